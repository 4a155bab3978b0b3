"""deploy/grafana and deploy/compose.yaml: the dashboard queries only metrics the service
exports (and shows each of them), its provisioning points where compose mounts it, and the
compose file's paths, images, ports and command are right."""
from __future__ import annotations

import json
import re

import yaml
from deploy_checks import (
    DEPLOY,
    PROMQL_FUNCTIONS,
    exported_metric_names,
    grafana_label_values_metric,
    parse_segsearch_argv,
    promql_names,
)
from segsearch.service.config import DEFAULT_METRICS_PORT, DEFAULT_PORT

DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
PROVISIONING = DEPLOY / "grafana" / "provisioning"


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_dashboard_queries_only_exported_metrics():
    samples, _ = exported_metric_names()
    for expr in dashboard_exprs():
        metrics, functions = promql_names(expr)
        assert metrics, expr
        assert metrics <= samples | {"up"}, f"not exported: {metrics - samples - {'up'}} in {expr}"
        assert functions <= PROMQL_FUNCTIONS, f"unknown functions {functions - PROMQL_FUNCTIONS} in {expr}"
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            assert grafana_label_values_metric(variable["query"]["query"]) in samples


def test_dashboard_shows_every_exported_metric():
    _, families = exported_metric_names()
    used = {name for expr in dashboard_exprs() for name in promql_names(expr)[0]}
    for family in families:
        assert any(name == family or name.startswith(family + "_") for name in used), f"{family} has no panel"


def test_dashboard_panels_are_well_formed():
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    titles = {panel["title"] for panel in board["panels"]}
    assert {"Requests by method and code", "Latency p50 / p99 by method", "In-flight requests",
            "Stage latency p99", "Index size"} <= titles
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel["targets"]:
            assert re.search(r"\[\$__rate_interval\]", target["expr"]) or "rate(" not in target["expr"]


def test_grafana_provisioning_matches_compose_mounts():
    grafana = compose()["services"]["grafana"]
    mounts = {target.split(":")[0]: source for source, target in
              (volume.split(":", 1) for volume in grafana["volumes"]) if source.startswith(".")}
    (datasource,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert datasource["uid"] == dashboard()["templating"]["list"][0]["current"]["value"]
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "segsearch.yml").read_text())["providers"]
    dashboard_target = provider["options"]["path"] + "/dashboard.json"
    assert mounts[dashboard_target] == "./grafana/dashboard.json"
    assert mounts["/etc/grafana/provisioning/datasources"] == "./grafana/provisioning/datasources"
    assert mounts["/etc/grafana/provisioning/dashboards"] == "./grafana/provisioning/dashboards"


def test_compose_paths_exist_and_images_are_pinned():
    services = compose()["services"]
    assert set(services) == {"segsearch", "prometheus", "grafana"}
    build = services["segsearch"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert (context / build["dockerfile"]).is_file() and (context / "pyproject.toml").is_file()
    for name, service in services.items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):  # a bind mount of a file of this repository
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name}: publish on loopback unless meant otherwise"


def test_compose_serves_on_the_ports_prometheus_scrapes():
    service = compose()["services"]["segsearch"]
    args = parse_segsearch_argv(service["command"])
    assert args.command == "serve" and args.host == "0.0.0.0"
    assert (args.port, args.metrics_port) == (DEFAULT_PORT, DEFAULT_METRICS_PORT)
    assert f"127.0.0.1:{DEFAULT_PORT}:{DEFAULT_PORT}" in service["ports"]
    assert str(DEFAULT_METRICS_PORT) in service["expose"]
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == [f"segsearch:{DEFAULT_METRICS_PORT}"]
    prometheus = compose()["services"]["prometheus"]
    mounted = {volume.split(":")[1] for volume in prometheus["volumes"]}
    assert {"/etc/prometheus/prometheus.yml", "/etc/prometheus/alerts.yml"} <= mounted
