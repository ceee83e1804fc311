"""bench/serve_load.py's h2load mode: what it counts as served and as failed.

h2load sees only HTTP status; the gRPC code is in trailers, so the mode reads the server's own
counter. These tests pin that: a server answering every call with an error must show up as
errors, not as fast generations.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from server_harness import seeded_data_dir, serve_args, start_serve

from feedloop.v1 import feedloop_pb2 as pb

LOAD = Path(__file__).resolve().parent.parent / "bench" / "serve_load.py"
needs_h2load = pytest.mark.skipif(
    shutil.which("h2load") is None, reason="h2load not installed (apt-get install nghttp2-client)"
)


def serve_load_module():
    spec = importlib.util.spec_from_file_location("serve_load", LOAD)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grpc_frame_is_the_length_prefixed_message() -> None:
    message = pb.GenerateRequest(prompt="ocean sunrise").SerializeToString()
    frame = serve_load_module().grpc_frame(message)
    assert frame[0] == 0  # not compressed
    assert struct.unpack(">I", frame[1:5])[0] == len(message)
    assert pb.GenerateRequest.FromString(frame[5:]).prompt == "ocean sunrise"


def run_h2load(proc, *flags: str) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            str(LOAD),
            "generate-h2load",
            "--target",
            proc.grpc_address,
            "--metrics",
            proc.metrics_address,
            "--concurrency",
            "4",
            "--duration-s",
            "1",
            "--warmup-s",
            "0.2",
            *flags,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@needs_h2load
def test_h2load_counts_served_generations_and_reads_grpc_errors_from_the_server(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    seeded_data_dir(tmp_path, tiny_checkpoint)
    proc = start_serve(serve_args(tmp_path, "--max-tokens-cap", "8", "--default-max-tokens", "8"))
    try:
        served = run_h2load(proc, "--max-tokens", "8")
        assert served["count"] > 0 and served["per_s"] > 0
        assert served["errors"] == 0, served["error_codes"]
        assert 0 < served["p50_ms"] <= served["p99_ms"]
        # max_tokens over the cap: every call is INVALID_ARGUMENT behind an HTTP 200.
        refused = run_h2load(proc, "--max-tokens", "9")
        assert refused["error_codes"].get("INVALID_ARGUMENT", 0) >= refused["count"] > 0
    finally:
        proc.kill()
