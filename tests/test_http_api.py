"""The OpenAI-compatible HTTP API against a real server, with the official `openai` client.

What it promises: completions and chat completions (n, sampling, seed, logprobs, stop,
streaming) are served by the same batcher as gRPC Generate and logged the same way, with the
key's name as the client and each choice carrying its generation id; feedback by generation id
through /v1/feedback is as durable and idempotent as gRPC's; the same keys and roles; bad input
is an OpenAI error naming the parameter and changes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from server_harness import (
    running_server,
    seeded_data_dir,
    seeded_registry,
    serve_args,
    serve_process,
    test_config,
    wait_until,
)

from feedloop.server.errors import Overloaded, Unavailable
from feedloop.server.http_api import error_response
from feedloop.v1 import feedloop_pb2 as pb

KEYS = {"app": "sk-app-1f2e3d", "generate": "sk-gen-4c5b6a", "admin": "sk-adm-7d8e9f"}
ROLES = {"app": ["generate", "feedback"], "generate": ["generate"], "admin": ["admin"]}
GRPC_METADATA = (("authorization", f"Bearer {KEYS['app']}"),)


def keys_file(directory: Path) -> Path:
    path = directory / "keys.toml"
    path.write_text(
        "".join(
            f'[[keys]]\nname = "{name}"\nkey = "{key}"\nroles = {ROLES[name]!r}\n'.replace("'", '"')
            for name, key in KEYS.items()
        )
    )
    return path


@pytest.fixture
async def served(tmp_path: Path, tiny_checkpoint: Path):
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    config = test_config(tmp_path, http_port=0, auth_keys_file=keys_file(tmp_path))
    async with running_server(config, registry=registry) as running:
        yield running


def client(running: Any, key: str = KEYS["app"]) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{running.server.http_port}/v1", api_key=key, max_retries=0
    )


async def stored(running: Any, ids: list[str]) -> dict[str, Any]:
    await wait_until(lambda: running.server.generation_log.depth == 0)
    return running.store.get_generations(ids)  # type: ignore[no-any-return]


async def post(running: Any, path: str, body: Any, key: str | None = KEYS["app"]) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = f"http://127.0.0.1:{running.server.http_port}{path}"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers) as response,
    ):
        return response.status, await response.json()


def feedback_by_id(running: Any) -> dict[str, Any]:
    return {event.event_id: event for event in running.store.feedback_after(0, 100)}


async def test_a_completion_is_served_and_logged_exactly_like_grpc_generate(served) -> None:
    async with client(served) as api:
        reply = await api.completions.create(
            model="feedloop",
            prompt="ocean sunrise",
            n=3,
            max_tokens=6,
            seed=77,
            temperature=0.8,
            user="end-user-5",
        )
    assert reply.model == "v0001"
    assert len(reply.choices) == 3
    ids = [choice.generation_id for choice in reply.choices]  # type: ignore[attr-defined]
    assert len(set(ids)) == 3
    records = await stored(served, ids)
    assert set(records) == set(ids)
    for index, choice in enumerate(reply.choices):
        record = records[choice.generation_id]  # type: ignore[attr-defined]
        assert record.text == choice.text
        assert record.prompt == "ocean sunrise"
        assert record.model_version == "v0001" and record.served_as == "live"
        assert record.client_id == "app"  # the key's name, as over gRPC
        assert record.end_user == "end-user-5"  # OpenAI's `user`: erasable by end user
        assert record.sampling["seed"] == 77 and record.sampling["temperature"] == pytest.approx(
            0.8
        )
        assert record.sampling["max_tokens"] == 6
        assert record.candidate_index == index and record.num_candidates == 3
        assert choice.finish_reason == ("stop" if record.finished else "length")
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == 2
    assert reply.usage.completion_tokens == sum(len(r.output_ids) for r in records.values())
    # The same request over gRPC gets the same candidates: one batcher, one sampler.
    grpc_reply = await served.generation.Generate(
        pb.GenerateRequest(
            prompt="ocean sunrise",
            num_candidates=3,
            sampling=pb.SamplingParams(max_tokens=6, seed=77, temperature=0.8),
        ),
        metadata=GRPC_METADATA,
        timeout=10,
    )
    assert [c.text for c in grpc_reply.candidates] == [c.text for c in reply.choices]


async def test_a_chat_completion_answers_the_last_user_message(served) -> None:
    async with client(served) as api:
        reply = await api.chat.completions.create(
            model="feedloop",
            messages=[
                {"role": "system", "content": "you write short phrases"},
                {"role": "user", "content": "garden"},
            ],
            n=2,
            seed=5,
        )
    assert reply.object == "chat.completion"
    ids = [choice.generation_id for choice in reply.choices]  # type: ignore[attr-defined]
    records = await stored(served, ids)
    for choice in reply.choices:
        assert choice.message.role == "assistant"
        record = records[choice.generation_id]  # type: ignore[attr-defined]
        assert record.prompt == "garden"
        assert record.text == choice.message.content


async def test_streamed_replies_carry_the_same_choices_as_whole_ones(served) -> None:
    async with client(served) as api:
        whole = await api.completions.create(model="feedloop", prompt="ocean", n=2, seed=9)
        texts: dict[int, str] = {}
        finish: dict[int, str | None] = {}
        async for chunk in await api.completions.create(
            model="feedloop", prompt="ocean", n=2, seed=9, stream=True
        ):
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
                finish[choice.index] = choice.finish_reason
        assert [texts[i] for i in (0, 1)] == [c.text for c in whole.choices]
        assert [finish[i] for i in (0, 1)] == [c.finish_reason for c in whole.choices]

        chat_whole = await api.chat.completions.create(
            model="feedloop", messages=[{"role": "user", "content": "ocean"}], seed=9
        )
        content, ids, usage = "", set(), None
        async for chat_chunk in await api.chat.completions.create(
            model="feedloop",
            messages=[{"role": "user", "content": "ocean"}],
            seed=9,
            stream=True,
            stream_options={"include_usage": True},
        ):
            for chat_choice in chat_chunk.choices:
                content += chat_choice.delta.content or ""
                ids.add(chat_choice.generation_id)  # type: ignore[attr-defined]
            usage = chat_chunk.usage or usage
    assert content == chat_whole.choices[0].message.content
    assert len(ids) == 1
    assert usage is not None and usage.completion_tokens >= 1
    await stored(served, list(ids))


async def test_models_lists_the_alias_and_the_loaded_versions_and_a_version_pins(served) -> None:
    async with client(served) as api:
        models = [model.id for model in (await api.models.list()).data]
        assert models == ["feedloop", "v0001"]
        pinned = await api.completions.create(model="v0001", prompt="ocean")
        assert pinned.feedloop["served_as"] == "pinned"  # type: ignore[attr-defined]
        with pytest.raises(openai.NotFoundError) as missing:
            await api.completions.create(model="v0042", prompt="ocean")
    assert missing.value.status_code == 404 and missing.value.param == "model"


async def test_logprobs_are_the_logged_behaviour_logprobs_per_token(served) -> None:
    async with client(served) as api:
        reply = await api.completions.create(model="feedloop", prompt="ocean", logprobs=0, n=2)
        chat = await api.chat.completions.create(
            model="feedloop", messages=[{"role": "user", "content": "ocean"}], logprobs=True
        )
    records = await stored(served, [c.generation_id for c in reply.choices])  # type: ignore[attr-defined]
    for choice in reply.choices:
        record = records[choice.generation_id]  # type: ignore[attr-defined]
        assert choice.logprobs is not None
        tokens = choice.logprobs.tokens or []
        assert len(tokens) == len(record.output_ids) - int(record.finished)
        assert choice.logprobs.token_logprobs == pytest.approx(
            record.behaviour_logprobs[: len(tokens)]
        )
    (chat_choice,) = chat.choices
    assert chat_choice.logprobs is not None and chat_choice.logprobs.content is not None
    joined = " ".join(entry.token for entry in chat_choice.logprobs.content)  # may be empty
    assert joined.replace(" ", "") == (chat_choice.message.content or "").replace(" ", "")


async def test_temperature_zero_is_greedy_over_http(served) -> None:
    async with client(served) as api:
        replies = [
            await api.completions.create(
                model="feedloop", prompt="quiet night", temperature=0, n=2, seed=seed
            )
            for seed in (1, 2)
        ]
    texts = {choice.text for reply in replies for choice in reply.choices}
    assert len(texts) == 1
    ids = [c.generation_id for r in replies for c in r.choices]  # type: ignore[attr-defined]
    for record in (await stored(served, ids)).values():
        assert record.sampling["temperature"] == 0.0
        assert record.behaviour_logprobs == [0.0] * len(record.output_ids)


async def test_a_stop_sequence_cuts_the_text_and_the_log_keeps_the_phrase(served) -> None:
    async with client(served) as api:
        for seed in range(1, 50):  # a seed whose phrase has two words at least
            whole = await api.completions.create(
                model="feedloop", prompt="ocean", seed=seed, max_tokens=8
            )
            words = whole.choices[0].text.split()
            if len(words) >= 2 and words[1] not in words[0]:
                break
        cut = await api.completions.create(
            model="feedloop", prompt="ocean", seed=seed, max_tokens=8, stop=[" " + words[1]]
        )
    (choice,) = cut.choices
    assert choice.text == words[0] and choice.finish_reason == "stop"
    (record,) = (await stored(served, [choice.generation_id])).values()  # type: ignore[attr-defined]
    assert record.text == whole.choices[0].text


BAD = [
    ("temperature", {"temperature": -1}),
    ("n", {"n": 99}),
    ("n", {"n": 0}),
    ("max_tokens", {"max_tokens": 1000}),
    ("top_p", {"top_p": 0}),
    ("seed", {"seed": -3}),
    ("stop", {"stop": ["a", "b", "c", "d", "e"]}),
    ("prompt", {"prompt": ""}),
    ("presence_penalty", {"presence_penalty": 0.5}),
    ("user", {"user": "u" * 200}),
]


@pytest.mark.parametrize(("param", "change"), BAD, ids=[p for p, _ in BAD])
async def test_bad_input_is_a_400_naming_the_parameter_and_logs_nothing(
    served, param: str, change: dict[str, Any]
) -> None:
    body = {"prompt": "ocean"} | change
    async with client(served) as api:
        with pytest.raises(openai.BadRequestError) as err:
            await api.completions.create(model="feedloop", **body)
    assert err.value.status_code == 400
    assert err.value.param == param
    assert str(err.value.message).startswith(param) or param in str(err.value.message)
    assert served.server.generation_log.depth == 0
    assert served.store.counts().generations == 0


async def test_keys_and_roles_are_the_grpc_ones(served) -> None:
    async with client(served, key="sk-wrong") as wrong:
        with pytest.raises(openai.AuthenticationError):
            await wrong.completions.create(model="feedloop", prompt="ocean")
    async with client(served, key=KEYS["admin"]) as admin:
        with pytest.raises(openai.PermissionDeniedError):
            await admin.completions.create(model="feedloop", prompt="ocean")
        with pytest.raises(openai.PermissionDeniedError):
            await admin.models.list()
    status, body = await post(served, "/v1/completions", {"model": "feedloop", "prompt": "a"}, None)
    assert status == 401 and body["error"]["type"] == "authentication_error"
    async with client(served, key=KEYS["generate"]) as generate_only:
        reply = await generate_only.completions.create(model="feedloop", prompt="ocean")
    gid = reply.choices[0].generation_id  # type: ignore[attr-defined]
    event = {"event_id": "e-role", "rating": {"generation_id": gid, "score": 1.0}}
    status, body = await post(served, "/v1/feedback", event, KEYS["generate"])
    assert status == 403 and "feedback" in body["error"]["message"]
    assert set(await stored(served, [gid])) == {gid}
    assert served.store.counts().generations == 1  # nothing from the refused calls


async def test_feedback_of_every_kind_is_stored_once_by_event_id(served) -> None:
    async with client(served) as api:
        reply = await api.completions.create(model="feedloop", prompt="ocean", n=3)
    a, b, c = (choice.generation_id for choice in reply.choices)  # type: ignore[attr-defined]
    events = [
        {
            "event_id": "e1",
            "rating": {"generation_id": a, "score": 1, "scale": "RATING_SCALE_THUMBS"},
        },
        {"event_id": "e2", "ranking": {"generation_ids": [b, a, c]}},
        {"event_id": "e3", "comparison": {"preferred_id": a, "rejected_id": b}},
        {"event_id": "e4", "correction": {"generation_id": c, "text": "calm blue sea"}},
    ]
    async with client(served) as api:  # the extension through the OpenAI client, as documented
        ack = await api.post("/feedback", cast_to=object, body=events[0])
    assert ack == {"event_id": "e1", "outcome": "accepted"}
    for event in events[1:]:
        assert await post(served, "/v1/feedback", event) == (
            200,
            {"event_id": event["event_id"], "outcome": "accepted"},
        )
    # Acknowledged means committed: the store holds each event now, with the key's name.
    stored_events = feedback_by_id(served)
    assert {e.kind for e in stored_events.values()} == {
        "rating",
        "ranking",
        "comparison",
        "correction",
    }
    assert {e.client_id for e in stored_events.values()} == {"app"}
    assert await post(served, "/v1/feedback", events[0]) == (
        200,
        {"event_id": "e1", "outcome": "duplicate"},
    )
    status, body = await post(
        served, "/v1/feedback", {"event_id": "e5", "rating": {"generation_id": a, "score": 7}}
    )
    assert status == 400 and body["error"]["param"] == "rating.score"
    status, body = await post(
        served, "/v1/feedback", {"event_id": "e6", "rating": {"generation_id": "nope", "score": 1}}
    )
    assert status == 404
    for malformed in ({"event_id": "e7", "ratin": {}}, 5, [1], "e8"):
        status, body = await post(served, "/v1/feedback", malformed)
        assert status == 400 and body["error"]["param"] == "body", malformed
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"http://127.0.0.1:{served.server.http_port}/v1/feedback",
            data=b"{not json",
            headers={"Authorization": f"Bearer {KEYS['app']}"},
        ) as response,
    ):
        assert response.status == 400
        assert (await response.json())["error"]["param"] == "body"
    assert set(feedback_by_id(served)) == {"e1", "e2", "e3", "e4"}


async def test_rate_limited_calls_are_429s(tmp_path: Path, tiny_checkpoint: Path) -> None:
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    config = test_config(tmp_path, http_port=0, rate_limit_rps=0.01, rate_limit_burst=1)
    async with (
        running_server(config, registry=registry) as running,
        client(running, key="unused") as api,
    ):
        await api.completions.create(model="feedloop", prompt="ocean")
        with pytest.raises(openai.RateLimitError) as err:
            await api.completions.create(model="feedloop", prompt="ocean")
        sample = running.server.metrics.registry.get_sample_value
        method = {"method": "HTTP /v1/completions"}
        counted = (
            sample("feedloop_rate_limited_total", method),
            sample("feedloop_requests_total", {**method, "code": "RESOURCE_EXHAUSTED"}),
        )
    assert err.value.status_code == 429
    assert counted == (1.0, None)  # counted apart from server errors
    # the bucket refills one token in 100 s: the wait the server asks for says so
    headers = err.value.response.headers
    assert 90 <= int(headers["retry-after"]) <= 100
    assert 89_000 <= int(headers["retry-after-ms"]) <= 100_000


def test_back_pressure_maps_to_429_and_unavailability_to_503() -> None:
    full = error_response(Overloaded("queue full"))
    assert full.status == 429
    assert (full.headers["Retry-After"], full.headers["retry-after-ms"]) == ("1", "500")
    assert error_response(Unavailable("draining")).status == 503
    broken = error_response(RuntimeError("boom"))
    assert broken.status == 500 and "Retry-After" not in broken.headers


def test_feedloop_serve_turns_the_api_on_from_its_environment_and_drains_it(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    data_dir = seeded_data_dir(tmp_path, tiny_checkpoint)
    with serve_process(serve_args(data_dir), env={"FEEDLOOP_HTTP_PORT": "0"}) as proc:
        assert proc.http_address is not None and proc.http_address.startswith("127.0.0.1:")
        api = openai.OpenAI(base_url=f"http://{proc.http_address}/v1", api_key="-", max_retries=0)
        reply = api.chat.completions.create(
            model="feedloop", messages=[{"role": "user", "content": "ocean"}]
        )
        assert reply.model == proc.live
        assert proc.terminate() == 0
    with serve_process(serve_args(data_dir)) as proc:
        assert proc.http_address is None  # off unless asked for
