"""Child processes of the demo (and of tests): `feedloop serve` / `feedloop train` subprocesses.

Each child runs in its own process group, writes its logs to a file, and announces itself with
one start-up line on stdout (`feedloop serve: listening grpc=HOST:PORT metrics=HOST:PORT ...`),
parsed here into key=value pairs. Stopping is SIGTERM to the group, a grace period, then
SIGKILL, then wait: nothing is left behind. On Linux a child also gets SIGKILL if its parent
dies without cleaning up (PR_SET_PDEATHSIG), so even `kill -9` of the demo leaves no orphan.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


class ChildStartupError(RuntimeError):
    """A child did not start: it exited, or printed no start-up line in time."""


def parse_banner(line: str) -> dict[str, str]:
    """`feedloop serve: listening grpc=a:1 live=v0001` -> {"grpc": "a:1", "live": "v0001"}."""
    _, _, rest = line.partition(":")
    pairs = (word.partition("=") for word in rest.split())
    return {key: value for key, sep, value in pairs if sep}


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel for SIGKILL when the parent dies.
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


@dataclass
class Child:
    name: str
    process: subprocess.Popen[str]
    banner: dict[str, str]
    log_path: Path
    stdout_lines: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = 15.0) -> int:
        """SIGTERM the child's process group, wait up to grace_s, then SIGKILL; its exit code."""
        if self.alive():
            _signal_group(self.process, signal.SIGTERM)
            try:
                return self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(self.process, signal.SIGKILL)  # stragglers in the group, if any
        return self.process.wait(timeout=30)


def _signal_group(process: subprocess.Popen[str], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def process_tree(pid: int) -> list[int]:
    """pid and every live process below it (Linux /proc): a server, its fork server and the
    model process forked from that. Exited (zombie) processes are left out."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if fields[0] != "Z":
            parents[int(entry)] = int(fields[1])
    found = [pid] if pid in parents else []
    frontier = set(found)
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found.extend(sorted(frontier))
    return found


def feedloop_command(*args: str) -> list[str]:
    """The `feedloop ...` command line run with this interpreter (works without PATH)."""
    return [sys.executable, "-m", "feedloop.client.cli", *args]


SERVE_BANNER = "feedloop serve: listening"


def start_server(
    data_dir: Path,
    *extra_args: str,
    log_path: Path,
    name: str = "server",
    timeout_s: float = 120.0,
) -> Child:
    """`feedloop serve` over data_dir on free loopback ports, once its start-up line is out."""
    argv = feedloop_command(
        "serve", "--port", "0", "--metrics-port", "0", "--data-dir", str(data_dir), *extra_args
    )
    return start_child(
        name, argv, log_path=log_path, banner_prefix=SERVE_BANNER, timeout_s=timeout_s
    )


def start_child(
    name: str,
    argv: list[str],
    *,
    log_path: Path,
    banner_prefix: str,
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
    die_with_parent: bool = True,
) -> Child:
    """Start argv and wait for its stdout line starting with banner_prefix.

    die_with_parent=False leaves out the PR_SET_PDEATHSIG request, which runs Python in the
    child between fork and exec: from a process whose other threads are busy in gRPC that
    child can crash (SIGSEGV in threading's after-fork handler) before it execs. The caller
    must then stop the child itself.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 (the child keeps it)
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=log_file,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: stopped as a whole, not by Ctrl-C
        preexec_fn=_die_with_parent if die_with_parent and sys.platform == "linux" else None,
    )
    log_file.close()  # the child holds its own descriptor
    lines: queue.Queue[str | None] = queue.Queue()
    child = Child(name, process, {}, log_path)

    def pump() -> None:
        # Reads stdout for the whole life of the child so its pipe never fills and blocks it.
        assert process.stdout is not None
        for line in process.stdout:
            child.stdout_lines.append(line.rstrip("\n"))
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, name=f"{name}-stdout", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while True:
        remaining_s = deadline - time.monotonic()
        try:
            line = lines.get(timeout=max(remaining_s, 0.01))
        except queue.Empty:
            child.stop(grace_s=5.0)
            raise ChildStartupError(
                f"{name} printed no start-up line within {timeout_s:g}s; log {log_path}:\n"
                f"{child.log_tail()}"
            ) from None
        if line is None:
            code = process.wait(timeout=30)
            raise ChildStartupError(
                f"{name} exited with code {code} before starting; log {log_path}:\n"
                f"{child.log_tail()}"
            )
        if line.startswith(banner_prefix):
            child.banner = parse_banner(line)
            return child
