import random
from pathlib import Path

import pytest

from feedloop.core.corpus import (
    MAX_LINE_CHARS,
    keywords_of,
    load_phrases,
    make_pairs,
    split_corpus,
)
from feedloop.core.errors import CorpusError
from feedloop.core.tokenizer import split_words


def test_shipped_corpus_has_enough_distinct_short_phrases_and_keywords():
    phrases = load_phrases()
    assert len(set(phrases)) >= 5000
    assert all(3 <= len(p.split()) <= 12 for p in phrases)
    keyword_counts: dict[str, int] = {}
    for p in phrases:
        for k in keywords_of(p):
            keyword_counts[k] = keyword_counts.get(k, 0) + 1
    assert sum(1 for c in keyword_counts.values() if c >= 5) >= 200


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_bytes(data)
    return path


GOOD = b"".join(f"phrase number {i} about the sea\n".encode() for i in range(30))


def test_a_user_corpus_loads_and_skips_blank_lines(tmp_path):
    assert len(load_phrases(write(tmp_path, GOOD + b"\n\n"))) == 30


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"   \n\n", "empty"),
        (GOOD + b"bad \xff\xfe bytes\n", ":31: not valid UTF-8"),
        (GOOD + b"\x00\x01\x02binary\n", ":31: NUL byte"),
        (
            GOOD + b"x" * (MAX_LINE_CHARS + 1) + b"\n",
            f":31: line of {MAX_LINE_CHARS + 1} characters",
        ),
        (b"only one phrase\n", "at least"),
    ],
)
def test_bad_corpus_files_get_an_error_naming_the_line(tmp_path, data, message):
    with pytest.raises(CorpusError, match=message.replace("(", r"\(")):
        load_phrases(write(tmp_path, data))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CorpusError, match="cannot read"):
        load_phrases(tmp_path / "nope.txt")


def test_split_is_fixed_for_a_seed_disjoint_and_complete():
    phrases = load_phrases()
    a, b = split_corpus(phrases, seed=3), split_corpus(list(reversed(phrases)), seed=3)
    assert a == b
    parts = [set(a.train), set(a.validation), set(a.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set().union(*parts) == set(phrases)
    assert split_corpus(phrases, seed=4).test != a.test


def test_keywords_are_content_words_in_phrase_order():
    assert keywords_of("The quiet garden of the winter!") == ["quiet", "garden", "winter"]


def test_pairs_prompt_with_keywords_taken_from_their_phrase():
    phrases = load_phrases()[:200]
    for prompt, phrase in make_pairs(phrases, random.Random(0)):
        words = set(split_words(phrase))
        assert 1 <= len(prompt.split()) <= 2
        assert all(k in words for k in prompt.split())
