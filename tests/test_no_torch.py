"""The base install is the client: feedloop.client needs grpcio, protobuf and grpcio-health-checking
(generated code over those two), never torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

BLOCKED = (
    "torch",
    "numpy",
    "feedloop.core",
    "feedloop.server",
    "feedloop.trainer",
    "feedloop.demo",
    "grpc_reflection",
    "prometheus_client",
    "rich",
    "matplotlib",
)

IMPORT_CHECK = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = {blocked!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"blocked import of {{name}}")
            return None

    sys.meta_path.insert(0, Block())
    import feedloop.client
    import feedloop.client.commands
    from feedloop.client import AsyncFeedloopClient, FeedloopClient, FeedloopClientError
    from feedloop.client.cli import main
    for command in ("generate", "feedback", "models", "status", "set-live", "rollback",
                    "human-eval"):
        try:
            main([command, "--help"])
        except SystemExit:
            pass
    leaked = sorted(n for n in sys.modules if any(n == b or n.startswith(b + ".") for b in BLOCKED))
    assert not leaked, leaked
    print("client imports without torch")
    """
)


def test_client_and_its_commands_import_with_torch_and_numpy_blocked():
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK.format(blocked=BLOCKED)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "client imports without torch" in result.stdout


CONSOLE_CHECK = IMPORT_CHECK.replace(
    "import feedloop.client\n",
    "import feedloop.client\nimport feedloop.console.cli\n"
    "from feedloop.console.app import build_app\n"
    "from feedloop.console.config import ConsoleConfig\nbuild_app(ConsoleConfig())\n",
)


def test_console_imports_with_torch_and_numpy_blocked():
    """The console is a client: with its extra (aiohttp) it runs where torch is not installed."""
    # CI's venv at the client's dependency floors has the client alone, not the console extra.
    pytest.importorskip("aiohttp", reason="the console extra (aiohttp) is not installed")
    assert CONSOLE_CHECK != IMPORT_CHECK
    result = subprocess.run(
        [sys.executable, "-c", CONSOLE_CHECK.format(blocked=BLOCKED)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "client imports without torch" in result.stdout


@pytest.mark.slow
def test_plain_pip_install_of_the_base_package_gives_a_working_client(tmp_path):
    """A fresh venv (no system site-packages), `pip install .` with no extras: no torch, and
    the client and `feedloop --help` work. pip reads the machine's configured (offline) index."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.util, feedloop.client; "
            "print(importlib.util.find_spec('torch') is None, "
            "importlib.util.find_spec('numpy') is None)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["True", "True"]  # neither was installed
    check = subprocess.run(
        [str(python), "-c", IMPORT_CHECK.format(blocked=BLOCKED)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert check.returncode == 0, check.stderr
    helped = subprocess.run(
        [str(env_dir / "bin" / "feedloop"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert helped.returncode == 0 and "generate" in helped.stdout
    served = subprocess.run(
        [str(env_dir / "bin" / "feedloop"), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert served.returncode == 2 and "pip install 'feedloop[serve]'" in served.stderr
