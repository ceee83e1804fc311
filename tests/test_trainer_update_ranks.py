"""The update loop on data-parallel ranks takes the same steps as on one process.

Two ranks run here as two threads whose sums go through a barrier (the same `Ranks` interface
torch.distributed's ranks implement in trainer.distributed), so the loop's data-parallel
arithmetic is checked in a second, without spawning processes; tests/test_trainer_distributed.py
runs it on real gloo ranks.
"""

from __future__ import annotations

import copy
import random
import threading
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from trainer_support import one_torch_thread

from feedloop.core.checkpoint import load_checkpoint
from feedloop.core.policy import Policy, PolicyOutput, TokenBatch, token_logprobs
from feedloop.trainer.algorithms import make_algorithm
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.distributed import ShardedForward, row_slices
from feedloop.trainer.update import Experience, OneProcess, UpdateResult

__all__ = ["one_torch_thread"]

# float32 sums in another order (two half-minibatch gradients against one whole): the
# parameters after the round agree to this, the figures to rel 1e-4.
PARAMETER_ATOL = 1e-5


class Exchange:
    """What the ranks' collectives share: each sum waits for every rank, adds in rank order."""

    def __init__(self, world_size: int) -> None:
        self.barrier = threading.Barrier(world_size, timeout=60)
        self.slots: list[list[torch.Tensor]] = [[] for _ in range(world_size)]

    def sum(self, rank: int, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        self.slots[rank] = tensors
        self.barrier.wait()
        total = [torch.stack(parts).sum(dim=0) for parts in zip(*self.slots, strict=True)]
        self.barrier.wait()
        return total


class ThreadRanks:
    def __init__(self, rank: int, world_size: int, exchange: Exchange) -> None:
        self.rank, self.world_size, self.exchange = rank, world_size, exchange
        self.rows: list[int] = []  # the rows this rank's teacher-forced passes computed

    def sharded(self, policy: Policy) -> Policy:
        def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
            parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
            parts[self.rank] = tensor
            # a sum of one-hot parts is an all-gather
            return self.exchange.sum(self.rank, parts)

        sharded = ShardedForward(policy, self.rank, self.world_size, all_gather)
        forward = sharded.teacher_forced

        def counted(batch: TokenBatch) -> PolicyOutput:
            mine = row_slices(int(batch.output_ids.shape[0]), self.world_size)[self.rank]
            self.rows.append(len(mine))
            return forward(batch)

        sharded.teacher_forced = counted  # type: ignore[method-assign]
        return cast(Policy, sharded)

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        grads = [p.grad for p in parameters if p.grad is not None]
        for grad, total in zip(grads, self.exchange.sum(self.rank, grads), strict=True):
            grad.copy_(total)


def experience(policy: Policy, n: int, *, corrections: int = 8) -> Experience:
    """n logged rows as a round has them: outputs of 1 to 6 tokens, behaviour log-probs near
    the policy's own, client weights between 0.5 and 1.5, and a few corrections."""
    rng = random.Random(7)
    vocab = policy.tokenizer.vocab_size
    words = ["ocean", "hills", "river", "night", "garden", "little"]

    def outputs(count: int) -> list[list[int]]:
        return [[rng.randrange(4, vocab) for _ in range(rng.randint(1, 6))] for _ in range(count)]

    prompts = [policy.encode_prompt(rng.choice(words)) for _ in range(n)]
    batch = TokenBatch.from_lists(prompts, outputs(n))
    fixes = [policy.encode_prompt(rng.choice(words)) for _ in range(corrections)]
    noise = torch.Generator().manual_seed(3)
    with torch.no_grad():
        logged = token_logprobs(policy.teacher_forced(batch).logits, batch.output_ids)
    return Experience(
        batch,
        (logged + 0.3 * torch.randn(logged.shape, generator=noise)) * batch.output_mask,
        torch.rand(n, generator=noise) * 2 - 1,
        0.5 + torch.rand(n, generator=noise),
        TokenBatch.from_lists(fixes, outputs(corrections)) if corrections else None,
        0.5 + torch.rand(corrections, generator=noise) if corrections else None,
    )


@pytest.fixture
def policy(tiny_checkpoint: Path) -> Policy:
    return load_checkpoint(tiny_checkpoint)[0]


def config(tmp_path: Path, **overrides: Any) -> TrainConfig:
    values: dict[str, Any] = dict(
        data_dir=tmp_path,
        minibatch_size=8,
        epochs=2,
        max_updates_per_round=100,
        target_approx_kl=10.0,
        learning_rate=3e-3,
        correction_loss_weight=0.5,
    )
    values.update(overrides)
    return TrainConfig(**values)


def on_ranks(
    cfg: TrainConfig, policy: Policy, exp: Experience, world_size: int
) -> tuple[list[Policy], list[UpdateResult], list[ThreadRanks]]:
    exchange = Exchange(world_size)
    ranks = [ThreadRanks(r, world_size, exchange) for r in range(world_size)]
    policies = [copy.deepcopy(policy) for _ in range(world_size)]
    results: list[Any] = [None] * world_size
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            results[rank] = make_algorithm(cfg).update(
                policies[rank], policy, exp, 0.2, ranks=ranks[rank]
            )
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)
            exchange.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return policies, results, ranks


def max_difference(a: Policy, b: Policy) -> float:
    return max(
        float((x - y).detach().abs().max())
        for x, y in zip(a.parameters(), b.parameters(), strict=True)
    )


@pytest.mark.parametrize("algorithm", ["actor-critic", "reinforce"])
def test_two_ranks_take_the_same_steps_as_one_process(
    policy: Policy, tmp_path: Path, algorithm: str
) -> None:
    cfg = config(tmp_path, algorithm=algorithm)
    exp = experience(policy, 28)  # minibatches 8, 8, 8, 4 per epoch
    alone = copy.deepcopy(policy)
    single = make_algorithm(cfg).update(alone, policy, exp, 0.2)

    (first, second), (result, other), ranks = on_ranks(cfg, policy, exp, 2)

    assert max_difference(alone, policy) > 100 * PARAMETER_ATOL  # the round moved the policy
    assert max_difference(first, alone) < PARAMETER_ATOL
    assert max_difference(first, second) < PARAMETER_ATOL  # every rank holds the same policy
    assert result.steps == single.steps == 8
    # each rank computed half of every minibatch (8, 8, 8, 4 rows) and of each correction sample
    assert ranks[0].rows == ranks[1].rows == [4, 4, 4, 4, 4, 4, 2, 4] * 2
    assert result.figures.keys() == single.figures.keys()
    for name, value in single.figures.items():
        assert result.figures[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
        assert other.figures[name] == result.figures[name], name


def test_the_ranks_stop_together_where_one_process_stops_on_approx_kl(
    policy: Policy, tmp_path: Path
) -> None:
    cfg = config(tmp_path, learning_rate=3e-2, target_approx_kl=0.01)
    exp = experience(policy, 28)
    alone = copy.deepcopy(policy)
    single = make_algorithm(cfg).update(alone, policy, exp, 0.2)
    (first, _), (result, other), _ = on_ranks(cfg, policy, exp, 2)
    assert 1 < single.steps < 8  # stopped early
    assert result.steps == other.steps == single.steps
    assert max_difference(first, alone) < PARAMETER_ATOL


def test_three_ranks_share_uneven_minibatches_and_one_smaller_than_the_world(
    policy: Policy, tmp_path: Path
) -> None:
    cfg = config(tmp_path, algorithm="reinforce", epochs=1)
    exp = experience(policy, 18, corrections=0)  # minibatches of 8, 8 and 2 rows
    alone = copy.deepcopy(policy)
    make_algorithm(cfg).update(alone, policy, exp, 0.2)
    (first, *_), _, ranks = on_ranks(cfg, policy, exp, 3)
    # 8 rows cut 3, 3, 2; of the last 2 rows, the third rank has none
    assert [r.rows for r in ranks] == [[3, 3, 1], [3, 3, 1], [2, 2, 0]]
    assert max_difference(first, alone) < PARAMETER_ATOL


def test_one_process_steps_the_policy_itself() -> None:
    policy = cast(Policy, object())
    assert OneProcess().sharded(policy) is policy
    assert OneProcess().sum_gradients([]) is None


@pytest.mark.parametrize(
    ("n", "world_size", "expected"),
    [
        (8, 2, [[0, 1, 2, 3], [4, 5, 6, 7]]),
        (7, 3, [[0, 1, 2], [3, 4], [5, 6]]),
        (2, 3, [[0], [1], []]),
    ],
)
def test_row_slices_cut_a_batch_into_slices_as_equal_as_can_be(
    n: int, world_size: int, expected: list[list[int]]
) -> None:
    assert [s.tolist() for s in row_slices(n, world_size)] == expected
