"""Mutation testing of the RL math and the trainer's bookkeeping: do the tests fail on wrong code?

    .venv/bin/python tools/mutation.py                        # every module below, every mutant
    .venv/bin/python tools/mutation.py trainer/gate.py        # the modules named
    .venv/bin/python tools/mutation.py --changed-since main   # the modules a diff from main touches
    .venv/bin/python tools/mutation.py --sample 0.2 --budget-s 180   # a fixed fifth, at most 3 min

mutmut (pinned in requirements.lock) writes every mutant of a module into one copy of it, each
function behind a trampoline that picks the mutant by name, and runs only the tests that call the
mutated function, in processes forked from one that has imported torch and the tests already.
The installed package maps `feedloop.trainer` to trainer/ and `feedloop.core` to core/ (pyproject's
package-dir), a layout mutmut cannot mutate in place, so each module runs in a scratch directory
holding `src/feedloop/` laid out as installed, the tests and pyproject.toml: there the mutated copy
is what `import feedloop...` finds. The work tree is never modified.

Each module runs only the test files that specify it (MODULES), not the whole suite. A mutant the
tests do not fail on is a survivor; every survivor is either killed by a new test or listed as
equivalent (no test can tell it from the original) in tools/mutation_equivalent.toml with a
one-line reason. The tool prints, per module, the mutants killed (a failing test, a timeout, a
crash), survived, uncovered (no mapped test calls the function), equivalent and not run (past the
budget), the runtime, and every unexplained survivor with its diff. It exits 1 when a mutant
survives that is not listed as equivalent, 0 otherwise (mutants left unrun by the budget do not
fail it).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT_FILE = ROOT / "tools" / "mutation_equivalent.toml"

# Each mutated module and the test files that specify it: only these run against its mutants.
MODULES: dict[str, tuple[str, ...]] = {
    "trainer/rl_math.py": ("tests/test_rl_math.py", "tests/test_rl_math_edges.py"),
    "trainer/algorithms.py": ("tests/test_algorithms.py", "tests/test_q_learning.py"),
    "trainer/q_math.py": ("tests/test_q_math.py", "tests/test_q_learning.py"),
    "trainer/update.py": (
        "tests/test_trainer_update.py",
        "tests/test_algorithms.py",
        "tests/test_trainer_update_ranks.py",
    ),
    "trainer/gate.py": (
        "tests/test_gate_checks.py",
        "tests/test_trainer_gate.py",
        "tests/test_gate_estimates.py",
        "tests/test_learning_knobs.py",
    ),
    "trainer/signals.py": (
        "tests/test_heldout_isolation.py",
        "tests/test_exploration_learning.py",
        "tests/test_trainer_drift.py",
    ),
    "trainer/rewards.py": (
        "tests/test_rewards.py",
        "tests/test_heldout_isolation.py",
        "tests/test_reward_model.py",
        "tests/test_learning_knobs.py",
    ),
    "trainer/shaping.py": ("tests/test_learning_knobs.py",),
    "trainer/reward_model.py": (
        "tests/test_reward_model_score.py",
        "tests/test_reward_model.py",
        "tests/test_reward_model_heldout.py",
        "tests/test_heldout_isolation.py",
    ),
    "trainer/data.py": (
        "tests/test_data_window.py",
        "tests/test_trainer_data.py",
        "tests/test_trainer_drift.py",
        "tests/test_drift.py",
    ),
    "trainer/drift.py": ("tests/test_drift.py", "tests/test_trainer_drift.py"),
    "core/discount.py": ("tests/test_evidence_ages.py",),
    "core/sampling.py": (
        "tests/test_sampling_draws.py",
        "tests/test_sampling.py",
        "tests/test_policy.py",
        "tests/test_decoding.py",
    ),
}

# mutmut's statuses, grouped as this tool counts them. A mutant that crashed the test process or
# ran past its time limit was detected: it counts as killed.
KILLED = {"killed", "timeout", "segfault", "caught by type check"}
SURVIVED = {"survived", "suspicious"}
UNCOVERED = {"no tests"}

# Seconds a module needs at least (copying, generating mutants, the clean and stats test runs);
# with less of the budget left it is reported as not run.
MIN_MODULE_S = 30.0
PROGRESS_EVERY_S = 20.0


@dataclass(frozen=True)
class Equivalent:
    """A surviving mutant that no test can tell apart from the original, and why."""

    module: str
    function: str
    before: str
    after: str
    reason: str


@dataclass
class ModuleResult:
    module: str
    status_by_mutant: dict[str, str] = field(default_factory=dict)
    diffs: dict[str, str] = field(default_factory=dict)
    equivalent: dict[str, Equivalent] = field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""

    def names(self, statuses: set[str]) -> list[str]:
        return [
            m
            for m, s in self.status_by_mutant.items()
            if s in statuses and m not in self.equivalent
        ]

    @property
    def unexplained(self) -> list[str]:
        return self.names(SURVIVED | UNCOVERED)

    @property
    def not_run(self) -> int:
        known = KILLED | SURVIVED | UNCOVERED
        return sum(s not in known for s in self.status_by_mutant.values())

    def score(self) -> float:
        """Killed over the mutants that ran and are not equivalent."""
        killed = len(self.names(KILLED))
        judged = killed + len(self.unexplained)
        return killed / judged if judged else float("nan")


# ------------------------------------------------------------------------------ choosing the work


def changed_files(ref: str) -> set[str]:
    """Files a diff from `ref` to the work tree touches (committed or not), and untracked files."""

    def git(*args: str) -> list[str]:
        out = subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True)
        return [line for line in out.stdout.splitlines() if line]

    return {
        *git("diff", "--name-only", ref, "--"),
        *git("ls-files", "--others", "--exclude-standard"),
    }


def modules_touched(changed: Iterable[str]) -> list[str]:
    """The mutated modules a change touches: the module itself or a test file mapped to it."""
    changed = set(changed)
    return [m for m, tests in MODULES.items() if m in changed or changed & set(tests)]


def commit_count() -> int:
    command = ["git", "rev-list", "--count", "HEAD"]
    out = subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    return int(out.stdout)


def rotated(modules: Sequence[str], turn: int) -> list[str]:
    """The modules in order, starting at index `turn` modulo their number."""
    start = turn % len(modules)
    return [*modules[start:], *modules[:start]]


def sample_pattern(module_name: str, share: float) -> str | None:
    """An fnmatch pattern for a fixed `share` of a module's mutants, by the last digit of their
    number (mutmut numbers each function's mutants 1, 2, ...); None for all of them."""
    tenths = round(share * 10)
    if tenths >= 10:
        return None
    if tenths < 1:
        raise ValueError(f"--sample must be at least 0.1, got {share}")
    digits = "".join(str(i * 10 // tenths) for i in range(tenths))
    return f"{module_name}.*__mutmut_*[{digits}]"


# ------------------------------------------------------------------------------ equivalent mutants


def load_equivalents(path: Path = EQUIVALENT_FILE) -> list[Equivalent]:
    data = tomllib.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    return [Equivalent(**entry) for entry in data.get("mutant", [])]


def function_name(mutant: str) -> str:
    """`...rl_math.xǁAdaptiveKLControllerǁupdate__mutmut_3` -> `AdaptiveKLController.update`."""
    mangled = mutant.rpartition(".")[2].partition("__mutmut_")[0]
    if mangled.startswith("xǁ"):
        return ".".join(mangled[2:].split("ǁ"))
    return mangled.removeprefix("x_")


def changed_lines(diff: str) -> tuple[str, str]:
    """The lines a mutant's unified diff removes and adds, stripped and joined."""
    lines = diff.splitlines()
    body = [line for line in lines if not line.startswith(("---", "+++"))]
    before = "\n".join(line[1:].strip() for line in body if line.startswith("-"))
    after = "\n".join(line[1:].strip() for line in body if line.startswith("+"))
    return before, after


def match_equivalent(
    module: str, mutant: str, diff: str, equivalents: Sequence[Equivalent]
) -> Equivalent | None:
    before, after = changed_lines(diff)
    for e in equivalents:
        if (e.module, e.function, e.before.strip(), e.after.strip()) == (
            module,
            function_name(mutant),
            before,
            after,
        ):
            return e
    return None


# ------------------------------------------------------------------------------ running mutmut


def package_dirs() -> dict[str, str]:
    """pyproject's package-dir: import package -> folder in this repository."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return dict(data["tool"]["setuptools"]["package-dir"])


def staged_path(module: str, packages: dict[str, str]) -> Path:
    """Where a repository file lies in the scratch directory's `src/`, laid out as installed."""
    for package, folder in sorted(packages.items(), key=lambda kv: -len(kv[1])):
        prefix = folder.rstrip("/") + "/"
        if module.startswith(prefix):
            return Path("src", *package.split("."), module[len(prefix) :])
    raise ValueError(f"{module} is in no package of pyproject's package-dir")


def type_check_command(target: Path) -> list[str]:
    """mypy on one staged file, one JSON object per error (what mutmut's type filter reads)."""
    cache = ["--cache-dir", str(ROOT / ".mypy_cache")]
    return [sys.executable, "-m", "mypy", str(target), "-O", "json", *cache]


def unmutated_type_errors(scratch: Path, target: Path) -> list[str]:
    """mypy's errors in the staged module before any mutation, as `path:line: message` (errors
    in the modules it imports, which mutmut skips, are not reported).

    In the scratch layout mypy resolves `feedloop.*` imports to their real types; the work
    tree's mypy run sees them as Any (the installed package-dir mapping is invisible to it) and
    so passes code that is wrong here. mutmut's type filter attributes each error to the mutant
    whose function holds the line: an error in the unmutated code would count every mutant of
    its function as caught, and one outside them stops mutmut with "Could not find mutant for
    type error". So the staged module must type-check clean first.
    """
    out = subprocess.run(
        type_check_command(target), cwd=scratch, capture_output=True, text=True, check=False
    )
    errors = []
    for line in out.stdout.splitlines():
        if line.strip():
            d = json.loads(line)
            if d["severity"] == "error" and Path(d["file"]) == target:
                errors.append(f"{d['file']}:{d['line']}: {d['message']}")
    return errors


def stage(scratch: Path, module: str, tests: Sequence[str], packages: dict[str, str]) -> Path:
    """Lay out the scratch directory for one module; returns the mutated file's path in it."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package, folder in sorted(packages.items()):  # a package before its subpackages
        shutil.copytree(
            ROOT / folder,
            scratch / "src" / Path(*package.split(".")),
            ignore=ignore,
            dirs_exist_ok=True,
        )
    shutil.copytree(ROOT / "tests", scratch / "tests", ignore=ignore)
    target = staged_path(module, packages)
    settings = {
        "source_paths": ["src"],
        "only_mutate": [str(target)],
        "pytest_add_cli_args_test_selection": list(tests),
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-m", "not slow and not postgres"],
        # torch is not fork-safe once used: fork the workers from a process that only imported.
        "process_isolation": "forkserver",
        # A mutant mypy rejects cannot land (CI type-checks trainer and core): it counts as
        # killed without running the tests. The project's mypy cache keeps this to seconds.
        "type_check_command": type_check_command(target),
    }
    config = "\n[tool.mutmut]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in settings.items())
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    (scratch / "pyproject.toml").write_text(pyproject + config, encoding="utf-8")
    return target


# mutmut's status line: done/total, killed, no tests, timeout, suspicious, survived, skipped,
# caught by the type check.
PROGRESS = re.compile(
    r"(\d+)/(\d+)\s+🎉 (\d+) 🫥 \d+\s+⏰ (\d+)\s+🤔 \d+\s+🙁 (\d+)\s+🔇 \d+\s+🧙 (\d+)"
)


def run_mutmut(
    scratch: Path, patterns: Sequence[str], jobs: int, deadline: float, label: str
) -> bool:
    """Run mutmut in `scratch` until done or the deadline; True when it finished by itself."""
    command = [str(Path(sys.executable).parent / "mutmut"), "run", "--max-children", str(jobs)]
    log = (scratch / "mutmut.log").open("wb")
    # One torch thread: each mutant's tests run in a process forked from one that has run
    # torch already (a test module that computes at import), and a forked child that uses
    # the parent's intra-op thread pool hangs until mutmut's timeout, which counts it as
    # killed whatever the tests would have said. (The trainer runs on one thread too.)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command + list(patterns),
        cwd=scratch,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert process.stdout is not None
    try:
        return _follow(process, log, deadline, label)
    except BaseException:
        # mutmut runs in a session of its own (so that the deadline can stop its workers
        # together): an interrupt of this tool must stop it too, or it runs on unowned.
        stop(process)
        raise
    finally:
        log.close()


def stop(process: subprocess.Popen[bytes]) -> None:
    """Interrupt mutmut's session (it stops its workers and keeps every result recorded), then
    kill whatever of it is left: a process started in the background ignores SIGINT."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _follow(process: subprocess.Popen[bytes], log: IO[bytes], deadline: float, label: str) -> bool:
    """Log mutmut's output and echo its progress until it ends (True) or the deadline stops it
    (False); RuntimeError when it fails."""
    assert process.stdout is not None
    tail, last_progress = b"", time.monotonic()
    while True:
        ready, _, _ = select.select([process.stdout], [], [], 1.0)
        if ready:
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                break
            log.write(chunk)
            tail = (tail + chunk)[-4096:]
        if time.monotonic() - last_progress >= PROGRESS_EVERY_S:
            found = PROGRESS.findall(tail.decode("utf-8", "replace"))
            if found:
                done, total, killed, timeout, survived, typed = found[-1]
                caught = int(killed) + int(timeout) + int(typed)
                print(
                    f"  {label}: {done}/{total} mutants, {caught} killed, {survived} survived",
                    flush=True,
                )
            last_progress = time.monotonic()
        if time.time() > deadline:
            stop(process)
            return False
    process.wait()
    if process.returncode != 0:
        tail_text = tail.decode("utf-8", "replace").replace("\r", "\n")
        raise RuntimeError(f"mutmut failed on {label} (exit {process.returncode}):\n{tail_text}")
    return True


def read_results(scratch: Path, *, complete: bool) -> dict[str, str]:
    """mutmut's status of every mutant: killed, survived, no tests, timeout, not checked, ...

    A run stopped at the budget may have stopped before there was anything to read: then what
    can be read is taken, and nothing is not an error.
    """
    mutmut = str(Path(sys.executable).parent / "mutmut")
    out = subprocess.run(
        [mutmut, "results", "--all", "true"],
        cwd=scratch,
        check=complete,
        capture_output=True,
        text=True,
    )
    results = {}
    for line in out.stdout.splitlines():
        name, separator, status = line.strip().partition(": ")
        if separator and "__mutmut_" in name:
            results[name] = status
    return results


def read_diffs(scratch: Path, target: Path, mutants: Iterable[str]) -> dict[str, str]:
    """Each mutant's diff against the original function, as `mutmut show` prints it."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    with contextlib.chdir(scratch):
        return {m: get_diff_for_mutant(m, path=target) for m in mutants}


def module_name(target: Path) -> str:
    return ".".join(target.with_suffix("").parts[1:])


def test_module(
    module: str,
    equivalents: Sequence[Equivalent],
    *,
    share: float,
    jobs: int,
    deadline: float,
    keep: bool,
) -> ModuleResult:
    result = ModuleResult(module)
    started = time.monotonic()
    if deadline - time.time() < MIN_MODULE_S:
        result.note = "not run: past the time budget"
        return result
    scratch = Path(tempfile.mkdtemp(prefix="feedloop-mutation-"))
    try:
        target = stage(scratch, module, MODULES[module], package_dirs())
        type_errors = unmutated_type_errors(scratch, target)
        if type_errors:
            raise RuntimeError(
                f"mypy rejects {module} before any mutation, in the layout mutmut runs it in "
                "(with feedloop's real types), so mutmut's type filter cannot attribute its "
                "errors: fix these first\n" + "\n".join(type_errors)
            )
        pattern = sample_pattern(module_name(target), share)
        finished = run_mutmut(scratch, [pattern] if pattern else [], jobs, deadline, module)
        result.status_by_mutant = read_results(scratch, complete=finished)
        if pattern:
            result.status_by_mutant = {
                m: s for m, s in result.status_by_mutant.items() if fnmatch.fnmatchcase(m, pattern)
            }
        if not finished:
            result.note = "stopped at the time budget"
        survivors = [m for m, s in result.status_by_mutant.items() if s in SURVIVED | UNCOVERED]
        result.diffs = read_diffs(scratch, target, survivors)
        for mutant, diff in result.diffs.items():
            match = match_equivalent(module, mutant, diff, equivalents)
            if match is not None:
                result.equivalent[mutant] = match
        if keep:
            result.note += f" (kept in {scratch})"
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)
        result.seconds = time.monotonic() - started
    return result


# ------------------------------------------------------------------------------ the report


def report(
    results: Sequence[ModuleResult], equivalents: Sequence[Equivalent], share: float
) -> None:
    print()
    header = f"{'module':<26}{'mutants':>8}{'killed':>8}{'timeout':>8}{'survived':>9}"
    print(header + f"{'uncovered':>10}{'equivalent':>11}{'not run':>8}{'score':>7}{'time':>8}")
    for r in results:
        score = r.score()
        print(
            f"{r.module:<26}{len(r.status_by_mutant):>8}{len(r.names(KILLED)):>8}"
            f"{len(r.names({'timeout'})):>8}"
            f"{len(r.names(SURVIVED)):>9}{len(r.names(UNCOVERED)):>10}{len(r.equivalent):>11}"
            f"{r.not_run:>8}{'' if score != score else f'{score:.0%}':>7}{r.seconds:>7.0f}s"
            + (f"  {r.note}" if r.note else "")
        )
    for r in results:
        for mutant in r.unexplained:
            kind = (
                "survived" if r.status_by_mutant[mutant] in SURVIVED else "no mapped test calls it"
            )
            print(f"\n{mutant} ({kind}):\n{r.diffs.get(mutant, '')}")
    complete = {r.module for r in results if r.status_by_mutant and not r.note and share >= 1.0}
    matched = {id(e) for r in results for e in r.equivalent.values()}
    for e in equivalents:
        if e.module in complete and id(e) not in matched:
            print(f"\nnote: no surviving mutant matches this equivalent entry any more: {e}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "modules",
        nargs="*",
        metavar="MODULE",
        help=f"repository paths to mutate (default: all of {', '.join(MODULES)})",
    )
    parser.add_argument(
        "--changed-since",
        metavar="REF",
        help="only the modules whose file or mapped tests differ from REF",
    )
    parser.add_argument(
        "--sample",
        type=float,
        default=1.0,
        metavar="SHARE",
        help="a fixed share of each module's mutants, in tenths (0.1 to 1.0)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=float("inf"),
        help="stop after this many seconds; what did not run is reported, not failed",
    )
    parser.add_argument(
        "--rotate",
        action="store_true",
        help="start at a module chosen by the commit (HEAD's commit count), so that a budget "
        "too short for every module covers them all over successive commits",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="mutants tested at once (default: the number of CPUs)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep each module's scratch directory (for `mutmut browse` there)",
    )
    args = parser.parse_args(argv)

    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"not a mutated module: {', '.join(unknown)} (known: {', '.join(MODULES)})")
    missing = [t for tests in MODULES.values() for t in tests if not (ROOT / t).exists()]
    if missing:
        parser.error(f"MODULES maps to test files that do not exist: {', '.join(missing)}")
    modules = list(args.modules or MODULES)
    if args.changed_since:
        touched = modules_touched(changed_files(args.changed_since))
        modules = [m for m in modules if m in touched]
        print(f"modules touched since {args.changed_since}: {', '.join(modules) or 'none'}")
    if args.rotate and modules:
        modules = rotated(modules, commit_count())
    equivalents = load_equivalents()
    deadline = time.time() + args.budget_s
    results = []
    for module in modules:
        print(f"mutating {module} (tests: {', '.join(MODULES[module])})", flush=True)
        results.append(
            test_module(
                module,
                equivalents,
                share=args.sample,
                jobs=args.jobs,
                deadline=deadline,
                keep=args.keep,
            )
        )
    report(results, equivalents, args.sample)
    unexplained = sum(len(r.unexplained) for r in results)
    if unexplained:
        print(
            f"\n{unexplained} mutants survived that are not listed in "
            f"{EQUIVALENT_FILE.relative_to(ROOT)}: add a test that kills each, or list it "
            "there with the reason it is equivalent"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
