"""The data-parallel update under torchrun: `torchrun --nproc-per-node N -m feedloop.client.cli
train ...` (or `--nnodes` with a rendezvous across machines).

torchrun starts the N processes itself and tells each its place (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT in the environment, read by torch.distributed's env:// init). Rank 0 is the trainer,
exactly as with `--nproc` (trainer.distributed); every other rank serves update jobs and opens
neither the store nor the registry. Jobs go out by broadcast on a second gloo group whose
timeout is long, since the ranks wait there between rounds, however far apart; the updates'
own collectives keep dist_timeout_s.

A rank that dies fails the round (nothing published, the cursor kept), as with `--nproc`; but
a group torchrun formed cannot re-form from inside, so rank 0 then stops and exits 1, and
torchrun's agent restarts every rank (`--max-restarts`); the restarted trainer resumes from its
cursor and reads the same window again.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from feedloop.core.policy import Policy
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.distributed import (
    ProcessGroupRanks,
    RankFailed,
    collective,
    round_job,
    serve_jobs,
)
from feedloop.trainer.update import Algorithm, Experience, TrainingDiverged, UpdateResult

IDLE_TIMEOUT = datetime.timedelta(days=365)  # the ranks' wait for the next round


def join_group(config: TrainConfig) -> Any:
    """Join torchrun's group (env://); returns the group that carries the jobs."""
    dist.init_process_group(
        "gloo", init_method="env://", timeout=datetime.timedelta(seconds=config.dist_timeout_s)
    )
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def serve_as_worker(config: TrainConfig) -> int:
    """A rank other than 0: serve rank 0's update jobs until it says stop; the exit code."""
    jobs = join_group(config)

    def receive() -> bytes | None:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=jobs)
        return box[0]

    serve_jobs(config, receive)
    dist.destroy_process_group()
    return 0


class TorchrunDataParallel:
    """Rank 0's side under torchrun (the interface of trainer.distributed.DataParallel)."""

    def __init__(self, config: TrainConfig, on_failure: Callable[[], None]) -> None:
        self.jobs = join_group(config)
        self.world_size = dist.get_world_size()
        self.on_failure = on_failure  # the trainer stops: torchrun restarts every rank
        self.failed = False

    def update(
        self,
        algorithm: Algorithm[Any],
        policy: Policy,
        reference: Policy,
        experience: Experience,
        kl_coef: float,
        *,
        on_step: Callable[[int], None] | None = None,
    ) -> UpdateResult:
        if self.failed:
            raise RankFailed("the data-parallel group failed earlier: torchrun must restart it")
        job = round_job(policy, reference, experience, kl_coef)
        try:
            collective(lambda: dist.broadcast_object_list([job], src=0, group=self.jobs))
            return algorithm.update(
                policy, reference, experience, kl_coef, on_step=on_step, ranks=ProcessGroupRanks()
            )
        except TrainingDiverged:
            raise  # every rank raised it at the same step: the group is still in step
        except BaseException:
            self.failed = True
            self.on_failure()
            raise

    def close(self) -> None:
        if not self.failed:
            dist.broadcast_object_list([None], src=0, group=self.jobs)  # the ranks exit 0
        dist.destroy_process_group()
