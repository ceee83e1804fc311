"""The monitoring shipped in the repo names only real series, passes promtool, and works
against a real Prometheus scraping a real server and trainer."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from client_prometheus import (
    DASHBOARD,
    MONITORING,
    PROMETHEUS_CONFIG,
    RULES,
    RULES_TEST,
    SYNTHETIC,
    Prometheus,
    dashboard_expressions,
    declared_series,
    metric_names,
    prometheus_binary,
    promtool,
    recording_rule_names,
    rule_expressions,
    values,
)

from feedloop.client import FeedloopClient
from feedloop.demo.processes import feedloop_command, start_child, start_server

needs_promtool = pytest.mark.skipif(
    promtool() is None, reason="promtool not installed (Debian package 'prometheus'; CI has it)"
)


def test_metric_name_extraction_ignores_functions_labels_and_keywords():
    expr = (
        'histogram_quantile(0.99, sum by (method, le) (rate(feedloop_x_bucket{code=~"A|B"}[5m])))'
        " / on(job) group_left(instance) feedloop:y:rate5m > bool 2 and up offset 5m"
    )
    assert metric_names(expr) == {"feedloop_x_bucket", "feedloop:y:rate5m", "up"}


@pytest.mark.parametrize(
    ("where", "expressions"),
    [("rules", rule_expressions()), ("dashboard", dashboard_expressions())],
)
def test_every_series_named_in_rules_and_dashboard_is_exported_by_the_code(where, expressions):
    known = declared_series() | recording_rule_names() | SYNTHETIC
    unknown = {
        (title, name)
        for title, expr in expressions
        for name in metric_names(expr)
        if name not in known
    }
    assert expressions and not unknown, f"{where} names series nobody exports: {sorted(unknown)}"


def test_rules_cover_every_required_alert():
    alerts = {name for name, _ in rule_expressions()} - recording_rule_names()
    assert alerts >= {
        "FeedloopTargetDown",
        "FeedloopHighErrorRatio",
        "FeedloopHighGenerateLatencyP99",
        "FeedloopQueueSaturated",
        "FeedloopSwapRefused",
        "FeedloopTrainerStalled",
        "FeedloopNoFeedbackArriving",
        "FeedloopKLAboveLimit",
        "FeedloopRewardDroppedAfterSwap",
        "FeedloopDiskAlmostFull",
        "FeedloopDiskFillingUp",
    }
    tested = {
        t["alertname"]
        for case in yaml.safe_load(RULES_TEST.read_text())["tests"]
        for t in case.get("alert_rule_test", [])
    }
    assert tested == alerts, f"alerts without a promtool unit test: {sorted(alerts - tested)}"


def test_dashboard_has_the_promised_panels_on_the_provisioned_datasource():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    titles = " | ".join(p["title"].lower() for p in panels)
    for topic in (
        "requests per second",
        "latency",
        "per batch",
        "feedback accepted per second by kind",
        "reward by version",
        "kl",
        "losses",
        "swaps",
        "gate decisions",
    ):
        assert topic in titles, topic
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    provisioned = yaml.safe_load(
        (MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"][0]["uid"]
    assert {p["datasource"]["uid"] for p in panels} == {provisioned}
    provider = yaml.safe_load(
        (MONITORING / "grafana/provisioning/dashboards/feedloop.yml").read_text()
    )["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_reward_by_version_plots_users_feedback_by_version_not_trainer_figures():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if "reward by version" in p["title"].lower()]
    names = {name for p in panels for t in p["targets"] for name in metric_names(t["expr"])}
    assert panels and not {n for n in names if n.startswith("feedloop_trainer_")}
    assert {
        "feedloop_feedback_rating_normalised_sum",
        "feedloop_feedback_rating_normalised_count",
        "feedloop_feedback_version_wins_total",
    } <= names
    legends = " ".join(t["legendFormat"] for p in panels for t in p["targets"])
    assert "{{version}}" in legends and "{{winner}}" in legends


def test_the_reward_drop_alert_compares_the_live_version_with_other_versions():
    rules = dict(rule_expressions())
    assert "version" in rules["feedloop:rating_normalised:mean_30m"]
    names = metric_names(rules["FeedloopRewardDroppedAfterSwap"])
    assert {"feedloop:rating_normalised:mean_30m", "feedloop_live_model_info"} <= names


def test_prometheus_config_scrapes_server_and_trainer_and_loads_the_rules():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == {"feedloop-server", "feedloop-trainer"}
    assert [(PROMETHEUS_CONFIG.parent / f).resolve() for f in config["rule_files"]] == [RULES]


@needs_promtool
@pytest.mark.parametrize(
    "command",
    [
        ["check", "config", str(PROMETHEUS_CONFIG)],
        ["check", "rules", str(RULES)],
        ["test", "rules", str(RULES_TEST)],
    ],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool_accepts_config_rules_and_rule_unit_tests(command):
    result = subprocess.run(
        [promtool(), *command], capture_output=True, text=True, timeout=120, cwd=RULES.parent
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    prometheus_binary() is None,
    reason="prometheus not installed (Debian package 'prometheus'; CI has it)",
)
def test_real_prometheus_scrapes_server_and_trainer_and_sees_series_move(
    tmp_path: Path, tiny_checkpoint: Path
):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copytree(tiny_checkpoint, data_dir / "default-policy")
    children = []
    prometheus = None
    try:
        server = start_server(data_dir, "--torch-threads", "1", log_path=tmp_path / "serve.log")
        children.append(server)
        trainer = start_child(
            "trainer",
            feedloop_command(
                "train", "--metrics-port", "0", "--data-dir", str(data_dir), "--torch-threads", "1"
            ),
            log_path=tmp_path / "train.log",
            banner_prefix="feedloop train: metrics=",
        )
        children.append(trainer)
        prometheus = Prometheus(
            tmp_path / "prometheus",
            {
                "feedloop-server": server.banner["metrics"],
                "feedloop-trainer": trainer.banner["metrics"],
            },
        )
        prometheus.wait_until_ready()
        prometheus.wait_for('up{job=~"feedloop-.*"} == 1', lambda r: len(r) == 2)
        live_number = int(server.banner["live"].lstrip("v"))
        prometheus.wait_for(
            "feedloop_live_model_version_number",
            lambda r: list(values(r)) == [live_number],
        )
        prometheus.wait_for("feedloop_trainer_rounds_total", lambda r: len(r) >= 1)

        with FeedloopClient(server.banner["grpc"]) as client:
            reply = client.generate("green hills", n=2)
            client.rate(reply.candidates[0].generation_id, 1.0, scale="thumbs")
            first = prometheus.wait_for(
                'sum(feedloop_requests_total{method="Generate", code="OK"})',
                lambda r: r and next(values(r)) >= 1,
            )
            for _ in range(3):
                client.generate("quiet forest", n=2)
        before = next(values(first))
        prometheus.wait_for(
            'sum(feedloop_requests_total{method="Generate", code="OK"})',
            lambda r: r and next(values(r)) >= before + 3,
        )
        prometheus.wait_for(
            'sum(feedloop_feedback_events_total{kind="rating", outcome="accepted"})',
            lambda r: r and next(values(r)) >= 1,
        )
        prometheus.wait_for(
            f'feedloop_feedback_rating_normalised_count{{version="{server.banner["live"]}"}}',
            lambda r: r and next(values(r)) == 1,
        )
        # Rules load and evaluate against the real series without errors.
        deadline = time.monotonic() + 30
        while True:
            groups = prometheus.get("/api/v1/rules")["data"]["groups"]
            health = {r["name"]: r["health"] for g in groups for r in g["rules"]}
            if all(h == "ok" for h in health.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        assert {g["name"] for g in groups} == {"feedloop.recording", "feedloop.alerts"}
        assert set(health.values()) == {"ok"}, health
        prometheus.wait_for("feedloop:requests:rate1m", lambda r: len(r) >= 1)
    finally:
        if prometheus is not None:
            prometheus.stop()
        for child in reversed(children):
            child.stop()
