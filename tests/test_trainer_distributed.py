"""`feedloop train --nproc N`: the update on real torch.distributed (gloo) ranks.

Two processes give the same update as one on the same data; a rank killed mid-update fails
the round (nothing published, the cursor kept), and the next round starts fresh ranks and
publishes.
"""

from __future__ import annotations

import copy
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_trainer_update_ranks import PARAMETER_ATOL, config, experience, max_difference
from trainer_support import Env, env, fast_config, one_torch_thread, simulation

from feedloop.core.checkpoint import load_checkpoint
from feedloop.core.policy import Policy
from feedloop.demo.simusers import IncludeWord
from feedloop.trainer.algorithms import make_algorithm
from feedloop.trainer.config import TrainConfig
from feedloop.trainer.distributed import DataParallel, RankFailed
from feedloop.trainer.loop import Trainer

__all__ = ["env", "one_torch_thread"]


@pytest.fixture
def policy(tiny_checkpoint: Path) -> Policy:
    return load_checkpoint(tiny_checkpoint)[0]


@pytest.fixture
def two_ranks(tmp_path: Path) -> Iterator[DataParallel]:
    parallel = DataParallel(config(tmp_path), 2, timeout_s=60)
    yield parallel
    parallel.close()


def test_two_processes_give_the_same_update_as_one(
    policy: Policy, tmp_path: Path, two_ranks: DataParallel
) -> None:
    cfg = config(tmp_path)
    exp = experience(policy, 28)
    alone = copy.deepcopy(policy)
    single = make_algorithm(cfg).update(alone, policy, exp, 0.2)

    rank0 = copy.deepcopy(policy)
    result = two_ranks.update(make_algorithm(cfg), rank0, policy, exp, 0.2)

    assert len(two_ranks.worker_pids) == 1
    assert max_difference(alone, policy) > 100 * PARAMETER_ATOL
    assert max_difference(rank0, alone) < PARAMETER_ATOL
    assert result.steps == single.steps
    for name in ("policy_loss", "value_loss", "approx_kl", "grad_norm", "correction_loss"):
        assert result.figures[name] == pytest.approx(single.figures[name], rel=1e-4), name

    again = copy.deepcopy(policy)  # the ranks stay up between rounds
    two_ranks.update(make_algorithm(cfg), again, policy, exp, 0.2)
    assert two_ranks.groups_started == 1
    assert max_difference(again, alone) < PARAMETER_ATOL


def test_fewer_than_two_processes_is_refused_naming_nproc(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nproc"):
        DataParallel(config(tmp_path), 1)
    with pytest.raises(ValueError, match="nproc must be > 0"):
        TrainConfig(data_dir=tmp_path, nproc=0)


class KillsARank(Trainer):
    """Kills worker rank 1 (SIGKILL) at the first step of the next update, once."""

    kill_next_update = False

    def _check_stop(self) -> None:
        parallel = self.data_parallel
        if self.kill_next_update and parallel is not None and parallel.worker_pids:
            self.kill_next_update = False
            os.kill(parallel.worker_pids[0], signal.SIGKILL)
        super()._check_stop()


@pytest.mark.slow
def test_a_killed_rank_fails_the_round_cleanly_and_the_next_round_retries(env: Env) -> None:
    cfg = fast_config(env.root, nproc=2, dist_timeout_s=60)
    simulation(env, IncludeWord("little")).serve_events(40)
    parallel = DataParallel(cfg, 2, timeout_s=60)
    trainer = KillsARank(cfg, env.store, env.registry, log=lambda _: None, data_parallel=parallel)
    try:
        trainer.kill_next_update = True
        with pytest.raises(RankFailed, match=r"collective failed: .*(Connection|closed|reset)"):
            trainer.run_round()
        assert env.registry.versions() == ["v0001"] and env.registry.live() == "v0001"
        assert env.store.get_cursor("trainer") is None  # the window will be read again
        assert parallel.workers == []  # the broken group is gone

        result = trainer.run_round()  # fresh ranks, the same window
        assert result.outcome == "published", result.reason
        assert parallel.groups_started == 2
        assert env.registry.live() == result.version == "v0002"
        assert (env.store.get_cursor("trainer") or {})["feedback_seq"] == env.store.max_seq()[1]
    finally:
        parallel.close()
