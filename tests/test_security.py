"""Security checks: no code runs from a checkpoint, no secret leaks through metrics labels.

tests/test_checkpoint.py already proves `load_checkpoint` refuses a pickle handed to it. Here:
- a registry version whose weights are replaced by a pickle AFTER it was published (checksums
  rewritten to match, so only the format stands between the pickle and execution) is refused by
  the server's hot swap, and the pickle's payload never runs, as a plain file or as torch.save's
  zip-of-pickles format;
- nothing in the shipped code can unpickle at all (a scan of the sources);
- many different wrong API keys add no metric series (no per-key labels), and none appears.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from faults_checkpoints import _Exploit, pickled_weights_consistent
from server_harness import running_server, seeded_registry, test_config, wait_until

from feedloop.core.checkpoint import MANIFEST, WEIGHTS, sha256_of
from feedloop.server.auth import hash_key
from feedloop.v1 import feedloop_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
SHIPPED_SOURCES = ("core", "server", "trainer", "client", "demo", "proto/feedloop")


@pytest.fixture
async def live(tmp_path: Path, tiny_checkpoint: Path):
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    async with running_server(test_config(tmp_path), registry=registry) as running:
        yield running


def torch_saved_weights_consistent(directory: Path, marker: Path) -> None:
    """Weights replaced by torch.save of an object whose unpickling creates marker."""
    torch.save({"embedding.weight": _Exploit(str(marker))}, directory / WEIGHTS)
    manifest = directory / MANIFEST
    text = manifest.read_text(encoding="utf-8")
    old = re.search(rf'"{re.escape(WEIGHTS)}": "([0-9a-f]{{64}})"', text)
    assert old is not None
    manifest.write_text(text.replace(old.group(1), sha256_of(directory / WEIGHTS)))


@pytest.mark.parametrize("planted", ["plain-pickle", "torch-save"])
async def test_a_pickle_planted_after_publish_is_refused_by_hot_swap_without_running(
    live, tiny_checkpoint: Path, tmp_path: Path, planted: str
) -> None:
    registry = live.server.registry
    marker = tmp_path / "pwned"
    version = await asyncio.to_thread(registry.publish, tiny_checkpoint, reason="to be replaced")
    directory = registry.checkpoint_dir(version)
    if planted == "plain-pickle":
        pickled_weights_consistent(directory, marker)
    else:
        torch_saved_weights_consistent(directory, marker)
    await asyncio.to_thread(registry.set_live, version, reason="security test")

    await wait_until(lambda: live.server.metrics.tallies.swaps_refused == 1)
    assert not marker.exists(), "the planted pickle was executed"
    reply = await live.generation.Generate(pb.GenerateRequest(prompt="safe"), timeout=10)
    assert reply.model_version == "v0001"
    refusal = next(d for d in registry.history() if d.action == "refused")
    assert refusal.version == version and "weights" in refusal.reason
    # A pinned request for it is refused too, and still nothing ran.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await live.generation.Generate(
            pb.GenerateRequest(prompt="pinned", model_version=version), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert not marker.exists()


# What can execute code while loading data: pickle and friends, and torch.load unless it is
# told weights_only=True.
UNSAFE_LOADERS = re.compile(
    r"\b(pickle|cPickle|dill|cloudpickle|joblib|marshal|shelve)\.(load|loads|Unpickler)\b"
    r"|\bnumpy\.load\([^)]*allow_pickle\s*=\s*True"
    r"|\bnp\.load\([^)]*allow_pickle\s*=\s*True"
)
TORCH_LOAD = re.compile(r"\btorch\.load\(([^)]*)\)", re.S)
# Each exception names the only bytes it unpickles and why no caller of feedloop can send them.
TRUSTED_UNPICKLERS = {
    # A data-parallel rank unpickles the round job its own trainer (rank 0) pickled and handed to
    # the worker it spawned, over that worker's private multiprocessing pipe (which pickles by
    # design). No network peer, key holder or stored row reaches it.
    "trainer/distributed.py: pickle.loads",
}


def test_no_shipped_module_can_unpickle() -> None:
    offenders = []
    scanned = 0
    for folder in SHIPPED_SOURCES:
        for path in sorted((REPO / folder).rglob("*.py")):
            scanned += 1
            text = path.read_text(encoding="utf-8")
            for match in UNSAFE_LOADERS.finditer(text):
                offenders.append(f"{path.relative_to(REPO)}: {match.group(0)}")
            for match in TORCH_LOAD.finditer(text):
                if not re.search(r"weights_only\s*=\s*True", match.group(1)):
                    offenders.append(f"{path.relative_to(REPO)}: torch.load({match.group(1)})")
    assert scanned > 30
    assert sorted(set(offenders) - TRUSTED_UNPICKLERS) == []


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def series_names(text: str) -> set[str]:
    return {line.split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


async def test_wrong_api_keys_add_no_metric_series_and_never_appear_in_them(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    keys = tmp_path / "keys.toml"
    keys.write_text(
        f'[[keys]]\nname = "app"\nsha256 = "{hash_key("sk-real-1b2c3d")}"\nroles = ["generate"]\n'
    )
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    config = test_config(tmp_path, auth_keys_file=keys)
    async with running_server(config, registry=registry) as running:
        good = (("authorization", "Bearer sk-real-1b2c3d"),)
        await running.generation.Generate(pb.GenerateRequest(prompt="a"), metadata=good)

        async def refused(key: str) -> None:
            with pytest.raises(grpc.aio.AioRpcError):
                await running.generation.Generate(
                    pb.GenerateRequest(prompt="a"),
                    metadata=(("authorization", f"Bearer {key}"),),
                    timeout=10,
                )

        await refused("sk-guess-first")
        before = series_names(await asyncio.to_thread(scrape, running.server.metrics_port))
        guesses = [f"sk-guess-{i:04d}-secret" for i in range(60)]
        for key in guesses:
            await refused(key)
        text = await asyncio.to_thread(scrape, running.server.metrics_port)
    assert series_names(text) == before, "refused keys created new series (per-key labels)"
    for secret in ["sk-real-1b2c3d", "sk-guess-first", *guesses]:
        assert secret not in text
    assert 'feedloop_auth_denied_total{reason="unauthenticated"} 61.0' in text
