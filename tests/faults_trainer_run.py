"""Run `feedloop train` (the real CLI, in this process) but freeze it at a chosen instant.

    python tests/faults_trainer_run.py --pause-at publish-copy --marker M -- --data-dir D ...

At the chosen instant the process writes the marker file and sleeps, so a test can SIGKILL it
exactly there instead of hoping a timer lands in a window a few milliseconds wide:
- mid-update: inside the policy update (the round's third stop check), nothing written yet;
- publish-copy: inside DirectoryRegistry.publish, after the first file was copied into the
  registry's staging folder and before the rename that would make the version exist;
- cursor-write: after the candidate was published and made live, before the trainer's cursor
  is written (the "publish done, cursor lost" crash).
Only the instant is injected; everything else is the shipped code path.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

PAUSES = ("mid-update", "publish-copy", "cursor-write")


def freeze(marker: Path) -> None:
    marker.write_text("paused\n")
    while True:  # until SIGKILL
        time.sleep(3600)


def install(pause_at: str, marker: Path) -> None:
    if pause_at == "mid-update":
        from feedloop.trainer.loop import Trainer

        original_check = Trainer._check_stop
        calls = [0]

        def check_stop(self: Any) -> None:
            calls[0] += 1
            if calls[0] == 3:
                freeze(marker)
            original_check(self)

        Trainer._check_stop = check_stop  # type: ignore[method-assign]
    elif pause_at == "publish-copy":
        original_copy = shutil.copyfile

        def copyfile(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
            result = original_copy(src, dst, *args, **kwargs)
            if "/.staging/" in str(dst):
                freeze(marker)
            return result

        shutil.copyfile = copyfile  # type: ignore[assignment]
    elif pause_at == "cursor-write":
        from feedloop.core.store.sqlite import SQLiteStore

        def set_cursor(self: Any, name: str, value: dict[str, Any]) -> None:
            freeze(marker)

        SQLiteStore.set_cursor = set_cursor  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown pause {pause_at!r}; one of {PAUSES}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pause-at", choices=PAUSES, required=True)
    parser.add_argument("--marker", type=Path, required=True)
    args, train_args = parser.parse_known_args()
    if train_args and train_args[0] == "--":
        train_args = train_args[1:]
    install(args.pause_at, args.marker)
    from feedloop.trainer.cli import main as train_main

    return train_main(["train", *train_args])


if __name__ == "__main__":
    sys.exit(main())
