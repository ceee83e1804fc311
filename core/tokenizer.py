"""Word-level tokenizer, built from the training split and saved inside every checkpoint.

Rules (documented because detokenised text is what users see):
- Text is NFKC-normalised and lower-cased.
- A word is a run of letters and digits, with inner apostrophes kept ("don't", "it's").
- Every other visible character (",", "!", "?", "." ...) is a token of its own.
- Detokenising joins words with single spaces and attaches closing punctuation to the word
  before it, so `decode(encode(s)) == normalise(s)` for the corpus's phrases.
- Words outside the vocabulary map to <unk>.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

PAD, BOS, EOS, UNK, SEP = "<pad>", "<bos>", "<eos>", "<unk>", "<sep>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, SEP)
PAD_ID, BOS_ID, EOS_ID, UNK_ID, SEP_ID = range(5)

_TOKEN_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*|[^\w\s]", re.UNICODE)
_ATTACH_LEFT = frozenset(",.!?;:%)")
FORMAT_VERSION = 1


def normalise(text: str) -> str:
    """Apply the tokenizer's normalisation: NFKC and lower case."""
    return unicodedata.normalize("NFKC", text).lower()


def split_words(text: str) -> list[str]:
    """Split text into the tokenizer's word and punctuation pieces (no vocabulary involved)."""
    return _TOKEN_RE.findall(normalise(text))


@dataclass(frozen=True)
class Tokenizer:
    """An immutable vocabulary: token strings in id order, the special tokens first."""

    tokens: tuple[str, ...]

    def __post_init__(self) -> None:
        if tuple(self.tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"the vocabulary must start with {SPECIAL_TOKENS}")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("the vocabulary has duplicate tokens")
        object.__setattr__(self, "_index", {t: i for i, t in enumerate(self.tokens)})

    @classmethod
    def build(
        cls, texts: Iterable[str], *, min_count: int = 1, max_size: int | None = None
    ) -> Tokenizer:
        """Build a vocabulary from texts: most frequent first, ties broken alphabetically."""
        counts = Counter(word for text in texts for word in split_words(text))
        ranked = sorted(
            (w for w, c in counts.items() if c >= min_count and w not in SPECIAL_TOKENS),
            key=lambda w: (-counts[w], w),
        )
        if max_size is not None:
            ranked = ranked[: max(0, max_size - len(SPECIAL_TOKENS))]
        return cls(SPECIAL_TOKENS + tuple(ranked))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def id_of(self, token: str) -> int:
        return self._index.get(token, UNK_ID)  # type: ignore[attr-defined,no-any-return]

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without bos/eos."""
        return [self.id_of(w) for w in split_words(text)]

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a keyword prompt as the policy reads it (here: the words themselves; a
        causal LM's tokenizer wraps them in its prompt template first)."""
        return self.encode(prompt)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids; special tokens other than <unk> are dropped, decoding stops at <eos>."""
        words: list[str] = []
        for i in ids:
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID, SEP_ID):
                continue
            words.append(self.tokens[i] if 0 <= i < len(self.tokens) else UNK)
        return join_words(words)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return [self.tokens[i] for i in ids]

    def to_json(self) -> str:
        return json.dumps(
            {"format": FORMAT_VERSION, "kind": "word", "lowercase": True, "tokens": self.tokens},
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        data = json.loads(text)
        if data.get("format") != FORMAT_VERSION or data.get("kind") != "word":
            raise ValueError(
                f"unsupported tokenizer format {data.get('format')!r}/{data.get('kind')!r}"
            )
        return cls(tuple(data["tokens"]))

    def save(self, path: Path) -> None:
        path.write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        return cls.from_json(path.read_text(encoding="utf-8"))


def join_words(words: Sequence[str]) -> str:
    """Join word pieces into text, attaching closing punctuation to the word before it."""
    out: list[str] = []
    for w in words:
        if out and w in _ATTACH_LEFT:
            out[-1] += w
        else:
            out.append(w)
    return " ".join(out)
