"""deploy/ agrees with the code: its config loads, every metric its alert rules and
dashboard query exists, and the compose file wires the ports the config listens on.
(No container engine runs here; these checks are what can fail without one.)"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families
from sipcdr.config import load_config
from sipcdr.telemetry.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
_METRIC = re.compile(r"\bsipcdr_[a-z_]+\b")


def _exported_families() -> set[str]:
    from prometheus_client import generate_latest

    text = generate_latest(Metrics().registry).decode()
    return {family.name for family in text_string_to_metric_families(text)}


def _family(name: str) -> str:
    return name.removesuffix("_total")


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
    from sipcdr.app import FD_HEADROOM
    from sipcdr.config import DEFAULT_HEP_TCP_MAX_CONNECTIONS

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
