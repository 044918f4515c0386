"""Which hot path runs: compiled at install when a compiler was there, the source when
SIPCDR_PURE_PYTHON says so or when the source changed after the build, and the daemon
says which in its `started` line and in `sipcdr_build_info`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from daemonproc import start_daemon
from sipcdr import hotpath
from sipcdr.telemetry.metrics import Metrics

DAEMON_DIR = Path(hotpath.__file__).resolve().parents[1]
REPORT = """
import json, sys
from sipcdr import hotpath
from sipcdr.sip import parser
print(json.dumps([*hotpath.hot_path(), parser.__file__, parser._scan_head is not None]))
"""


def report(env: dict[str, str], path: Path = DAEMON_DIR) -> list[object]:
    environ = {k: v for k, v in os.environ.items() if k != hotpath.PURE_PYTHON_ENV}
    environ.update(env, PYTHONPATH=str(path))
    done = subprocess.run(
        [sys.executable, "-c", REPORT], env=environ, capture_output=True, text=True, check=True
    )
    result: list[object] = json.loads(done.stdout)
    return result


def built_hot_path() -> str:
    """What a process runs without SIPCDR_PURE_PYTHON: `make test` builds with the
    compiler it finds."""
    return "compiled" if shutil.which("cc") or shutil.which("gcc") else "interpreted"


def test_the_suite_runs_the_hot_path_the_install_built() -> None:
    kind, why = hotpath.hot_path()
    expected = "interpreted" if hotpath.pure_python_forced() else built_hot_path()
    assert kind == expected, f"interpreted: {why}"
    parser = sys.modules["sipcdr.sip.parser"]
    assert parser.__file__ is not None
    assert parser.__file__.endswith(".py") == (kind == "interpreted")
    assert (parser._scan_head is not None) == (kind == "compiled")


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_pure_python_env_runs_the_source_without_the_scanner(value: str) -> None:
    kind, why, parser_file, scanner = report({hotpath.PURE_PYTHON_ENV: value})
    assert (kind, why, scanner) == ("interpreted", "forced", False)
    assert str(parser_file).endswith("parser.py")


@pytest.mark.parametrize("value", ["", "0", "false", "no"])
def test_pure_python_env_off_leaves_the_build(value: str) -> None:
    kind, _why, _file, scanner = report({hotpath.PURE_PYTHON_ENV: value})
    assert kind == built_hot_path()
    assert scanner == (kind == "compiled")


def test_a_source_edited_after_the_build_runs_interpreted(tmp_path: Path) -> None:
    # A copy of the installed tree (the mypyc runtime library sits beside the package).
    shutil.copytree(DAEMON_DIR / "sipcdr", tmp_path / "sipcdr")
    for runtime in DAEMON_DIR.glob("*__mypyc*"):
        shutil.copy2(runtime, tmp_path)
    built = shutil.which("cc") or shutil.which("gcc")
    assert report({}, tmp_path)[:2] == (["compiled", ""] if built else ["interpreted", "not_built"])
    edited = tmp_path / "sipcdr" / "dialog" / "state.py"
    # Saved a minute after the build (or after the copy, when nothing was built).
    later = max(path.stat().st_mtime for path in tmp_path.rglob("*")) + 60
    os.utime(edited, (later, later))
    kind, why, parser_file, scanner = report({}, tmp_path)
    # Every module runs from source, not only the edited one.
    assert (kind, why, scanner) == ("interpreted", "stale" if built else "not_built", False)
    assert str(parser_file) == str(tmp_path / "sipcdr" / "sip" / "parser.py")


def test_build_info_metric_names_the_hot_path() -> None:
    metrics = Metrics()
    kind = hotpath.hot_path()[0]
    assert metrics.registry.get_sample_value("sipcdr_build_info", {"hot_path": kind}) == 1


@pytest.mark.integration
@pytest.mark.parametrize("forced", [False, True])
def test_the_daemon_logs_and_exports_its_hot_path(tmp_path: Path, forced: bool) -> None:
    env = {hotpath.PURE_PYTHON_ENV: "1"} if forced else {}
    daemon = start_daemon(tmp_path, **env)
    try:
        kind = "interpreted" if forced else built_hot_path()
        assert daemon.metric("sipcdr_build_info", hot_path=kind) == 1
        started = next(
            json.loads(line) for line in daemon.log.read_text().splitlines() if '"started"' in line
        )
        assert started["hot_path"] == kind
        assert started["hot_path_reason"] == ("forced" if forced else None)
    finally:
        assert daemon.stop() == 0
