"""tools/mutation.py's own bookkeeping: which modules, which mutants, which survivors are excused.

Running mutmut itself takes minutes; CI does that (.ci/run). These tests check the parts that
decide what runs and what fails, on made-up names and diffs.
"""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))  # the tools are scripts, not an installed package

import mutation  # noqa: E402

DIFF = """\
--- src/feedloop/trainer/rl_math.py
+++ src/feedloop/trainer/rl_math.py
@@ -1,3 +1,3 @@
 def snips(weights, rewards):
-    return Estimate(float("nan"), float("nan"), float("nan"), n)
+    return Estimate(float("NAN"), float("nan"), float("nan"), n)
"""


def test_every_mapped_test_file_exists_and_every_module_is_a_file() -> None:
    for module, tests in mutation.MODULES.items():
        assert (ROOT / module).is_file(), module
        assert tests and all((ROOT / t).is_file() for t in tests), module


def test_every_equivalent_mutant_names_a_mutated_module_and_a_reason() -> None:
    for entry in mutation.load_equivalents():
        assert entry.module in mutation.MODULES
        assert entry.reason.strip() and "\n" not in entry.reason
        assert entry.before.strip() != entry.after.strip()


def test_a_change_selects_its_module_and_the_modules_its_tests_specify() -> None:
    assert mutation.modules_touched({"trainer/gate.py", "README.md"}) == ["trainer/gate.py"]
    assert mutation.modules_touched({"tests/test_data_window.py"}) == ["trainer/data.py"]
    assert mutation.modules_touched({"docs/x.md", "server/app.py"}) == []


def test_a_sample_is_a_fixed_share_of_mutant_numbers() -> None:
    pattern = mutation.sample_pattern("feedloop.trainer.gate", 0.2)
    assert pattern == "feedloop.trainer.gate.*__mutmut_*[05]"
    names = [f"feedloop.trainer.gate.x_perplexity__mutmut_{i}" for i in range(1, 101)]
    chosen = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    assert len(chosen) == 20
    assert mutation.sample_pattern("feedloop.trainer.gate", 1.0) is None
    with pytest.raises(ValueError):
        mutation.sample_pattern("feedloop.trainer.gate", 0.04)


def test_a_repository_file_is_staged_where_the_installed_package_puts_it() -> None:
    packages = mutation.package_dirs()
    assert mutation.staged_path("trainer/rl_math.py", packages) == Path(
        "src/feedloop/trainer/rl_math.py"
    )
    assert mutation.staged_path("core/store/base.py", packages) == Path(
        "src/feedloop/core/store/base.py"
    )
    assert mutation.module_name(Path("src/feedloop/core/sampling.py")) == "feedloop.core.sampling"


def test_a_survivor_is_excused_only_by_an_entry_for_its_function_and_its_exact_change() -> None:
    entry = mutation.Equivalent(
        "trainer/rl_math.py",
        "snips",
        'return Estimate(float("nan"), float("nan"), float("nan"), n)',
        'return Estimate(float("NAN"), float("nan"), float("nan"), n)',
        "float() reads NaN case-insensitively",
    )
    name = "feedloop.trainer.rl_math.x_snips__mutmut_19"
    assert mutation.match_equivalent("trainer/rl_math.py", name, DIFF, [entry]) is entry
    other_function = "feedloop.trainer.rl_math.x_doubly_robust__mutmut_19"
    assert mutation.match_equivalent("trainer/rl_math.py", other_function, DIFF, [entry]) is None
    other_change = DIFF.replace('float("NAN")', 'float("XXnanXX")')
    assert mutation.match_equivalent("trainer/rl_math.py", name, other_change, [entry]) is None


def test_method_mutants_are_named_class_dot_method() -> None:
    name = "feedloop.trainer.rl_math.xǁAdaptiveKLControllerǁupdate__mutmut_3"
    assert mutation.function_name(name) == "AdaptiveKLController.update"
    assert mutation.function_name("feedloop.trainer.gate.x_perplexity__mutmut_12") == "perplexity"


def test_rotation_starts_at_the_commits_turn_and_keeps_the_order() -> None:
    modules = ["a.py", "b.py", "c.py"]
    assert mutation.rotated(modules, 0) == ["a.py", "b.py", "c.py"]
    assert mutation.rotated(modules, 4) == ["b.py", "c.py", "a.py"]


def test_every_mutated_module_type_checks_in_the_layout_mutmut_runs_it_in(tmp_path: Path) -> None:
    """mutmut's type filter needs a clean start: there mypy sees feedloop's real types, and an
    error in unmutated code stops it ("Could not find mutant for type error") or counts every
    mutant of the function holding it as caught."""
    packages = mutation.package_dirs()
    for module, tests in mutation.MODULES.items():
        target = mutation.stage(tmp_path, module, tests, packages)
        assert mutation.unmutated_type_errors(tmp_path, target) == [], module
        shutil.rmtree(tmp_path / "tests")  # stage copies them again for the next module


def test_stopping_a_run_ends_every_process_of_its_session() -> None:
    """mutmut runs in a session of its own: stopping it (the deadline, or an interrupt of the
    tool) must end its workers too, not leave them running unowned."""
    script = (
        "import signal, subprocess, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "ignoring = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "subprocess.Popen(['sleep', '60'], preexec_fn=ignoring)  # a worker deaf to SIGINT\n"
        "time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    time.sleep(1.0)
    mutation.stop(process)
    assert process.returncode is not None

    def session() -> list[str]:
        found = subprocess.run(["ps", "-eo", "sid=,stat="], capture_output=True, text=True)
        return [
            line
            for line in found.stdout.splitlines()
            if line.split()[0] == str(process.pid) and not line.split()[1].startswith("Z")
        ]

    deadline = time.monotonic() + 5
    while session() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert session() == []
