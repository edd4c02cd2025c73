"""The alert rules, their promtool unit tests and the Grafana dashboard stay valid and refer only
to metrics the exchange exports (the metric-name contract of issue 5)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "kaboni.json"
OPERATIONS = ROOT / "docs" / "operations.md"

# The contract: every metric family gateway/_metrics.py exports (histograms by base name).
COUNTERS = {
    "kaboni_orders_received_total", "kaboni_rejects_total", "kaboni_trades_total",
    "kaboni_traded_quantity_tonnes_total", "kaboni_traded_value_minor_units_total",
    "kaboni_journal_bytes_written_total", "kaboni_throttled_messages_total",
    "kaboni_disconnects_total", "kaboni_outbound_held_total",
}
HISTOGRAMS = {
    "kaboni_order_to_report_latency_seconds", "kaboni_journal_append_to_durable_seconds",
    "kaboni_journal_batch_records", "kaboni_journal_fsync_seconds",
}
GAUGES = {
    "kaboni_journal_records_pending", "kaboni_sessions", "kaboni_best_bid_price_minor_units",
    "kaboni_best_ask_price_minor_units", "kaboni_resting_orders", "kaboni_resting_quantity_tonnes",
    "kaboni_instrument_state", "kaboni_trading_day_info", "kaboni_build_info",
    "kaboni_start_time_seconds",
}
CONTRACT = COUNTERS | HISTOGRAMS | GAUGES
# prometheus-client's default process collector, and Prometheus's own scrape series
PROCESS = {
    "process_cpu_seconds_total", "process_resident_memory_bytes", "process_virtual_memory_bytes",
    "process_open_fds", "process_max_fds", "process_start_time_seconds",
}
SCRAPE = {"up"}
RECORDED = {"kaboni:trading_session:active"}

# Names a PromQL expression mentions: identifiers followed by "{" or "[" or standing alone as a
# metric; PromQL functions and keywords are followed by "(" or are in this list.
_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "le", "inf", "nan",
}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (label names, strings and functions left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)          # strings
    expr = re.sub(r"\{[^}]*\}", "{}", expr)                    # label matchers
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\w+|\$\{\w+\}", "", expr)                # Grafana variables
    expr = re.sub(r"\[[^\]]*\]", "[]", expr)                    # range durations
    expr = re.sub(r"\boffset\s+\w+", "", expr)                  # offsets
    expr = re.sub(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?", "0", expr)  # numbers
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        name = m.group(0)
        rest = expr[m.end():].lstrip()
        if rest.startswith("(") or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def family(name: str) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
            return name[: -len(suffix)]
    return name


def promtool(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    assert exe, "promtool not found: install Debian's prometheus package (CI does)"
    return subprocess.run([exe, *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=60)


def test_promtool_check_rules():
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_for_the_alerts_pass():
    result = promtool("test", "rules", "alerts_test.yml", "alerts_weekend_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config():
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def _rules() -> list[dict]:
    # promtool has parsed the file already; a YAML parser is not a dependency, so read the
    # few fields we need from promtool's own view of the rules.
    text = (PROM_DIR / "alerts.yml").read_text()
    rules, current = [], None
    for line in text.splitlines():
        m = re.match(r"\s*- (alert|record): (\S+)", line)
        if m:
            current = {"kind": m.group(1), "name": m.group(2), "expr": [], "in_expr": False}
            rules.append(current)
            continue
        if current is None:
            continue
        m = re.match(r"(\s*)expr: ?(.*)", line)
        if m:
            current["in_expr"] = True
            current["indent"] = len(m.group(1))
            if m.group(2) not in ("|", ">"):
                current["expr"].append(m.group(2))
                current["in_expr"] = False
            continue
        if current["in_expr"]:
            if line.strip() and len(line) - len(line.lstrip()) <= current["indent"]:
                current["in_expr"] = False
            else:
                current["expr"].append(line)
    for r in rules:
        r["expr"] = "\n".join(r["expr"])
    return rules


def test_every_alert_the_issue_asks_for_exists_and_has_a_test():
    alerts = {r["name"]: r["expr"] for r in _rules() if r["kind"] == "alert"}
    wanted = {
        "KaboniDown": "up",
        "KaboniJournalFsyncSlow": "kaboni_journal_fsync_seconds_bucket",
        "KaboniJournalRecordsPendingGrowing": "kaboni_journal_records_pending",
        "KaboniOrderToReportLatencyHigh": "kaboni_order_to_report_latency_seconds_bucket",
        "KaboniRejectRateSpike": "kaboni_rejects_total",
        "KaboniInstrumentHalted": "kaboni_instrument_state",
        "KaboniNoTrades": "kaboni_trades_total",
    }
    assert set(wanted) <= set(alerts)
    for name, metric in wanted.items():
        assert metric in metric_names(alerts[name]), name
    tests = (PROM_DIR / "alerts_test.yml").read_text()
    for name in alerts:
        # each alert has at least one firing case (exp_alerts with entries) and one quiet case
        blocks = re.findall(rf"alertname: {name}\n\s+exp_alerts:(.*?)(?=\n\s+- eval_time|\n\s+- interval|\Z)", tests, re.S)
        assert any(b.strip() == "[]" for b in blocks), f"{name}: no not-firing case"
        assert any("exp_labels" in b for b in blocks), f"{name}: no firing case"
    down = alerts["KaboniDown"]
    assert 'up{job="kaboni"} == 0' in down


def test_alerts_use_only_contract_metrics():
    for rule in _rules():
        for name in metric_names(rule["expr"]):
            assert family(name) in CONTRACT | SCRAPE | RECORDED, (rule["name"], name)


def test_scrape_config_targets_the_metrics_port_with_job_kaboni():
    text = (PROM_DIR / "prometheus.yml").read_text()
    assert re.search(r"job_name:\s*kaboni\b", text)
    assert "127.0.0.1:9101" in text
    assert re.search(r"rule_files:\s*\n\s*-\s*alerts\.yml", text)


def _targets(panels):
    for panel in panels:
        yield from ((panel, t) for t in panel.get("targets", []))
        yield from _targets(panel.get("panels", []))


def test_dashboard_is_valid_and_refers_only_to_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    used = set()
    for panel, target in _targets(dash["panels"]):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert target["datasource"]["uid"] == "${datasource}", panel["title"]
        for name in metric_names(target["expr"]):
            assert family(name) in CONTRACT | PROCESS | SCRAPE, (panel["title"], name)
            used.add(family(name))
    for v in variables.values():
        if v["type"] == "query":
            for name in metric_names(v["definition"].removeprefix("label_values(").rsplit(",", 1)[0]):
                assert family(name) in CONTRACT | SCRAPE, (v["name"], name)
    # the four areas the issue names, each with something in it
    titles = {p["title"] for p in dash["panels"] if p["type"] == "row"}
    assert {"Trading activity", "Latency", "Journal health"} <= titles
    assert any("Sessions" in t for t in titles)
    # every exported family is on the dashboard somewhere
    assert CONTRACT - used == set()


def test_operations_guide_documents_every_metric():
    text = OPERATIONS.read_text()
    missing = [name for name in sorted(CONTRACT) if f"`{name}`" not in text]
    assert not missing, missing


@pytest.mark.parametrize("expr, names", [
    ('sum by (le) (rate(a_bucket{job="x", le="0.1"}[5m])) > 0.25', {"a_bucket"}),
    ("vector(1) and on() (hour() * 60 >= 90 < 210)", set()),
    ('up{job="kaboni"} == 0', {"up"}),
    ('x / on(instance) group_left() y', {"x", "y"}),
])
def test_metric_names_helper(expr, names):
    assert metric_names(expr) == names


def test_dashboard_json_is_what_its_builder_prints():
    import sys
    out = subprocess.run([sys.executable, str(DASHBOARD.parent / "build_dashboard.py")],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert json.loads(out) == json.loads(DASHBOARD.read_text())


def test_dashboard_panels_fit_the_grid_without_overlapping():
    dash = json.loads(DASHBOARD.read_text())
    cells = {}
    for panel in dash["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, (panel["title"], cells.get((x, y)))
                cells[(x, y)] = panel["title"]


def test_the_configuration_example_in_the_operations_guide_is_valid():
    from engine import parse_config

    text = OPERATIONS.read_text()
    example = re.search(r"```toml\n(.*?)```", text, re.S).group(1)
    config = parse_config(example, "docs/operations.md")
    assert [i.symbol for i in config.instruments] == ["CEA25"]
    assert {m.id: m.role for m in config.members} == {"M01": "member", "ops": "operator"}
    assert config.gateway.durability == "fsync" and config.gateway.data_dir == "/var/lib/kaboni"
