"""The console's web application over HTTP (no browser) against an in-process server with auth
off: raters are told apart by their declared names, every bad input gets a message and stores
nothing, a rater over the server's rate limit is told to slow down, and a form sent twice is
stored once. The browser tests (test_console_browser.py) drive the same pages in Chromium."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from server_harness import running_server, seeded_registry, test_config

from feedloop.console.app import build_app
from feedloop.console.config import ConsoleConfig, load_console_config


class Console:
    def __init__(self, client: TestClient, running) -> None:
        self.client = client
        self.running = running

    async def login(self, name: str) -> None:
        reply = await self.client.post("/login", data={"name": name, "key": ""})
        assert reply.status == 200 and reply.url.path == "/rate"

    async def ask(self, mode: str, prompt: str) -> tuple[int, str]:
        reply = await self.client.post(f"/{mode}/prompt", data={"prompt": prompt})
        return reply.status, await reply.text()

    async def post(self, path: str, data: dict[str, str]) -> tuple[int, str]:
        reply = await self.client.post(path, data=data)
        return reply.status, await reply.text()

    def feedback_count(self) -> int:
        return self.running.store.counts().feedback


def hidden(page: str, name: str) -> list[str]:
    return re.findall(rf'name="{name}" value="([^"]*)"', page)


def notice(page: str) -> str:
    found = re.search(r'<div id="notice"[^>]*>([^<]*)</div>', page)
    return found.group(1) if found else ""


@pytest.fixture
async def console(tmp_path: Path, tiny_checkpoint: Path) -> AsyncIterator[Console]:
    registry = seeded_registry(tmp_path / "registry", tiny_checkpoint)
    config = test_config(tmp_path, rate_limit_rps=5.0, rate_limit_burst=12)
    async with running_server(config, registry=registry) as running:
        app = build_app(
            ConsoleConfig(target=f"127.0.0.1:{running.server.grpc_port}", max_text_chars=40)
        )
        async with TestClient(TestServer(app)) as client:
            yield Console(client, running)


async def test_each_rater_is_recorded_by_name_and_a_form_sent_twice_is_stored_once(console):
    await console.login("ann")
    status, page = await console.ask("rate", "ocean sunrise")
    assert status == 200
    form = {
        "task_id": hidden(page, "task_id")[0],
        "event_id": hidden(page, "event_id")[0],
        "generation_id": hidden(page, "generation_id")[0],
        "score": "4",
    }
    status, page = await console.post("/rate/submit", form)
    assert status == 200 and "stored" in notice(page)
    status, again = await console.post("/rate/submit", form)  # a reload sends it again
    assert status == 200 and "already stored" in notice(again)
    (event,) = console.running.store.feedback_after(0, 10)
    assert (event.kind, event.score, event.scale, event.client_id) == (
        "rating",
        4.0,
        "stars5",
        "ann",
    )
    generation = console.running.store.get_generations([form["generation_id"]])
    assert generation[form["generation_id"]].client_id == "ann"


async def test_bad_input_gets_a_message_and_stores_nothing(console):
    await console.login("bob")
    status, page = await console.ask("correct", "   ")
    assert status == 400 and "prompt is empty" in notice(page)
    status, page = await console.ask("correct", "x" * 41)
    assert status == 400 and "too long" in notice(page)
    status, page = await console.ask("correct", "garden")
    task_id = hidden(page, "task_id")[0]
    ids = hidden(page, "generation_id")
    event_ids = hidden(page, "event_id")
    form = {"task_id": task_id, "event_id": event_ids[0], "generation_id": ids[0]}
    for text, message, code in (
        ("", "correction is empty", 400),
        ("   ", "correction is empty", 400),
        ("y" * 41, "too long", 400),
        ("bell\x07", "control characters", 400),
    ):
        status, page = await console.post("/correct/submit", {**form, "text": text})
        assert (status, message in notice(page)) == (code, True), text
    # A phrase not on the page, a form from another page, and a page since replaced: stale.
    stale_forms = (
        {**form, "generation_id": "not-shown", "text": "calm sea"},
        {**form, "event_id": "forged", "text": "calm sea"},
    )
    for stale in stale_forms:
        status, page = await console.post("/correct/submit", stale)
        assert status == 409 and "stale candidate" in notice(page)
    await console.ask("correct", "rain")  # the rater moved on: the old form is stale now
    status, page = await console.post("/correct/submit", {**form, "text": "calm sea"})
    assert status == 409 and "stale candidate" in notice(page)
    status, page = await console.post("/rank/submit", {"task_id": "none"})
    assert status == 409
    assert console.feedback_count() == 0


async def test_a_ranking_must_give_each_place_once(console):
    await console.login("cy")
    _, page = await console.ask("rank", "candle")
    ids = re.findall(r'name="rank_([^"]+)"', page)
    base = {"task_id": hidden(page, "task_id")[0], "event_id": hidden(page, "event_id")[0]}
    twice = {**base, **{f"rank_{gid}": "1" for gid in ids}}
    status, page = await console.post("/rank/submit", twice)
    assert status == 400 and "given twice" in notice(page)
    assert console.feedback_count() == 0
    order = {**base, **{f"rank_{gid}": str(len(ids) - i) for i, gid in enumerate(ids)}}
    status, page = await console.post("/rank/submit", order)
    assert status == 200 and "stored" in notice(page)
    (event,) = console.running.store.feedback_after(0, 10)
    assert event.kind == "ranking" and event.generation_ids == ids[::-1]


async def test_a_rater_over_the_rate_limit_is_told_to_slow_down_and_nothing_is_stored(console):
    await console.login("dee")
    codes = []
    for _ in range(16):  # a burst of 12, then 5 per second: some of these are refused
        status, page = await console.ask("compare", "rain")
        codes.append(status)
        if status == 429:
            assert "too fast" in notice(page) and "Nothing was stored" in notice(page)
    assert 429 in codes
    # Another rater has a bucket of their own.
    await console.client.post("/logout")
    await console.login("eve")
    status, _ = await console.ask("compare", "rain")
    assert status == 200


async def test_pages_need_a_signed_in_rater(console):
    reply = await console.client.get("/rate", allow_redirects=False)
    assert reply.status == 303 and reply.headers["Location"] == "/"
    reply = await console.client.post("/login", data={"name": ""})
    assert reply.status == 400
    reply = await console.client.get("/")
    assert "Rater name" in await reply.text()
    assert "frame-ancestors 'none'" in reply.headers["Content-Security-Policy"]


def test_console_config_reads_flags_over_environment_over_toml(tmp_path, monkeypatch):
    toml = tmp_path / "console.toml"
    toml.write_text('[console]\nport = 9001\nscale = "thumbs"\ncandidates = 3\n')
    monkeypatch.setenv("FEEDLOOP_CONSOLE_CANDIDATES", "5")
    config = load_console_config(["--config", str(toml), "--port", "9002"])
    assert (config.port, config.scale, config.candidates) == (9002, "thumbs", 5)
    with pytest.raises(ValueError, match="scale"):
        load_console_config(["--scale", "stars10"])
    toml.write_text("[console]\nbogus = 1\n")
    with pytest.raises(ValueError, match="bogus"):
        load_console_config(["--config", str(toml)])


def test_a_verdict_on_screen_sides_maps_to_the_versions_whichever_side_a_was_on():
    from feedloop.console.app import BadInput
    from feedloop.console.evaluation import _choice
    from feedloop.console.sessions import EvaluationItem, Shown

    a, b = Shown("gen-a", "calm sea"), Shown("gen-b", "sea")
    a_left = EvaluationItem("ocean", a, b, a_left=True)
    a_right = EvaluationItem("ocean", a, b, a_left=False)
    assert (a_left.left, a_left.right, a_right.left, a_right.right) == (a, b, b, a)
    assert [_choice(a_left, side) for side in ("left", "right")] == ["a", "b"]
    assert [_choice(a_right, side) for side in ("left", "right")] == ["b", "a"]
    assert _choice(a_right, "tie") == "tie" and _choice(a_left, "both_bad") == "both_bad"
    with pytest.raises(BadInput):
        _choice(a_left, "a")  # the page never names a version
