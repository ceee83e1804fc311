"""The demo's users: simulated people asking for phrases and answering with noisy feedback.

Each user is a thread with its own simusers.SimulatedUser (same preference, own seed) that
paces itself to share the population's request rate, asks the live model for candidates for a
keyword prompt, records the candidates' true reward (the hidden preference, which the learner
never sees), and sends its feedback through the client.
"""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from feedloop.client.client import FeedloopClient
from feedloop.client.errors import FeedloopClientError
from feedloop.client.types import Comparison, Correction, FeedbackInput, Ranking, Rating
from feedloop.core.corpus import load_phrases, prompt_for
from feedloop.core.feedback_kinds import FEEDBACK_KINDS
from feedloop.demo.simusers import (
    Candidate,
    SimulatedFeedback,
    SimulatedUser,
    parse_preference,
)
from feedloop.demo.tracker import DemoStats


@dataclass(frozen=True)
class PopulationConfig:
    preference: str  # simusers.parse_preference spec: include:WORD, avoid:WORD, length[:N]...
    users: int
    rate_rps: float  # requests per second of the whole population
    candidates: int  # candidates asked per request
    feedback_mix: Mapping[str, float]
    noise_sd: float
    scale: str
    seed: int

    @classmethod
    def from_options(cls, ns: Any) -> PopulationConfig:
        """The population `feedloop demo`'s parsed options describe (demo.options.build_parser;
        ValueError for a bad --feedback-mix)."""
        return cls(
            preference=ns.preference,
            users=ns.users,
            rate_rps=ns.rate_rps,
            candidates=ns.candidates,
            feedback_mix=parse_mix(ns.feedback_mix),
            noise_sd=ns.noise_sd,
            scale=ns.scale,
            seed=ns.seed,
        )


def parse_mix(text: str) -> dict[str, float]:
    """`rating=0.4,comparison=0.3,...` -> {"rating": 0.4, ...}; kinds not named get 0."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, weight = part.partition("=")
        if not sep or kind not in FEEDBACK_KINDS:
            raise ValueError(
                f"feedback mix {part!r}: expected KIND=WEIGHT, KIND one of "
                f"{', '.join(FEEDBACK_KINDS)}"
            )
        mix[kind] = float(weight)
        if mix[kind] < 0:
            raise ValueError(f"feedback mix {part!r}: weight must be >= 0")
    if not any(mix.values()):
        raise ValueError("feedback mix needs at least one positive weight")
    return mix


class TasteChange(NamedTuple):
    """The users' preference becomes `preference`: all at once at at_s (span_s 0), or user by
    user over [at_s, at_s + span_s], each at a moment of their own spread evenly over it."""

    preference: str
    at_s: float
    span_s: float = 0.0

    @property
    def end_s(self) -> float:
        return self.at_s + self.span_s

    def share_at(self, elapsed_s: float) -> float:
        """The share of users who have changed their taste by then."""
        if elapsed_s < self.at_s:
            return 0.0
        if self.span_s <= 0 or elapsed_s >= self.end_s:
            return 1.0
        return (elapsed_s - self.at_s) / self.span_s


def parse_taste_change(text: str) -> TasteChange:
    """`keyword@120` (at once, 120 s in) or `initial:bcd@120-240` (gradually, from 120 s to
    240 s): the new preference and when it takes over."""
    spec, sep, when = text.rpartition("@")
    start, dash, end = when.partition("-")
    try:
        at_s = float(start)
        end_s = float(end) if dash else at_s
    except ValueError:
        at_s = end_s = -1.0
    if not sep or at_s < 0 or end_s < at_s:
        raise ValueError(
            f"taste change {text!r}: expected PREFERENCE@SECONDS or PREFERENCE@START-END, "
            "0 <= START <= END"
        )
    parse_preference(spec)  # a ValueError naming the known preferences
    return TasteChange(spec, at_s, end_s - at_s)


def parse_taste_changes(texts: list[str]) -> list[TasteChange]:
    """Several changes, in order: each starts once the one before has ended."""
    changes = [parse_taste_change(t) for t in texts]
    for before, after in itertools.pairwise(changes):
        if after.at_s < before.end_s:
            raise ValueError(
                f"taste changes overlap: {after.preference}@{after.at_s:g} starts before "
                f"{before.preference} has taken over ({before.end_s:g} s)"
            )
    return changes


def demo_prompts(seed: int, count: int = 2000) -> list[str]:
    """Keyword prompts drawn from the shipped corpus, so every word is in the vocabulary."""
    rng = random.Random(seed)
    phrases = load_phrases()
    prompts: list[str] = []
    while len(prompts) < count:
        prompt = prompt_for(rng.choice(phrases), rng)
        if prompt:
            prompts.append(prompt)
    return prompts


def to_client_event(feedback: SimulatedFeedback) -> FeedbackInput:
    """A simulated user's feedback as the client's event type."""
    ids = feedback.generation_ids
    if feedback.kind == "rating":
        if feedback.score is None:
            raise ValueError("a simulated rating without a score")
        return Rating(ids[0], float(feedback.score), scale=feedback.scale or "unit")
    if feedback.kind == "comparison":
        return Comparison(ids[0], ids[1])
    if feedback.kind == "ranking":
        return Ranking(tuple(ids))
    if feedback.text is None:
        raise ValueError("a simulated correction without its text")
    return Correction(ids[0], feedback.text)


class Population:
    """config.users threads driving traffic through one client until stop() or an error."""

    def __init__(self, client: FeedloopClient, config: PopulationConfig, stats: DemoStats):
        self.client = client
        self.config = config
        self.stats = stats
        self.preference = parse_preference(config.preference)
        self.prompts = demo_prompts(config.seed)
        self.users = [
            SimulatedUser(
                self.preference,
                mix=dict(config.feedback_mix),
                noise_sd=config.noise_sd,
                scale=config.scale,
                seed=config.seed * 1000 + i,
                client_id=f"demo-user-{i}",
            )
            for i in range(config.users)
        ]
        # Who changes taste first in a gradual change: a seeded order, not the users' numbers.
        self._change_order = list(range(config.users))
        random.Random(config.seed * 31 + 7).shuffle(self._change_order)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def change_preference(self, spec: str, share: float = 1.0) -> None:
        """The taste of the first `share` of the users (in an order fixed by the seed) becomes
        spec from their next request on (a drift of taste; share 1: everyone)."""
        preference = parse_preference(spec)
        changed = round(share * len(self.users))
        for index in self._change_order[:changed]:
            self.users[index].preference = preference
        if changed == len(self.users):
            self.preference = preference

    def start(self) -> None:
        for i, user in enumerate(self.users):
            thread = threading.Thread(
                target=self._run_user, args=(i, user), name=f"demo-user-{i}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=timeout_s)

    def _run_user(self, index: int, user: SimulatedUser) -> None:
        rng = random.Random(self.config.seed * 7919 + index)
        period_s = self.config.users / self.config.rate_rps  # each user's share of the rate
        self._stop.wait(rng.uniform(0, period_s))  # spread the users' first requests
        while not self._stop.is_set():
            prompt = rng.choice(self.prompts)
            try:
                # The user's id as routing key: a user stays on one side of a canary trial.
                reply = self.client.generate(
                    prompt, self.config.candidates, routing_key=user.client_id, timeout_s=10
                )
                candidates = [Candidate(c.generation_id, c.text) for c in reply.candidates]
                preference = user.preference  # one taste for the whole request
                rewards = [preference.reward(c.text, prompt) for c in reply.candidates]
                events = [to_client_event(f) for f in user.respond(prompt, candidates)]
                if events:
                    self.client.submit_many(events, timeout_s=10)
                self.stats.record_request(
                    reply.model_version, rewards, len(events), reply.served_as or "live"
                )
            except FeedloopClientError as exc:
                self.stats.record_error(exc.code.name)
            # Exponential think time: arrivals look like many independent people (Poisson).
            self._stop.wait(rng.expovariate(1.0 / period_s))
