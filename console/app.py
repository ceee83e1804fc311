"""The console's web application (aiohttp): sign-in, and the four judging modes.

Each rater signs in with a name (and an API key when the server needs one) and gets a gRPC client
of their own: the server sees every generation and event under the rater's identity (the key's
name, or with auth off the declared name) and rate-limits each rater as the client they are.
A judging page shows candidates the live version produced for a prompt; submitting a form sends
the matching feedback event and the page acknowledges it only once the server has (after the
event is durable), with the event's id and outcome. Bad input (an empty or oversize text, a
form from an older page) gets a message and sends nothing.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from aiohttp import web

from feedloop.client import (
    AsyncFeedloopClient,
    Comparison,
    Correction,
    FeedbackResult,
    FeedloopClientError,
    Ranking,
    Rating,
    RetryPolicy,
)
from feedloop.client.types import FeedbackInput
from feedloop.console import pages
from feedloop.console.config import ConsoleConfig, connect
from feedloop.console.pages import Notice
from feedloop.console.sessions import MODES, RaterSession, Sessions, Shown, Task

COOKIE = "feedloop_console"
STATIC_DIR = Path(__file__).parent / "static"
# Prompts offered by "Give me a prompt": keywords of the phrase corpus the default policy knows.
SUGGESTED_PROMPTS = (
    "ocean morning",
    "garden",
    "rain",
    "city night",
    "summer village",
    "cozy blankets",
    "candle",
    "mountain morning",
    "coffee",
    "autumn leaves",
    "quiet library",
    "bold posters",
)
# What each status code means to a rater; the server's own message follows.
ERROR_HINTS = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: "too fast: the server limits each rater's rate",
    grpc.StatusCode.INVALID_ARGUMENT: "the server refused the input",
    grpc.StatusCode.NOT_FOUND: "not found",
    grpc.StatusCode.UNAUTHENTICATED: "the server needs a valid API key",
    grpc.StatusCode.PERMISSION_DENIED: "your API key may not do this",
    grpc.StatusCode.UNAVAILABLE: "the server is unavailable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the server did not answer in time",
}
HTTP_STATUS = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
}
OUTCOME_WORDS = {"accepted": "stored", "duplicate": "already stored (sent twice, kept once)"}

config_key = web.AppKey("config", ConsoleConfig)
sessions_key = web.AppKey("sessions", Sessions)


class BadInput(Exception):
    """A rater's input the console refuses before sending anything; `status` is the HTTP code."""

    def __init__(self, text: str, status: int = 400) -> None:
        super().__init__(text)
        self.status = status


def client_error_notice(exc: FeedloopClientError) -> tuple[Notice, int]:
    hint = ERROR_HINTS.get(exc.code, exc.code.name)
    text = f"{hint}: {exc.message}"
    if exc.retry_delay_s is not None:
        text += f" (retry in {exc.retry_delay_s:.1f} s)"
    return Notice(False, text + ". Nothing was stored."), HTTP_STATUS.get(exc.code, 502)


def html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def rater_of(request: web.Request) -> RaterSession:
    session = request.app[sessions_key].get(request.cookies.get(COOKIE))
    if session is None:
        raise web.HTTPSeeOther("/")
    return session


def rater_client(config: ConsoleConfig, rater: str, key: str) -> AsyncFeedloopClient:
    """A client that speaks as the rater: their key, or with auth off their declared name."""
    # No retries: a person waiting on a click is better told at once that the server is busy
    # or that they are too fast (and clicks again) than kept waiting out a delay.
    return connect(config, key, rater, retry=RetryPolicy(max_attempts=1))


def quoted(text: str) -> str:
    """A phrase inside a message: quoted, or said to be empty."""
    return f"“{text}”" if text.strip() else "(empty phrase)"


def check_text(text: str, what: str, max_chars: int) -> str:
    text = text.strip()
    if not text:
        raise BadInput(f"the {what} is empty: write something first. Nothing was stored.")
    if len(text) > max_chars:
        raise BadInput(
            f"the {what} is too long ({len(text)} characters, at most {max_chars}). "
            "Nothing was stored."
        )
    if not text.isprintable():
        raise BadInput(f"the {what} holds control characters. Nothing was stored.")
    return text


# -- sign-in -------------------------------------------------------------------------------------


async def index(request: web.Request) -> web.Response:
    if request.app[sessions_key].get(request.cookies.get(COOKIE)) is not None:
        raise web.HTTPSeeOther("/rate")
    return html(pages.login_page())


async def login(request: web.Request) -> web.Response:
    config = request.app[config_key]
    form = await request.post()
    name = str(form.get("name", "")).strip()
    key = str(form.get("key", "")).strip()
    if not name or len(name) > 64 or not name.isprintable():
        notice = Notice(False, "Enter a rater name (1 to 64 printable characters).")
        return html(pages.login_page(notice), 400)
    session, dropped = request.app[sessions_key].add(name, lambda: rater_client(config, name, key))
    for old in dropped:
        await old.client.close()
    response = web.HTTPSeeOther("/rate")
    response.set_cookie(COOKIE, session.token, httponly=True, samesite="Strict", path="/")
    raise response


async def logout(request: web.Request) -> web.Response:
    session = request.app[sessions_key].remove(request.cookies.get(COOKIE, ""))
    if session is not None:
        await session.client.close()
    response = web.HTTPSeeOther("/")
    response.del_cookie(COOKIE, path="/")
    raise response


# -- the four judging modes ----------------------------------------------------------------------


def _mode(request: web.Request) -> str:
    mode = request.match_info["mode"]
    if mode not in MODES:
        raise web.HTTPNotFound()
    return mode


def render(
    request: web.Request,
    session: RaterSession,
    mode: str,
    notice: Notice | None = None,
    status: int = 200,
    prompt: str = "",
) -> web.Response:
    config = request.app[config_key]
    page = pages.mode_page(
        mode,
        session.rater,
        session.tasks.get(mode),
        scale=config.scale,
        max_chars=config.max_text_chars,
        notice=notice,
        prompt=prompt,
    )
    return html(page, status)


async def show_mode(request: web.Request) -> web.Response:
    return render(request, rater_of(request), _mode(request))


async def new_prompt(request: web.Request) -> web.Response:
    """Generate candidates from the live version for the rater's (or a suggested) prompt."""
    session, mode = rater_of(request), _mode(request)
    config = request.app[config_key]
    form = await request.post()
    prompt = str(form.get("prompt", ""))
    try:
        if form.get("suggest"):
            prompt = random.choice(SUGGESTED_PROMPTS)
        prompt = check_text(prompt, "prompt", config.max_text_chars)
        n = 2 if mode == "compare" else config.candidates
        reply = await session.client.generate(prompt, n=n, routing_key=session.rater)
    except BadInput as exc:
        return render(request, session, mode, Notice(False, str(exc)), exc.status, prompt)
    except FeedloopClientError as exc:
        notice, status = client_error_notice(exc)
        return render(request, session, mode, notice, status, prompt)
    shown = [Shown(c.generation_id, c.text) for c in reply.candidates]
    session.tasks[mode] = Task(mode, prompt, reply.model_version, shown)
    return render(request, session, mode)


def current_task(session: RaterSession, mode: str, form: dict[str, str]) -> Task:
    """The task the form was filled on; a form from an older page is stale."""
    task = session.tasks.get(mode)
    if task is None or form.get("task_id") != task.task_id:
        raise BadInput(
            "stale candidate: this form comes from an older page (the phrases have changed "
            "since). Nothing was stored; judge the phrases shown now.",
            409,
        )
    return task


def shown_candidate(task: Task, generation_id: str) -> Shown:
    candidate = task.candidate(generation_id)
    if candidate is None:
        raise BadInput("stale candidate: that phrase is not on this page. Nothing was stored.", 409)
    return candidate


def _rating(task: Task, form: dict[str, str], scale: str) -> tuple[str, FeedbackInput, str]:
    candidate = shown_candidate(task, form.get("generation_id", ""))
    allowed = {value for value, _ in pages.SCALE_CHOICES[scale]}
    score = form.get("score", "")
    if score not in allowed:
        raise BadInput(f"choose a score on the scale ({', '.join(sorted(allowed))}).")
    event = Rating(candidate.generation_id, float(score), scale, form.get("event_id") or None)
    return candidate.generation_id, event, f"rating {score} ({scale}) of {quoted(candidate.text)}"


def _ranking(task: Task, form: dict[str, str]) -> tuple[str, FeedbackInput, str]:
    n = len(task.candidates)
    places: dict[int, str] = {}
    for c in task.candidates:
        value = form.get(f"rank_{c.generation_id}", "")
        if not value.isdigit() or not 1 <= int(value) <= n:
            raise BadInput(f"give every phrase a place from 1 to {n}. Nothing was stored.")
        if int(value) in places:
            raise BadInput(f"place {value} is given twice: each place once. Nothing was stored.")
        places[int(value)] = c.generation_id
    order = [places[k] for k in sorted(places)]
    event = Ranking(tuple(order), form.get("event_id") or None)
    return "ranking", event, f"ranking of {n} phrases"


def _comparison(task: Task, form: dict[str, str]) -> tuple[str, FeedbackInput, str]:
    preferred = shown_candidate(task, form.get("preferred", ""))
    rejected = next(c for c in task.candidates if c.generation_id != preferred.generation_id)
    event = Comparison(
        preferred.generation_id, rejected.generation_id, form.get("event_id") or None
    )
    return "comparison", event, f"{quoted(preferred.text)} preferred over {quoted(rejected.text)}"


def _correction(task: Task, form: dict[str, str], max_chars: int) -> tuple[str, FeedbackInput, str]:
    candidate = shown_candidate(task, form.get("generation_id", ""))
    text = check_text(form.get("text", ""), "correction", max_chars)
    if text == candidate.text:
        raise BadInput("the correction is the phrase unchanged: edit it first. Nothing was stored.")
    event = Correction(candidate.generation_id, text, form.get("event_id") or None)
    return candidate.generation_id, event, f"correction {quoted(candidate.text)} → {quoted(text)}"


async def submit(request: web.Request) -> web.Response:
    """Send the mode's feedback event; acknowledge it on the page once the server has."""
    session, mode = rater_of(request), _mode(request)
    config = request.app[config_key]
    form = {k: str(v) for k, v in (await request.post()).items()}
    try:
        task = current_task(session, mode, form)
        if mode == "rate":
            slot, event, what = _rating(task, form, config.scale)
        elif mode == "rank":
            slot, event, what = _ranking(task, form)
        elif mode == "compare":
            slot, event, what = _comparison(task, form)
        else:
            slot, event, what = _correction(task, form, config.max_text_chars)
        event_id = form.get("event_id", "")
        if event_id != task.event_ids.get(slot) and event_id not in task.sent_ids:
            # Not a key this page handed out: a form copied or forged from elsewhere.
            raise BadInput(
                "stale candidate: this form is not from this page. Nothing was stored.", 409
            )
        result: FeedbackResult = await session.client.submit(event)
    except BadInput as exc:
        return render(request, session, mode, Notice(False, str(exc)), exc.status)
    except FeedloopClientError as exc:
        notice, status = client_error_notice(exc)
        return render(request, session, mode, notice, status)
    task.sent(slot, result.event_id)
    if mode == "compare":
        session.tasks.pop(mode)  # a pair is judged once; the next prompt makes the next pair
    outcome = "duplicate" if result.duplicate else "accepted"
    notice = Notice(True, f"{what}: {OUTCOME_WORDS[outcome]}.", result.event_id, outcome)
    return render(request, session, mode, notice)


# -- the application -----------------------------------------------------------------------------


@web.middleware
async def security_headers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    response = await handler(request)
    # Pages load only their own script and stylesheet, and no other site may frame them.
    response.headers.setdefault(
        "Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'"
    )
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    return response


async def close_clients(app: web.Application) -> None:
    for session in app[sessions_key].all():
        await session.client.close()


def build_app(config: ConsoleConfig) -> web.Application:
    from feedloop.console import evaluation  # the evaluation mode's handlers

    app = web.Application(middlewares=[security_headers], client_max_size=64 * 1024)
    app[config_key] = config
    app[sessions_key] = Sessions(config.max_sessions)
    app.router.add_get("/", index)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    evaluation.add_routes(app)
    app.router.add_get("/{mode}", show_mode)
    app.router.add_post("/{mode}/prompt", new_prompt)
    app.router.add_post("/{mode}/submit", submit)
    app.router.add_static("/static", STATIC_DIR)
    app.on_cleanup.append(close_clients)
    return app
