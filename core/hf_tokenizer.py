"""A Hugging Face `tokenizers` tokenizer seen through feedloop's tokenizer interface.

The rest of feedloop (server, trainer, reward model, generation log) speaks token ids in which
`<pad> <bos> <eos> <unk> <sep>` are ids 0-4 (core/tokenizer.py). A tokenizer trained here for a
tiny model puts them there itself (`offset` 0: feedloop's ids are the model's). A user's
tokenizer (GPT-2's, say) has its own specials elsewhere, so its ids are shifted up by five
(`offset` 5) and the five come first: feedloop's `<eos>` is the model's end-of-text token, and
the policy maps ids and logits across at its boundary (core/hf_policy.py).

This module needs only the `tokenizers` library (no torch, no transformers): the server process
holds one of these to encode prompts and decode phrases. It pickles as its JSON text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feedloop.core.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SEP_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    Tokenizer,
)

KEYWORDS = "{keywords}"
DEFAULT_PROMPT_TEMPLATE = "keywords: {keywords} =>"
SHIFTED = len(SPECIAL_TOKENS)  # the offset of a tokenizer whose specials are elsewhere


def native_specials(vocab: dict[str, int]) -> bool:
    """Whether a tokenizer's ids 0-4 are feedloop's special tokens (offset 0)."""
    return all(vocab.get(token) == i for i, token in enumerate(SPECIAL_TOKENS))


@dataclass(frozen=True, eq=False)
class HFTokenizer(Tokenizer):
    """feedloop's ids over a `tokenizers` tokenizer; build with `from_json`.

    tokens: feedloop's view of the vocabulary (the specials, then the model's tokens when
    shifted); model_eos_id: the model's end-of-text id, which feedloop's `<eos>` stands for;
    prompt_template: how a keyword prompt becomes the model's prompt text (declared in the
    checkpoint's manifest), with `{keywords}` where the keywords go.
    """

    tokenizer_json: str = ""
    offset: int = 0
    model_eos_id: int = EOS_ID
    model_bos_id: int = EOS_ID
    model_unk_id: int = EOS_ID
    prompt_template: str = KEYWORDS
    _compiled: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_json(  # type: ignore[override]
        cls,
        text: str,
        *,
        prompt_template: str = KEYWORDS,
        eos_token_id: int | None = None,
        bos_token_id: int | None = None,
        unk_token_id: int | None = None,
    ) -> HFTokenizer:
        """From a tokenizer.json's text; the token ids come from the model's config.

        Raises ValueError naming what does not fit (no end-of-text token, no {keywords}).
        """
        from tokenizers import Tokenizer as Compiled

        if KEYWORDS not in prompt_template:
            raise ValueError(f"prompt_template {prompt_template!r} has no {KEYWORDS} placeholder")
        compiled = Compiled.from_str(text)
        vocab = compiled.get_vocab(with_added_tokens=True)
        by_id = {i: t for t, i in vocab.items()}
        size = max(by_id) + 1 if by_id else 0
        model_tokens = [by_id.get(i, f"<unused {i}>") for i in range(size)]
        if native_specials(vocab):
            return cls(tuple(model_tokens), text, 0, EOS_ID, BOS_ID, UNK_ID, prompt_template)
        if eos_token_id is None or not 0 <= eos_token_id < size:
            raise ValueError(
                f"the model declares no end-of-text token in its vocabulary of {size} "
                f"(eos_token_id {eos_token_id!r}): feedloop needs one to end a phrase"
            )
        # A model token that spells a feedloop special (a `<pad>` of its own, say) keeps its
        # place under another name: the five names at the front are feedloop's.
        shown = tuple(f"{t} (model)" if t in SPECIAL_TOKENS else t for t in model_tokens)
        bos = bos_token_id if bos_token_id is not None else eos_token_id
        unk = unk_token_id if unk_token_id is not None else eos_token_id
        return cls(SPECIAL_TOKENS + shown, text, SHIFTED, eos_token_id, bos, unk, prompt_template)

    @property
    def compiled(self) -> Any:
        """The `tokenizers.Tokenizer`, built on first use (a pickled copy carries only JSON)."""
        if self._compiled is None:
            from tokenizers import Tokenizer as Compiled

            object.__setattr__(self, "_compiled", Compiled.from_str(self.tokenizer_json))
        return self._compiled

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_compiled"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def model_ids(self) -> list[int]:
        """For every feedloop id, the model's id (the table the policy translates inputs by)."""
        if self.offset == 0:
            return list(range(self.vocab_size))
        specials = {
            PAD_ID: self.model_eos_id,  # padding is masked out: any real id will do
            BOS_ID: self.model_bos_id,
            EOS_ID: self.model_eos_id,
            UNK_ID: self.model_unk_id,
            SEP_ID: self.model_eos_id,
        }
        return [specials[i] for i in range(SHIFTED)] + list(range(self.vocab_size - SHIFTED))

    # -- feedloop's tokenizer interface ----------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """A phrase's ids as the model continues a prompt with it: after a space."""
        ids = self.compiled.encode(" " + text.strip(), add_special_tokens=False).ids
        return [i + self.offset for i in ids]

    def encode_prompt(self, prompt: str) -> list[int]:
        text = self.prompt_template.replace(KEYWORDS, prompt.strip())
        ids = self.compiled.encode(text, add_special_tokens=False).ids
        return [i + self.offset for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        model_ids: list[int] = []
        for i in ids:
            if i == EOS_ID:
                break
            if i >= self.offset and i < self.vocab_size:
                model_ids.append(i - self.offset)
        return str(self.compiled.decode(model_ids, skip_special_tokens=True)).strip()

    def id_of(self, token: str) -> int:
        """The id of a word written as one token (after a space, as in a phrase), else <unk>."""
        for text in (" " + token, token):
            ids = self.compiled.encode(text, add_special_tokens=False).ids
            if len(ids) == 1:
                return int(ids[0]) + self.offset
        return UNK_ID

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Each token as the text it adds (byte-level tokens as characters, not 'Ġ' marks)."""
        return [
            self.tokens[i]
            if i < self.offset
            else str(self.compiled.decode([i - self.offset], skip_special_tokens=False))
            for i in ids
        ]

    def to_json(self) -> str:
        return self.tokenizer_json

    def save(self, path: Path) -> None:
        path.write_text(self.tokenizer_json, encoding="utf-8")


def read_tokenizer_json(path: Path) -> str:
    """A tokenizer.json's text, checked to be JSON (ValueError otherwise)."""
    text = path.read_text(encoding="utf-8")
    json.loads(text)
    return text
