"""The console's pages, rendered on the server as plain HTML: forms that work without
JavaScript, and a small script (static/console.js) that only adds keyboard shortcuts.

Every value from a rater or the server is escaped here (`esc`); nothing else writes HTML.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

from feedloop.console.sessions import Evaluation, EvaluationItem, Task

# The scales raters see: (name, the scores offered with their labels).
SCALE_CHOICES: dict[str, tuple[tuple[str, str], ...]] = {
    "stars5": tuple((str(k), "★" * k) for k in range(1, 6)),
    "thumbs": (("0", "👎 bad"), ("1", "👍 good")),
    "unit": tuple((f"{k / 4:g}", f"{k / 4:g}") for k in range(5)),
}
SCALE_TITLES = {
    "stars5": "1 to 5 stars (5 is best)",
    "thumbs": "thumbs up or down",
    "unit": "0 to 1 (1 is best)",
}
VERDICT_BUTTONS = (
    ("left", "Left is better", "←  or  1"),
    ("right", "Right is better", "→  or  2"),
    ("tie", "Tie", "T  or  3"),
    ("both_bad", "Both bad", "B  or  4"),
)
MODE_TITLES = {
    "rate": "Rate",
    "rank": "Rank",
    "compare": "Compare two",
    "correct": "Correct",
    "evaluate": "Blind evaluation",
}


def esc(value: object) -> str:
    return escape(str(value), quote=True)


def phrase(text: str) -> str:
    """A candidate's text for display; an empty phrase is said to be one, not left blank."""
    return esc(text) if text.strip() else "<i>(empty phrase)</i>"


@dataclass(frozen=True)
class Notice:
    """The message at the top of a page: an acknowledgement or what went wrong."""

    ok: bool
    text: str
    # The acknowledged event's id and outcome (accepted, duplicate), for people and tests.
    event_id: str = ""
    outcome: str = ""


def _notice(notice: Notice | None) -> str:
    if notice is None:
        return '<div id="notice" role="status" aria-live="polite"></div>'
    kind = "ack" if notice.ok else "error"
    data = (
        f' data-event-id="{esc(notice.event_id)}" data-outcome="{esc(notice.outcome)}"'
        if notice.ok
        else ""
    )
    return (
        f'<div id="notice" role="{"status" if notice.ok else "alert"}" aria-live="polite" '
        f'class="{kind}"{data}>{esc(notice.text)}</div>'
    )


def layout(title: str, body: str, *, rater: str = "", active: str = "") -> str:
    nav = ""
    if rater:
        links = " ".join(
            f'<a href="/{mode}"{" aria-current=page" if mode == active else ""}>{esc(name)}</a>'
            for mode, name in MODE_TITLES.items()
        )
        nav = (
            f'<nav aria-label="modes">{links}</nav>'
            f'<form class="who" method="post" action="/logout">rater <b id="rater">'
            f'{esc(rater)}</b> <button type="submit">log out</button></form>'
        )
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} · feedloop console</title>"
        '<link rel="stylesheet" href="/static/console.css">'
        '<script src="/static/console.js" defer></script></head>'
        f'<body><header><span class="brand">feedloop console</span>{nav}</header>'
        f"<main><h1>{esc(title)}</h1>{body}</main></body></html>"
    )


def login_page(notice: Notice | None = None) -> str:
    body = (
        f"{_notice(notice)}"
        '<form method="post" action="/login" class="card">'
        "<p>Your name is recorded on every judgement you give. If the server asks for API "
        "keys, enter yours: the key then identifies you.</p>"
        '<label for="name">Rater name</label>'
        '<input id="name" name="name" required maxlength="64" autofocus autocomplete="username">'
        '<label for="key">API key (if the server needs one)</label>'
        '<input id="key" name="key" type="password" autocomplete="current-password">'
        '<button type="submit" id="login">Start rating</button></form>'
    )
    return layout("Sign in", body)


def _prompt_form(mode: str, prompt: str, max_chars: int) -> str:
    return (
        f'<form method="post" action="/{mode}/prompt" class="prompt">'
        '<label for="prompt">Prompt (a few keywords)</label>'
        f'<input id="prompt" name="prompt" value="{esc(prompt)}" maxlength="{max_chars}" '
        'placeholder="ocean sunrise">'
        '<button type="submit" id="ask">Show phrases</button>'
        '<button type="submit" name="suggest" value="1" id="suggest">Give me a prompt</button>'
        "</form>"
    )


def _task_header(task: Task) -> str:
    return (
        f'<p class="task" data-task-id="{esc(task.task_id)}">Prompt <q id="task-prompt">'
        f"{esc(task.prompt)}</q>, version <code>{esc(task.model_version)}</code></p>"
    )


def _hidden(task: Task, form: str) -> str:
    return (
        f'<input type="hidden" name="task_id" value="{esc(task.task_id)}">'
        f'<input type="hidden" name="event_id" value="{esc(task.event_id(form))}">'
    )


def _rate_body(task: Task, scale: str) -> str:
    rows = []
    for i, c in enumerate(task.candidates):
        buttons = "".join(
            f'<button type="submit" name="score" value="{esc(value)}" '
            f'aria-label="{esc(label)} for phrase {i + 1}">{esc(label)}</button>'
            for value, label in SCALE_CHOICES[scale]
        )
        rows.append(
            f'<li class="candidate"><span class="text">{phrase(c.text)}</span>'
            f'<form method="post" action="/rate/submit" class="scale">'
            f"{_hidden(task, c.generation_id)}"
            f'<input type="hidden" name="generation_id" value="{esc(c.generation_id)}">'
            f"{buttons}</form></li>"
        )
    return (
        f'<p>Scale: <b id="scale">{esc(SCALE_TITLES[scale])}</b>. Rate any phrase.</p>'
        f'<ol class="candidates">{"".join(rows)}</ol>'
    )


def _rank_body(task: Task) -> str:
    n = len(task.candidates)
    rows = []
    for i, c in enumerate(task.candidates):
        options = "".join(
            f'<option value="{k}"{" selected" if k == i + 1 else ""}>{k}</option>'
            for k in range(1, n + 1)
        )
        rows.append(
            f'<li class="candidate"><label for="rank-{i}">place</label>'
            f'<select id="rank-{i}" name="rank_{esc(c.generation_id)}">{options}</select>'
            f'<span class="text">{phrase(c.text)}</span></li>'
        )
    return (
        '<form method="post" action="/rank/submit">'
        f"{_hidden(task, 'ranking')}"
        "<p>Give each phrase a place, 1 for the best; each place once.</p>"
        f'<ul class="candidates">{"".join(rows)}</ul>'
        '<button type="submit" id="submit-ranking">Submit ranking</button></form>'
    )


def _compare_body(task: Task) -> str:
    left, right = task.candidates[0], task.candidates[1]
    sides = "".join(
        f'<div class="side"><p class="text">{phrase(c.text)}</p>'
        f'<button type="submit" name="preferred" value="{esc(c.generation_id)}" '
        f'id="prefer-{side}" data-key="{key}">This one is better ({label})</button></div>'
        for c, side, key, label in ((left, "left", "1", "← or 1"), (right, "right", "2", "→ or 2"))
    )
    return (
        '<form method="post" action="/compare/submit" class="pair">'
        f"{_hidden(task, 'comparison')}{sides}</form>"
    )


def _correct_body(task: Task, max_chars: int) -> str:
    rows = []
    for i, c in enumerate(task.candidates):
        rows.append(
            f'<li class="candidate"><form method="post" action="/correct/submit">'
            f"{_hidden(task, c.generation_id)}"
            f'<input type="hidden" name="generation_id" value="{esc(c.generation_id)}">'
            f'<label for="correction-{i}">phrase {i + 1}: <span class="text">{phrase(c.text)}'
            f"</span></label>"
            f'<textarea id="correction-{i}" name="text" rows="2" maxlength="{max_chars * 2}">'
            f"{esc(c.text)}</textarea>"
            f'<button type="submit" id="submit-correction-{i}">Submit correction</button>'
            "</form></li>"
        )
    return (
        "<p>Edit a phrase into what it should have been, then submit it.</p>"
        f'<ol class="candidates">{"".join(rows)}</ol>'
    )


def mode_page(
    mode: str,
    rater: str,
    task: Task | None,
    *,
    scale: str,
    max_chars: int,
    notice: Notice | None = None,
    prompt: str = "",
) -> str:
    body = _notice(notice) + _prompt_form(mode, prompt or (task.prompt if task else ""), max_chars)
    if task is not None:
        body += _task_header(task)
        if mode == "rate":
            body += _rate_body(task, scale)
        elif mode == "rank":
            body += _rank_body(task)
        elif mode == "compare":
            body += _compare_body(task)
        else:
            body += _correct_body(task, max_chars)
    return layout(MODE_TITLES[mode], body, rater=rater, active=mode)


def evaluation_setup_page(
    rater: str,
    *,
    versions: list[str],
    version_a: str,
    version_b: str,
    prompts: str,
    max_prompts: int,
    notice: Notice | None = None,
) -> str:
    options = "".join(f'<option value="{esc(v)}">' for v in versions)
    body = (
        f"{_notice(notice)}"
        '<form method="post" action="/evaluate/start" class="card">'
        "<p>Two versions answer the same prompts; you see their phrases side by side in a "
        "random order, without knowing which is which, and judge each pair. The versions are "
        "revealed at the end.</p>"
        f'<datalist id="versions">{options}</datalist>'
        '<label for="version_a">Version A</label>'
        f'<input id="version_a" name="version_a" list="versions" value="{esc(version_a)}" '
        "required>"
        '<label for="version_b">Version B</label>'
        f'<input id="version_b" name="version_b" list="versions" value="{esc(version_b)}" '
        "required>"
        f'<label for="prompts">Prompts, one per line (at most {max_prompts})</label>'
        f'<textarea id="prompts" name="prompts" rows="6">{esc(prompts)}</textarea>'
        '<button type="submit" id="start-evaluation">Start blind session</button></form>'
    )
    return layout(MODE_TITLES["evaluate"], body, rater=rater, active="evaluate")


def evaluation_item_page(rater: str, evaluation: Evaluation, notice: Notice | None = None) -> str:
    item: EvaluationItem = evaluation.items[evaluation.position]
    buttons = "".join(
        f'<button type="submit" name="choice" value="{value}" id="verdict-{value}" '
        f'aria-keyshortcuts="{keys}">{esc(label)} <kbd>{esc(keys)}</kbd></button>'
        for value, label, keys in VERDICT_BUTTONS
    )
    body = (
        f"{_notice(notice)}"
        f'<p id="progress">Pair {evaluation.position + 1} of {len(evaluation.items)}. '
        "Which phrase answers the prompt better?</p>"
        f'<p class="task">Prompt <q id="eval-prompt">{esc(item.prompt)}</q></p>'
        f'<form method="post" action="/evaluate/verdict" class="pair verdict" '
        f'data-shortcuts="verdict">'
        f'<input type="hidden" name="session_id" value="{esc(evaluation.session_id)}">'
        f'<input type="hidden" name="position" value="{evaluation.position}">'
        f'<div class="side"><h2>Left</h2><p class="text" id="left-text">{phrase(item.left.text)}'
        "</p></div>"
        f'<div class="side"><h2>Right</h2><p class="text" id="right-text">'
        f"{phrase(item.right.text)}</p></div>"
        f'<div class="verdicts">{buttons}</div></form>'
    )
    return layout(MODE_TITLES["evaluate"], body, rater=rater, active="evaluate")


NAMES = {"a": "A better", "b": "B better", "tie": "tie", "both_bad": "both bad"}


def evaluation_summary_page(
    rater: str, evaluation: Evaluation, report_text: str, notice: Notice | None = None
) -> str:
    counts = {name: 0 for name in NAMES}
    rows = []
    for i, item in enumerate(evaluation.items):
        if item.choice is not None:
            counts[item.choice] += 1
        left = evaluation.version_a if item.a_left else evaluation.version_b
        right = evaluation.version_b if item.a_left else evaluation.version_a
        rows.append(
            f"<tr><td>{i + 1}</td><td>{esc(item.prompt)}</td><td>{esc(left)}</td>"
            f"<td>{esc(right)}</td><td>{esc(NAMES.get(item.choice or '', 'not judged'))}</td></tr>"
        )
    tally = ", ".join(f"{NAMES[k]} {v}" for k, v in counts.items())
    body = (
        f"{_notice(notice)}"
        f'<p id="revealed">Version A was <code>{esc(evaluation.version_a)}</code>, version B '
        f"<code>{esc(evaluation.version_b)}</code>. Your verdicts: "
        f'<span id="session-tally">{esc(tally)}</span>.</p>'
        '<table class="reveal"><thead><tr><th>#</th><th>prompt</th><th>left was</th>'
        "<th>right was</th><th>your verdict</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
        f'<pre id="report">{esc(report_text)}</pre>'
        '<form method="get" action="/evaluate"><input type="hidden" name="new" value="1">'
        '<button type="submit" id="new-evaluation">New session</button></form>'
    )
    return layout("Evaluation revealed", body, rater=rater, active="evaluate")
