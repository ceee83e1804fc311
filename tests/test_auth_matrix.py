"""Auth, method by method, against a real `feedloop serve --auth-keys-file`: every RPC with no
key, a malformed header, a wrong key and a key without the role is refused with the documented
code before it does anything; admin methods are never reachable with a generate/feedback key;
and no API key ever shows up in the server's output or its /metrics.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from faults_procs import is_serving, seeded_data_dir, server_process

from feedloop.core.store import open_store
from feedloop.demo.processes import Child
from feedloop.server.auth import METHODS, hash_key
from feedloop.v1 import feedloop_pb2 as pb
from feedloop.v1 import feedloop_pb2_grpc as pb_grpc

# Distinctive values, so a leak is found by a plain substring search.
KEYS = {
    "generate": "sk-gen-7c1e9d52a0b84f36",
    "feedback": "sk-fb-2b8d6e0c4f1a9375",
    "app": "sk-app-9e4f1a7d3c2b8065",
    "admin": "sk-adm-5d3a8c1f6e9b0274",
}
ROLES = {
    "generate": ["generate"],
    "feedback": ["feedback"],
    "app": ["generate", "feedback"],
    "admin": ["admin"],
}
WRONG_KEY = "sk-wrong-0f2e4d6c8b1a3957"
CALL_TIMEOUT_S = 20.0


def keys_toml() -> str:
    # Half the keys as sha256 (the recommended form), half in plain text (the throwaway form).
    entries = []
    for i, (name, key) in enumerate(KEYS.items()):
        secret = f'sha256 = "{hash_key(key)}"' if i % 2 == 0 else f'key = "{key}"'
        entries.append(f'[[keys]]\nname = "{name}"\n{secret}\nroles = {ROLES[name]!r}\n')
    return "\n".join(entries).replace("'", '"')


@dataclass
class Secured:
    child: Child
    channel: grpc.Channel
    data_dir: Path
    generation_id: str

    @property
    def address(self) -> str:
        return self.child.banner["grpc"]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[Secured]:
    data_dir = seeded_data_dir(tmp_path_factory.mktemp("auth"), tiny_checkpoint)
    keys_file = data_dir / "keys.toml"
    keys_file.write_text(keys_toml())
    with (
        server_process(
            data_dir, "--auth-keys-file", str(keys_file), "--log-level", "debug"
        ) as child,
        grpc.insecure_channel(child.banner["grpc"]) as channel,
    ):
        assert child.banner["auth"] == "on"
        reply = pb_grpc.GenerationStub(channel).Generate(
            pb.GenerateRequest(prompt="sea", num_candidates=2),
            metadata=bearer(KEYS["app"]),
            timeout=CALL_TIMEOUT_S,
        )
        yield Secured(child, channel, data_dir, reply.candidates[0].generation_id)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


# method name -> (role it needs, how to call it with metadata)
Call = Callable[[grpc.Channel, str, Any], Any]


def _event(event_id: str, gid: str) -> pb.FeedbackEvent:
    return pb.FeedbackEvent(event_id=event_id, rating=pb.Rating(generation_id=gid, score=1.0))


CALLS: dict[str, tuple[str, Call]] = {
    "Generate": (
        "generate",
        lambda ch, gid, md: pb_grpc.GenerationStub(ch).Generate(
            pb.GenerateRequest(prompt="auth matrix"), metadata=md, timeout=CALL_TIMEOUT_S
        ),
    ),
    "Submit": (
        "feedback",
        lambda ch, gid, md: pb_grpc.FeedbackStub(ch).Submit(
            _event(f"unary-{md_label(md)}", gid), metadata=md, timeout=CALL_TIMEOUT_S
        ),
    ),
    "SubmitStream": (
        "feedback",
        lambda ch, gid, md: list(
            pb_grpc.FeedbackStub(ch).SubmitStream(
                iter([_event(f"stream-{md_label(md)}", gid)]), metadata=md, timeout=CALL_TIMEOUT_S
            )
        ),
    ),
    "ListModels": (
        "admin",
        lambda ch, gid, md: pb_grpc.ModelAdminStub(ch).ListModels(
            pb.ListModelsRequest(), metadata=md, timeout=CALL_TIMEOUT_S
        ),
    ),
    "GetStatus": (
        "admin",
        lambda ch, gid, md: pb_grpc.ModelAdminStub(ch).GetStatus(
            pb.GetStatusRequest(), metadata=md, timeout=CALL_TIMEOUT_S
        ),
    ),
    "SetLive": (
        "admin",
        # v0001 is already live: a successful call changes nothing.
        lambda ch, gid, md: pb_grpc.ModelAdminStub(ch).SetLive(
            pb.SetLiveRequest(version="v0001", reason="auth matrix"),
            metadata=md,
            timeout=CALL_TIMEOUT_S,
        ),
    ),
    "Rollback": (
        "admin",
        lambda ch, gid, md: pb_grpc.ModelAdminStub(ch).Rollback(
            pb.RollbackRequest(reason="auth matrix"), metadata=md, timeout=CALL_TIMEOUT_S
        ),
    ),
    "SetPinned": (
        "admin",
        # v0001 is not pinned: a successful unpin changes nothing.
        lambda ch, gid, md: pb_grpc.ModelAdminStub(ch).SetPinned(
            pb.SetPinnedRequest(version="v0001", pinned=False), metadata=md, timeout=CALL_TIMEOUT_S
        ),
    ),
    "GetOnlineReport": (
        "admin",
        lambda ch, gid, md: pb_grpc.ModelAdminStub(ch).GetOnlineReport(
            pb.GetOnlineReportRequest(), metadata=md, timeout=CALL_TIMEOUT_S
        ),
    ),
    "SubmitVerdict": (
        "feedback",
        # v0001 against an unknown version: past auth it is refused (NOT_FOUND), never stored.
        lambda ch, gid, md: pb_grpc.FeedbackStub(ch).SubmitVerdict(
            pb.EvaluationVerdict(
                verdict_id=f"verdict-{md_label(md)}",
                session_id="auth matrix",
                version_a="v0001",
                generation_id_a=gid,
                version_b="v9999",
                generation_id_b="unknown",
                choice=pb.VERDICT_CHOICE_TIE,
            ),
            metadata=md,
            timeout=CALL_TIMEOUT_S,
        ),
    ),
    "GetHumanEvaluation": (
        "admin",
        lambda ch, gid, md: pb_grpc.ModelAdminStub(ch).GetHumanEvaluation(
            pb.GetHumanEvaluationRequest(version_a="v0001", version_b="v0002"),
            metadata=md,
            timeout=CALL_TIMEOUT_S,
        ),
    ),
    "LoadVersion": (
        "admin",
        # v0001 is live, so loaded: a successful call changes nothing.
        lambda ch, gid, md: pb_grpc.ModelAdminStub(ch).LoadVersion(
            pb.LoadVersionRequest(version="v0001"), metadata=md, timeout=CALL_TIMEOUT_S
        ),
    ),
}


def md_label(metadata: Any) -> str:
    return str(abs(hash(tuple(metadata or ()))))


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


UNAUTHENTICATED_METADATA = {
    "no-key": (),
    "wrong-key": bearer(WRONG_KEY),
    "empty-bearer": (("authorization", "Bearer "),),
    "basic-scheme": (("authorization", f"Basic {KEYS['admin']}"),),
    "key-without-scheme": (("authorization", KEYS["admin"]),),
    "other-header": (("x-api-key", KEYS["admin"]),),
}


@pytest.mark.parametrize("method", list(CALLS))
@pytest.mark.parametrize("credential", list(UNAUTHENTICATED_METADATA))
def test_every_method_without_a_valid_key_is_unauthenticated(
    secured: Secured, method: str, credential: str
) -> None:
    _, call = CALLS[method]
    metadata = UNAUTHENTICATED_METADATA[credential]
    code = code_of(lambda: call(secured.channel, secured.generation_id, metadata))
    assert code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("method", list(CALLS))
@pytest.mark.parametrize("key_name", list(KEYS))
def test_every_method_answers_permission_denied_exactly_when_the_key_lacks_its_role(
    secured: Secured, method: str, key_name: str
) -> None:
    role, call = CALLS[method]
    code = code_of(lambda: call(secured.channel, secured.generation_id, bearer(KEYS[key_name])))
    if role in ROLES[key_name]:
        # Past auth: whatever the method itself answers, never an auth refusal.
        assert code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
    else:
        assert code == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("admin_method", [m for m, (role, _) in CALLS.items() if role == "admin"])
def test_admin_methods_are_never_reachable_with_a_generate_or_feedback_key(
    secured: Secured, admin_method: str
) -> None:
    _, call = CALLS[admin_method]
    for key_name in ("generate", "feedback", "app"):
        code = code_of(
            lambda k=key_name: call(secured.channel, secured.generation_id, bearer(KEYS[k]))
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED, key_name
    # And the registry was not touched by them: v0001 live, no rollback recorded.
    status = pb_grpc.ModelAdminStub(secured.channel).ListModels(
        pb.ListModelsRequest(), metadata=bearer(KEYS["admin"]), timeout=CALL_TIMEOUT_S
    )
    assert status.live_version == "v0001"
    assert all(d.action != "rolled_back" for d in status.decisions)


def test_refused_feedback_writes_nothing(secured: Secured) -> None:
    for key in ("", WRONG_KEY, KEYS["generate"], KEYS["admin"]):
        metadata = bearer(key) if key else ()
        for method in ("Submit", "SubmitStream"):
            _, call = CALLS[method]
            code_of(lambda c=call, m=metadata: c(secured.channel, secured.generation_id, m))
    store = open_store(str(secured.data_dir / "replay.sqlite3"))
    try:
        stored = store.feedback_after(0, 100_000)
    finally:
        store.close()
    # Only the feedback/app keys' own events (from the other tests) may be there.
    assert {f.client_id for f in stored} <= {"feedback", "app"}


def test_no_api_key_appears_in_the_server_output_or_its_metrics(secured: Secured) -> None:
    # Make sure every kind of refusal has happened at least once before looking.
    for credential in UNAUTHENTICATED_METADATA.values():
        for _, call in CALLS.values():
            code_of(lambda c=call, m=credential: c(secured.channel, secured.generation_id, m))
    assert is_serving(secured.address)
    metrics_url = f"http://{secured.child.banner['metrics']}/metrics"
    with urllib.request.urlopen(metrics_url, timeout=CALL_TIMEOUT_S) as response:
        metrics_text = response.read().decode()
    assert "feedloop_auth_denied_total" in metrics_text
    log_text = secured.child.log_path.read_text(encoding="utf-8", errors="replace")
    stdout_text = "\n".join(secured.child.stdout_lines)
    assert "auth" in stdout_text  # the banner is there: we are reading the right output
    for secret in [*KEYS.values(), WRONG_KEY]:
        for where, text in (("log", log_text), ("stdout", stdout_text), ("metrics", metrics_text)):
            assert secret not in text, f"API key {secret[:7]}... leaked into the {where}"


def test_every_rpc_of_the_contract_needs_a_role() -> None:
    """A method missing from the auth table would be open to anyone."""
    rpcs = {
        f"/{service.full_name}/{method.name}"
        for service in pb.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert rpcs == set(METHODS)
