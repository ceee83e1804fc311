"""Write requirements.lock: every package `pip install -e '.[dev]'` brings in, at one exact version.

    .venv/bin/python tools/lock.py            # re-resolve, keeping what is locked, and rewrite
    .venv/bin/python tools/lock.py --upgrade  # the newest of everything, torch held where it is
    .venv/bin/python tools/lock.py --check    # the venv holds exactly the locked packages

`[dev]` includes `[demo]`, which includes `[serve]`, `[train]` and `[core]`, so one resolution
covers the runtime, the demo and the development tools. pip resolves without installing
(`install --dry-run --ignore-installed --report`), against the indexes pip is configured with,
for the interpreter running this script: the lock is for CPython 3.11 on Linux x86_64, and the
script refuses to write one anywhere else rather than write a lock for another platform.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
PROJECT = "feedloop"
TARGET = "CPython 3.11 on Linux x86_64"
# What a fresh venv brings along by itself; the lock constrains them only where a dependency
# asks for them.
INSTALLER_PACKAGES = {"pip", "setuptools", "wheel"}

HEADER = f"""\
# requirements.lock: every package `pip install -e '.[dev]'` installs (runtime, demo and
# development tools), each at one exact version, for {TARGET}.
# Used as constraints: pip install -c requirements.lock -e '.[dev]'   (or '.[demo]', '.')
# torch is the CPU build (a local version, +cpu): these machines have its wheel on disk; elsewhere
# add PyTorch's CPU wheel index with --extra-index-url.
# Written by `.venv/bin/python tools/lock.py` after a change to pyproject.toml's dependencies;
# audited by `.venv/bin/python tools/audit.py`. Do not edit by hand.
"""


def canonical(name: str) -> str:
    """The PEP 503 form of a distribution name: `PyYAML` and `pyyaml` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """`{canonical name: version}` from a lock file's `name==version` lines."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, separator, version = line.partition("==")
        if not separator or not name.strip() or not version.strip():
            raise ValueError(f"{path.name} line {number}: expected name==version, got {raw!r}")
        pins[canonical(name.strip())] = version.strip()
    return pins


# pyproject allows a range of torch (an app brings its own); the lock holds the CPU build these
# machines have on disk, which a free resolution would leave for the newest release.
HELD = ("torch",)


def held_pins(
    locked: dict[str, str], upgrade: bool, released: Sequence[str] = ()
) -> dict[str, str]:
    """The pins a resolution keeps: every locked one but those released, or with upgrade only
    HELD's."""
    free = {canonical(name) for name in released}
    return {
        n: v for n, v in locked.items() if (n in HELD if upgrade else n not in free) or n in HELD
    }


def resolve(keep: dict[str, str]) -> dict[str, str]:
    """What pip would install into an empty environment for `-e '.[dev]'`, by canonical name,
    with the versions in keep as constraints (they bind only packages something requires)."""
    with tempfile.TemporaryDirectory() as scratch:
        report_path = Path(scratch) / "report.json"
        constraints = Path(scratch) / "keep.txt"
        constraints.write_text("".join(f"{n}=={v}\n" for n, v in sorted(keep.items())))
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
             "--report", str(report_path), "-c", str(constraints), "-e", f"{ROOT}[dev]"],
            check=True,
        )  # fmt: skip
        report = json.loads(report_path.read_text(encoding="utf-8"))
    pins = {
        canonical(item["metadata"]["name"]): item["metadata"]["version"]
        for item in report["install"]
    }
    pins.pop(PROJECT, None)
    return pins


def write_lock(pins: dict[str, str], path: Path = LOCK) -> None:
    lines = [f"{name}=={pins[name]}" for name in sorted(pins)]
    path.write_text(HEADER + "\n" + "\n".join(lines) + "\n", encoding="utf-8")


def installed() -> dict[str, str]:
    """The distributions this interpreter sees, by canonical name."""
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}


def differences(locked: dict[str, str], present: dict[str, str]) -> list[str]:
    """How an environment departs from the lock: missing, other versions, unlocked extras."""
    problems = [
        f"{name}: locked {version}, installed {present.get(name, 'nothing')}"
        for name, version in sorted(locked.items())
        if present.get(name) != version
    ]
    ignored = INSTALLER_PACKAGES | {PROJECT}
    problems += [
        f"{name}: installed {version}, not in the lock"
        for name, version in sorted(present.items())
        if name not in locked and name not in ignored
    ]
    return problems


def on_target() -> bool:
    return (
        platform.python_implementation() == "CPython"
        and sys.version_info[:2] == (3, 11)
        and sys.platform == "linux"
        and platform.machine() == "x86_64"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare this interpreter's installed packages with the lock instead of writing it",
    )
    parser.add_argument(
        "--upgrade",
        action="store_true",
        help="resolve every package afresh (torch stays at its locked version); by default "
        "the locked versions are kept and only what pyproject.toml adds or removes changes",
    )
    parser.add_argument(
        "--upgrade-package",
        action="append",
        default=[],
        metavar="NAME",
        help="resolve this package afresh, keep the others (repeatable)",
    )
    args = parser.parse_args()

    if args.check:
        locked = read_lock()
        problems = differences(locked, installed())
        for problem in problems:
            print(f"  {problem}")
        verdict = "differs from" if problems else "matches"
        print(f"lock: the environment {verdict} requirements.lock ({len(locked)} pins)")
        return 1 if problems else 0

    if not on_target():
        here = f"{platform.python_implementation()} {platform.python_version()}"
        print(
            f"tools/lock.py writes the lock for {TARGET}; this is {here} "
            f"on {sys.platform} {platform.machine()}",
            file=sys.stderr,
        )
        return 2
    before = read_lock() if LOCK.exists() else {}
    pins = resolve(held_pins(before, args.upgrade, args.upgrade_package))
    write_lock(pins)
    changed = sorted(
        f"{name} {before.get(name, '-')} -> {pins.get(name, '-')}"
        for name in before.keys() | pins.keys()
        if before.get(name) != pins.get(name)
    )
    for change in changed:
        print(f"  {change}")
    print(f"lock: {len(pins)} packages written to requirements.lock, {len(changed)} changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
