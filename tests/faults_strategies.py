"""Hypothesis strategies for the fuzz tests: feedloop.v1 requests of every shape a client can
send (control characters, NUL, huge and negative numbers, NaN and infinities, empty and repeated
ids, oversize repeated fields, out-of-range timestamps).
"""

from __future__ import annotations

import string
from typing import Any

from hypothesis import strategies as st

from feedloop.v1 import feedloop_pb2 as pb

INT32 = st.integers(-(2**31), 2**31 - 1)
# google.protobuf.Timestamp's valid range: 0001-01-01 to 9999-12-31.
MIN_TIMESTAMP_S, MAX_TIMESTAMP_S = -62135596800, 253402300799
BAD_TIMESTAMPS = [(322, -1), (0, 1_000_000_000), (MAX_TIMESTAMP_S + 1, 0), (-(2**63), 0)]

# -- strategies ------------------------------------------------------------------------------------

NASTY_CHARS = ["\x00", "\x01", "\x1b", "\n", "\r", "\t", "\x7f", "\u202e", "\ufeff", "\u0301"]


def texts(*, allow_nul: bool, max_size: int = 40) -> st.SearchStrategy[str]:
    """Any Unicode text (control characters included), keywords, and blow-ups past the limits."""
    chars = st.characters(codec="utf-8")
    if not allow_nul:
        chars = st.characters(codec="utf-8", exclude_characters="\x00")
    nasty = [c for c in NASTY_CHARS if allow_nul or c != "\x00"]
    plain = st.text(alphabet=chars, max_size=max_size)
    return st.one_of(
        plain,
        st.text(alphabet=string.ascii_lowercase + " ", min_size=1, max_size=max_size),
        st.lists(st.sampled_from(nasty), min_size=1, max_size=6).map("".join),
        st.tuples(plain, st.integers(10, 60)).map(lambda t: (t[0] or "x") * t[1]),
    )


def floats32() -> st.SearchStrategy[float]:
    return st.one_of(
        st.floats(width=32, allow_nan=True, allow_infinity=True),
        st.sampled_from([0.0, -0.0, 0.5, 1.0, 1e-45, -1.0, 2.0, float("nan"), float("inf")]),
    )


def generate_requests(allow_nul: bool) -> st.SearchStrategy[pb.GenerateRequest]:
    text = texts(allow_nul=allow_nul)
    small_or_any = st.one_of(st.integers(-3, 60), INT32)
    return st.builds(
        lambda prompt, n, temperature, top_k, top_p, max_tokens, seed, version, request_id: (
            pb.GenerateRequest(
                prompt=prompt,
                num_candidates=n,
                sampling=pb.SamplingParams(
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    max_tokens=max_tokens,
                    seed=seed,
                ),
                model_version=version,
                request_id=request_id,
            )
        ),
        prompt=st.one_of(text, st.just(""), st.just("ocean sunrise")),
        n=st.one_of(st.integers(-2, 10), INT32),
        # Edge floats, and values a real caller sends (0 greedy, below the lowest valid
        # temperature, typical): with edge values alone a valid request became rare once
        # temperatures under the documented floor were refused.
        temperature=st.one_of(floats32(), st.sampled_from([0.0, 0.001, 0.7, 1.0, 1.5])),
        top_k=small_or_any,
        top_p=st.one_of(floats32(), st.sampled_from([0.0, 0.5, 0.9, 1.0])),
        max_tokens=small_or_any,
        seed=st.integers(0, 2**64 - 1),
        version=st.one_of(st.just(""), st.just("v0001"), st.just("v9999"), text),
        request_id=st.one_of(st.just(""), text, st.text(min_size=129, max_size=140)),
    )


def feedback_events(
    real_ids: list[str], allow_nul: bool
) -> st.SearchStrategy[tuple[pb.FeedbackEvent, str]]:
    """(event, kind) pairs: every kind, with real, unknown, empty and repeated generation ids."""
    text = texts(allow_nul=allow_nul)
    gid = st.one_of(st.sampled_from(real_ids), st.sampled_from(real_ids), text, st.just(""))
    event_id = st.one_of(
        st.sampled_from(["dup-a", "dup-b", "dup-c"]),
        st.uuids().map(str),
        text,
        st.text(min_size=129, max_size=140),
    )
    score = st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([0.0, 1.0, 0.5, 3.0, 5.0, -1.0, 5.5, 1e308]),
    )
    scale = st.one_of(st.integers(0, 3), INT32)
    oversize_ranking = st.integers(200, 1500).map(lambda n: [f"g{i}" for i in range(n)])
    ranking_ids = st.one_of(
        st.lists(gid, max_size=6),
        st.lists(st.sampled_from(real_ids), min_size=2, max_size=5),
        oversize_ranking,
        st.lists(st.sampled_from(real_ids), min_size=1, max_size=3).map(lambda ids: ids * 100),
    )
    given_at = st.one_of(
        st.none(),
        st.tuples(st.integers(MIN_TIMESTAMP_S, MAX_TIMESTAMP_S), st.integers(0, 999_999_999)),
        st.tuples(st.integers(-(2**63), 2**63 - 1), INT32),
        st.sampled_from([(1.7e9, 0), *BAD_TIMESTAMPS]),
    )

    def build(
        kind: str,
        eid: str,
        a: str,
        b: str,
        s: float,
        sc: int,
        ids: list[str],
        words: str,
        when: Any,
    ) -> tuple[pb.FeedbackEvent, str]:
        event = pb.FeedbackEvent(event_id=eid)
        if kind == "rating":
            event.rating.CopyFrom(pb.Rating(generation_id=a, score=s, scale=sc))  # type: ignore[arg-type]
        elif kind == "ranking":
            event.ranking.CopyFrom(pb.Ranking(generation_ids=ids))
        elif kind == "comparison":
            event.comparison.CopyFrom(pb.Comparison(preferred_id=a, rejected_id=b))
        elif kind == "correction":
            event.correction.CopyFrom(pb.Correction(generation_id=a, text=words))
        if when is not None:
            event.given_at.seconds, event.given_at.nanos = int(when[0]), when[1]
        return event, kind

    arbitrary = st.builds(
        build,
        st.sampled_from(["rating", "ranking", "comparison", "correction", "none"]),
        event_id,
        gid,
        gid,
        score,
        scale,
        ranking_ids,
        st.one_of(text, st.just(""), st.just("   "), st.text(min_size=1025, max_size=1100)),
        given_at,
    )
    # Mostly-valid events as well, so that acceptance, duplicates and the store are exercised
    # as hard as refusals (arbitrary events are nearly always refused).
    pairs = st.lists(st.sampled_from(real_ids), min_size=2, max_size=2, unique=True)
    mostly_valid = st.builds(
        build,
        st.sampled_from(["rating", "ranking", "comparison", "correction"]),
        st.one_of(st.uuids().map(str), st.sampled_from(["dup-a", "dup-b", "dup-c"])),
        st.sampled_from(real_ids),
        st.sampled_from(real_ids),
        st.sampled_from([0.0, 0.25, 1.0]),
        st.sampled_from([0, 1, 3]),
        st.one_of(
            st.permutations(real_ids[:4]).map(list),
            st.permutations(real_ids[4:]).map(list),
            pairs,  # may span two requests: refused by the writer, not the parser
        ),
        st.text(alphabet=string.ascii_lowercase + " ", min_size=1, max_size=30).map("x{}".format),
        st.one_of(st.none(), st.just((1.7e9, 5))),
    )
    return st.one_of(arbitrary, mostly_valid)
