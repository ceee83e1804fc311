"""What the demo shows: the live progress table, the closing summary per version, the reward
plot, and the verdict (did the loop improve the reward?)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from feedloop.client.types import ModelsResult
from feedloop.demo.tracker import DemoStats, Swap, VersionStats


@dataclass(frozen=True)
class Verdict:
    improved: bool
    message: str
    baseline: VersionStats | None = None
    final: VersionStats | None = None


def judge(
    versions: Sequence[VersionStats],
    initial_version: str,
    swaps: Sequence[Swap],
    *,
    min_improvement: float,
    min_candidates: int,
    round_counts: dict[str, int],
) -> Verdict:
    """Improved means: the last version that went live (with enough served candidates to
    measure) has a higher true reward than the initial one, by more than min_improvement and by
    more than twice the standard error of the difference."""
    by_name = {v.version: v for v in versions}
    baseline = by_name.get(initial_version)
    if baseline is None or baseline.candidates < min_candidates:
        return Verdict(
            False,
            f"too little traffic on the initial version {initial_version!r} "
            f"to measure its reward (fewer than {min_candidates} candidates)",
        )
    rounds = ", ".join(f"{n} {outcome}" for outcome, n in sorted(round_counts.items()))
    if not swaps:
        return Verdict(
            False,
            "no new version went live: the trainer "
            + (f"ran rounds ({rounds}) but none passed the gate" if rounds else "finished no round")
            + "; try a longer --duration-s or a higher --rate-rps",
            baseline,
        )
    measured = [
        by_name[s.live]
        for s in swaps
        if s.live in by_name
        and s.live != initial_version
        and by_name[s.live].candidates >= min_candidates
    ]
    if not measured:
        return Verdict(
            False,
            f"{swaps[-1].live} went live too late to measure its reward "
            f"(fewer than {min_candidates} candidates served)",
            baseline,
        )
    final = measured[-1]
    gain = final.mean_reward - baseline.mean_reward
    noise = 2 * math.sqrt(baseline.stderr**2 + final.stderr**2)
    summary = (
        f"true reward {baseline.version} {baseline.mean_reward:.3f} -> {final.version} "
        f"{final.mean_reward:.3f} ({gain:+.3f}, 2 s.e. {noise:.3f})"
    )
    if gain > max(min_improvement, noise):
        return Verdict(True, f"the loop improved the reward: {summary}", baseline, final)
    return Verdict(
        False,
        f"no clear improvement: {summary}; the gain must exceed "
        f"{min_improvement} and 2 standard errors",
        baseline,
        final,
    )


# ------------------------------------------------------------------------------ live view


def live_view(
    stats: DemoStats,
    *,
    title: str,
    remaining_s: float,
    last_trainer_line: str,
    last_decision: str = "",
) -> Any:
    requests_rps, feedback_eps = stats.rates_per_s()
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    rounds = stats.round_counts()
    head.add_row("elapsed / left", f"{stats.elapsed_s():.0f}s / {max(remaining_s, 0):.0f}s")
    head.add_row("requests/s", f"{requests_rps:.1f}  (total {stats.requests})")
    head.add_row("feedback/s", f"{feedback_eps:.1f}  (total {stats.feedback_events})")
    head.add_row("live version", stats.live_version or "?")
    head.add_row(
        "swaps",
        " ".join(f"{s.previous}->{s.live}@{s.at_s:.0f}s" for s in stats.swaps) or "none yet",
    )
    head.add_row(
        "trainer rounds",
        ", ".join(f"{n} {o}" for o, n in sorted(rounds.items())) or "waiting for feedback",
    )
    if stats.errors:
        head.add_row("errors", ", ".join(f"{k}: {v}" for k, v in sorted(stats.errors.items())))
    head.add_row("trainer", Text(last_trainer_line or "-", overflow="ellipsis", no_wrap=True))
    head.add_row(
        "last gate decision", Text(last_decision or "-", overflow="ellipsis", no_wrap=True)
    )
    table = Table(title="true reward per version (the users' hidden preference)")
    for column in ("version", "requests", "candidates", "mean reward", "± s.e."):
        table.add_column(column, justify="right" if column != "version" else "left")
    for v in stats.snapshot_versions():
        live = " (live)" if v.version == stats.live_version else ""
        table.add_row(
            v.version + live,
            str(v.requests),
            str(v.candidates),
            f"{v.mean_reward:.3f}",
            f"{v.stderr:.3f}" if v.candidates > 1 else "",
        )
    return Group(Text(title, style="bold cyan"), head, table)


# ------------------------------------------------------------------------------ summary


def _number(summary: dict[str, Any], *keys: str) -> float | None:
    for key in keys:
        value = summary.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def summary_table(stats: DemoStats, models: ModelsResult | None) -> Table:
    """Per version: feedback consumed, mean true reward, perplexity, gate result."""
    table = Table(title="feedloop demo: per version")
    for column in (
        "version",
        "parent",
        "feedback consumed",
        "served requests",
        "mean reward",
        "± s.e.",
        "perplexity",
        "gate",
    ):
        table.add_column(
            column, justify="left" if column in ("version", "parent", "gate") else "right"
        )
    measured = {v.version: v for v in stats.snapshot_versions()}
    gate: dict[str, str] = {}
    info: dict[str, Any] = {}
    if models is not None:
        for decision in reversed(models.decisions):  # oldest first: the latest action wins
            gate[decision.version] = decision.action
        info = {v.version: v for v in models.versions}
    names = sorted(set(measured) | set(info))
    for name in names:
        v = measured.get(name)
        model = info.get(name)
        summary = model.summary if model is not None else {}
        consumed = _number(summary, "new_events")
        perplexity = _number(
            summary, "perplexity_candidate", "test_perplexity", "validation_perplexity"
        )
        result = gate.get(name, "")
        if model is not None and not model.parent_version:
            result = result or "pretrained"
        table.add_row(
            name + (" (live)" if model is not None and model.live else ""),
            model.parent_version if model is not None else "",
            f"{consumed:.0f}" if consumed is not None else "-",
            str(v.requests) if v else "0",
            f"{v.mean_reward:.3f}" if v and v.candidates else "-",
            f"{v.stderr:.3f}" if v and v.candidates > 1 else "",
            f"{perplexity:.2f}" if perplexity is not None else "-",
            result,
        )
    if models is not None:
        refused = [d for d in models.decisions if d.action == "refused"]
        if refused:
            table.caption = (
                f"{len(refused)} candidate(s) refused by the gate; latest: {refused[0].reason}"
            )
    return table


# ------------------------------------------------------------------------------ plot


def rolling_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of the last `window` values at each position (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_reward(stats: DemoStats, path: Path, *, preference: str, window: int = 50) -> Path:
    """True reward over time: one rolling mean across swaps, each version's mean, the swaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with stats._lock:
        samples = sorted(stats.samples)
        swaps = list(stats.swaps)
        taste_changes = list(stats.taste_changes)
    figure, axes = plt.subplots(figsize=(10, 5), dpi=110)
    by_version: dict[str, list[tuple[float, float]]] = {}
    for t, version, reward, _ in samples:
        by_version.setdefault(version, []).append((t, reward))
    for index, (version, points) in enumerate(sorted(by_version.items())):
        times = [t for t, _ in points]
        rewards = [r for _, r in points]
        mean = sum(rewards) / len(rewards)
        color = f"C{index % 10}"
        axes.scatter(times, rewards, s=5, alpha=0.2, color=color)
        axes.hlines(
            mean,
            times[0],
            times[-1],
            colors=color,
            linewidth=3,
            label=f"{version}: mean {mean:.3f} ({len(rewards)} requests)",
        )
    if samples:
        axes.plot(
            [s.at_s for s in samples],
            rolling_mean([s.reward for s in samples], window),
            color="black",
            linewidth=1.2,
            label=f"rolling mean of {window} requests",
        )
    for i, swap in enumerate(swaps):
        axes.axvline(swap.at_s, color="grey", linestyle="--", linewidth=1)
        # Labels sit inside the top of the axes, rotated, so swaps close in time stay legible.
        axes.text(
            swap.at_s,
            0.98 - 0.07 * (i % 2),
            f" {swap.live}",
            rotation=90,
            fontsize=7,
            va="top",
            ha="right",
            transform=axes.get_xaxis_transform(),
        )
    for at_s, preference in taste_changes:
        axes.axvline(at_s, color="red", linewidth=1.5)
        axes.text(
            at_s,
            0.02,
            f" taste: {preference}",
            color="red",
            fontsize=8,
            transform=axes.get_xaxis_transform(),
        )
    axes.set_xlabel("seconds since the users started")
    axes.set_ylabel("true reward of served candidates (request mean)")
    axes.set_title(
        f"feedloop demo: reward over time, preference {preference} (dashed: model swaps)",
        fontsize=10,
    )
    axes.set_ylim(-0.05, 1.05)
    axes.grid(alpha=0.3)
    if samples:
        axes.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
