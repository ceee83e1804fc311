"""Audit requirements.lock against the vulnerabilities PyPI publishes; list what went unchecked.

    .venv/bin/python tools/audit.py              # fails only on a known vulnerability
    .venv/bin/python tools/audit.py --strict     # fails also when a package could not be checked

PyPI's JSON API lists the known vulnerabilities (from the PyPA advisory database and OSV) with
each release. For every locked `name==version` the release document
(`/pypi/NAME/VERSION/json`) is asked first: it settles the question for that exact version. Where
it is not served (the package mirror of these machines serves only project documents), the
project document (`/pypi/NAME/json`) is asked: its vulnerabilities are those of the project's
latest release, so it settles the question only when the locked version is that release.
Anything else (an older locked version, an index that cannot be reached) is counted and printed
as not checked, never as clean.

Exit status: 1 when a checked package has a known vulnerability that is not withdrawn, or with
--strict when any package could not be checked; 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from lock import LOCK, read_lock

# Fetches a JSON document by path below the JSON API's root; None when there is no answer.
Fetch = Callable[[str], dict | None]


@dataclass(frozen=True)
class Finding:
    """What the index says about one locked package."""

    name: str
    version: str
    checked: bool
    vulnerabilities: list[str] = field(default_factory=list)  # one line each, with its aliases
    reason: str = ""  # why it was not checked


def public_version(version: str) -> str:
    """The version as the index knows it: `2.13.0+cpu` is release 2.13.0 in a local build."""
    return version.split("+", 1)[0]


def live_vulnerabilities(document: dict) -> list[str]:
    """One line per vulnerability not withdrawn; an advisory and its aliases count once."""
    seen: set[str] = set()
    found = []
    for vulnerability in document.get("vulnerabilities") or []:
        if vulnerability.get("withdrawn") or vulnerability["id"] in seen:
            continue
        aliases = vulnerability.get("aliases") or []
        seen.update([vulnerability["id"], *aliases])
        fixed_in = ", ".join(vulnerability.get("fixed_in") or []) or "no release yet"
        also = f", also {', '.join(aliases)}" if aliases else ""
        found.append(f"{vulnerability['id']}{also} (fixed in {fixed_in})")
    return found


def audit_one(name: str, version: str, fetch: Fetch) -> Finding:
    release = public_version(version)
    document = fetch(f"{name}/{release}/json")
    if document is not None and "vulnerabilities" in document:
        return Finding(name, version, True, live_vulnerabilities(document))
    project = fetch(f"{name}/json")
    if project is None or "vulnerabilities" not in project:
        return Finding(name, version, False, reason="the index gave no answer")
    latest = project.get("info", {}).get("version")
    if latest != release:
        return Finding(
            name,
            version,
            False,
            reason=f"latest release is {latest}; this index lists vulnerabilities of that one only",
        )
    return Finding(name, version, True, live_vulnerabilities(project))


def audit(pins: dict[str, str], fetch: Fetch, workers: int = 8) -> list[Finding]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda item: audit_one(*item, fetch), sorted(pins.items())))


def index_fetcher(json_api: str, timeout_s: float) -> Fetch:
    def fetch(path: str) -> dict | None:
        try:
            with urllib.request.urlopen(f"{json_api.rstrip('/')}/{path}", timeout=timeout_s) as r:
                return json.load(r)
        except (OSError, ValueError):  # URLError and HTTPError are OSErrors; bad JSON a ValueError
            return None

    return fetch


def default_json_api() -> str:
    # The JSON API beside the index pip installs from by default (pip's own constant).
    from pip._internal.models.index import PyPI

    return PyPI.pypi_url


def summary(findings: list[Finding]) -> str:
    checked = [f for f in findings if f.checked]
    vulnerable = [f for f in checked if f.vulnerabilities]
    unchecked = len(findings) - len(checked)
    line = (
        f"audit: {len(checked)} of {len(findings)} locked packages checked against PyPI's "
        f"vulnerability data, {len(vulnerable)} vulnerable"
    )
    if unchecked:
        line += f"; {unchecked} NOT CHECKED (listed above)"
    return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lock", type=Path, default=LOCK, help="the lock file to audit")
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 also when a package could not be checked"
    )
    parser.add_argument(
        "--json-api", default=None, help="root of the index's JSON API (default: pip's default)"
    )
    parser.add_argument("--timeout-s", type=float, default=30.0, help="per request")
    args = parser.parse_args()

    findings = audit(
        read_lock(args.lock), index_fetcher(args.json_api or default_json_api(), args.timeout_s)
    )
    for finding in findings:
        if not finding.checked:
            print(f"  not checked  {finding.name}=={finding.version}: {finding.reason}")
        for vulnerability in finding.vulnerabilities:
            print(f"  VULNERABLE   {finding.name}=={finding.version}: {vulnerability}")
    print(summary(findings))
    if any(f.vulnerabilities for f in findings):
        return 1
    return 1 if args.strict and not all(f.checked for f in findings) else 0


if __name__ == "__main__":
    sys.exit(main())
