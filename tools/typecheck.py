"""Type-check feedloop as it is imported: `feedloop.core`, `feedloop.server`, ... as one package.

    .venv/bin/python tools/typecheck.py [extra mypy flags]

The installed package maps `feedloop.core` to core/, `feedloop.server` to server/ and so on
(pyproject's package-dir), through an editable-install import hook that mypy cannot follow. Run
on the folders (`mypy core server ...`), mypy finds no `feedloop.core` and, with
ignore_missing_imports, types every cross-module import as Any: a call with the wrong argument
type from server/ into core/ passes unseen. This lays the folders out as the installed package
(symlinks in a scratch directory: `feedloop/core -> core`, ...) and checks that package, so
every import resolves to the real module. mypy's messages name the repository's paths.
Exit status: mypy's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# feedloop.<name> -> folder, as pyproject's package-dir maps them.
SUBPACKAGES = {name: name for name in ("core", "server", "trainer", "client", "demo")}
PROTO = ROOT / "proto" / "feedloop"  # the package itself: __init__, v1 (generated), py.typed


def layout(scratch: Path) -> Path:
    package = scratch / "feedloop"
    package.mkdir()
    for entry in PROTO.iterdir():
        (package / entry.name).symlink_to(entry)
    for name, folder in SUBPACKAGES.items():
        (package / name).symlink_to(ROOT / folder)
    return package


def repository_paths(text: str) -> str:
    """feedloop/core/x.py -> core/x.py, feedloop/v1/... -> proto/feedloop/v1/..."""
    names = "|".join(SUBPACKAGES)
    text = re.sub(rf"^feedloop/({names})/", lambda m: f"{SUBPACKAGES[m[1]]}/", text, flags=re.M)
    return re.sub(r"^feedloop/", "proto/feedloop/", text, flags=re.M)


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="feedloop-types-") as tmp:
        layout(Path(tmp))
        command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")]
        command += ["--cache-dir", str(ROOT / ".mypy_cache" / "package")]
        for name in SUBPACKAGES:
            command += ["-p", f"feedloop.{name}"]
        done = subprocess.run(
            [*command, *argv],
            cwd=tmp,
            capture_output=True,
            text=True,
            env={**os.environ, "MYPYPATH": tmp},
        )
    sys.stdout.write(repository_paths(done.stdout))
    sys.stderr.write(done.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
