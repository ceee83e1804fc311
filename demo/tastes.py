"""Issue 21's tastes: sets of letters that the last word of a liked phrase starts with, each
covering about a quarter of what the pretrained policy says, disjoint, reproducible from a seed.

A pair of such sets is a change of taste whose both sides start from the same base (what the
first version serves of each is about the target share), so runs with different pairs compare.
The shares are measured on the policy's own samples (the demo's prompts, the server's default
sampling), not on the corpus: what users are served is what they like or not.

`initial_shares` and `pick_letter_sets` are pure; `policy_initial_shares` samples the policy
(torch, imported when called: the demo's process needs it only for `--drift`).
"""

from __future__ import annotations

import random
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from feedloop.demo.simusers import LastWordInitial, words_of

TARGET_SHARE = 0.25  # each taste covers about this share of the pretrained policy's phrases


def last_word_initial(text: str) -> str | None:
    """The first letter (a-z) of the phrase's last word, None when there is none."""
    words = [w for w in words_of(text) if any(c.isalnum() for c in w)]
    if not words:
        return None
    first = words[-1][0].lower()
    return first if first in string.ascii_lowercase else None


def initial_shares(texts: Iterable[str]) -> dict[str, float]:
    """Each letter's share of the phrases whose last word starts with it (phrases without such a
    letter count in the total and under no letter)."""
    counts: Counter[str] = Counter()
    total = 0
    for text in texts:
        total += 1
        letter = last_word_initial(text)
        if letter is not None:
            counts[letter] += 1
    if total == 0:
        raise ValueError("no phrases to measure letter shares on")
    return {letter: counts[letter] / total for letter in sorted(counts)}


def pick_letter_sets(
    shares: Mapping[str, float], count: int, target: float, order: Sequence[str]
) -> list[str]:
    """count disjoint letter sets, each as close to `target` of the phrases as a greedy pass
    gets: letters are visited in `order`, and one joins the set being built when it brings the
    set's share closer to the target; a set is closed when no unused letter does.

    ValueError when the letters cannot make count sets (a set that stays empty).
    """
    if count < 1 or not 0 < target < 1:
        raise ValueError(f"need count >= 1 and 0 < target < 1, got {count} and {target}")
    used: set[str] = set()
    sets: list[str] = []
    for _ in range(count):
        chosen: list[str] = []
        share = 0.0
        for letter in order:
            p = shares.get(letter, 0.0)
            if letter in used or p <= 0:
                continue
            if abs(share + p - target) < abs(share - target):
                chosen.append(letter)
                share += p
        if not chosen:
            raise ValueError(
                f"the letters' shares cannot make {count} sets of about {target}: "
                f"set {len(sets) + 1} stays empty"
            )
        used.update(chosen)
        sets.append("".join(sorted(chosen)))
    return sets


def taste_sets(
    shares: Mapping[str, float], count: int, seed: int, target: float = TARGET_SHARE
) -> list[str]:
    """pick_letter_sets with the letters visited in an order shuffled by seed: another seed,
    another pair of tastes, the same seed the same pair."""
    order = sorted(shares)
    random.Random(seed).shuffle(order)
    return pick_letter_sets(shares, count, target, order)


def set_share(shares: Mapping[str, float], letters: str) -> float:
    """The share of phrases a letter set covers: the first version's liked rate on that taste."""
    return sum(shares.get(letter, 0.0) for letter in letters)


def taste_names(sets: Sequence[str]) -> list[str]:
    """The sets as preference specs (`initial:LETTERS`), checked by the preference itself."""
    return [LastWordInitial(letters).name for letters in sets]


def policy_initial_shares(
    checkpoint: Path, prompts: Sequence[str], *, samples_per_prompt: int = 4, seed: int = 0
) -> dict[str, float]:
    """initial_shares of the policy's samples for these prompts at the server's default
    sampling (temperature 1, no filtering), seeded: the same figures on every call."""
    from dataclasses import replace

    import torch

    from feedloop.core.checkpoint import load_checkpoint
    from feedloop.core.policy import SampleRequest
    from feedloop.core.sampling import SamplingParams

    policy, _ = load_checkpoint(checkpoint)
    base = SamplingParams()
    texts: list[str] = []
    batch = 256
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            chunk = prompts[start : start + batch]
            requests = [
                SampleRequest(
                    policy.encode_prompt(p),
                    replace(base, seed=seed + start + i + 1),
                    samples_per_prompt,
                )
                for i, p in enumerate(chunk)
            ]
            for outputs in policy.sample(requests):
                texts.extend(policy.decode(o.token_ids) for o in outputs)
    return initial_shares(texts)
