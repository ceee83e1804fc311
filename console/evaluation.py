"""The console's blind evaluation mode: two named versions answer the same prompts, a rater
judges each pair side by side without knowing which version is on which side, and learns which
was which only at the end.

Blindness: the sides are drawn at random for each pair (A on the left with probability 1/2) and
the pairs are shuffled; the page shows no version name, candidate id or order that would tell
them apart. Each verdict goes to the server as it is given (Feedback.SubmitVerdict):
stored as a human-evaluation verdict and, for one side, as comparison feedback. A form from an
older pair is refused as stale, so a verdict always names the pair the rater saw.
"""

from __future__ import annotations

import asyncio
import random

from aiohttp import web

from feedloop.client import AsyncFeedloopClient, FeedloopClientError, Verdict
from feedloop.client.human_eval import human_evaluation_text
from feedloop.console import pages
from feedloop.console.app import (
    SUGGESTED_PROMPTS,
    BadInput,
    check_text,
    client_error_notice,
    config_key,
    html,
    rater_of,
)
from feedloop.console.config import ConsoleConfig, connect
from feedloop.console.pages import Notice
from feedloop.console.sessions import Evaluation, EvaluationItem, RaterSession, Shown

SIDES = ("left", "right")
admin_client_key = web.AppKey("admin_client", AsyncFeedloopClient)


def admin_client(app: web.Application) -> AsyncFeedloopClient | None:
    """The console's own admin connection, if it has an admin key (made on first use)."""
    config: ConsoleConfig = app[config_key]
    if not config.admin_key:
        return None
    if admin_client_key not in app:
        app[admin_client_key] = connect(config, config.admin_key, "feedloop-console")
    return app[admin_client_key]


async def _versions(app: web.Application, session: RaterSession) -> tuple[list[str], str, str]:
    """Published versions for the form's suggestions, and a default pair (newest, live)."""
    client = admin_client(app) or session.client
    try:
        models = await client.list_models(max_decisions=1)
    except FeedloopClientError:
        return [], "", ""  # a rater's key may not list versions: the names are typed instead
    names = [m.version for m in models.versions]
    newest = next((v for v in names if v != models.live_version), "")
    return names, newest, models.live_version


def setup(
    request: web.Request,
    session: RaterSession,
    versions: list[str],
    form: dict[str, str],
    notice: Notice | None = None,
    status: int = 200,
) -> web.Response:
    config = request.app[config_key]
    page = pages.evaluation_setup_page(
        session.rater,
        versions=versions,
        version_a=form.get("version_a", ""),
        version_b=form.get("version_b", ""),
        prompts=form.get("prompts", "\n".join(SUGGESTED_PROMPTS[: config.evaluation_prompts])),
        max_prompts=config.evaluation_prompts,
        notice=notice,
    )
    return html(page, status)


async def show(request: web.Request) -> web.Response:
    session = rater_of(request)
    evaluation = session.evaluation
    if evaluation is not None and not request.query.get("new"):
        if not evaluation.finished:
            return html(pages.evaluation_item_page(session.rater, evaluation))
        return await summary(request, session, evaluation)
    versions, newest, live = await _versions(request.app, session)
    return setup(request, session, versions, {"version_a": newest, "version_b": live})


def parse_setup(form: dict[str, str], config: ConsoleConfig) -> tuple[str, str, list[str]]:
    version_a = form.get("version_a", "").strip()
    version_b = form.get("version_b", "").strip()
    if not version_a or not version_b:
        raise BadInput("name both versions. Nothing was started.")
    if version_a == version_b:
        raise BadInput("versions A and B are the same: name two versions. Nothing was started.")
    prompts = [line.strip() for line in form.get("prompts", "").splitlines() if line.strip()]
    if not prompts:
        raise BadInput("give at least one prompt. Nothing was started.")
    if len(prompts) > config.evaluation_prompts:
        raise BadInput(
            f"{len(prompts)} prompts, at most {config.evaluation_prompts} per session. "
            "Nothing was started."
        )
    return version_a, version_b, [check_text(p, "prompt", config.max_text_chars) for p in prompts]


async def _pair(
    client: AsyncFeedloopClient, prompt: str, version_a: str, version_b: str
) -> EvaluationItem:
    a, b = await asyncio.gather(
        client.generate(prompt, model_version=version_a),
        client.generate(prompt, model_version=version_b),
    )
    return EvaluationItem(
        prompt,
        Shown(a.candidates[0].generation_id, a.candidates[0].text),
        Shown(b.candidates[0].generation_id, b.candidates[0].text),
        a_left=random.random() < 0.5,
    )


async def start(request: web.Request) -> web.Response:
    """Load both versions on the server (with the console's admin key), generate each prompt's
    pair, and show the first pair."""
    session = rater_of(request)
    config = request.app[config_key]
    form = {k: str(v) for k, v in (await request.post()).items()}
    versions, _, _ = await _versions(request.app, session)
    try:
        version_a, version_b, prompts = parse_setup(form, config)
        admin = admin_client(request.app)
        if admin is not None:
            for version in (version_a, version_b):
                await admin.load_version(version)
        items = list(
            await asyncio.gather(*(_pair(session.client, p, version_a, version_b) for p in prompts))
        )
    except BadInput as exc:
        return setup(request, session, versions, form, Notice(False, str(exc)), exc.status)
    except FeedloopClientError as exc:
        notice, status = client_error_notice(exc)
        return setup(request, session, versions, form, notice, status)
    random.shuffle(items)
    session.evaluation = Evaluation(version_a, version_b, items)
    return html(pages.evaluation_item_page(session.rater, session.evaluation))


def _choice(item: EvaluationItem, given: str) -> str:
    """The rater's verdict on the screen (left, right, tie, both_bad) in versions' terms."""
    if given in SIDES:
        return "a" if (given == "left") == item.a_left else "b"
    if given in ("tie", "both_bad"):
        return given
    raise BadInput("choose left, right, tie or both bad. Nothing was stored.")


async def verdict(request: web.Request) -> web.Response:
    session = rater_of(request)
    form = {k: str(v) for k, v in (await request.post()).items()}
    evaluation = session.evaluation
    if (
        evaluation is None
        or form.get("session_id") != evaluation.session_id
        or form.get("position") != str(evaluation.position)
        or evaluation.finished
    ):
        notice = Notice(
            False,
            "stale candidate: this verdict is for a pair no longer shown (sent twice, or from an "
            "older page). Nothing was stored.",
        )
        if evaluation is None:
            versions, _, _ = await _versions(request.app, session)
            return setup(request, session, versions, {}, notice, 409)
        if evaluation.finished:
            return await summary(request, session, evaluation, notice, 409)
        return html(pages.evaluation_item_page(session.rater, evaluation, notice), 409)
    item = evaluation.items[evaluation.position]
    try:
        choice = _choice(item, form.get("choice", ""))
        result = await session.client.submit_verdict(
            Verdict(
                evaluation.session_id,
                evaluation.version_a,
                item.a.generation_id,
                evaluation.version_b,
                item.b.generation_id,
                choice,
                item.a_left,
                item.verdict_id,
            )
        )
    except BadInput as exc:
        notice = Notice(False, str(exc))
        return html(pages.evaluation_item_page(session.rater, evaluation, notice), exc.status)
    except FeedloopClientError as exc:
        notice, status = client_error_notice(exc)
        return html(pages.evaluation_item_page(session.rater, evaluation, notice), status)
    item.choice = choice
    evaluation.position += 1
    outcome = "duplicate" if result.duplicate else "accepted"
    notice = Notice(
        True,
        f"verdict on pair {evaluation.position} of {len(evaluation.items)}: stored.",
        result.event_id,
        outcome,
    )
    if evaluation.finished:
        return await summary(request, session, evaluation, notice)
    return html(pages.evaluation_item_page(session.rater, evaluation, notice))


async def summary(
    request: web.Request,
    session: RaterSession,
    evaluation: Evaluation,
    notice: Notice | None = None,
    status: int = 200,
) -> web.Response:
    """The reveal: which side was which version, and the evaluation so far over every rater
    (needs the console's admin key; without it, this session's verdicts only)."""
    admin = admin_client(request.app)
    report = (
        "the report over every rater needs the console's admin key: "
        f"feedloop human-eval {evaluation.version_a} {evaluation.version_b}"
    )
    if admin is not None:
        try:
            result = await admin.human_evaluation(evaluation.version_a, evaluation.version_b)
            report = human_evaluation_text(result)
        except FeedloopClientError as exc:
            report = f"the report is unavailable: {exc.code.name}: {exc.message}"
    page = pages.evaluation_summary_page(session.rater, evaluation, report, notice)
    return html(page, status)


async def close_admin(app: web.Application) -> None:
    if admin_client_key in app:
        await app[admin_client_key].close()


def add_routes(app: web.Application) -> None:
    app.router.add_get("/evaluate", show)
    app.router.add_post("/evaluate/start", start)
    app.router.add_post("/evaluate/verdict", verdict)
    app.on_cleanup.append(close_admin)
