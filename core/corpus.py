"""The phrase corpus: loading with clear errors, a seeded split, and (prompt, phrase) pairs.

The default corpus ships in `core/corpus/phrases.txt` (made by `core/corpus/make_phrases.py`).
A user's corpus is a UTF-8 text file with one phrase per line; blank lines are skipped.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from feedloop.core.errors import CorpusError
from feedloop.core.tokenizer import split_words

MAX_LINE_CHARS = 200
MIN_PHRASES = 20

# Words that never serve as keywords: function words carry no topic.
STOPWORDS = frozenset(
    """
    a about above after again against all am an and any are as at be because been before being
    below between both but by can could did do does doing down during each even ever every few
    for from further had has have having he her here hers herself him himself his how i if in
    into is it it's its itself just let let's me more most my myself no nor not now of off on
    once one only or other our ours ourselves out over own same she should so some such than
    that the their theirs them themselves then there these they this those through to too under
    until up us very was we were what when where which while who whom why will with would you
    your yours yourself yourselves don't can't won't isn't aren't we're you're i'm i'll we'll
    you'll that's there's here's what's get got make made go goes going new
    """.split()
)


def default_corpus_path() -> Path:
    """Path of the phrase corpus shipped with feedloop."""
    return Path(str(resources.files("feedloop.core").joinpath("corpus/phrases.txt")))


def load_phrases(path: Path | None = None) -> list[str]:
    """Read a corpus file; raise CorpusError naming the file and line for anything unusable."""
    path = path or default_corpus_path()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"{path}: cannot read the corpus: {exc.strerror or exc}") from exc
    if not raw.strip():
        raise CorpusError(f"{path}: the corpus is empty (expected one phrase per line)")
    phrases: list[str] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if b"\x00" in line:
            raise CorpusError(f"{path}:{number}: NUL byte: this looks like a binary file")
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise CorpusError(
                f"{path}:{number}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8"
            ) from exc
        if len(text) > MAX_LINE_CHARS:
            raise CorpusError(
                f"{path}:{number}: line of {len(text)} characters; at most {MAX_LINE_CHARS} "
                "(one short phrase per line)"
            )
        if any(ord(c) < 32 and c not in "\t\r" for c in text):
            raise CorpusError(f"{path}:{number}: control character in the phrase")
        if text and split_words(text):
            phrases.append(text)
    distinct = list(dict.fromkeys(phrases))
    if len(distinct) < MIN_PHRASES:
        raise CorpusError(
            f"{path}: only {len(distinct)} distinct phrases; at least {MIN_PHRASES} are needed"
        )
    return distinct


@dataclass(frozen=True)
class CorpusSplit:
    train: list[str]
    validation: list[str]
    test: list[str]


def split_corpus(
    phrases: Sequence[str],
    *,
    seed: int = 0,
    validation_share: float = 0.05,
    test_share: float = 0.05,
) -> CorpusSplit:
    """A fixed split for a seed: the same phrases and seed always give the same three parts."""
    ordered = sorted(set(phrases))
    random.Random(seed).shuffle(ordered)
    n_val = max(1, round(len(ordered) * validation_share))
    n_test = max(1, round(len(ordered) * test_share))
    return CorpusSplit(
        train=ordered[n_val + n_test :],
        validation=ordered[:n_val],
        test=ordered[n_val : n_val + n_test],
    )


def keywords_of(phrase: str) -> list[str]:
    """Content words of a phrase that can serve as its prompt, in phrase order, distinct."""
    words = [w for w in split_words(phrase) if w.isalpha() and len(w) >= 3 and w not in STOPWORDS]
    return list(dict.fromkeys(words))


def prompt_for(phrase: str, rng: random.Random, *, max_keywords: int = 2) -> str | None:
    """A prompt for a phrase: one or more of its keywords, in phrase order. None if it has none."""
    keywords = keywords_of(phrase)
    if not keywords:
        return None
    k = 1 if max_keywords <= 1 or rng.random() < 0.6 else rng.randint(2, max_keywords)
    chosen = sorted(rng.sample(range(len(keywords)), min(k, len(keywords))))
    return " ".join(keywords[i] for i in chosen)


def make_pairs(
    phrases: Sequence[str], rng: random.Random, *, max_keywords: int = 2
) -> list[tuple[str, str]]:
    """(prompt, phrase) pairs for teacher forcing: one per phrase that has a keyword."""
    pairs = []
    for phrase in phrases:
        prompt = prompt_for(phrase, rng, max_keywords=max_keywords)
        if prompt is not None:
            pairs.append((prompt, phrase))
    return pairs
