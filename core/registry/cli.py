"""`feedloop registry`: model registry tools. `prune` applies retention (the trainer also does,
after each publish); `--dry-run` shows what it would delete and changes nothing.

Exit codes: 0 done, 1 the registry could not be read or changed, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from feedloop.core.config import (
    add_config_flags,
    config_from_args,
    default_data_dir,
    is_postgres_url,
)
from feedloop.core.errors import ConfigError, FeedloopError
from feedloop.core.registry.factory import open_registry
from feedloop.core.registry.retention import PrunePlan, RetentionPolicy
from feedloop.core.tool_cli import ToolParser, UsageError, parse_command

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
_DEFAULTS = RetentionPolicy()

EXAMPLES = """\
examples:
  feedloop registry prune --dry-run                 # what retention would delete, nothing changes
  feedloop registry prune --registry-keep-last 10   # the embedded registry, keeping 10 newest
  feedloop registry prune --registry 'postgresql://feedloop@db/feedloop?schema=prod' --json

Live, the trial, pinned versions (`feedloop models pin`), the rollback stack's newest, the KL
leash's reference, the newest and the best by recorded evaluation keep their weights; the rest's
weights are deleted, their manifests and decisions stay. The same FEEDLOOP_REGISTRY_KEEP_*
variables configure the trainer's retention after each publish.
"""


@dataclass(frozen=True)
class RegistryToolConfig:
    """Where the registry is and what retention keeps: the trainer's keys of the same names."""

    data_dir: Path = field(
        default_factory=default_data_dir,
        metadata={"help": "feedloop's data directory (holds the embedded registry)"},
    )
    registry: str | None = field(
        default=None,
        metadata={
            "help": "model registry: directory or postgresql:// URL (unset: DATA_DIR/registry)"
        },
    )
    registry_keep_last: int = field(
        default=_DEFAULTS.keep_last, metadata={"help": "newest published versions kept"}
    )
    registry_keep_best: int = field(
        default=_DEFAULTS.keep_best,
        metadata={"help": "versions with the best off-policy value recorded by the gate, kept"},
    )
    registry_keep_rollback: int = field(
        default=_DEFAULTS.keep_rollback,
        metadata={"help": "earlier live versions (the rollback stack, newest first) kept"},
    )
    reference_version: str | None = field(
        default=None,
        metadata={
            "help": "the trainer's configured KL reference, kept (unset: the root of the live "
            "version's lineage, always kept)"
        },
    )

    def registry_location(self) -> str:
        return self.registry or str(self.data_dir / "registry")

    def policy(self) -> RetentionPolicy:
        return RetentionPolicy(
            keep_last=self.registry_keep_last,
            keep_best=self.registry_keep_best,
            keep_rollback=self.registry_keep_rollback,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = ToolParser(prog="feedloop registry", description="Model registry tools.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ToolParser)
    prune = commands.add_parser(
        "prune",
        help="delete the weights of versions retention does not keep",
        description="Delete the weights of the registry versions retention does not keep.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prune.add_argument("--config", metavar="FILE", help="TOML config file ([registry] table)")
    add_config_flags(prune, RegistryToolConfig)
    prune.add_argument("--dry-run", action="store_true", help="show the plan, delete nothing")
    prune.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def plan_text(plan: PrunePlan, dry_run: bool, size_bytes: int) -> str:
    label = "would prune" if dry_run else "pruned"
    lines = [f"  {'keep':<11}  {v}  ({', '.join(why)})" for v, why in plan.keep.items()]
    lines += [f"  {label:<11}  {v}" for v in plan.prune]
    lines.append(
        f"{label} {len(plan.prune)} versions, kept {len(plan.keep)}; the registry holds "
        f"{size_bytes / 1e6:.1f} MB of checkpoints"
    )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parse_command(parser, argv)
        config = config_from_args(RegistryToolConfig, args, section="registry")
        policy = config.policy()
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except (ConfigError, ValueError) as exc:
        print(f"feedloop registry {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    location = config.registry_location()
    if not is_postgres_url(location) and not Path(location).is_dir():
        print(f"feedloop registry prune: no registry at {location}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        registry = open_registry(location)
        try:
            plan = registry.prune(
                policy,
                reference=config.reference_version,
                dry_run=args.dry_run,
                reason="feedloop registry prune",
            )
            size_bytes = registry.size_bytes()
        finally:
            registry.close()
    except (FeedloopError, OSError) as exc:
        print(f"feedloop registry prune: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        doc = {
            "dry_run": args.dry_run,
            "keep": {v: list(why) for v, why in plan.keep.items()},
            "prune": list(plan.prune),
            "size_bytes": size_bytes,
        }
        print(json.dumps(doc, indent=2))
    else:
        print(plan_text(plan, args.dry_run, size_bytes))
    return EXIT_OK
