"""A real Prometheus scrapes a real segsearch server on loopback.

The server's metrics port is scraped every second by `prometheus` (a subprocess, with the
alert rules of deploy/prometheus/alerts.yml loaded); real requests go to the server (GetInfo,
SearchSimilar by segment id, one unknown id, one top_k over the limit); then Prometheus's
HTTP API must show exactly those counts by method and code, a finite p99 from the duration
histogram, the index and serving gauges, rules that evaluate without error, and answer every
query of deploy/grafana/dashboard.json. Those tests skip only where the `prometheus` binary
is absent (scripts/install_test_tools.sh installs it). Every wait is bounded.
"""
from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import pytest
import yaml
from segsearch.indexer.index_store import IndexStore
from segsearch.service.prometheus import LATENCY_BUCKETS
from segsearch.service.server import SegsearchServer
from segsearch.service.config import ServerConfig
from service_helpers import copy_index, start_server

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROMETHEUS = shutil.which("prometheus")
WAIT_SECONDS = 30.0
SERVER_SIDE_CODES = "UNKNOWN|INTERNAL|DATA_LOSS|UNIMPLEMENTED|UNAVAILABLE|DEADLINE_EXCEEDED"

needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="the prometheus binary is not installed "
                                "(Debian package prometheus; scripts/install_test_tools.sh)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Prometheus:
    """A `prometheus` subprocess on 127.0.0.1 scraping one target every second."""

    def __init__(self, workdir: Path, metrics_port: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        shutil.copy(DEPLOY / "prometheus" / "alerts.yml", workdir / "alerts.yml")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [{"job_name": "segsearch",
                                "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
        }
        (workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log_path = workdir / "prometheus.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - held for the life of the process
        self.process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def ready(self) -> bool:
        with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
            return response.status == 200

    def get(self, path: str, **params) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=5) as response:
            return json.loads(response.read())

    def query(self, promql: str) -> list[dict]:
        answer = self.get("/api/v1/query", query=promql)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def wait_until(self, what: str, condition):
        """Poll `condition()` until it returns a truthy value; fail after WAIT_SECONDS."""
        deadline, last = time.monotonic() + WAIT_SECONDS, None
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"prometheus exited:\n{self.log()}"
            try:
                last = condition()
            except (OSError, ValueError) as error:  # not listening yet, or a 503 while starting
                last = error
            if last and not isinstance(last, Exception):
                return last
            time.sleep(0.25)
        pytest.fail(f"waited {WAIT_SECONDS:.0f} s for {what}; last: {last!r}\n{self.log()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()


@pytest.fixture(scope="module")
def monitored(index_template, checkpoint_path, tmp_path_factory):
    """(running server, Prometheus scraping it)."""
    running = start_server(copy_index(index_template, tmp_path_factory), checkpoint_path)
    prometheus = None
    try:
        prometheus = Prometheus(tmp_path_factory.mktemp("prometheus"), running.server.metrics_port)
        prometheus.wait_until("Prometheus to be ready", prometheus.ready)
        yield running, prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()
        running.stop()


def counts_by_method_and_code(prometheus: Prometheus) -> Counter:
    result = prometheus.query('sum by (method, code) (segsearch_requests_total{job="segsearch"})')
    return Counter({(s["metric"]["method"], s["metric"]["code"]): int(float(s["value"][1])) for s in result})


def send_requests(client, segment_id: int, sent: Counter) -> float:
    """GetInfo x2, SearchSimilar by id x2, an unknown id, a top_k over the limit; returns the
    slowest call's client-side wall time (an upper bound of the server-side time)."""
    slowest = 0.0

    def call(method: str, expected: str, make_call):
        nonlocal slowest
        started = time.perf_counter()
        try:
            make_call()
            code = "OK"
        except grpc.RpcError as error:
            code = error.code().name
        slowest = max(slowest, time.perf_counter() - started)
        assert code == expected, f"{method}: {code}"
        sent[(method, code)] += 1

    for _ in range(2):
        call("GetInfo", "OK", client.info)
        call("SearchSimilar", "OK", lambda: client.search_segment(segment_id, top_k=5))
    call("SearchSimilar", "NOT_FOUND", lambda: client.search_segment(10**9, top_k=5))
    call("SearchSimilar", "INVALID_ARGUMENT", lambda: client.search_segment(segment_id, top_k=10**6))
    return slowest


@pytest.fixture(scope="module")
def traffic(monitored, index_template):
    """Send two rounds of requests and wait until Prometheus has scraped them all; returns
    (what was sent by (method, code), the slowest call's seconds)."""
    running, prometheus = monitored
    with IndexStore.open(index_template, read_only=True) as store:
        segment_id = int(store.segment_ids()[0][0])
    sent: Counter = Counter()
    # Two rounds: rate() needs a series to be scraped once before the calls it counts.
    slowest = send_requests(running.client, segment_id, sent)
    prometheus.wait_until("the first round's counts", lambda: counts_by_method_and_code(prometheus) == sent)
    slowest = max(slowest, send_requests(running.client, segment_id, sent))
    prometheus.wait_until("the second round's counts", lambda: counts_by_method_and_code(prometheus) == sent)
    return sent, slowest


@needs_prometheus
def test_prometheus_sees_the_requests_sent(monitored, traffic):
    _, prometheus = monitored
    sent, slowest = traffic
    assert sent == {("GetInfo", "OK"): 4, ("SearchSimilar", "OK"): 4,
                    ("SearchSimilar", "NOT_FOUND"): 2, ("SearchSimilar", "INVALID_ARGUMENT"): 2}
    assert counts_by_method_and_code(prometheus) == sent

    searches = prometheus.query('sum(segsearch_request_duration_seconds_count{method="SearchSimilar"})')
    assert float(searches[0]["value"][1]) == 8

    def p99() -> float | None:
        result = prometheus.query('histogram_quantile(0.99, sum by (le) (rate('
                                  'segsearch_request_duration_seconds_bucket{job="segsearch", method="SearchSimilar"}[1m])))')
        value = float(result[0]["value"][1]) if result else math.nan
        return value if math.isfinite(value) else None

    value = prometheus.wait_until("a finite p99 from the duration histogram", p99)
    ceiling = min(bound for bound in LATENCY_BUCKETS if bound >= slowest)
    assert 0 < value <= ceiling, (value, slowest)


@needs_prometheus
def test_prometheus_sees_the_gauges_and_the_index(monitored):
    running, prometheus = monitored
    info = running.client.info()

    def gauge(promql: str):
        result = prometheus.query(promql)
        return float(result[0]["value"][1]) if result else None

    prometheus.wait_until("the gauges", lambda: gauge('up{job="segsearch"}') == 1)
    assert gauge("segsearch_serving") == 1
    assert gauge("segsearch_index_segments") == info.num_segments > 0
    assert gauge("segsearch_index_images") == info.num_images == 6
    assert gauge("segsearch_inflight_requests") == 0


@needs_prometheus
def test_alert_rules_evaluate_on_real_series_and_none_fire(monitored, traffic):
    """Client errors (NOT_FOUND, INVALID_ARGUMENT) are not server errors: nothing is pending."""
    _, prometheus = monitored

    def evaluated_rules():
        groups = prometheus.get("/api/v1/rules")["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(rule["health"] == "ok" for rule in rules) else None

    rules = prometheus.wait_until("every rule evaluated", evaluated_rules)
    defined = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    assert sorted(rule["name"] for rule in rules) == sorted(rule["alert"] for rule in defined)
    assert all(not rule.get("lastError") for rule in rules)
    active = {alert["labels"]["alertname"] for alert in prometheus.get("/api/v1/alerts")["data"]["alerts"]}
    # (SegsearchHighLatencyP99 is left out: a loaded machine may make it pending, rightly.)
    assert not active & {"SegsearchHighErrorRate", "SegsearchSheddingLoad", "SegsearchDown", "SegsearchAbsent",
                         "SegsearchNotServing", "SegsearchIndexEmpty"}, active
    server_side = prometheus.query(f'sum(segsearch_requests_total{{code=~"{SERVER_SIDE_CODES}"}})')
    assert server_side == []


@needs_prometheus
def test_every_dashboard_query_runs(monitored, traffic):
    _, prometheus = monitored
    board = json.loads((DEPLOY / "grafana" / "dashboard.json").read_text())
    empty = []
    for panel in board["panels"]:
        for target in panel["targets"]:
            promql = target["expr"].replace("$__rate_interval", "1m").replace("$instance", ".*")
            if not prometheus.query(promql):
                empty.append(panel["title"])
    # Every query is valid PromQL (query() asserts success); the traffic sent above gives data
    # to all but the error ratio's numerator (no server-side errors were sent).
    assert set(empty) <= {"Server-side error ratio"}, empty


@needs_prometheus
def test_container_healthcheck_script(monitored):
    running, _ = monitored
    script = str(DEPLOY / "healthcheck.py")
    serving = subprocess.run([sys.executable, script, "--address", running.address], check=False,
                             capture_output=True, text=True, timeout=30)
    assert serving.returncode == 0 and "SERVING" in serving.stdout, serving.stdout + serving.stderr
    closed = subprocess.run([sys.executable, script, "--address", f"127.0.0.1:{free_port()}", "--timeout", "1"],
                            check=False, capture_output=True, text=True, timeout=30)
    assert closed.returncode == 1 and "UNAVAILABLE" in closed.stdout, closed.stdout + closed.stderr


def test_serving_gauge_follows_health(index_template, checkpoint_path, tmp_path_factory):
    """segsearch_serving (what SegsearchNotServing watches) is 0 while loading and draining."""
    config = ServerConfig(index_dir=str(copy_index(index_template, tmp_path_factory)),
                          checkpoint=str(checkpoint_path), port=0, metrics_port=None)
    server = SegsearchServer(config)

    def gauge() -> float | None:
        return server.metrics.registry.get_sample_value("segsearch_serving")

    server.start()
    try:
        assert gauge() == 0
        server.load()
        assert gauge() == 1
    finally:
        server.stop(grace=1)
    assert gauge() == 0
