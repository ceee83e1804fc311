"""JSON logs behind one switch: a request's line carries its generation ids, an event's its
event id, a training round's its round and version; text stays the default."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import grpc
import pytest
from server_harness import rating, seeded_data_dir, serve_args, start_serve

from feedloop.core.logs import JsonFormatter, configure_logging
from feedloop.v1 import feedloop_pb2 as pb
from feedloop.v1 import feedloop_pb2_grpc as pb_grpc


def test_the_json_formatter_writes_the_declared_fields_and_nothing_private() -> None:
    stream = io.StringIO()
    handler = configure_logging("debug", "json", stream=stream)
    try:
        log = logging.getLogger("feedloop.test")
        log.info("round %d done", 3, extra={"round": 3, "version": "v0004", "secret": "x"})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed", extra={"event_id": "e1"})
    finally:
        logging.getLogger().removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "round 3 done" and first["level"] == "info"
    assert (first["round"], first["version"]) == (3, "v0004")
    assert "secret" not in first and first["logger"] == "feedloop.test"
    assert first["time"].endswith("+00:00")
    assert second["event_id"] == "e1" and "ValueError: boom" in second["exception"]
    assert isinstance(JsonFormatter().format(logging.makeLogRecord({"msg": "x"})), str)


@pytest.mark.slow
@pytest.mark.parametrize("switch", ["flag", "environment"])
def test_a_requests_json_log_line_carries_its_generation_ids(
    tmp_path: Path, tiny_checkpoint: Path, switch: str
) -> None:
    seeded_data_dir(tmp_path, tiny_checkpoint)
    extra = ["--log-level", "debug"]
    env = {"FEEDLOOP_LOG_FORMAT": "json"}
    if switch == "flag":
        extra += ["--log-format", "json"]
        env = {}
    proc = start_serve(serve_args(tmp_path, *extra), env=env)
    try:
        with grpc.insecure_channel(proc.grpc_address) as channel:
            reply = pb_grpc.GenerationStub(channel).Generate(
                pb.GenerateRequest(prompt="ocean", num_candidates=2), timeout=20
            )
            ids = [c.generation_id for c in reply.candidates]
            pb_grpc.FeedbackStub(channel).Submit(rating("ev-1", ids[0]), timeout=20)
        assert proc.terminate() == 0
        _, stderr = proc.process.communicate(timeout=10)
    finally:
        proc.kill()
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert lines and len(lines) == len(stderr.splitlines())  # every line is JSON
    (served,) = [x for x in lines if x.get("generation_ids") == ids]
    assert served["request_id"] == reply.request_id and served["version"] == "v0001"
    (stored,) = [x for x in lines if x.get("event_id") == "ev-1"]
    assert stored["generation_ids"] == [ids[0]] and stored["outcome"] == "accepted"
    assert any(x.get("version") == "v0001" and "serving" in x["message"] for x in lines)
