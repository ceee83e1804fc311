"""The data-parallel update: `feedloop train --nproc N` runs each round's update on N processes.

Rank 0 is the trainer itself: it reads the window, builds the rewards, gates and publishes, as
with one process. Only the update is shared. Rank 0 hands each worker rank the round's job (the
policy to update, the reference, the experience, the KL coefficient) over a queue; then every
rank runs the same `Algorithm.update` loop (trainer.update) with `ProcessGroupRanks`, and the
workers' copies are dropped: rank 0's updated policy is the candidate.

How a step is shared, and why it equals one process: the losses see the policy through
`ShardedForward`, whose teacher-forced pass (the forward and backward through the GRU, where a
step's time goes) each rank computes for its slice of the minibatch's rows only; the slices'
outputs are all-gathered, so every rank computes the algorithm's loss on the whole minibatch,
exactly as one process does, whatever the loss (means over tokens, self-normalised importance
weights). Its gradient on one rank flows through that rank's rows alone, and the chain rule
splits the whole gradient over the rows: the sum over the ranks (one all-reduce per step, the
gradient bucket of DistributedDataParallel in one piece) is the whole minibatch's gradient.
Every rank then clips and steps alike. The minibatch order comes from one seeded generator,
and `prepare` (a no-grad pass over the window: advantages, whitening, baselines) runs whole on
every rank. Equal to one process up to float32 summation order: tests/test_trainer_update_ranks.py
and tests/test_trainer_distributed.py hold the parameters to 1e-5 after a round.

A rank that dies (or a collective that fails) fails the round: rank 0 raises RankFailed, the
trainer loop logs `round failed`, publishes nothing and keeps its cursor; the group is torn down
and the next round starts fresh workers on a fresh port. The backend is gloo: the policy trains
on CPU here, and NCCL reduces CUDA tensors only.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import multiprocessing
import os
import pickle
import signal
import socket
import sys
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Any, Protocol, cast

import torch
import torch.distributed as dist

from feedloop.core.errors import FeedloopError
from feedloop.core.policy import Policy, PolicyOutput, TokenBatch
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.update import Algorithm, Experience, TrainingDiverged, UpdateResult, select


class RankFailed(FeedloopError):
    """A data-parallel rank died or a collective failed: the round is lost, not the trainer."""


AllGather = Callable[[torch.Tensor], list[torch.Tensor]]


def row_slices(n: int, world_size: int) -> list[torch.Tensor]:
    """Each rank's rows of an n-row batch: world_size slices as equal as can be."""
    return list(torch.tensor_split(torch.arange(n), world_size))


class ShardedForward:
    """A policy whose teacher-forced pass is shared among the ranks (see the module's doc).

    Returns the whole batch's output on every rank; only this rank's rows carry gradients. A
    rank with no rows (a batch smaller than the world) computes the first row and sends it as
    padding, so that every rank's part has the same shape for the all-gather.
    """

    def __init__(self, policy: Policy, rank: int, world_size: int, all_gather: AllGather) -> None:
        self.policy = policy
        self.rank = rank
        self.world_size = world_size
        self.all_gather = all_gather

    def teacher_forced(self, batch: TokenBatch) -> PolicyOutput:
        slices = row_slices(int(batch.output_ids.shape[0]), self.world_size)
        mine = slices[self.rank]
        width = max(len(s) for s in slices)
        computed = mine if len(mine) else slices[0][:1]
        out = self.policy.teacher_forced(select(batch, computed))
        # logits (R, T, V) and values (R, T) in one tensor: one all-gather a forward pass
        packed = torch.cat([out.logits, out.values.unsqueeze(-1)], dim=-1).detach()
        padding = packed[:1].expand(width - len(packed), *packed.shape[1:])
        parts = self.all_gather(torch.cat([packed, padding]).contiguous())
        logits, values = [], []
        for rank, (part, rows) in enumerate(zip(parts, slices, strict=True)):
            if rank == self.rank:
                logits.append(out.logits[: len(rows)])
                values.append(out.values[: len(rows)])
            else:
                logits.append(part[: len(rows), :, :-1])
                values.append(part[: len(rows), :, -1])
        return PolicyOutput(torch.cat(logits), torch.cat(values))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)  # the rest of the policy's interface, unshared


class ProcessGroupRanks:
    """This process's rank in the default torch.distributed group."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def sharded(self, policy: Policy) -> Policy:
        # Duck-typed: the losses call teacher_forced, and anything else reaches the policy.
        return cast(Policy, ShardedForward(policy, self.rank, self.world_size, self._all_gather))

    def _all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        collective(lambda: dist.all_gather(parts, tensor))
        return parts

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        collective(lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM))
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def collective(call: Callable[[], object]) -> None:
    try:
        call()
    except (RuntimeError, ValueError) as exc:  # gloo: a peer closed its connection, a timeout
        reason = str(exc).splitlines()[0].split(". This is typically")[0]  # gloo's advice, cut
        raise RankFailed(f"data-parallel collective failed: {reason}") from exc


class SharedUpdate(Protocol):
    """An update shared with other ranks: DataParallel (spawned), TorchrunDataParallel."""

    def update(
        self,
        algorithm: Algorithm[Any],
        policy: Policy,
        reference: Policy,
        experience: Experience,
        kl_coef: float,
        *,
        on_step: Callable[[int], None] | None = None,
    ) -> UpdateResult: ...

    def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class RoundJob:
    """What a worker rank needs for one update: rank 0 sends it over the worker's queue."""

    policy: Policy
    reference: Policy
    experience: Experience
    kl_coef: float


def round_job(policy: Policy, reference: Policy, experience: Experience, kl_coef: float) -> bytes:
    """The job, pickled now (not by a queue's feeder thread later: rank 0 starts changing the
    policy in place at its first step)."""
    return pickle.dumps(RoundJob(policy, reference, experience, kl_coef))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    # A worker must not outlive the trainer: SIGKILL when the parent dies (Linux).
    if sys.platform == "linux":
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)


def _worker_main(
    rank: int,
    world_size: int,
    init_method: str,
    config: TrainConfig,
    timeout_s: float,
    jobs: Any,
) -> None:
    """A spawned worker rank: join the group, then serve rank 0's jobs from its queue."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when the workers stop
    torch.set_num_threads(config.torch_threads)
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    serve_jobs(config, jobs.get)
    dist.destroy_process_group()


def serve_jobs(config: TrainConfig, receive: Callable[[], bytes | None]) -> None:
    """A worker rank's life in the group: the update of every job rank 0 sends, until None."""
    from feedloop.trainer.algorithms import make_algorithm

    ranks = ProcessGroupRanks()
    algorithm = make_algorithm(config)
    while (payload := receive()) is not None:
        job: RoundJob = pickle.loads(payload)
        with contextlib.suppress(TrainingDiverged):  # raised on every rank alike: next job
            algorithm.update(job.policy, job.reference, job.experience, job.kl_coef, ranks=ranks)


class DataParallel:
    """Rank 0's side of the data-parallel update: the worker ranks, started on first use and
    started afresh after a failed round."""

    def __init__(self, config: TrainConfig, nproc: int, *, timeout_s: float = 300.0) -> None:
        if nproc < 2:
            raise ValueError("nproc: a data-parallel update needs at least 2 processes")
        self.config = config
        self.nproc = nproc
        self.timeout_s = timeout_s  # a rank silent this long in a collective fails the round
        self.workers: list[BaseProcess] = []
        self.queues: list[Any] = []
        self.groups_started = 0

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        for rank in range(1, self.nproc):
            jobs = context.Queue()
            worker = context.Process(
                target=_worker_main,
                args=(rank, self.nproc, init_method, self.config, self.timeout_s, jobs),
                name=f"feedloop-train-rank{rank}",
                daemon=True,
            )
            worker.start()
            self.workers.append(worker)
            self.queues.append(jobs)
        try:
            dist.init_process_group(
                "gloo",
                init_method=init_method,
                rank=0,
                world_size=self.nproc,
                timeout=datetime.timedelta(seconds=self.timeout_s),
            )
        except (RuntimeError, ValueError) as exc:
            self.close()
            raise RankFailed(f"the data-parallel group did not form: {exc}") from exc
        self.groups_started += 1

    @property
    def worker_pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.pid is not None]

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
        """`algorithm.update` on every rank; rank 0's policy is updated in place."""
        if any(not w.is_alive() for w in self.workers):
            self.close()  # a rank died between rounds: this round starts a fresh group
        if not self.workers:
            self._start()
        job = round_job(policy, reference, experience, kl_coef)
        try:
            for jobs in self.queues:
                jobs.put(job)
            return algorithm.update(
                policy, reference, experience, kl_coef, on_step=on_step, ranks=ProcessGroupRanks()
            )
        except TrainingDiverged:
            raise  # every rank raised it at the same step: the group is still in step
        except BaseException:
            self.close()  # ranks left mid-collective: only a fresh group is in a known state
            raise

    def close(self) -> None:
        """Stop the workers and leave the group (a worker stuck in a collective is killed)."""
        for jobs, worker in zip(self.queues, self.workers, strict=True):
            if worker.is_alive():
                with contextlib.suppress(Exception):
                    jobs.put(None)
        for worker in self.workers:
            worker.join(timeout=2.0)
            if worker.is_alive() and worker.pid is not None:
                os.kill(worker.pid, signal.SIGKILL)
                worker.join(timeout=10.0)
        for jobs in self.queues:
            jobs.cancel_join_thread()
            jobs.close()
        self.workers, self.queues = [], []
        if dist.is_initialized():
            dist.destroy_process_group()
