"""``kaboni demo``: a demo exchange and twenty member firms trading it, live in the terminal.

The exchange runs as its own process (``python -m gateway serve --demo``), exactly as an
operator would run it, with its journal fsynced in a fresh directory. The firms are
``gateway.client`` sessions over real TCP, driven by the simulation in ``_demo_market``; one
operator session subscribes to the market data that the view shows. At the end the firms log
out (their cancel-on-disconnect orders go), the exchange drains and stops, and a summary says
what happened and where to look next.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Union

import msgspec

from engine._config import demo_config
from engine._messages import (
    REPORTS, BookSnapshot, BookUpdate, CancelRejected, Fill, InstrumentStatus, MassCancelDone, OrderAccepted,
    OrderCancelled, OrderRejected, OrderReplaced, Trade,
)

from ._demo_market import (
    DemoStats, ExchangeFigures, FairPrice, format_price, parse_metrics, LocalBook, MarketView, demo_instruments, make_firms, render_line,
    render_screen, render_summary,
)

__all__ = ["add_demo_command", "run_demo"]

_Incoming = Union[OrderAccepted, OrderRejected, Fill, OrderCancelled, OrderReplaced, CancelRejected,
                  MassCancelDone, BookSnapshot, BookUpdate, Trade, InstrumentStatus]
_ROOT = Path(__file__).resolve().parent.parent


def _firms(text: str) -> int:
    """``--firms``: 1..20 (the demo's members M01..M20); 0 and 21 were clamped without a word."""
    import argparse

    try:
        firms = int(text)
    except ValueError:
        firms = 0
    if not 1 <= firms <= 20:
        raise argparse.ArgumentTypeError(f"not a number of firms in 1..20: {text!r}")
    return firms


def add_demo_command(subparsers) -> None:
    from .cli import _port

    p = subparsers.add_parser(
        "demo", help="run a demo exchange with simulated member firms and watch it trade",
        description="Start the demo exchange and simulated member firms that trade the CEA vintages "
                    "over TCP around a drifting price; show the market live, then a summary.")
    p.add_argument("--seconds", type=float, default=60.0, help="how long the firms trade (default 60)")
    p.add_argument("--rate", type=int, default=1_000,
                   help="order messages per second, all firms together (default 1000)")
    p.add_argument("--firms", type=_firms, default=20, help="member firms M01.. to simulate (1-20, default 20)")
    p.add_argument("--port", type=_port, help="order-entry port (default 7001, or a free one)")
    p.add_argument("--metrics-port", type=_port, help="metrics port (default 9101, or a free one)")
    p.add_argument("--data-dir", help="journal directory (default: a new temporary directory)")
    p.add_argument("--seed", type=int, help="random seed (default: a new one each run)")
    p.add_argument("--plain", action="store_true", help="progress lines instead of the live screen")
    p.add_argument("--no-end-of-day", dest="end_of_day", action="store_false",
                   help="leave the trading day open at the end (default: close the market, end the day "
                        "and check the settlement report)")
    p.add_argument("--keep-running", action="store_true",
                   help="leave the exchange running after the firms stop (Ctrl-C to stop it)")
    p.set_defaults(func=run_demo)


# ---------------------------------------------------------------------------------------------
# The exchange process


def _port(preferred: int | None, default: int) -> int:
    """``preferred`` if given; else ``default`` when it is free, else any free port."""
    if preferred:
        return preferred
    for port in (default, 0):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port")


def _die_with_parent() -> None:
    """In the child, on Linux: SIGTERM (an orderly drain) if the demo itself dies, so a killed
    demo never leaves an exchange holding the ports."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


class ExchangeProcess:
    """``python -m gateway serve --demo`` in a subprocess, its log in a file."""

    def __init__(self, data_dir: Path, port: int, metrics_port: int, log_path: Path) -> None:
        self.data_dir, self.port, self.metrics_port, self.log_path = data_dir, port, metrics_port, log_path
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--demo", "--data-dir", str(data_dir),
             "--port", str(port), "--metrics-port", str(metrics_port)],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=str(_ROOT),
            start_new_session=True,  # Ctrl-C reaches the demo, which then stops the exchange in order
            preexec_fn=_die_with_parent,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the exchange exited with {self.proc.returncode}:\n{self.log_tail()}")
            for port in (self.port, self.metrics_port):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                except OSError:
                    break
            else:
                return
            time.sleep(0.05)
        raise RuntimeError(f"the exchange did not start within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (an orderly drain), then SIGKILL if it does not finish in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# ---------------------------------------------------------------------------------------------
# The firms and the view


class _Run:
    """State shared by the demo's tasks."""

    # stay under the demo configuration's per-session throttle (gateway.max_msgs_per_s = 1000)
    MAX_FIRM_RATE = 900.0

    def firm_rate(self, firm) -> float:
        weight = sum(f.weight for f in self.firms)
        return min(self.MAX_FIRM_RATE, self.args.rate * firm.weight / weight)

    @property
    def rate(self) -> float:
        return sum(self.firm_rate(f) for f in self.firms)

    def __init__(self, args, port: int, metrics_url: str) -> None:
        self.args = args
        self.port = port
        self.metrics_url = metrics_url
        self.config = demo_config()
        self.symbols = demo_instruments(self.config)
        self.reference = {s: self.config.instrument(s).reference_price for s in self.symbols}
        seed = args.seed if args.seed is not None else random.randrange(1 << 30)
        self.seed = seed
        self.fair = FairPrice(self.config, self.symbols, random.Random(seed))
        self.books = {s: LocalBook(s) for s in self.symbols}
        self.view = MarketView(self.fair, self.books)
        members = [m.id for m in self.config.members if m.role == "member"][: max(1, min(20, args.firms))]
        run_id = _base36(int(time.time() * 10) % 36 ** 7)
        self.firms = make_firms(members, self.symbols, seed, run_id)
        self.stats = DemoStats(self.symbols)
        self.sent_at: dict[str, float] = {}
        self.trading_day = "?"
        self.stop = asyncio.Event()
        self.failed: str | None = None
        self.started = 0.0
        self.elapsed = 0.0
        self.exchange: ExchangeFigures | None = None
        self.closed_day: str | None = None
        self.next_day: str | None = None
        self.closing: dict[str, int | None] = {}
        self.eod_error: str | None = None


def scrape(url: str) -> ExchangeFigures | None:
    """The exchange's own figures from its metrics endpoint (None if it does not answer)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return parse_metrics(response.read().decode())
    except (OSError, ValueError):
        return None


async def _scrape_every(run: "_Run", seconds: float) -> None:
    while True:
        figures = await asyncio.to_thread(scrape, run.metrics_url)
        if figures is not None:
            run.exchange = figures
        await asyncio.sleep(seconds)


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if not n:
            return out


_decode = msgspec.convert


async def _watch_market(run: _Run, client) -> None:
    """The operator session's market data feeds the firms' view of the books and the stats."""
    while True:
        msg = await client.market.get()
        try:
            event = _decode(msg, _Incoming)
        except msgspec.ValidationError:
            continue
        book = run.books.get(event.instrument)
        if book is None:
            continue
        book.apply(event)
        if isinstance(event, Trade):
            run.stats.on_trade(event)


async def _firm_reports(run: _Run, firm, client) -> None:
    clock = time.perf_counter  # loop.time() is millisecond-coarse under uvloop
    while True:
        msg = await client.reports.get()
        now = clock()
        try:
            report = _decode(msg, _Incoming)
        except msgspec.ValidationError:
            continue
        if not isinstance(report, REPORTS):
            continue
        sent = run.sent_at.pop(report.cl_ord_id, None)
        if sent is not None:
            run.stats.on_latency(now, now - sent)
        if isinstance(report, (OrderRejected, CancelRejected)):
            run.stats.on_reject(report.reason)
        firm.on_report(report)


async def _firm_orders(run: _Run, firm, client, rate: float) -> None:
    """Open loop: the firm sends at its own pace whether or not the exchange keeps up."""
    loop = asyncio.get_running_loop()
    interval = 1.0 / rate
    next_at = loop.time() + random.random() * interval
    while not run.stop.is_set():
        delay = next_at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
            if run.stop.is_set():
                return
        now = loop.time()
        next_at = max(next_at + interval, now - 0.05)  # catch up a little, never burst
        for command in firm.decide(run.view):
            run.sent_at[command.cl_ord_id] = time.perf_counter()
            client.send_nowait(command)
            run.stats.on_sent(command)
        if client.writer.transport.get_write_buffer_size() > 1 << 20:
            await client.writer.drain()


async def _drift(run: _Run) -> None:
    loop = asyncio.get_running_loop()
    last = loop.time()
    while True:
        await asyncio.sleep(0.05)
        now = loop.time()
        run.fair.step(now - last)
        last = now


async def _show(run: _Run, tty: bool) -> None:
    loop = asyncio.get_running_loop()
    out = sys.stdout
    total = run.args.seconds
    drawn = 0
    history_every = max(0.25, total / 48)
    line_every = max(1.0, min(10.0, total / 12))
    next_history, next_line = 0.0, loop.time() + line_every
    while True:
        now = loop.time()
        run.elapsed = min(total, now - run.started)
        record = now >= next_history
        if record:
            next_history = now + history_every
        run.stats.sample(time.perf_counter(), record_history=record)  # the latencies' clock
        if tty:
            width = shutil.get_terminal_size((100, 24)).columns
            lines = render_screen(run.stats, run.books, run.reference, run.elapsed, total, run.trading_day,
                                  run.metrics_url, color=True, width=width, exchange=run.exchange)
            text = (f"\x1b[{drawn}F" if drawn else "") + "".join(f"\x1b[2K{line}\n" for line in lines)
            out.write(text)
            out.flush()
            drawn = len(lines)
        elif now >= next_line or run.stop.is_set():
            next_line = now + line_every
            print(render_line(run.stats, run.books, run.elapsed, total), flush=True)
        if run.stop.is_set():
            return
        await asyncio.sleep(0.25)


async def _simulate(run: _Run, tty: bool) -> None:
    from .client import Client

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            loop.add_signal_handler(sig, run.stop.set)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    tasks: list[asyncio.Task] = []
    clients = []
    try:
        watcher = await Client.connect("127.0.0.1", run.port)
        clients.append(watcher)
        reply = await watcher.logon("ops", "ops-token")
        run.trading_day = reply.get("trading_day", "?")
        tasks.append(loop.create_task(_watch_market(run, watcher)))
        await watcher.subscribe(run.symbols, depth=20)
        deadline = loop.time() + 10
        while any(b.md_seq == 0 and b.reference_price is None for b in run.books.values()):
            if loop.time() > deadline:
                raise RuntimeError("no market data snapshot from the exchange")
            await asyncio.sleep(0.01)
        await _open_for_trading(run, watcher)
        run.reference = {s: b.reference_price for s, b in run.books.items()}
        run.fair.rebase(run.reference, {s: run.config.instrument(s).band_bp for s in run.symbols})
        firm_clients = await asyncio.gather(*(Client.connect("127.0.0.1", run.port) for _ in run.firms))
        clients += firm_clients
        await asyncio.gather(*(c.logon(f.member, f"{f.member}-token", cancel_on_disconnect=True)
                               for f, c in zip(run.firms, firm_clients)))
        run.stats.sessions = len(firm_clients)
        run.started = loop.time()
        tasks.append(loop.create_task(_drift(run)))
        tasks.append(loop.create_task(_scrape_every(run, 2.0)))
        senders = []
        for firm, client in zip(run.firms, firm_clients):
            tasks.append(loop.create_task(_firm_reports(run, firm, client)))
            senders.append(loop.create_task(_firm_orders(run, firm, client, run.firm_rate(firm))))
        tasks += senders
        view = loop.create_task(_show(run, tty))
        closed = [loop.create_task(c.closed.wait()) for c in clients]
        timer = loop.create_task(asyncio.sleep(run.args.seconds))
        done, _ = await asyncio.wait([timer, loop.create_task(run.stop.wait()), *closed],
                                     return_when=asyncio.FIRST_COMPLETED)
        if not timer.done() and any(t in done for t in closed):
            run.failed = "the exchange closed a connection"
        timer.cancel()
        for t in closed:
            t.cancel()
        run.elapsed = min(run.args.seconds, loop.time() - run.started)
        run.stop.set()
        for t in senders:
            t.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        # let the last answers arrive before the firms log out
        deadline = loop.time() + 2
        while run.sent_at and loop.time() < deadline and not run.failed:
            await asyncio.sleep(0.02)
        await view
        await asyncio.gather(*(_logout(c) for c in firm_clients), return_exceptions=True)
        if run.args.end_of_day and not run.failed:
            await _end_of_day(run, watcher)
    finally:
        run.stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(_logout(c) for c in clients), return_exceptions=True)


async def _open_for_trading(run: _Run, ops) -> None:
    """A journal reused with --data-dir may have closed or halted instruments: open them."""
    if any(b.status == "closed" for b in run.books.values()):
        reply = await ops.request({"type": "OpenMarket"})
        if reply.get("type") != "AdminAck":
            raise RuntimeError(f"OpenMarket: {reply}")
    for sym, book in run.books.items():
        if book.status == "halted":
            reply = await ops.request({"type": "Resume", "instrument": sym})
            if reply.get("type") != "AdminAck":
                raise RuntimeError(f"Resume {sym}: {reply}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while any(b.status != "open" for b in run.books.values()):
        if loop.time() > deadline:
            raise RuntimeError("the instruments did not open")
        await asyncio.sleep(0.01)


async def _end_of_day(run: _Run, ops) -> None:
    """Close the market and end the day as an operator would; the new reference prices (the
    day's closing prices) arrive as InstrumentStatus market data."""
    day = run.trading_day
    loop = asyncio.get_running_loop()

    async def until(condition) -> None:
        deadline = loop.time() + 3
        while not condition() and loop.time() < deadline:
            await asyncio.sleep(0.01)

    reply = await ops.request({"type": "CloseMarket"})
    if reply.get("type") == "AdminAck":
        await until(lambda: all(b.status == "closed" for b in run.books.values()))
        seen = {s: b.md_seq for s, b in run.books.items()}
        reply = await ops.request({"type": "EndOfDay"})
    if reply.get("type") != "AdminAck":
        run.eod_error = f"{reply.get('request')}: {reply.get('reason')} {reply.get('text', '')}".strip()
        return
    run.next_day = reply.get("trading_day")
    # one InstrumentStatus per instrument carries its new reference price
    await until(lambda: all(b.md_seq > seen[s] for s, b in run.books.items()))
    run.closing = {s: b.reference_price for s, b in run.books.items()}
    run.closed_day = day


def settlement_check(report: dict) -> list[str]:
    """Summary lines for a ``kaboni settle --format json`` report: that it balances."""
    lines = report.get("lines", [])
    totals = report.get("totals", {})
    members = {line["member"] for line in lines}
    balanced = all(t.get("net_qty") == 0 and t.get("net_cash") == 0 for t in totals.values())
    # recompute rather than trust the report's own totals
    sums: dict[str, list[int]] = {}
    for line in lines:
        acc = sums.setdefault(line["instrument"], [0, 0])
        acc[0] += line["net_qty"]
        acc[1] += line["net_cash"]
    balanced = balanced and all(q == 0 and c == 0 for q, c in sums.values())
    return [f"Settlement of {report.get('trading_day')} from the journal alone: {len(lines)} lines for "
            f"{len(members)} accounts across {len(sums)} vintages; net tonnes and net cash "
            f"per vintage sum to zero: {'yes' if balanced else 'NO'}."]


async def _logout(client) -> None:
    if client.closed.is_set():
        await client.close()
        return
    try:
        await client.logout(timeout=5)
    except Exception:  # noqa: BLE001 - the connection may already be gone; close it anyway
        await client.close()


def _settle(data_dir: Path, day: str) -> list[str]:
    """Run ``kaboni settle`` on the journal the exchange left behind and check it balances."""
    import json

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    try:
        result = subprocess.run([sys.executable, "-m", "gateway", "settle", str(data_dir), "--day", day,
                                 "--format", "json"], capture_output=True, text=True, timeout=60, env=env)
        if result.returncode != 0:
            return [f"kaboni settle failed: {result.stderr.strip()[:300]}"]
        return settlement_check(json.loads(result.stdout))
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        return [f"kaboni settle failed: {exc}"]


def _run_loop(coro) -> None:
    try:
        import uvloop
    except ImportError:
        uvloop = None
    try:
        (uvloop.run if uvloop else asyncio.run)(coro)
    finally:
        # uvloop leaves its own (now dead) handlers installed: give Ctrl-C and SIGTERM back
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _terminate)
        signal.signal(signal.SIGHUP, _terminate)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def run_demo(args) -> int:
    out = sys.stdout
    tty = out.isatty() and not args.plain and os.environ.get("TERM") != "dumb"
    if args.seconds <= 0 or args.rate <= 0:
        print("kaboni demo: --seconds and --rate must be positive", file=sys.stderr)
        return 2
    port = _port(args.port, 7001)
    metrics_port = _port(args.metrics_port, 9101)
    if metrics_port == port:
        metrics_port = _port(None, 0)
    if args.data_dir:
        data_dir = Path(args.data_dir).absolute()
        log_path = data_dir.with_name(data_dir.name + ".log")
    else:
        run_dir = Path(tempfile.mkdtemp(prefix="kaboni-demo-"))
        data_dir, log_path = run_dir / "journal", run_dir / "exchange.log"
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    print(f"Starting the demo exchange: order entry on 127.0.0.1:{port}, metrics on {metrics_url},\n"
          f"journal (fsync on) in {data_dir}, log in {log_path}", flush=True)
    t0 = time.monotonic()
    exchange = ExchangeProcess(data_dir, port, metrics_port, log_path)
    code = 0
    run = None
    waiting_for_ctrl_c = False  # --keep-running after the simulation: Ctrl-C is the normal stop
    try:
        exchange.wait_ready()
        run = _Run(args, port, metrics_url)
        print(f"Exchange ready in {time.monotonic() - t0:.1f} s. {len(run.firms)} member firms log on and trade "
              f"{', '.join(run.symbols)} for {args.seconds:g} s at about {run.rate:,.0f} orders/s "
              f"(seed {run.seed}).\n", flush=True)
        if tty:
            out.write("\x1b[?25l")
        try:
            _run_loop(_simulate(run, tty))
        finally:
            if tty:
                out.write("\x1b[?25h")
                out.flush()
        run.exchange = scrape(metrics_url) or run.exchange   # after the firms logged out
        if run.failed:
            print(f"\nkaboni demo: {run.failed}. Exchange log:\n{exchange.log_tail()}", file=sys.stderr)
            code = 1
        if args.keep_running and exchange.proc.poll() is None and not run.failed:
            waiting_for_ctrl_c = True
            print(f"\nThe exchange keeps running on 127.0.0.1:{port} (metrics {metrics_url}). "
                  f"Try: kaboni book CEA25 --port {port}. Ctrl-C stops it.", flush=True)
            try:
                exchange.proc.wait()
            except KeyboardInterrupt:
                pass
    except KeyboardInterrupt:
        code = 0 if waiting_for_ctrl_c else 130
    except Exception as exc:  # noqa: BLE001 - say what went wrong in a line, with the exchange's log
        print(f"\nkaboni demo: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    finally:
        exit_code = exchange.stop()
    if run is not None and run.stats.sent:
        extra = []
        if run.closed_day:
            closes = ", ".join(f"{s} {format_price(p)}" for s, p in run.closing.items())
            extra += [f"End of day {run.closed_day}: market closed, day orders expired, purchases settled. "
                      f"Closing prices (the day's VWAP), {run.next_day}'s reference prices: {closes}."]
            extra += _settle(data_dir, run.closed_day) if exit_code == 0 else []
            extra += [""]
        elif run.eod_error:
            extra += [f"End of day was refused: {run.eod_error}", ""]
        extra += [f"The exchange drained and stopped (exit code {exit_code}); restart it on the same journal with:",
                  f"  kaboni serve --demo --data-dir {data_dir} --port {port} --metrics-port {metrics_port}"
                  + (f"   (then: kaboni admin OpenMarket --port {port})" if run.closed_day else ""),
                  f"Verify the journal: kaboni journal verify {data_dir}   settlement: kaboni settle {data_dir} "
                  f"--day {run.closed_day or run.trading_day}",
                  f"Exchange log: {log_path}"]
        for line in render_summary(run.stats, run.reference, run.elapsed or args.seconds, metrics_url,
                                   str(data_dir), extra, exchange=run.exchange):
            print(line)
    if exit_code not in (0, None) and code == 0:
        print(f"kaboni demo: the exchange exited with {exit_code}:\n{exchange.log_tail()}", file=sys.stderr)
        code = 1
    return code
