"""A real exchange process scraped by a real Prometheus with the project's scrape configuration
and alert rules; orders go in through the client library and the series are read back through
Prometheus's HTTP API. Also ``kaboni demo`` end to end, as a newcomer runs it."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from engine import CancelOrder, NewOrder
from gateway.client import Client

from test_alerts import CONTRACT, HISTOGRAMS, _rules as _rules_in_file

ROOT = Path(__file__).resolve().parent.parent
PROM_DIR = ROOT / "deploy" / "prometheus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), e.get("PYTHONPATH")]))
    return e


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except (OSError, ValueError, KeyError) as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.fixture
def exchange(tmp_path):
    port, metrics_port = free_port(), free_port()
    log = open(tmp_path / "exchange.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--demo", "--data-dir", str(tmp_path / "data"),
         "--port", str(port), "--metrics-port", str(metrics_port)],
        cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT,
    )

    def ready():
        assert proc.poll() is None, (tmp_path / "exchange.log").read_text()
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        socket.create_connection(("127.0.0.1", metrics_port), timeout=0.5).close()
        return True

    try:
        wait_for(ready, 30, "the exchange to listen")
        yield port, metrics_port
    finally:
        code = stop(proc)
        log.close()
        assert code == 0, (tmp_path / "exchange.log").read_text()


@pytest.fixture
def prometheus(tmp_path, exchange):
    """Prometheus with deploy/prometheus/prometheus.yml, pointed at the test's metrics port and
    scraping every second."""
    exe = shutil.which("prometheus")
    assert exe, "prometheus not found: install Debian's prometheus package (CI does)"
    _, metrics_port = exchange
    text = (PROM_DIR / "prometheus.yml").read_text()
    assert "127.0.0.1:9101" in text and "scrape_interval: 5s" in text and "evaluation_interval: 5s" in text
    text = (text.replace("127.0.0.1:9101", f"127.0.0.1:{metrics_port}")
                .replace("scrape_interval: 5s", "scrape_interval: 1s")
                .replace("evaluation_interval: 5s", "evaluation_interval: 1s"))
    conf_dir = tmp_path / "prom"
    conf_dir.mkdir()
    (conf_dir / "prometheus.yml").write_text(text)
    shutil.copy(PROM_DIR / "alerts.yml", conf_dir / "alerts.yml")
    web = free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [exe, f"--config.file={conf_dir / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{web}"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{web}"

    def ready():
        assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
        with urllib.request.urlopen(f"{base}/-/ready", timeout=1) as r:
            return r.status == 200

    try:
        wait_for(ready, 30, "Prometheus to be ready")
        yield base
    finally:
        stop(proc)
        log.close()


def query(base: str, expr: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def value(base: str, expr: str) -> float | None:
    result = query(base, expr)
    assert len(result) <= 1, (expr, result)
    return float(result[0]["value"][1]) if result else None


async def trade_a_little(port: int) -> list[Client]:
    """Three members and an operator: a trade of 60 t, a reject, an invalid message, a cancel.
    Returns the sessions still logged on."""
    ops, m1, m2, m3 = [await Client.connect("127.0.0.1", port) for _ in range(4)]
    await ops.logon("ops", "ops-token")
    for client, member in ((m1, "M01"), (m2, "M02"), (m3, "M03")):
        await client.logon(member, f"{member}-token")
    tag = str(time.time_ns())[-9:]
    await m1.send(NewOrder(f"s{tag}", "CEA25", "sell", 100, 9_250, "gtc"))
    assert (await m1.next_report())["type"] == "OrderAccepted"
    await m2.send(NewOrder(f"b{tag}", "CEA25", "buy", 60, 9_250, "day"))
    accepted, fill = await m2.next_report(), await m2.next_report()
    assert (accepted["type"], fill["type"], fill["qty"]) == ("OrderAccepted", "Fill", 60)
    await m3.send(NewOrder(f"x{tag}", "CEA25", "buy", 10, 20_000, "day"))   # far outside the band
    reject = await m3.next_report()
    assert (reject["type"], reject["reason"]) == ("OrderRejected", "price_out_of_band")
    await m3.send({"type": "NewOrder", "cl_ord_id": f"i{tag}", "instrument": "CEA25", "side": "up",
                   "qty": 1, "price": 9_000})
    assert (await m3.next_reply())["reason"] == "invalid_message"
    await m3.send(NewOrder(f"r{tag}", "CEA25", "buy", 10, 9_200, "day"))
    assert (await m3.next_report())["type"] == "OrderAccepted"
    await m3.send(NewOrder(f"c{tag}", "CEA25", "buy", 5, 9_100, "day"))
    assert (await m3.next_report())["type"] == "OrderAccepted"
    await m3.send(CancelOrder(f"d{tag}", f"c{tag}"))
    assert (await m3.next_report())["type"] == "OrderCancelled"
    return [ops, m1, m2, m3]


def test_prometheus_scrapes_what_the_exchange_did(exchange, prometheus):
    port, metrics_port = exchange
    base = prometheus

    async def scenario():
        clients = await trade_a_little(port)
        try:
            expected = {
                'kaboni_orders_received_total{type="NewOrder", outcome="accepted"}': 4,
                'kaboni_orders_received_total{type="NewOrder", outcome="rejected"}': 1,
                'kaboni_orders_received_total{type="NewOrder", outcome="invalid"}': 1,
                'kaboni_orders_received_total{type="CancelOrder", outcome="accepted"}': 1,
                'kaboni_rejects_total{reason="price_out_of_band"}': 1,
                'kaboni_trades_total{instrument="CEA25"}': 1,
                'kaboni_trades_total{instrument="CEA24"}': 0,
                'kaboni_traded_quantity_tonnes_total{instrument="CEA25"}': 60,
                'kaboni_traded_value_minor_units_total{instrument="CEA25", currency="CNY"}': 60 * 9_250,
                'kaboni_sessions{role="member"}': 3,
                'kaboni_sessions{role="operator"}': 1,
                'kaboni_best_bid_price_minor_units{instrument="CEA25"}': 9_200,
                'kaboni_best_ask_price_minor_units{instrument="CEA25"}': 9_250,
                'kaboni_resting_orders{instrument="CEA25"}': 2,
                'kaboni_resting_quantity_tonnes{instrument="CEA25"}': 50,
                'kaboni_instrument_state{instrument="CEA25", state="open"}': 1,
                'kaboni_instrument_state{instrument="CEA25", state="halted"}': 0,
                'up{job="kaboni"}': 1,
            }

            def all_arrived():
                got = {expr: value(base, expr.replace("{", '{job="kaboni", ', 1) if expr.startswith("kaboni") else expr)
                       for expr in expected}
                return got if got == expected else None

            await asyncio.to_thread(wait_for, all_arrived, 20, "the series to reach their values")
            # gone from the book side: no series at all, not a zero
            assert await asyncio.to_thread(query, base, 'kaboni_best_ask_price_minor_units{instrument="CEA24"}') == []
            # a session that logs out is counted by cause and leaves the sessions gauge
            await clients[3].logout()

            def logged_out():
                return (value(base, 'kaboni_disconnects_total{job="kaboni", cause="logout"}') == 1
                        and value(base, 'kaboni_sessions{job="kaboni", role="member"}') == 2)

            await asyncio.to_thread(wait_for, logged_out, 10, "the logout to be counted")
        finally:
            for c in clients[:3]:
                await c.logout()

    asyncio.run(scenario())

    # the journal's histograms and counters moved
    assert value(base, 'kaboni_journal_bytes_written_total{job="kaboni"}') > 0
    assert value(base, 'kaboni_journal_fsync_seconds_count{job="kaboni"}') > 0
    # one observation per request answered with a report (the invalid message got an Error)
    assert value(base, 'kaboni_order_to_report_latency_seconds_count{job="kaboni"}') == 6
    # info metrics
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()
    [info] = query(base, 'kaboni_trading_day_info{job="kaboni"}')
    assert info["metric"]["trading_day"] == today and info["value"][1] == "1"
    [build] = query(base, 'kaboni_build_info{job="kaboni"}')
    assert build["metric"]["python"] == ".".join(map(str, sys.version_info[:3]))
    from gateway._version import installed_version
    assert build["metric"]["version"] == installed_version()  # the one kaboni --version prints
    assert abs(value(base, 'kaboni_start_time_seconds{job="kaboni"}') - time.time()) < 120
    # every family of the contract is exported, and nothing else under kaboni_
    names = {r["metric"]["__name__"] for r in query(base, '{job="kaboni", __name__=~"kaboni_.+"}')}
    families = set()
    for name in names:
        base_name = re.sub(r"_(bucket|sum|count)$", "", name)
        families.add(base_name if base_name in HISTOGRAMS else name)
    assert families == CONTRACT
    assert query(base, 'process_cpu_seconds_total{job="kaboni"}')
    # every dashboard query is valid PromQL, and all but the empty-book ones have data
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "kaboni.json").read_text())
    empty = []
    for title, expr in _dashboard_queries(dashboard["panels"]):
        expr = (expr.replace("$__rate_interval", "1m").replace('"$instance"', '".*"')
                    .replace('"$instrument"', '".*"'))
        if not query(base, expr):
            empty.append(title)
    assert empty == [], empty
    # the alert rules evaluate cleanly against the real series, and none fires
    def evaluated():
        rules = _rules(base)
        return rules if all(not r["lastEvaluation"].startswith("0001") for r in rules) else None

    rules = wait_for(evaluated, 10, "the rules to be evaluated")
    assert sorted(r["name"] for r in rules) == sorted(r["name"] for r in _rules_in_file())  # every rule loaded
    assert all(rule["health"] == "ok" for rule in rules), rules
    assert [r["name"] for r in rules if r["type"] == "alerting" and r["state"] != "inactive"] == []


def _dashboard_queries(panels):
    for panel in panels:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
        yield from _dashboard_queries(panel.get("panels", []))


def _rules(base: str) -> list[dict]:
    with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=5) as r:
        return [rule for g in json.load(r)["data"]["groups"] for rule in g["rules"]]


def test_kaboni_demo_runs_end_to_end(tmp_path):
    data = tmp_path / "journal"
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "--seconds", "5", "--rate", "400", "--seed", "1",
         "--data-dir", str(data), "--port", str(free_port()), "--metrics-port", str(free_port())],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "\x1b[" not in out                                    # not a terminal: plain lines
    progress = [line for line in out.splitlines() if line.startswith("[")]
    assert len(progress) >= 4 and progress[-1].startswith("[  5.0s/5s]")
    for sym in ("CEA19-20", "CEA21", "CEA22", "CEA23", "CEA24", "CEA25"):
        assert re.search(rf"^{sym} .*\d", out, re.M), sym
    m = re.search(r"20 member firms, ([\d,]+) order messages \(([\d,]+)/s\), ([\d,]+) trades", out)
    assert m, out
    sent, rate, trades = (int(g.replace(",", "")) for g in m.groups())
    assert 1_000 <= sent <= 2_400 and 200 <= rate <= 480 and trades > 100
    assert re.search(r"p99 [\d.]+ (ms|µs)", out)
    # the exchange's own metrics count every message the firms sent, and the same trades
    assert f"The exchange's own metrics: {sent:,} orders received" in out, out
    assert f", {trades:,} trades, order-to-report p99" in out
    assert re.search(r"Its journal: [\d,]+ records durable in [\d,]+ fsyncs", out)
    assert "/metrics" in out and str(data) in out and "exit code 0" in out
    # the day is closed by the operator and the settlement report, read back from the journal, balances
    assert re.search(r"End of day \d{4}-\d\d-\d\d: market closed.*CEA25 \d+\.\d\d", out), out
    assert re.search(r"Settlement of .* sum to zero: yes\.", out), out
    # the engine's closing prices are the VWAPs the demo computed from the public trade feed
    closes = dict(re.findall(r"(CEA[\d-]+) (\d+\.\d\d)[,.]", out.split("Closing prices")[1].splitlines()[0]))
    vwaps = {m[0]: m[1] for m in re.findall(r"^(CEA[\d-]+)(?: +[\d.,]+){5} +([\d.]+) ", out, re.M)}
    assert closes == vwaps and len(closes) == 6, (closes, vwaps)
    # the journal it leaves behind is whole, and settles
    verify = subprocess.run([sys.executable, "-m", "gateway", "journal", "verify", str(data)],
                            cwd=ROOT, env=env(), capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_kaboni_demo_redraws_in_place_on_a_terminal_and_stops_cleanly_on_ctrl_c(tmp_path):
    pid, fd = pty.fork()
    if pid == 0:  # child: the demo on a pseudo-terminal
        os.chdir(ROOT)
        os.execvpe(sys.executable, [sys.executable, "-m", "gateway", "demo", "--seconds", "60", "--rate", "200",
                                    "--data-dir", str(tmp_path / "journal"), "--port", str(free_port()),
                                    "--metrics-port", str(free_port())], env())
    chunks = []
    deadline = time.monotonic() + 60
    interrupted = False
    while time.monotonic() < deadline:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
        if not interrupted and len(re.findall(rb"\x1b\[\d+F", b"".join(chunks))) >= 6:
            os.kill(pid, signal.SIGINT)      # Ctrl-C after a few redraws
            interrupted = True
    _, status = os.waitpid(pid, 0)
    out = b"".join(chunks).decode(errors="replace")
    assert interrupted, out
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert "\x1b[?25l" in out and "\x1b[?25h" in out               # cursor hidden, then restored
    assert "Kaboni demo exchange" in out and "CEA25" in out
    # a summary for the part that ran, and the exchange drained
    assert re.search(r"Kaboni demo: \d+\.\d s, 20 member firms", out), out
    assert "exit code 0" in out


def test_kaboni_demo_keep_running_leaves_the_exchange_up_until_ctrl_c(tmp_path):
    metrics_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "--seconds", "1", "--rate", "200", "--no-end-of-day",
         "--keep-running", "--data-dir", str(tmp_path / "journal"), "--port", str(free_port()),
         "--metrics-port", str(metrics_port)],
        cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "keeps running" in line:
                break
        assert "keeps running" in "".join(lines), "".join(lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            assert b"kaboni_trades_total" in r.read()
        proc.send_signal(signal.SIGINT)
        out = proc.stdout.read()
        assert proc.wait(30) == 0, out
        assert "drained and stopped (exit code 0)" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
