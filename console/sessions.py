"""What the console remembers of each rater between pages: who they are, their connection to
the server, the candidates their current page shows, and their blind evaluation session.

Only what a page showed can be judged: a submitted form names its task (and, in evaluation, its
item), and a form from an older page is refused as stale, so no one rates a phrase they were
not shown in the context they saw it. Sessions live in memory (a restart logs raters out: the
feedback they gave is already stored) and are bounded, the least recently used dropped first.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from feedloop.client import AsyncFeedloopClient

MODES = ("rate", "rank", "compare", "correct")


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Shown:
    """One candidate as a page showed it."""

    generation_id: str
    text: str


@dataclass
class Task:
    """The candidates one prompt produced for one mode's page."""

    mode: str
    prompt: str
    model_version: str
    candidates: list[Shown]
    task_id: str = field(default_factory=new_id)
    # One idempotency key per form on the page, made when the page is first shown: sending the
    # same form twice (a reload, a double click) stores one event, acknowledged DUPLICATE.
    event_ids: dict[str, str] = field(default_factory=dict)
    # Keys already acknowledged: the same form sent again is passed on, and the server answers
    # DUPLICATE (stored once) rather than the console guessing.
    sent_ids: set[str] = field(default_factory=set)

    def candidate(self, generation_id: str) -> Shown | None:
        return next((c for c in self.candidates if c.generation_id == generation_id), None)

    def event_id(self, form: str) -> str:
        return self.event_ids.setdefault(form, new_id())

    def sent(self, form: str, event_id: str) -> None:
        """A form's event was acknowledged: the next one from this page is a new event."""
        self.event_ids.pop(form, None)
        self.sent_ids.add(event_id)


@dataclass
class EvaluationItem:
    """One prompt of a blind evaluation: A's and B's candidates, and which side A is on."""

    prompt: str
    a: Shown
    b: Shown
    a_left: bool
    verdict_id: str = field(default_factory=new_id)
    choice: str | None = None  # "a", "b", "tie", "both_bad" once judged

    @property
    def left(self) -> Shown:
        return self.a if self.a_left else self.b

    @property
    def right(self) -> Shown:
        return self.b if self.a_left else self.a


@dataclass
class Evaluation:
    """A rater's blind evaluation session of version_a against version_b."""

    version_a: str
    version_b: str
    items: list[EvaluationItem]
    session_id: str = field(default_factory=new_id)
    position: int = 0  # the next item to judge

    @property
    def finished(self) -> bool:
        return self.position >= len(self.items)


@dataclass
class RaterSession:
    rater: str
    client: AsyncFeedloopClient
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    tasks: dict[str, Task] = field(default_factory=dict)  # by mode
    evaluation: Evaluation | None = None
    last_seen: float = field(default_factory=time.monotonic)


class Sessions:
    """Rater sessions by cookie token, at most `capacity`, least recently used dropped first."""

    def __init__(self, capacity: int, idle_timeout_s: float = 12 * 3600) -> None:
        self.capacity = capacity
        self.idle_timeout_s = idle_timeout_s
        self._by_token: OrderedDict[str, RaterSession] = OrderedDict()

    def get(self, token: str | None) -> RaterSession | None:
        session = self._by_token.get(token or "")
        if session is None:
            return None
        if time.monotonic() - session.last_seen > self.idle_timeout_s:
            return None
        session.last_seen = time.monotonic()
        self._by_token.move_to_end(session.token)
        return session

    def add(
        self, rater: str, connect: Callable[[], AsyncFeedloopClient]
    ) -> tuple[RaterSession, list[RaterSession]]:
        """A new session, and the sessions dropped to make room (their clients to close)."""
        session = RaterSession(rater, connect())
        self._by_token[session.token] = session
        dropped = []
        while len(self._by_token) > self.capacity:
            _, old = self._by_token.popitem(last=False)
            dropped.append(old)
        return session, dropped

    def remove(self, token: str) -> RaterSession | None:
        return self._by_token.pop(token, None)

    def all(self) -> list[RaterSession]:
        return list(self._by_token.values())
