"""Reading monitoring files for the tests: PromQL expressions, the metric names they use, the
series the code declares, and a real Prometheus server in a subprocess."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "monitoring"
RULES = MONITORING / "prometheus" / "rules" / "feedloop.rules.yml"
RULES_TEST = MONITORING / "prometheus" / "rules" / "feedloop.rules.test.yml"
PROMETHEUS_CONFIG = MONITORING / "prometheus" / "prometheus.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "feedloop.json"

PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}
# Series Prometheus makes itself for every target.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def rule_expressions() -> list[tuple[str, str]]:
    """(rule name, expr) of every recording and alerting rule."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [
        (rule.get("record") or rule["alert"], rule["expr"])
        for group in groups
        for rule in group["rules"]
    ]


def recording_rule_names() -> set[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {r["record"] for g in groups for r in g["rules"] if "record" in r}


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, expr) of every panel target and annotation query of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    found += [(a["name"], a["expr"]) for a in dashboard["annotations"]["list"] if "expr" in a]
    return found


def metric_names(expr: str) -> set[str]:
    """Names of the series a PromQL expression selects (functions, labels, keywords removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery selectors
    # grouping and matching label lists: by (a, b), on(job), group_left(x) ...
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in PROMQL_WORDS:
            continue
        names.add(name)
    return names


def declared_series() -> set[str]:
    """Every sample name the server's and trainer's metrics modules can export."""
    from feedloop.server.metrics import ServerMetrics
    from feedloop.trainer.metrics import TrainerMetrics

    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "info": ("_info",),
        "stateset": ("",),
        "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
        "unknown": ("",),
    }
    names: set[str] = set()
    for metrics in (ServerMetrics(), TrainerMetrics()):
        for family in metrics.registry.collect():
            names.update(family.name + s for s in suffixes[family.type])
    return names


# ----------------------------------------------------------------------- a real Prometheus


def promtool() -> str | None:
    return shutil.which("promtool")


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Prometheus:
    """A Prometheus server on a free loopback port, scraping the given targets every second."""

    def __init__(self, workdir: Path, targets: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [address]}]}
                for job, address in targets.items()
            ],
        }
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [
                    prometheus_binary() or "prometheus",
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as reply:
            return json.loads(reply.read() or b"null") if path.startswith("/api") else reply.read()

    def query(self, promql: str) -> list[dict[str, Any]]:
        body = self.get("/api/v1/query", query=promql)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_until_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{self.log_path.read_text()[-2000:]}")
            try:
                self.get("/-/ready")
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"prometheus not ready in {timeout_s}s")

    def wait_for(self, promql: str, predicate: Any, timeout_s: float = 30.0) -> list[dict]:
        """Poll a query until predicate(result) holds; return that result."""
        deadline = time.monotonic() + timeout_s
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(promql)
            if predicate(result):
                return result
            time.sleep(0.25)
        raise AssertionError(f"{promql}: condition not met in {timeout_s}s; last {result}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
                return
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=20)


def values(result: list[dict[str, Any]]) -> Iterator[float]:
    for sample in result:
        yield float(sample["value"][1])
