"""deploy/ agrees with the code: its config loads, every metric its alert rules and
dashboard query exists, and the compose file wires the ports the config listens on.
(No container engine runs here; these checks are what can fail without one.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families
from sipcdr.config import load_config
from sipcdr.telemetry.families import FAMILIES
from sipcdr.telemetry.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULE_TESTS = Path(__file__).resolve().parent / "promtool"
_METRIC = re.compile(r"\bsipcdr_[a-z_]+\b")
# A metric with a label selector: the metric's name and what is inside the braces.
_SELECTOR = re.compile(r"\b(sipcdr_[a-z_]+)\{([^}]*)\}")
_SAMPLE_SUFFIXES = ("_total", "_bucket", "_sum", "_count")


def _exported_families() -> set[str]:
    from prometheus_client import generate_latest

    text = generate_latest(Metrics().registry).decode()
    return {family.name for family in text_string_to_metric_families(text)}


def _family(name: str) -> str:
    """The family a sample name belongs to: a counter's _total, a histogram's _bucket,
    _sum and _count are its samples."""
    for suffix in _SAMPLE_SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in FAMILIES:
            return name.removesuffix(suffix)
    return name


def _alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "sipcdr.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_every_metric_the_alerts_and_dashboard_query_is_exported() -> None:
    exported = _exported_families()
    queried = {
        _family(name)
        for expr in [rule["expr"] for rule in _alert_rules()] + _dashboard_exprs()
        for name in _METRIC.findall(expr)
    }
    assert len(queried) > 15
    assert queried <= exported, sorted(queried - exported)


def test_every_label_the_alerts_and_dashboard_select_on_is_one_the_metric_has() -> None:
    selected = [
        (_family(name), label.split("=")[0].strip().rstrip("!~"))
        for expr in [rule["expr"] for rule in _alert_rules()] + _dashboard_exprs()
        for name, inside in _SELECTOR.findall(expr)
        for label in inside.split(",")
        if label.strip()
    ]
    assert len(selected) > 5
    for family, label in selected:
        labels = set(FAMILIES[family].labels)
        if FAMILIES[family].kind == "histogram":
            labels.add("le")
        assert label in labels, (family, label)


def test_the_asr_alert_fires_when_a_trunks_answers_stop_and_not_while_they_flow() -> None:
    """promtool evaluates the shipped rule on series where one trunk's answers stop
    after an hour of a 50 % ASR and another's go on: the first fires once its 15 minute
    window has emptied and the 15 minutes of `for` have passed, the second never."""
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool missing: make sysdeps installs it (prometheus)"
    result = subprocess.run(
        [promtool, "test", "rules", "asr_alert_test.yml"],
        cwd=RULE_TESTS,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_rule_files_pass_promtool_check() -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool missing: make sysdeps installs it (prometheus)"
    result = subprocess.run(
        [promtool, "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_are_complete() -> None:
    rules = _alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
    # The delivery promises each have an alert: loss, blocked intake, a down sink.
    assert {"SipcdrRecordsLost", "SipcdrIntakeBlocked", "SipcdrSinkDown"} <= set(names)


def test_the_unit_and_compose_file_give_room_for_the_hep_connections() -> None:
    from sipcdr.config import DEFAULT_HEP_TCP_MAX_CONNECTIONS
    from sipcdr.limits import FD_HEADROOM

    unit = (DEPLOY / "sipcdr.service").read_text()
    limits = re.findall(r"(?m)^LimitNOFILE=(\d+)$", unit)
    assert len(limits) == 1
    needed = DEFAULT_HEP_TCP_MAX_CONNECTIONS + FD_HEADROOM
    assert int(limits[0]) >= 4 * needed  # headroom for raising the cap too
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert compose["services"]["sipcdr"]["ulimits"]["nofile"] == int(limits[0])


def test_the_compose_config_loads_and_its_ports_match(tmp_path: Path) -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"sipcdr", "kafka", "postgres", "prometheus", "grafana"} <= set(services)
    sipcdr = services["sipcdr"]
    dsn = sipcdr["environment"]["SIPCDR_SINKS__POSTGRES__DSN"].replace(
        "${POSTGRES_PASSWORD:-sipcdr}", "sipcdr"
    )
    config = load_config(DEPLOY / "sipcdr.toml", {"SIPCDR_SINKS__POSTGRES__DSN": dsn})
    published = {port.split(":", 1)[1] for port in sipcdr["ports"]}
    listeners = (
        [f"{e.port}/udp" for e in config.capture.sip_udp]
        + [f"{e.port}/udp" for e in config.capture.hep_udp]
        + [f"{e.port}/tcp" for e in config.capture.hep_tcp]
        + [f"{config.metrics.listen.port}/tcp"]
    )
    assert set(listeners) == published
    assert config.sinks.kafka.bootstrap_servers == "kafka:9092"
    assert config.sinks.postgres.dsn.startswith("postgresql://sipcdr:")
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"sipcdr:{config.metrics.listen.port}"]
