"""`feedloop train`: the trainer as its own process.

    feedloop train --store replay.sqlite3 --registry registry/ --metrics-port 9466
    feedloop train --once --algorithm reinforce      # one round, then exit (cron, tests)
    feedloop train --nproc 4                         # each update data-parallel on 4 processes
    torchrun --nproc-per-node 4 -m feedloop.client.cli train ...   # the same, ranks by torchrun

Prints one line when ready (`feedloop train: metrics=HOST:PORT store=... registry=...`), then
one line per round. SIGTERM or SIGINT abandons the round in progress at its next step boundary
(nothing of it is kept; the cursor stays) and exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from feedloop.core.config import add_config_flags, config_from_args
from feedloop.core.errors import FeedloopError
from feedloop.core.logs import configure_logging

if TYPE_CHECKING:
    from feedloop.core.registry import ModelRegistry
    from feedloop.trainer.config import TrainConfig

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    from feedloop.trainer.config import TrainConfig

    parser = argparse.ArgumentParser(
        prog="feedloop train",
        description="Improve the live policy from stored feedback: read, reward, update "
        "(actor-critic or reinforce), gate, publish.",
        epilog="Every option can also come from FEEDLOOP_<NAME> or the [train] table of --config.",
    )
    parser.add_argument("--config", type=Path, default=None, help="TOML config file")
    parser.add_argument("--once", action="store_true", help="run one round and exit")
    add_config_flags(parser, TrainConfig)
    return parser


def lora_refusal(config: TrainConfig, registry: ModelRegistry) -> str | None:
    """Why --lora-rank cannot train on this registry's live version (None: it can, or LoRA is
    off, or nothing is live yet): said at startup, where each round would only fail on it."""
    from feedloop.core.checkpoint import HF_ARCHITECTURE, LORA_ARCHITECTURE

    live = registry.live()
    if not config.lora_rank or live is None:
        return None
    architecture = registry.manifest(live).architecture
    if architecture in (HF_ARCHITECTURE, LORA_ARCHITECTURE):
        return None
    return (
        f"--lora-rank {config.lora_rank} trains adapters over a Hugging Face causal LM "
        f"({HF_ARCHITECTURE}); the live version {live} is {architecture}: publish one "
        "(feedloop pretrain --architecture hf-causal-lm, or serve --policy DIR) or leave "
        "--lora-rank at 0"
    )


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv[1:])
    import torch

    from feedloop.core.registry import open_registry
    from feedloop.core.store import open_store
    from feedloop.trainer.config import TrainConfig
    from feedloop.trainer.distributed import DataParallel
    from feedloop.trainer.loop import Trainer
    from feedloop.trainer.metrics import TrainerMetrics
    from feedloop.trainer.torchrun import TorchrunDataParallel

    try:
        config = config_from_args(TrainConfig, args, section="train")
    except FeedloopError as exc:
        print(f"feedloop train: {exc}", file=sys.stderr)
        return EXIT_USAGE
    torch.set_num_threads(config.torch_threads)
    if config.nice:
        os.nice(config.nice)  # the process's own priority: the server's requests go first
    # torchrun tells each process its rank in the environment (its contract, read here at
    # the edge); rank 0 is the trainer, the others only serve its update jobs.
    torchrun_world = int(os.environ.get("WORLD_SIZE", "1"))
    if torchrun_world > 1 and config.nproc > 1:
        print("feedloop train: --nproc spawns ranks; under torchrun leave it 1", file=sys.stderr)
        return EXIT_USAGE
    if torchrun_world > 1 and int(os.environ.get("RANK", "0")) != 0:
        from feedloop.trainer.torchrun import serve_as_worker

        return serve_as_worker(config)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        store = open_store(config.store_location)
        registry = open_registry(config.registry_location)
    except FeedloopError as exc:
        print(f"feedloop train: {exc}", file=sys.stderr)
        return 1
    refusal = lora_refusal(config, registry)
    if refusal is not None:
        print(f"feedloop train: {refusal}", file=sys.stderr)
        store.close()
        registry.close()
        return EXIT_USAGE
    metrics = TrainerMetrics()
    metrics.gate_max_kl.set(config.gate_max_kl)  # alert rules compare the KL against it
    try:
        host, port = metrics.serve(config.metrics_host, config.metrics_port)
    except OSError as exc:
        print(
            f"feedloop train: cannot serve metrics on {config.metrics_host}:"
            f"{config.metrics_port}: {exc}",
            file=sys.stderr,
        )
        return 1
    print(
        f"feedloop train: metrics={host}:{port} store={config.store_location} "
        f"registry={config.registry_location} algorithm={config.algorithm} "
        f"nproc={max(config.nproc, torchrun_world)}",
        flush=True,
    )
    # Round and decision lines are log records (round, version, outcome as fields in JSON); in
    # text they read as before, on stdout, where the start line is too.
    configure_logging(
        config.log_level,
        config.log_format,
        stream=sys.stdout,
        text_format="feedloop train: %(message)s",
    )
    # Rank 0 is this process; the other ranks are spawned at the first update, or torchrun's.
    data_parallel: DataParallel | TorchrunDataParallel | None = None
    if torchrun_world > 1:
        data_parallel = TorchrunDataParallel(config, on_failure=stop.set)
    elif config.nproc > 1:
        data_parallel = DataParallel(config, config.nproc, timeout_s=config.dist_timeout_s)
    trainer = Trainer(
        config,
        store,
        registry,
        metrics=metrics,
        stop=stop,
        log=lambda _: None,
        data_parallel=data_parallel,
    )
    try:
        code = trainer.run(once=args.once)
    finally:
        if data_parallel is not None:
            data_parallel.close()
        store.close()
        registry.close()
    if isinstance(data_parallel, TorchrunDataParallel) and data_parallel.failed:
        print("feedloop train: a rank failed; exiting for torchrun to restart them", flush=True)
        return 1
    if stop.is_set():
        print("feedloop train: stopped", flush=True)
    return code
