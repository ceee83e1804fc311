from pathlib import Path

import pytest

from feedloop.core.tokenizer import BOS_ID, EOS_ID, SPECIAL_TOKENS, UNK_ID, Tokenizer, split_words


def test_specials_come_first_with_fixed_ids():
    tok = Tokenizer.build(["a b c"])
    assert tok.tokens[:5] == SPECIAL_TOKENS
    assert (tok.id_of("<bos>"), tok.id_of("<eos>"), tok.id_of("<unk>")) == (BOS_ID, EOS_ID, UNK_ID)


def test_lower_cases_and_splits_punctuation_but_keeps_inner_apostrophes():
    assert split_words("Don't STOP, Believing!") == ["don't", "stop", ",", "believing", "!"]


@pytest.mark.parametrize(
    "text",
    [
        "fresh coffee for every morning",
        "good morning, sunny friends!",
        "it's time for a walk?",
        "sale: 50% off.",
        "the quiet garden of winter",
    ],
)
def test_encode_decode_round_trips_normalised_text(text):
    tok = Tokenizer.build([text])
    assert tok.decode(tok.encode(text)) == text.lower()


def test_unknown_words_map_to_unk_and_decode_stops_at_eos():
    tok = Tokenizer.build(["hello world"])
    ids = tok.encode("hello martian")
    assert ids == [tok.id_of("hello"), UNK_ID]
    assert tok.decode([*tok.encode("hello world"), EOS_ID, tok.id_of("hello")]) == "hello world"


def test_vocabulary_is_ordered_by_frequency_then_alphabet_and_capped():
    tok = Tokenizer.build(["b a", "b c", "b a"], max_size=len(SPECIAL_TOKENS) + 2)
    assert tok.tokens[len(SPECIAL_TOKENS) :] == ("b", "a")


def test_min_count_drops_rare_words():
    tok = Tokenizer.build(["x y", "x"], min_count=2)
    assert "y" not in tok.tokens and "x" in tok.tokens


def test_save_and_load_give_the_same_vocabulary(tmp_path: Path):
    tok = Tokenizer.build(["one two three", "two three"])
    tok.save(tmp_path / "t.json")
    assert Tokenizer.load(tmp_path / "t.json") == tok


def test_rejects_a_vocabulary_without_specials_in_place():
    with pytest.raises(ValueError):
        Tokenizer(("a", "b"))
