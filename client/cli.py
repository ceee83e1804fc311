"""The `feedloop` command: one entry point that hands each subcommand to the part that owns it.

Client commands (generate, feedback, models, status, ...) need only grpcio and protobuf. Server,
trainer and pretraining commands import torch, so they are loaded only when asked for; without
the matching extra installed they say which one to install instead of failing with a traceback.
"""

from __future__ import annotations

import importlib
import sys

# name: (module with a `main(argv) -> int`, extra that provides it, one-line summary)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "generate": ("feedloop.client.commands", "", "ask the server for phrases"),
    "feedback": (
        "feedloop.client.commands",
        "",
        "send a rating, ranking, comparison or correction",
    ),
    "models": ("feedloop.client.commands", "", "list model versions and registry decisions"),
    "status": ("feedloop.client.commands", "", "show a server's live version and counters"),
    "set-live": ("feedloop.client.commands", "", "make a published version live"),
    "rollback": ("feedloop.client.commands", "", "make the previously live version live again"),
    "canary": (
        "feedloop.client.commands",
        "",
        "run a version on trial beside live, then promote or roll it back",
    ),
    "trainer": ("feedloop.client.commands", "", "pause or resume the trainer's publication"),
    "online-report": (
        "feedloop.client.commands",
        "",
        "online reward by version, with confidence intervals",
    ),
    "human-eval": (
        "feedloop.client.commands",
        "",
        "human evaluation of two versions: win rate with its interval, per rater",
    ),
    "console": (
        "feedloop.console.cli",
        "console",
        "the rating and evaluation console for people (a web app)",
    ),
    "serve": ("feedloop.server.cli", "serve", "run the gRPC server"),
    "train": ("feedloop.trainer.cli", "train", "run the trainer (RL from stored feedback)"),
    "pretrain": ("feedloop.core.cli", "core", "supervised pretraining of a policy on a corpus"),
    "sample": ("feedloop.core.cli", "core", "print sample generations from a checkpoint"),
    "store": (
        "feedloop.core.store.cli",
        "core",
        "replay store tools (export, erase, prune, backup)",
    ),
    "export": (
        "feedloop.core.export_cli",
        "core",
        "feedback as training datasets: preference pairs, KTO, SFT (JSONL, Parquet)",
    ),
    "registry": ("feedloop.core.registry.cli", "core", "model registry tools (prune)"),
    "demo": ("feedloop.demo.cli", "demo", "the whole loop, end to end, with simulated users"),
}

EXIT_USAGE = 2


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: feedloop COMMAND [options]",
        "",
        "Serve a generative policy over gRPC and improve it online from its users' feedback.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, _, summary) in COMMANDS.items()]
    lines += ["", "Run `feedloop COMMAND --help` for a command's options and examples."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        return dispatch(sys.argv[1:] if argv is None else argv)
    except BrokenPipeError:
        # The reader went away (`feedloop models | head`): not an error worth a traceback.
        sys.stderr.close()
        return 0


def dispatch(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else EXIT_USAGE
    if args[0] == "--version":
        from feedloop import __version__

        print(f"feedloop {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"feedloop: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return EXIT_USAGE
    module_name, extra, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if extra and exc.name and not exc.name.startswith("feedloop"):
            print(
                f"feedloop {name}: needs the '{extra}' extra ({exc.name} is not installed): "
                f"pip install 'feedloop[{extra}]'",
                file=sys.stderr,
            )
            return EXIT_USAGE
        raise
    try:
        return int(module.main([name, *rest]) or 0)
    except KeyboardInterrupt:
        print(f"feedloop {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
