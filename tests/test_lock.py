"""requirements.lock and pyproject.toml cannot drift apart, and the audit never passes what it did
not check.

The lock is written by tools/lock.py and audited by tools/audit.py; the audit's answers are
tested here on documents shaped like the index's, with no network.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))  # the tools are scripts, not an installed package

import audit  # noqa: E402
import lock  # noqa: E402


def declared_requirements() -> list[Requirement]:
    """Every requirement in pyproject.toml, base and extras, less the project's own extras."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines += extra
    requirements = [Requirement(line) for line in lines]
    return [r for r in requirements if lock.canonical(r.name) != lock.PROJECT]


LOCKED = lock.read_lock()


@pytest.mark.parametrize("requirement", declared_requirements(), ids=str)
def test_every_declared_dependency_is_locked_at_a_version_pyproject_allows(requirement):
    name = lock.canonical(requirement.name)
    assert name in LOCKED, f"{name} is declared in pyproject.toml but not locked: run tools/lock.py"
    assert requirement.specifier.contains(Version(LOCKED[name]), prereleases=True), (
        f"{name}=={LOCKED[name]} in the lock is outside pyproject's {requirement.specifier}"
    )


def test_torch_is_locked_to_the_cpu_build_of_2_13_0():
    torch = Version(LOCKED["torch"])
    assert (torch.public, torch.local) == ("2.13.0", "cpu")


def test_torch_is_a_range_for_users_and_a_relock_holds_it_at_the_locked_build():
    core = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "optional-dependencies"
    ]["core"]
    (torch,) = [Requirement(line) for line in core if Requirement(line).name == "torch"]
    assert len(torch.specifier) == 2 and not any(s.operator == "==" for s in torch.specifier)
    locked = {"numpy": "2.4.6", "torch": "2.13.0+cpu", "grpcio": "1.85.4"}
    assert lock.held_pins(locked, upgrade=False) == locked
    assert lock.held_pins(locked, upgrade=False, released=["GRPCio"]) == {
        "numpy": "2.4.6",
        "torch": "2.13.0+cpu",
    }
    assert lock.held_pins(locked, upgrade=True) == {"torch": "2.13.0+cpu"}
    assert lock.held_pins(locked, upgrade=False, released=["torch"]) == locked


def test_the_lock_is_sorted_canonical_pins_without_the_project_itself():
    assert list(LOCKED) == sorted(LOCKED)
    assert all(lock.canonical(name) == name for name in LOCKED)
    assert lock.PROJECT not in LOCKED


def test_an_environment_that_departs_from_the_lock_is_described():
    locked = {"numpy": "2.4.6", "torch": "2.13.0+cpu"}
    present = {"numpy": "2.4.5", "py-spy": "0.4.0", "pip": "23.2.1", "feedloop": "0.1.0"}
    assert lock.differences(locked, present) == [
        "numpy: locked 2.4.6, installed 2.4.5",
        "torch: locked 2.13.0+cpu, installed nothing",
        "py-spy: installed 0.4.0, not in the lock",
    ]
    assert lock.differences(locked, {**locked, "pip": "26.3"}) == []


# ------------------------------------------------------------------------------------ the audit

ADVISORY = {
    "id": "PYSEC-2026-1",
    "aliases": ["CVE-2026-1", "GHSA-aaaa-bbbb-cccc"],
    "fixed_in": ["1.1"],
    "withdrawn": None,
}
ITS_ALIAS = {"id": "GHSA-aaaa-bbbb-cccc", "aliases": ["PYSEC-2026-1"], "fixed_in": ["1.1"]}
WITHDRAWN = {"id": "PYSEC-2026-2", "aliases": [], "fixed_in": [], "withdrawn": "2026-05-01"}


def index(documents: dict[str, dict]):
    """A fetch that answers only the given paths, like an index that serves some documents."""
    asked: list[str] = []

    def fetch(path: str) -> dict | None:
        asked.append(path)
        return documents.get(path)

    fetch.asked = asked  # type: ignore[attr-defined]
    return fetch


def project_document(latest: str, vulnerabilities: list[dict]) -> dict:
    return {"info": {"version": latest}, "vulnerabilities": vulnerabilities}


def test_a_release_document_settles_that_exact_version():
    fetch = index({"pkg/1.0/json": {"info": {}, "vulnerabilities": [ADVISORY, ITS_ALIAS]}})
    finding = audit.audit_one("pkg", "1.0", fetch)
    assert finding.checked
    assert finding.vulnerabilities == [
        "PYSEC-2026-1, also CVE-2026-1, GHSA-aaaa-bbbb-cccc (fixed in 1.1)"
    ]


def test_the_project_document_settles_only_the_latest_release():
    documents = {"pkg/json": project_document("1.0", [ADVISORY, WITHDRAWN])}
    latest = audit.audit_one("pkg", "1.0", index(documents))
    assert latest.checked and len(latest.vulnerabilities) == 1

    older = audit.audit_one("pkg", "0.9", index(documents))
    assert not older.checked and older.vulnerabilities == []
    assert "latest release is 1.0" in older.reason


def test_no_answer_from_the_index_is_not_checked_never_clean():
    findings = audit.audit({"pkg": "1.0", "other": "2.0"}, index({}))
    assert [f.checked for f in findings] == [False, False]
    assert audit.summary(findings) == (
        "audit: 0 of 2 locked packages checked against PyPI's vulnerability data, 0 vulnerable; "
        "2 NOT CHECKED (listed above)"
    )


def test_a_local_build_is_audited_as_its_public_release():
    fetch = index({"torch/json": project_document("2.13.0", [])})
    finding = audit.audit_one("torch", "2.13.0+cpu", fetch)
    assert finding.checked and finding.vulnerabilities == []
    assert fetch.asked == ["torch/2.13.0/json", "torch/json"]
