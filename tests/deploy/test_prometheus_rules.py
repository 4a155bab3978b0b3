"""deploy/prometheus: promtool checks the config and rules, the rules' unit tests pass (each
alert fires when it should, and not otherwise), and the rules name only real metrics."""
from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from deploy_checks import DEPLOY, exported_metric_names, promql_names, tool
from segsearch.service.config import DEFAULT_METRICS_PORT

PROMETHEUS_DIR = DEPLOY / "prometheus"
PROMTOOL = tool("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed "
                                    "(Debian package prometheus; scripts/install_test_tools.sh)")


def promtool(*args: str, cwd=PROMETHEUS_DIR) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, check=False, capture_output=True, text=True, timeout=60)


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


@needs_promtool
def test_promtool_accepts_the_config():
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout


@needs_promtool
def test_promtool_accepts_the_rules():
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@needs_promtool
def test_alert_unit_tests_pass():
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_unit_tests_catch_a_broken_rule(tmp_path):
    """The unit tests can fail: with the error-rate threshold raised to 50% they do."""
    for name in ("alerts.yml", "alerts_test.yml"):
        shutil.copy(PROMETHEUS_DIR / name, tmp_path / name)
    rules = (tmp_path / "alerts.yml").read_text()
    assert rules.count(") > 0.05\n") == 2
    (tmp_path / "alerts.yml").write_text(rules.replace(") > 0.05\n", ") > 0.5\n", 1))
    result = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0 and "SegsearchHighErrorRate" in result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing():
    cases = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    fired = {check["alertname"] for case in cases for check in case["alert_rule_test"] if check["exp_alerts"]}
    assert fired == {rule["alert"] for rule in alert_rules()}


def test_alerts_name_only_exported_metrics():
    samples, _ = exported_metric_names()
    for rule in alert_rules():
        metrics, _ = promql_names(rule["expr"])
        assert metrics, rule["alert"]
        assert metrics <= samples | {"up"}, f"{rule['alert']}: unknown metrics {metrics - samples - {'up'}}"
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert 'job="segsearch"' in rule["expr"]


def test_scrape_config_targets_the_metrics_port_as_job_segsearch():
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "segsearch" and job["metrics_path"] == "/metrics"
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert targets == [f"segsearch:{DEFAULT_METRICS_PORT}"]
    assert config["rule_files"] == ["alerts.yml"]
