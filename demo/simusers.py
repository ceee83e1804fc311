"""Simulated users: people with a preference about phrases who answer with noisy feedback.

Pure Python (no torch): the trainer's tests and benches use it in-process, and the demo's client
process imports it without the model stack.

A `Preference` is the hidden truth: a function (phrase, prompt) -> reward in [0, 1], plus how a
user would edit a phrase to satisfy it better (a correction). A `SimulatedUser` holds one
preference and answers a request's candidates with one of the four feedback kinds, drawn from a
configured mix, through noise: ratings are the true reward plus Gaussian noise put on a rating
scale; comparisons and rankings order the candidates by noisy utility (a Thurstone model, the
Gaussian cousin of Bradley-Terry); corrections edit the worst candidate.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from feedloop.core.feedback_kinds import FEEDBACK_KINDS, RATING_SCALES, rating_scale
from feedloop.core.tokenizer import join_words, split_words


def words_of(text: str) -> list[str]:
    """The word pieces of a phrase (the tokenizer's rules), punctuation included."""
    return split_words(text)


def content_length(text: str) -> int:
    """Number of words in a phrase, punctuation not counted."""
    return sum(1 for w in words_of(text) if any(c.isalnum() for c in w))


class Preference(ABC):
    """What a user wants from a phrase: a true reward in [0, 1] and an edit towards it."""

    @property
    @abstractmethod
    def name(self) -> str: ...

    @abstractmethod
    def reward(self, text: str, prompt: str = "") -> float:
        """The true reward of a phrase for a prompt, in [0, 1]."""

    @abstractmethod
    def correct(self, text: str, prompt: str, rng: random.Random) -> str | None:
        """The phrase as this user would rewrite it (higher reward), or None if it cannot."""


# Words after which a person would slip in a describing word ("a [good] morning").
DETERMINERS = frozenset("a an the your my our their this every".split())


def _insert(words: list[str], word: str, rng: random.Random) -> list[str]:
    """words with word inserted where a person would put it: after a determiner if there is
    one, else at a random position before any closing punctuation."""
    after_determiner = [i + 1 for i, w in enumerate(words[:-1]) if w in DETERMINERS]
    if after_determiner:
        position = rng.choice(after_determiner)
    else:
        end = len(words)
        while end > 0 and not any(c.isalnum() for c in words[end - 1]):
            end -= 1
        position = rng.randint(0, end)
    return [*words[:position], word, *words[position:]]


@dataclass(frozen=True)
class IncludeWord(Preference):
    """The user wants a given word in every phrase."""

    word: str

    @property
    def name(self) -> str:
        return f"include:{self.word}"

    def reward(self, text: str, prompt: str = "") -> float:
        return 1.0 if self.word in words_of(text) else 0.0

    def correct(self, text: str, prompt: str, rng: random.Random) -> str | None:
        words = words_of(text)
        if self.word in words:
            return None
        return join_words(_insert(words, self.word, rng))


@dataclass(frozen=True)
class AvoidWord(Preference):
    """The user dislikes a given word: a phrase without it scores 1, with it 0."""

    word: str

    @property
    def name(self) -> str:
        return f"avoid:{self.word}"

    def reward(self, text: str, prompt: str = "") -> float:
        return 0.0 if self.word in words_of(text) else 1.0

    def correct(self, text: str, prompt: str, rng: random.Random) -> str | None:
        words = words_of(text)
        if self.word not in words:
            return None
        kept = [w for w in words if w != self.word]
        return join_words(kept) if content_length(join_words(kept)) else None


@dataclass(frozen=True)
class Length(Preference):
    """The user wants phrases of about target_words words; the reward falls off linearly.

    With the default target of 3 this is "shorter is better" for a model whose phrases run 4 to
    10 words; reward = max(0, 1 - |words - target| / width_words).
    """

    target_words: int = 3
    width_words: float = 6.0

    @property
    def name(self) -> str:
        return f"length:{self.target_words}"

    def reward(self, text: str, prompt: str = "") -> float:
        n = content_length(text)
        return max(0.0, 1.0 - abs(n - self.target_words) / self.width_words)

    def correct(self, text: str, prompt: str, rng: random.Random) -> str | None:
        words = words_of(text)
        n = content_length(text)
        if n <= self.target_words:
            return None  # a user shortens; inventing words to lengthen is not a correction
        keep = set(split_words(prompt))
        # Drop words from the end first, sparing the prompt's keywords, until the target.
        out = list(words)
        for i in range(len(out) - 1, -1, -1):
            if content_length(join_words(out)) <= self.target_words:
                break
            if any(c.isalnum() for c in out[i]) and out[i] not in keep:
                del out[i]
        return join_words(out) if content_length(join_words(out)) < n else None


@dataclass(frozen=True)
class ContainsKeyword(Preference):
    """The user wants the phrase to contain the prompt's keywords (share of them contained)."""

    @property
    def name(self) -> str:
        return "keyword"

    def reward(self, text: str, prompt: str = "") -> float:
        keywords = [w for w in split_words(prompt) if any(c.isalnum() for c in w)]
        if not keywords:
            return 1.0
        present = set(words_of(text))
        return sum(k in present for k in keywords) / len(keywords)

    def correct(self, text: str, prompt: str, rng: random.Random) -> str | None:
        words = words_of(text)
        missing = [k for k in split_words(prompt) if any(c.isalnum() for c in k) and k not in words]
        if not missing:
            return None
        for k in missing:
            words = _insert(words, k, rng)
        return join_words(words)


@dataclass(frozen=True)
class LastWordInitial(Preference):
    """The user likes a phrase whose last word starts with one of the given letters (issue
    21's taste: a set of letters covering about a quarter of what the pretrained policy says,
    demo/tastes.py picks them). Punctuation is not a word; a phrase without words scores 0.

    No correction: rewriting a phrase's ending takes words this user cannot pick from a
    vocabulary, so a user who drew a correction rates instead.
    """

    letters: str

    def __post_init__(self) -> None:
        if not self.letters or not all("a" <= c <= "z" for c in self.letters):
            raise ValueError(f"initial: needs lower-case letters a-z, got {self.letters!r}")
        if len(set(self.letters)) != len(self.letters):
            raise ValueError(f"initial: letters repeat in {self.letters!r}")

    @property
    def name(self) -> str:
        return f"initial:{self.letters}"

    def reward(self, text: str, prompt: str = "") -> float:
        words = [w for w in words_of(text) if any(c.isalnum() for c in w)]
        return 1.0 if words and words[-1][0].lower() in self.letters else 0.0

    def correct(self, text: str, prompt: str, rng: random.Random) -> str | None:
        return None


def parse_preference(spec: str) -> Preference:
    """A preference from its name: include:WORD, avoid:WORD, length[:N], keyword,
    initial:LETTERS (the last word starts with one of them)."""
    kind, _, arg = spec.partition(":")
    if kind == "include" and arg:
        return IncludeWord(arg.lower())
    if kind == "avoid" and arg:
        return AvoidWord(arg.lower())
    if kind == "length":
        return Length(int(arg)) if arg else Length()
    if kind == "keyword":
        return ContainsKeyword()
    if kind == "initial" and arg:
        return LastWordInitial(arg.lower())
    raise ValueError(
        f"unknown preference {spec!r} "
        "(include:WORD, avoid:WORD, length[:N], keyword, initial:LETTERS)"
    )


@dataclass(frozen=True)
class Candidate:
    """One candidate a user sees: its generation id and text."""

    generation_id: str
    text: str


@dataclass(frozen=True)
class SimulatedFeedback:
    """One feedback event, shaped like the proto's FeedbackEvent.

    generation_ids: rating and correction: [id]; comparison: [preferred, rejected]; ranking:
    best first. score/scale for ratings, text for corrections.
    """

    kind: str
    generation_ids: list[str]
    score: float | None = None
    scale: str | None = None
    text: str | None = None


def to_scale(unit_score: float, scale: str) -> float:
    """Put a score in [0, 1] on a rating scale (thumbs: down or up, stars5: whole stars)."""
    bounds = rating_scale(scale)
    if scale == "thumbs":
        return bounds.high if unit_score >= 0.5 else bounds.low
    if scale == "stars5":
        return bounds.low + round((bounds.high - bounds.low) * unit_score)
    return bounds.low + (bounds.high - bounds.low) * unit_score


@dataclass
class SimulatedUser:
    """A user with one preference who answers each request with one kind of feedback.

    mix: relative weights of the feedback kinds; noise_sd: standard deviation of the Gaussian
    noise on the [0, 1] reward before it is rated or compared; scale: the rating scale used.
    Comparisons and rankings need two candidates; with one, the user rates instead. A user with
    nothing to correct rates instead.
    """

    preference: Preference
    mix: Mapping[str, float] = field(
        default_factory=lambda: {
            "rating": 0.4,
            "comparison": 0.3,
            "ranking": 0.15,
            "correction": 0.15,
        }
    )
    noise_sd: float = 0.15
    scale: str = "unit"
    seed: int = 0
    client_id: str = "simulated-user"

    def __post_init__(self) -> None:
        unknown = set(self.mix) - set(FEEDBACK_KINDS)
        if unknown or not any(w > 0 for w in self.mix.values()):
            raise ValueError(
                f"mix needs positive weights over {FEEDBACK_KINDS}, got {dict(self.mix)}"
            )
        if self.scale not in RATING_SCALES:
            raise ValueError(f"unknown rating scale {self.scale!r}")
        self.rng = random.Random(self.seed)

    def _noisy(self, candidate: Candidate, prompt: str) -> float:
        true = self.preference.reward(candidate.text, prompt)
        return min(1.0, max(0.0, true + self.rng.gauss(0.0, self.noise_sd)))

    def _rate(self, prompt: str, candidates: Sequence[Candidate]) -> list[SimulatedFeedback]:
        return [
            SimulatedFeedback(
                "rating",
                [c.generation_id],
                score=to_scale(self._noisy(c, prompt), self.scale),
                scale=self.scale,
            )
            for c in candidates
        ]

    def respond(self, prompt: str, candidates: Sequence[Candidate]) -> list[SimulatedFeedback]:
        """This user's feedback on one request's candidates (one kind, drawn from the mix)."""
        if not candidates:
            return []
        kinds = [k for k in FEEDBACK_KINDS if self.mix.get(k, 0) > 0]
        kind = self.rng.choices(kinds, weights=[self.mix[k] for k in kinds])[0]
        if kind in ("comparison", "ranking") and len(candidates) < 2:
            kind = "rating"
        if kind == "comparison":
            a, b = self.rng.sample(list(candidates), 2)
            if self._noisy(a, prompt) < self._noisy(b, prompt):
                a, b = b, a
            return [SimulatedFeedback("comparison", [a.generation_id, b.generation_id])]
        if kind == "ranking":
            noisy = [(self._noisy(c, prompt), i) for i, c in enumerate(candidates)]
            order = [candidates[i].generation_id for _, i in sorted(noisy, reverse=True)]
            return [SimulatedFeedback("ranking", order)]
        if kind == "correction":
            worst = min(candidates, key=lambda c: self.preference.reward(c.text, prompt))
            text = self.preference.correct(worst.text, prompt, self.rng)
            if text is not None:
                return [SimulatedFeedback("correction", [worst.generation_id], text=text)]
        return self._rate(prompt, candidates)
