"""`feedloop export`: feedback as TRL's preference, KTO and SFT rows, in files `datasets` loads."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from store_support import generation

from feedloop.core.export_cli import ExportFilter, iter_rows, main
from feedloop.core.store import FeedbackRecord, open_store
from feedloop.core.training_rows import (
    Skipped,
    kto_label,
    preference_rows,
    ranking_pairs,
    sft_rows,
)


def event(event_id: str, kind: str, ids: list[str], t: float = 2000.0, **fields) -> FeedbackRecord:
    return FeedbackRecord(event_id, kind, ids, "app-1", t, **fields)  # type: ignore[arg-type]


def candidate(gid: str, prompt: str = "ocean", version: str = "v0001"):
    return dataclasses.replace(generation(gid, version=version), prompt=prompt, text=f"{gid} text")


def test_a_ranking_gives_every_better_one_over_every_worse_one() -> None:
    assert ranking_pairs(["a", "b", "c", "d"]) == [
        ("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d"),
    ]  # fmt: skip
    assert ranking_pairs(["a", "b"]) == [("a", "b")]


@pytest.mark.parametrize(
    ("score", "scale", "threshold", "label"),
    [
        (1.0, "thumbs", 0.0, True),
        (0.0, "thumbs", 0.0, False),
        (3.0, "stars5", 0.0, None),  # the middle of the scale: neither
        (4.0, "stars5", 0.0, True),  # (4 - 3) / 2 = 0.5
        (4.0, "stars5", 0.5, None),  # 0.5 is not above 0.5
        (4.5, "stars5", 0.5, True),  # 0.75
        (1.5, "stars5", 0.5, False),  # -0.75
        (0.3, "unit", 0.5, None),  # 2 * 0.3 - 1 = -0.4, within 0.5
        (0.2, "unit", 0.5, False),  # -0.6
    ],
)
def test_kto_labels_follow_the_declared_threshold_rule(score, scale, threshold, label) -> None:
    assert kto_label(score, scale, threshold) is label


def test_a_correction_is_chosen_over_the_original_and_is_an_sft_target() -> None:
    original = candidate("g1")
    fix = event("e1", "correction", ["g1"], text="calm ocean")
    skipped = Skipped({})
    (pair,) = preference_rows(fix, {"g1": original}, skipped)
    assert (pair["prompt"], pair["chosen"], pair["rejected"]) == ("ocean", "calm ocean", "g1 text")
    (sft,) = sft_rows(fix, {"g1": original}, skipped)
    assert (sft["prompt"], sft["completion"]) == ("ocean", "calm ocean")
    same = event("e2", "correction", ["g1"], text="g1 text")
    assert preference_rows(same, {"g1": original}, skipped) == []
    assert preference_rows(fix, {}, skipped) == []  # the generation was erased
    assert skipped.counts == {
        "correction equal to the original": 1,
        "generation erased or missing": 1,
    }


def test_pairs_of_different_prompts_are_left_out() -> None:
    skipped = Skipped({})
    gens = {"a": candidate("a", "ocean"), "b": candidate("b", "forest")}
    assert preference_rows(event("e", "comparison", ["a", "b"]), gens, skipped) == []
    assert skipped.counts == {"pair of different prompts": 1}


def fill(location: str) -> None:
    """One request of three candidates (v0001), one of two (v0002); every kind of feedback."""
    store = open_store(location)
    try:
        store.append_generations(
            [candidate(g) for g in ("a", "b", "c")]
            + [candidate(g, "forest", "v0002") for g in ("x", "y")]
        )
        store.insert_feedback(
            [
                event("rank", "ranking", ["c", "a", "b"], 1000.0),
                event("cmp", "comparison", ["x", "y"], 2000.0),
                event("fix", "correction", ["b"], 3000.0, text="calm ocean"),
                event("up", "rating", ["a"], 4000.0, score=1.0, scale="thumbs"),
                event("down", "rating", ["x"], 5000.0, score=0.0, scale="thumbs"),
                event("meh", "rating", ["y"], 6000.0, score=3.0, scale="stars5"),
            ]
        )
    finally:
        store.close()


@pytest.fixture
def store_path(tmp_path: Path) -> str:
    location = str(tmp_path / "replay.sqlite3")
    fill(location)
    return location


def load(path: Path):
    import datasets

    builder = "parquet" if path.suffix == ".parquet" else "json"
    return datasets.load_dataset(builder, data_files=str(path), split="train")


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_each_dataset_loads_with_the_datasets_library_in_trls_columns(
    store_path: str, tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture
) -> None:
    out = {name: tmp_path / f"{name}{suffix}" for name in ("preference", "kto", "sft")}
    for name, path in out.items():
        assert main(["export", name, "--store", store_path, "-o", str(path)]) == 0
    err = capsys.readouterr().err
    assert "5 preference rows" in err and "1 left out (rating within the threshold)" in err

    pairs = load(out["preference"])
    assert pairs.column_names[:3] == ["prompt", "chosen", "rejected"]
    assert [(r["chosen"], r["rejected"], r["kind"]) for r in pairs] == [
        ("c text", "a text", "ranking"),
        ("c text", "b text", "ranking"),
        ("a text", "b text", "ranking"),
        ("x text", "y text", "comparison"),
        ("calm ocean", "b text", "correction"),
    ]
    kto = load(out["kto"])
    assert kto.column_names[:3] == ["prompt", "completion", "label"]
    assert [(r["completion"], r["label"]) for r in kto] == [("a text", True), ("x text", False)]
    assert kto.features["label"].dtype == "bool"
    sft = load(out["sft"])
    assert [(r["prompt"], r["completion"]) for r in sft] == [("ocean", "calm ocean")]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def rows_of_cli(capsys: pytest.CaptureFixture, *argv: str) -> list[dict]:
    assert main(["export", *argv]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_kind_since_and_version_filters(store_path: str, capsys: pytest.CaptureFixture) -> None:
    only = rows_of_cli(capsys, "preference", "--store", store_path, "--kind", "comparison")
    assert [r["event_id"] for r in only] == ["cmp"]
    since = rows_of_cli(capsys, "preference", "--store", store_path, "--since", "2500")
    assert [r["event_id"] for r in since] == ["fix"]
    iso = rows_of_cli(capsys, "kto", "--store", store_path, "--since", "1970-01-01T01:10:00")
    assert [r["event_id"] for r in iso] == ["down"]  # 4200 s: after "up" (4000 s)
    v2 = rows_of_cli(capsys, "kto", "--store", store_path, "--version", "v0002")
    assert [(r["event_id"], r["model_version"]) for r in v2] == [("down", "v0002")]


def test_bad_options_are_usage_errors_naming_them(
    store_path: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(["export", "sft", "--store", store_path, "--kind", "rating"]) == 2
    assert "--kind rating gives no sft rows" in capsys.readouterr().err
    assert main(["export", "kto", "--store", store_path, "--since", "last week"]) == 2
    assert "--since 'last week'" in capsys.readouterr().err
    assert main(["export", "kto", "--store", store_path, "--format", "parquet"]) == 2
    assert "Parquet needs --output" in capsys.readouterr().err


def test_rows_stream_a_page_of_events_at_a_time(store_path: str) -> None:
    store = open_store(store_path)
    pages: list[int] = []
    read_page = store.feedback_after

    def counting(seq: int, limit: int):
        pages.append(seq)
        return read_page(seq, limit)

    store.feedback_after = counting  # type: ignore[method-assign]
    try:
        rows = iter_rows(
            store,
            "preference",
            ExportFilter(frozenset({"ranking", "comparison", "correction"})),
            kto_threshold=0.0,
            skipped=Skipped({}),
            page_events=1,
        )
        first = next(rows)
        assert first["event_id"] == "rank" and len(pages) == 1  # nothing read ahead
        assert [r["event_id"] for r in rows] == ["rank", "rank", "cmp", "fix"]
    finally:
        store.close()
