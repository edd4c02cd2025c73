"""Second operations review: what an operator relies on in docs/operations.md, checked for real.

Subprocess tests run ``python -m gateway`` from this checkout (PYTHONPATH = the repo root)."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest

from engine import ConfigError, parse_config
from gateway.cli import main

BASE = """
[[instruments]]
symbol = "CEA25"
currency = "CNY"
reference_price = 9250
"""


@pytest.mark.parametrize("line, key", [
    ('first_trading_day = "20261124"', "market.first_trading_day"),
    ('first_trading_day = "2026-W48-2"', "market.first_trading_day"),
    ('holidays = ["20261225"]', "market.holidays[0]"),
])
def test_market_dates_must_be_written_yyyy_mm_dd(line, key):
    # Python 3.11's date.fromisoformat also takes 20261124 and 2026-W48-2. The engine compares
    # days as YYYY-MM-DD strings: such a holiday was never skipped, and such a first trading day
    # was written into every FILL record, where `kaboni settle --day` cannot name it.
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        parse_config("[market]\n" + line + "\n" + BASE)


# -- log lines ----------------------------------------------------------------------------------


_FIELD = re.compile(r'([a-z_]+)=("(?:[^"\\]|\\.)*"|[^\s"]+)')


def _fields(line: str) -> dict[str, str]:
    """A log line's key=value fields; fails unless the whole line is such fields, as the docs
    promise (a value that is not a plain token is a JSON string)."""
    out, pos = {}, 0
    for m in _FIELD.finditer(line):
        assert line[pos:m.start()].strip() == "", f"not key=value at {line[pos:]!r}"
        key, value = m.groups()
        out[key] = json.loads(value) if value.startswith('"') else value
        pos = m.end()
    assert line[pos:].strip() == "", f"not key=value at {line[pos:]!r}"
    return out


class _Lines(logging.Handler):
    def __init__(self) -> None:
        from gateway._server import KeyValueFormatter

        super().__init__(logging.INFO)
        self.setFormatter(KeyValueFormatter())
        self.lines: list[str] = []

    def emit(self, record) -> None:
        self.lines.append(self.format(record))


def test_journal_failed_line_is_key_value_fields(tmp_path):
    """docs/operations.md: `journal_failed` (level ERROR), every line one line of key=value
    fields. The error was written with %r: `error=OSError(28, 'No space left on device')`."""
    from _fakes import ThreadServer, ledger_factory, make_config

    opened = []

    def factory(*args, **kwargs):
        ledger = ledger_factory()(*args, **kwargs)
        opened.append(kwargs["on_error"])
        return ledger

    handler = _Lines()
    logger = logging.getLogger("kaboni")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        srv = ThreadServer(make_config(), tmp_path / "d", ledger_factory=factory)
        with srv:
            threading.Thread(target=opened[0], args=(OSError(28, "No space left on device"),)).start()
            srv.thread.join(20)
        assert srv.code == 1
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    failed = [line for line in handler.lines if "event=journal_failed" in line]
    assert len(failed) == 1, handler.lines
    fields = _fields(failed[0])
    assert fields["level"] == "ERROR"
    assert "No space left on device" in fields["error"]
    for line in handler.lines:
        _fields(line)


# -- start-up failures ------------------------------------------------------------------------


def _serve(args, timeout=30):
    from _fakes import REPO

    return subprocess.run([sys.executable, "-m", "gateway", "serve", *args], cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "KABONI_PURE_PYTHON": "1"},
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("cert_exists", [False, True])
def test_bad_tls_file_is_named_in_the_start_failed_line(tmp_path, cert_exists):
    """start_failed for a bad TLS file: one line, exit 2 (the file's fault: systemd's
    RestartPreventExitStatus=2 stops the restart loop), nothing in the data directory; the
    line said only '[Errno 2] No such file or directory' or '[SSL] PEM lib (_ssl.c:3905)',
    not which file."""
    from _fakes import write_config_toml

    cert = tmp_path / "cert.pem"
    if cert_exists:
        cert.write_text("not a certificate\n")
    key = tmp_path / "key.pem"
    key.write_text("not a key\n")
    config = write_config_toml(tmp_path / "ex.toml", tls_cert=str(cert), tls_key=str(key))
    proc = _serve(["--config", str(config), "--data-dir", str(tmp_path / "d"), "--no-metrics"])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "event=start_failed" in lines[0], proc.stderr
    assert str(cert) in lines[0], lines[0]
    _fields(lines[0])
    assert not (tmp_path / "d").exists()


# -- command-line usage errors exit 2 (docs/operations.md: "2 for usage errors") ----------------


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tail_refuses_a_negative_idle(capsys):
    # `tail --idle -1` logged on and stopped at once with status 0
    with pytest.raises(SystemExit) as exc:
        main(["tail", "--port", str(_closed_port()), "--idle", "-1"])
    assert exc.value.code == 2 and "--idle" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--limit", "--from"])
def test_journal_dump_refuses_negative_numbers(tmp_path, capsys, option):
    # `journal dump DIR --limit -1` printed nothing and exited 0
    with pytest.raises(SystemExit) as exc:
        main(["journal", "dump", str(tmp_path), option, "-1"])
    assert exc.value.code == 2 and option in capsys.readouterr().err


def test_demo_restart_hint_names_the_port_it_used(tmp_path):
    """The demo's closing hint 'restart it ... (then: kaboni admin OpenMarket)' left out the
    --port of a demo run on other ports, so the admin command went to 7001 (the default)."""
    from _fakes import REPO, free_port

    port, mport = free_port(), free_port()
    proc = subprocess.run([sys.executable, "-m", "gateway", "demo", "--seconds", "1", "--rate", "20", "--firms", "1",
                           "--seed", "1", "--plain", "--port", str(port), "--metrics-port", str(mport),
                           "--data-dir", str(tmp_path / "d")], cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "KABONI_PURE_PYTHON": "1"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    hint = [line for line in proc.stdout.splitlines() if "kaboni admin OpenMarket" in line]
    assert len(hint) == 1 and f"kaboni admin OpenMarket --port {port}" in hint[0], proc.stdout


def test_port_equal_to_metrics_port_is_a_start_failure(tmp_path):
    """--port N --metrics-port N started 'fine' (event=start, exit 0 on SIGTERM) with no
    order-entry listener: uvloop binds the order port without listening until serving, the
    metrics endpoint (SO_REUSEADDR) then took the same port, and uvloop's start_serving dropped
    the failed listen silently. Members got /metrics answers instead of the exchange."""
    from _fakes import free_port

    port = free_port()
    proc = _serve(["--demo", "--data-dir", str(tmp_path / "d"), "--port", str(port), "--metrics-port", str(port)],
                  timeout=20)
    assert proc.returncode == 2, proc.stderr  # a configuration problem
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "event=start_failed" in lines[0], proc.stderr
    _fields(lines[0])
    assert not (tmp_path / "d").exists()


def test_admin_keeps_a_numeric_ref_a_string(tmp_path, capsys):
    """`kaboni admin Deposit ref=20261124001 ...` (a bank's transfer number as the ref) was sent
    with ref as an integer and answered `Error invalid_message: ref: Expected str, got int`:
    the CLI turned every value that looks like an integer into one, whatever the field."""
    from _fakes import ThreadServer, make_config

    with ThreadServer(make_config(), tmp_path / "d") as srv:
        code = main(["admin", "--port", str(srv.port), "--member", "ops", "--token", "ops-token", "Deposit",
                     "ref=20261124001", "member=M07", "asset=CNY", "amount=100"])
        out = capsys.readouterr().out
        assert code == 0, out
        reply = json.loads(out.splitlines()[-1])
        assert reply["type"] == "AdminAck" and reply["ref"] == "20261124001" and reply["amount"] == 100
        code = main(["admin", "--port", str(srv.port), "--member", "ops", "--token", "ops-token", "SuspendMember",
                     "member=M07"])
        assert code == 0, capsys.readouterr().out


# -- restoring a copy taken while the exchange ran ----------------------------------------------


def _durable(ledger) -> None:
    deadline = time.monotonic() + 10
    while ledger.durable_seq < ledger.last_seq and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ledger.durable_seq == ledger.last_seq


def test_a_snapshot_beyond_a_restored_journal_is_never_used_later(tmp_path):
    """docs/operations.md: a copy of a running exchange's directory is usable, and restoring on
    another machine is 'copy the directory, verify, start'. A copy (rsync takes journal-* before
    snapshot-*) can hold snapshots of seqs beyond its journal's end, from the original's later
    records. Recovery ignored them only while they were beyond the end: once the restored
    exchange had run that far on different commands, a restart restored the original's state
    from such a snapshot (its seq and byte position matched an ENTRY), not the journal's."""
    import engine as E
    from engine import demo_config
    from engine.journal import Ledger

    config = demo_config()

    def ledger(path, **kw):
        return Ledger.open(config, path, durability="none", today="2026-11-24", **kw)

    def orders(led, tag, price):
        for i in range(100):
            led.execute(E.NewOrder(f"{tag}{i}", "CEA25", "sell", 1, price), "M02", 1)
        _durable(led)

    live, copy = tmp_path / "live", tmp_path / "copy"
    original = ledger(live, snapshot_every=50)
    _durable(original)
    copy.mkdir()
    for seg in live.glob("journal-*.kbj"):  # the copy takes the segments first ...
        shutil.copy2(seg, copy / seg.name)
    orders(original, "x", 9300)  # ... the original goes on (and snapshots) ...
    original.close()
    for snap in live.glob("snapshot-*.kbs"):  # ... and the copy takes the snapshots after
        shutil.copy2(snap, copy / snap.name)

    restored = ledger(copy, snapshot_every=1_000_000)
    orders(restored, "y", 9301)  # the same sizes, other commands: the seqs and positions match
    crashed = tmp_path / "crashed"  # the restored exchange's files as a crash would leave them
    crashed.mkdir()
    for f in copy.iterdir():
        if f.name != "LOCK":
            shutil.copy2(f, crashed / f.name)
    restored.close()

    replay = tmp_path / "replay"  # the truth: its journal alone, replayed in full
    replay.mkdir()
    for seg in crashed.glob("journal-*.kbj"):
        shutil.copy2(seg, replay / seg.name)
    a, b = ledger(crashed), ledger(replay)
    try:
        assert a.last_seq == b.last_seq
        assert a.engine.state_hash() == b.engine.state_hash()
    finally:
        a.close()
        b.close()


def test_an_order_after_the_journal_failed_is_no_internal_error(caplog):
    """With a full disk the log read: event=journal (the writer), then event=internal_error with
    a traceback for the order that met the failed journal (whose session was then counted as a
    client_close), then event=journal_failed. docs/operations.md lists internal errors nowhere:
    they are bugs. An order meeting the failed journal ends its session as `shutdown`, quietly:
    the journal_failed line says what happened."""
    from engine.journal import JournalFailedError
    from gateway._exchange import Exchange
    from test_session_core import ManualLedger, connect, enc

    class FailedLedger(ManualLedger):
        failed = False

        def execute(self, cmd, member, ts, session=0, throttled=False):
            if self.failed:
                raise JournalFailedError("journal failed: OSError(28, 'No space left on device')")
            return super().execute(cmd, member, ts, session, throttled)

    from _fakes import make_config

    config = make_config()
    ledger = FailedLedger(config)
    ex = Exchange(config, ledger, clock_ns=lambda: 42)
    s, sink = connect(ex, "M01")
    sink.frames()
    ledger.failed = True
    order = {"type": "NewOrder", "cl_ord_id": "o1", "instrument": "CEA25", "side": "buy", "qty": 1, "price": 9250}
    with caplog.at_level(logging.INFO, logger="kaboni"):
        ex.data_received(s, enc(order), 0.0)
        assert sink.closed
        ex.connection_lost(s, "client_close", 0.0)
    assert not [r for r in caplog.records if "internal_error" in r.getMessage()], caplog.text
    assert ex.stats.disconnects["shutdown"] == 1 and ex.stats.disconnects["client_close"] == 0


def test_journal_open_failed_line_quotes_a_data_dir_with_a_space(tmp_path):
    """`journal_open_failed data_dir=/srv/kaboni data error=...`: the data directory went in
    unquoted, so a path with a space split the line into non-fields."""
    bad = tmp_path / "a file"
    bad.write_text("not a directory\n")
    proc = _serve(["--demo", "--data-dir", str(bad), "--no-metrics", "--port", "0"])
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "event=journal_open_failed" in lines[0], proc.stderr
    fields = _fields(lines[0])
    assert fields["data_dir"] == str(bad) and fields["level"] == "ERROR"


def test_order_port_taken_while_the_journal_opens_is_a_start_failure(tmp_path):
    """uvloop binds the order port at once but listens only when it starts serving, after the
    journal is open; a listen that fails then (another process took the port meanwhile, as two
    exchanges started together on one port do) was dropped by uvloop without an error: the
    server logged event=start and ran with no order entry at all."""
    import asyncio
    import socket

    import uvloop

    from _fakes import ledger_factory, make_config
    from gateway._server import Server

    taken = []

    def factory(*args, **kwargs):
        other = socket.socket()
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind(("127.0.0.1", server.port))
        other.listen(5)
        taken.append(other)
        return ledger_factory()(*args, **kwargs)

    handler = _Lines()
    logger = logging.getLogger("kaboni")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    server = Server(make_config(), tmp_path / "d", port=0, metrics=False, ledger_factory=factory)
    try:
        code = uvloop.run(asyncio.wait_for(server.run(), 20))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        for s in taken:
            s.close()
    assert code == 1, handler.lines
    failed = [line for line in handler.lines if "event=start_failed" in line]
    assert len(failed) == 1, handler.lines
    assert not [line for line in handler.lines if "event=start " in line], handler.lines


def test_a_segment_once_followed_by_another_never_changes_again(tmp_path):
    """docs/operations.md: copy every segment that is no longer the newest, as soon as a newer
    one exists (rsync --ignore-existing): 'they are immutable'. A crash while the journal moved
    to a new segment leaves that new file half created; the restart removed it and went on
    appending to the previous segment, which a continuous copy taken meanwhile (during the
    downtime) already held, shorter, and never copied again."""
    import engine as E
    from engine import demo_config
    from engine.journal import Ledger, read_records
    from engine.journal._format import segment_name

    def ledger(**kw):
        return Ledger.open(demo_config(), tmp_path, durability="none", today="2026-11-24", **kw)

    first = ledger(segment_bytes=8192)
    for i in range(10):
        first.execute(E.NewOrder(f"a{i}", "CEA25", "buy", 1, 9250), "M01", 1)
    first.close()
    newest = sorted(tmp_path.glob("journal-*.kbj"))[-1]
    last_seq = first.last_seq
    (tmp_path / segment_name(last_seq + 1)).write_bytes(b"\0" * 10)  # the crash while rolling
    sealed = newest.read_bytes()  # what a continuous copy takes now: a newer segment exists

    again = ledger(segment_bytes=1 << 20)
    for i in range(5):
        again.execute(E.NewOrder(f"b{i}", "CEA25", "buy", 1, 9250), "M01", 1)
    again.close()
    assert newest.read_bytes() == sealed
    assert (tmp_path / segment_name(last_seq + 1)).exists()
    seqs = [r.seq for r in read_records(tmp_path)]
    assert seqs == list(range(1, last_seq + 6))


def test_the_journal_writer_runs_at_the_configured_priority(tmp_path, caplog):
    """writer_nice: the writer thread ahead of the event loop on a shared core; where the
    process may not raise a priority the start goes on and says so."""
    import os

    from _fakes import ThreadServer, make_config

    caplog.set_level(logging.INFO, logger="kaboni")
    with ThreadServer(make_config(writer_nice=-5), tmp_path / "d") as server:
        tid = server.exchange.ledger.journal.writer_native_id
        nice = os.getpriority(os.PRIO_PROCESS, tid)
        main_nice = os.getpriority(os.PRIO_PROCESS, 0)
    logged = " ".join(r.getMessage() for r in caplog.records)
    if "event=writer_priority nice=-5" in logged:
        assert nice == -5 and main_nice != -5  # the writer thread only
    else:
        assert "event=writer_priority_unchanged nice=-5" in logged and "LimitNICE" in logged
    from engine import DEMO_TOML, ConfigError, parse_config

    with pytest.raises(ConfigError, match="gateway.writer_nice: must be in -20..19, got -21"):
        parse_config(DEMO_TOML.replace("[gateway]\n", "[gateway]\nwriter_nice = -21\n"))


def test_the_writer_gives_up_its_priority_at_peak_load_and_takes_it_back_after(monkeypatch):
    """Boosted while batches are small (latency counts), plain while they are large (the loop
    is saturated and a boosted writer only preempts it to wait for the GIL), with a gap."""
    import os
    from types import SimpleNamespace

    from gateway._server import WriterPriority

    calls = []
    monkeypatch.setattr(os, "setpriority", lambda which, who, nice: calls.append((who, nice)))
    stats = SimpleNamespace(batches=0, records=0)
    ledger = SimpleNamespace(stats=stats, journal=SimpleNamespace(writer_native_id=4242))
    wp = WriterPriority(ledger, -10)
    assert wp.enabled and wp.boosted and calls == [(4242, -10)]

    def batches(n, per_batch):
        for _ in range(n):
            stats.batches += 1
            stats.records += per_batch
            wp.update()

    batches(640, 2)     # moderate load: stays boosted
    batches(640, 6)     # in the gap: no change
    assert calls == [(4242, -10)]
    batches(64, 13)     # peak load
    assert calls[-1] == (4242, 0) and not wp.boosted
    batches(640, 6)     # in the gap again: stays plain
    assert len(calls) == 2
    batches(64, 3)      # load back to moderate
    assert calls[-1] == (4242, -10) and wp.boosted and len(calls) == 3


def test_a_writer_priority_that_cannot_be_raised_changes_nothing(monkeypatch, caplog):
    import os
    from types import SimpleNamespace

    from gateway._server import WriterPriority

    def refuse(which, who, nice):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", refuse)
    caplog.set_level(logging.INFO, logger="kaboni")
    wp = WriterPriority(SimpleNamespace(stats=None, journal=SimpleNamespace(writer_native_id=7)), -10)
    assert not wp.enabled
    for _ in range(200):
        wp.update()  # never looks again
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "event=writer_priority_unchanged nice=-10" in lines[0] and "LimitNICE" in lines[0]


def test_a_configuration_that_leaves_out_what_the_journal_has_exits_2(tmp_path):
    """A configuration problem, not a passing one: systemd's RestartPreventExitStatus=2 must stop
    the restart loop (it exited 1 and was restarted every 5 s for ever)."""
    from _fakes import write_config_toml

    from engine import load_config
    from engine.journal import Ledger

    full = write_config_toml(tmp_path / "full.toml")
    with Ledger.open(load_config(full), tmp_path / "d", durability="none"):
        pass
    text = full.read_text()
    head, *blocks = text.split("[[instruments]]")
    kept = [b for b in blocks if 'symbol = "EUA"' not in b]
    assert len(kept) == len(blocks) - 1
    (tmp_path / "less.toml").write_text("[[instruments]]".join([head, *kept]))
    proc = _serve(["--config", str(tmp_path / "less.toml"), "--data-dir", str(tmp_path / "d"), "--no-metrics"])
    assert proc.returncode == 2, proc.stderr
    assert "event=journal_open_failed" in proc.stderr and "leaves out EUA" in proc.stderr, proc.stderr
    assert "Changing the configuration" in proc.stderr  # the remedy, at the end of a long line
