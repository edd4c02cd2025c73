"""A stand-in for ``engine.journal.Ledger`` with the same API, for gateway tests only.

It keeps a real append-only file (length-prefixed MessagePack commands, fsynced by a writer
thread that calls ``on_durable``) and recovers by re-running the commands through a fresh
engine, so restart and kill tests mean something before the real journal lands.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path

import msgspec

import engine as E
from engine import Engine
from engine._histogram import LATENCY_BOUNDS, SIZE_BOUNDS, FixedHistogram

_REPORTS = (E.OrderAccepted, E.OrderRejected, E.Fill, E.OrderCancelled, E.OrderReplaced,
            E.CancelRejected, E.MassCancelDone)
_entry_decoder = msgspec.msgpack.Decoder(tuple[E.Command, str, int, int, bool])
_enc = msgspec.msgpack.Encoder()


def _report_step(bodies, max_bytes):
    """Ledger.report_step on a fake: the bodies up to max_bytes, nothing to resume from."""
    out, size = [], 0
    for body in bodies:
        out.append(body)
        size += len(body)
        if size >= max_bytes:
            break
    return out, None


class JournalStats:
    def __init__(self) -> None:
        self.records = 0
        self.bytes = 0
        self.batches = 0
        self.pending = 0
        self.batch_records = FixedHistogram(SIZE_BOUNDS)
        self.fsync_seconds = FixedHistogram(LATENCY_BOUNDS)
        self.append_to_durable_seconds = FixedHistogram(LATENCY_BOUNDS)


@contextlib.contextmanager
def logged_lines():
    """The messages logged under ``kaboni`` meanwhile, as a list filled in as they come."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    log = logging.getLogger("kaboni")
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


def enc(msg) -> bytes:
    """One frame of the protocol: a 4-byte big-endian length, then the msgpack map."""
    body = msgspec.msgpack.encode(msg)
    return len(body).to_bytes(4, "big") + body


def decode_frames(data: bytes) -> list:
    """The messages in a run of whole frames."""
    out = []
    while data:
        n = int.from_bytes(data[:4], "big")
        out.append(msgspec.msgpack.decode(data[4:4 + n]))
        data = data[4 + n:]
    return out


class ManualLedger:
    """The Ledger API with durability advanced by hand."""

    def __init__(self, config):
        self.engine = Engine(config, "2026-11-24")
        self.last_seq = 0
        self.durable_seq = 0
        self.bodies = {}
        self.recovered = False
        for m in self.engine.members:
            self.execute(E.Deposit(f"c-{m}", m, "CNY", 10**9), "", 0)
            self.execute(E.Deposit(f"q-{m}", m, "CEA25", 10**6), "", 0)
        self.execute(E.OpenMarket(), "", 0)
        self.durable_seq = self.last_seq

    def execute(self, cmd, member, ts, session=0, throttled=False):
        events = self.engine.execute(cmd, member, ts, session, throttled)
        if type(cmd) is E.QueryBalances:
            return self.last_seq, events, []
        self.last_seq += 1
        reports = [(e.member, msgspec.msgpack.encode(e)) for e in events if isinstance(e, _REPORTS)]
        for m, b in reports:
            self.bodies.setdefault(m, []).append(b)
        return self.last_seq, events, reports

    def reports(self, member, after, through):
        return iter(self.bodies.get(member, [])[after:through])

    def report_step(self, member, after, through, max_bytes, resume=None):
        return _report_step(self.reports(member, after, through), max_bytes)


class FakeLedger:
    def __init__(self) -> None:
        self.stats = JournalStats()
        self._reports: dict[str, list[bytes]] = {}
        self._lock = threading.Condition()
        self._buf: list[bytes] = []
        self._closed = False
        self.last_seq = 0
        self.durable_seq = 0
        self.fail_writes = False  # tests set this to make the writer fail

    @classmethod
    def open(cls, config, directory, *, durability="fsync", today=None, snapshot_every=100_000,
             on_durable=None, on_error=None):
        self = cls()
        self.config = config
        self._fsync = durability == "fsync"
        self.on_durable = on_durable
        self.on_error = on_error
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "fake.journal"
        day_file = directory / "fake.day"
        self.recovered = path.exists() and day_file.exists()
        if self.recovered:
            self.engine = Engine(config, day_file.read_text())
            data = path.read_bytes()
            pos = 0
            good = 0
            while pos + 4 <= len(data):
                n = int.from_bytes(data[pos:pos + 4], "big")
                if pos + 4 + n > len(data):
                    break  # torn tail
                cmd, member, ts, session, throttled = _entry_decoder.decode(data[pos + 4:pos + 4 + n])
                self._apply(cmd, member, ts, session, throttled)
                pos += 4 + n
                good = pos
            with open(path, "r+b") as f:
                f.truncate(good)
            self.durable_seq = self.last_seq
        else:
            day = config.market.first_trading_day or today
            self.engine = Engine(config, day)
            day_file.write_text(day)
        self._file = open(path, "ab")
        self._thread = threading.Thread(target=self._writer, daemon=True)
        self._thread.start()
        if not self.recovered:
            for m in self.engine.members:
                for cur in config.currencies:
                    if config.initial_cash:
                        self.execute(E.Deposit(f"init-cash-{m}-{cur}", m, cur, config.initial_cash), "", 0)
                for ins in self.engine.instruments:
                    if config.initial_allowances:
                        self.execute(E.Deposit(f"init-qty-{m}-{ins}", m, ins, config.initial_allowances), "", 0)
            if config.open_on_start:
                self.execute(E.OpenMarket(), "", 0)
        return self

    def _apply(self, cmd, member, ts, session, throttled):
        events = self.engine.execute(cmd, member, ts, session, throttled)
        self.last_seq += 1
        reports = []
        for ev in events:
            if isinstance(ev, _REPORTS):
                body = _enc.encode(ev)
                reports.append((ev.member, body))
                self._reports.setdefault(ev.member, []).append(body)
        return events, reports

    def execute(self, command, member, ts, session=0, throttled=False):
        if type(command) is E.QueryBalances:
            return self.last_seq, self.engine.execute(command, member, ts, session, throttled), []
        entry = _enc.encode((command, member, ts, session, throttled))
        with self._lock:
            events, reports = self._apply(command, member, ts, session, throttled)
            self._buf.append(len(entry).to_bytes(4, "big") + entry)
            self.stats.pending += 1
            self._lock.notify()
        return self.last_seq, events, reports

    def _writer(self):
        while True:
            with self._lock:
                while not self._buf and not self._closed:
                    self._lock.wait()
                if not self._buf and self._closed:
                    return
                buf, self._buf = self._buf, []
                seq = self.last_seq
            try:
                if self.fail_writes:
                    raise OSError(28, "No space left on device (injected)")
                data = b"".join(buf)
                self._file.write(data)
                self._file.flush()
                t = time.perf_counter()
                if self._fsync:
                    os.fsync(self._file.fileno())
                self.stats.fsync_seconds.observe(time.perf_counter() - t)
            except BaseException as exc:  # noqa: BLE001
                if self.on_error:
                    self.on_error(exc)
                return
            st = self.stats
            st.records += len(buf)
            st.bytes += len(data)
            st.batches += 1
            st.pending -= len(buf)
            st.batch_records.observe(len(buf))
            self.durable_seq = seq
            if self.on_durable:
                self.on_durable(seq)

    def reports(self, member, after_seq, through_seq):
        bodies = self._reports.get(member, [])
        return iter(bodies[max(after_seq, 0):through_seq])

    def report_step(self, member, after_seq, through_seq, max_bytes, resume=None):
        return _report_step(self.reports(member, after_seq, through_seq), max_bytes)

    def snapshot(self):
        pass

    def close(self):
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join()
        self._file.close()


# ---------------------------------------------------------------------------------------------
# Test harness: the real journal when it exists, else the fake; servers in a thread or a process

def ledger_factory():
    try:
        from engine.journal import Ledger  # noqa: F401
    except ImportError:
        return FakeLedger.open
    return Ledger.open


REPO = Path(__file__).resolve().parent.parent


def make_config(**gateway):
    """The demo market with test-friendly gateway settings (and ``gateway`` overrides)."""
    import msgspec as _m

    from engine import demo_config

    cfg = demo_config()
    gw = _m.structs.replace(cfg.gateway, host="127.0.0.1", port=0, metrics_port=0, **gateway)
    return _m.structs.replace(cfg, gateway=gw, market=_m.structs.replace(cfg.market, first_trading_day="2026-11-24"))


class ThreadServer:
    """A Server on its own uvloop loop in a thread: in-process, real sockets."""

    def __init__(self, config, data_dir, **kwargs):
        from gateway._server import Server

        factory = kwargs.pop("ledger_factory", None) or ledger_factory()
        self.server = Server(config, data_dir, ledger_factory=factory, metrics=kwargs.pop("metrics", False),
                             **kwargs)
        self.server.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.code = None

    def _run(self):
        import asyncio

        import uvloop

        asyncio.set_event_loop_policy(None)
        self.code = uvloop.run(self.server.run())

    def __enter__(self):
        self.thread.start()
        if not self.server.started.wait(20):
            raise RuntimeError("server did not start")
        return self

    @property
    def port(self):
        return self.server.port

    @property
    def exchange(self):
        return self.server.exchange

    def call(self, fn):
        """Run fn on the server's loop thread and return its result."""
        return self.server._run_in_loop(fn)

    def stop(self):
        if self.thread.is_alive():
            self.server.stop()
            self.thread.join(30)
        return self.code

    def __exit__(self, *exc):
        self.stop()
        if exc[0] is None:
            assert self.server.errors == [], self.server.errors  # nothing reached the loop's handler


def write_config_toml(path, port=0, metrics_port=0, **gateway):
    """The demo TOML with the given gateway settings, written to ``path``."""
    from engine import DEMO_TOML

    text = DEMO_TOML.replace("port = 7001", f"port = {port}").replace("metrics_port = 9101", f"metrics_port = {metrics_port}")
    extra = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in gateway.items())
    text = text.replace("[gateway]\n", "[gateway]\n" + extra)
    text = text.replace("[market]\n", '[market]\nfirst_trading_day = "2026-11-24"\n')
    Path(path).write_text(text)
    return path


class ProcessServer:
    """``python -m gateway serve`` (or this module with the fake journal) in a subprocess."""

    def __init__(self, config_path, data_dir, port, metrics_port=0):
        self.args = [str(config_path), str(data_dir), str(port), str(metrics_port)]
        self.port = port
        self.proc = None

    def start(self):
        import subprocess
        import sys

        env = dict(os.environ, PYTHONPATH=str(REPO))
        if ledger_factory() is FakeLedger.open:
            cmd = [sys.executable, str(Path(__file__).resolve())] + self.args
        else:
            cfg, data, port, mport = self.args
            cmd = [sys.executable, "-m", "gateway", "serve", "--config", cfg, "--data-dir", data, "--port", port,
                   "--metrics-port", mport] + (["--no-metrics"] if mport == "0" else [])
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._wait_listening()
        return self

    def _wait_listening(self):
        import socket

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("server did not listen")

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait(self, timeout=30):
        code = self.proc.wait(timeout)
        self.output = self.proc.stdout.read().decode()
        return code

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":  # the fake-journal server for subprocess tests
    import sys

    sys.path.insert(0, str(REPO))
    from engine import load_config
    from gateway._server import run

    cfg_path, data_dir, port, mport = sys.argv[1:5]
    raise SystemExit(run(load_config(cfg_path), data_dir, port=int(port), metrics_port=int(mport),
                         metrics=mport != "0", ledger_factory=FakeLedger.open))
