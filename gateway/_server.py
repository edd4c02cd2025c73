"""The asyncio shell around ``Exchange``: a thin Protocol per connection, uvloop, signals.

The journal's writer thread reports durability with ``loop.call_soon_threadsafe``; the loop
releases the outbox. A ``FlowControl`` per connection bounds what a slow reader can make us
buffer: past ``max_outbound_bytes`` the transport asks us to pause writing, and we disconnect
that client instead (its cancel-on-disconnect applies). Live reports and market data stop well
before that (``Exchange.release``); the connection then tells the exchange when its peer has
drained (``replay_later``, ``drain_later``) and cuts off a peer that takes nothing meanwhile. SIGTERM / SIGINT drain in stages with
time limits: stop accepting, end the sessions, let the journal make everything durable, flush
the goodbyes, close the journal.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import gc
import json
import logging
import os
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import Callable

from engine import Restarted
from engine.journal import JournalError

from ._exchange import TICK_PARTS, Exchange, log_event
from ._guard import peer_key
from ._metrics import KaboniCollector, Stats, start_metrics_server
from ._session import Session, State

__all__ = ["Server", "run", "FlowControl"]

# a resume replay whose last step the peer has not taken yet is looked at again after 1 ms,
# then 2, 4, ... up to 100 ms while the peer reads nothing
REPLAY_POLL_MIN = 0.001
REPLAY_POLL_MAX = 0.1
GEN2_EVERY = 1_000  # middle-generation collections per full collection (CPython's default: 10)
# open files the process needs besides its connections: the journal's segments, index and
# snapshot files and replay readers, the metrics endpoint, the listening sockets, epoll, pipes
FD_RESERVE = 64


def fd_budget(max_connections: int, max_pending: int) -> tuple[int, int, int | None, bool]:
    """Fit the connection caps to the open-file limit: raise the soft limit (RLIMIT_NOFILE)
    toward the hard one if the caps need more, and if they still do not fit, lower them so
    that a connection flood meets our cap (refused, counted, logged) instead of failing
    accepts unseen. Returns (max_connections, max_pending_logons, the soft limit or None if
    unknown, whether the caps were lowered)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return max_connections, max_pending, None, False
    infinity = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max_connections + FD_RESERVE
    if soft != infinity and soft < need:
        target = need if hard == infinity else min(hard, need)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
    if soft == infinity:
        return max_connections, max_pending, None, False
    if soft < need:
        fit = max(1, soft - FD_RESERVE)
        return fit, min(max_pending, max(1, fit // 2)), soft, True
    return max_connections, max_pending, soft, False


class FlowControl:
    """Write-side flow control of one transport (uvicorn style), in one place.

    The transport's high-water mark is the configured bound; crossing it means the peer is not
    reading, so instead of pausing the engine we report a slow consumer.
    """

    __slots__ = ("transport", "on_slow", "write_paused", "limit")

    def __init__(self, transport, limit: int, on_slow) -> None:
        self.transport = transport
        self.on_slow = on_slow
        self.limit = limit
        self.write_paused = False
        transport.set_write_buffer_limits(high=limit, low=limit // 2)

    def pause_writing(self) -> None:
        if not self.write_paused:
            self.write_paused = True
            self.on_slow()

    def resume_writing(self) -> None:
        self.write_paused = False


class Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: bytes to the exchange, frames to the socket."""

    __slots__ = ("server", "exchange", "transport", "session", "flow", "closing", "held", "close_timer",
                 "replay_wait", "replay_stuck", "drain_wait", "drain_stuck", "draining")

    def __init__(self, server: "Server") -> None:
        self.server = server
        self.exchange = server.exchange
        self.transport = None
        self.session = None
        self.flow = None
        self.closing = False
        self.held = False  # reading paused: frames wait for a later turn (see FRAMES_PER_TURN)
        self.close_timer = None
        self.replay_wait = REPLAY_POLL_MIN  # seconds until a stalled replay is looked at again
        self.replay_stuck = None  # (since, buffered): a logged-out peer's replay not moving
        self.drain_wait = REPLAY_POLL_MIN  # the same for stale market data waiting for a drain
        self.drain_stuck = None
        self.draining = False  # a drain_later look is scheduled

    # asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        session = self.exchange.connect(self, time.monotonic(), peer_key(transport.get_extra_info("peername")))
        if session is None:  # refused by a flood guard: closed at once, nothing read or sent
            self.closing = True
            transport.abort()
            return
        self.flow = FlowControl(transport, self.server.config.gateway.max_outbound_bytes, self._slow)
        self.session = session

    def data_received(self, data: bytes) -> None:
        if not self.closing and self.exchange.data_received(self.session, data, time.monotonic()):
            self._hold()

    def _hold(self) -> None:
        """Frames are left over: read nothing more until a later loop turn has run them, so that
        other connections get their turn in between."""
        if not self.held:
            self.held = True
            self.transport.pause_reading()
            asyncio.get_running_loop().call_soon(self._run_held)

    def _run_held(self) -> None:
        self.held = False
        if self.closing:
            return
        if self.exchange.data_received(self.session, b"", time.monotonic()):
            self._hold()
        elif not self.closing:
            self.transport.resume_reading()

    def eof_received(self):
        return False  # close our side too

    def connection_lost(self, exc) -> None:
        self.closing = True
        if self.close_timer is not None:
            self.close_timer.cancel()
        if self.session is not None:  # None: refused at once (connection_made)
            self.exchange.connection_lost(self.session, "client_close", time.monotonic())
        # The session points back at this connection (its sink), and the transport at it too:
        # drop our side of both cycles so a closed connection is freed at once, not by the full
        # collections the server makes rare (connections churned by the thousand piled up).
        self.session = self.transport = self.flow = self.close_timer = None

    def pause_writing(self) -> None:
        if self.flow is not None:
            self.flow.pause_writing()

    def resume_writing(self) -> None:
        if self.flow is not None:
            self.flow.resume_writing()

    # the sink the exchange writes to ----------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self.closing:
            transport = self.transport
            if transport.is_closing():
                # the peer went away and connection_lost is still on its way: drop, never raise
                # (a raise here would cut short the release of everyone else's reports)
                self.closing = True
                return
            try:
                transport.write(data)
            except (RuntimeError, OSError):
                self.closing = True
                transport.abort()

    def close(self) -> None:
        """Close after flushing, but a peer that stops reading gets ``logon_timeout_s`` to take
        its last bytes, not forever (``transport.close`` waits for the send buffer to drain)."""
        if not self.closing:
            self.closing = True
            self.transport.close()
        # also when the transport began closing by itself (the peer's EOF) and waits to flush
        if self.close_timer is None and self.transport is not None:
            self.close_timer = asyncio.get_running_loop().call_later(self.server.config.gateway.logon_timeout_s,
                                                                     self._close_timeout)

    def _close_timeout(self) -> None:
        if self.session.state is not State.CLOSED:
            log_event("close_timeout", member=self.session.member or "-", session=self.session.sid,
                      buffered=self.transport.get_write_buffer_size())
            self.transport.abort()

    def abort(self) -> None:
        # Even when already closing: a close waiting to flush to a peer that does not read (or
        # the transport closing itself on the peer's EOF) would otherwise never end.
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def buffered(self) -> int:
        """Bytes written but not yet taken by the peer (the exchange's outbound bound)."""
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def drain_later(self) -> None:
        """Market data stopped near the bound: resync once the peer has taken most of it."""
        if not self.draining and not self.closing:
            self.draining = True
            self.drain_stuck = None
            asyncio.get_running_loop().call_later(REPLAY_POLL_MIN, self._drained)

    def _drained(self) -> None:
        self.draining = False
        if self.closing:
            return
        buffered = self.transport.get_write_buffer_size()
        if buffered > self.flow.limit // 4:
            if self._stalled("drain_stuck", buffered):
                self._slow()
                return
            self.draining = True
            asyncio.get_running_loop().call_later(self.drain_wait, self._drained)
            self.drain_wait = min(self.drain_wait * 2, REPLAY_POLL_MAX)
            return
        self.drain_wait = REPLAY_POLL_MIN
        self.drain_stuck = None
        self._guarded(self.exchange.resync)

    def _guarded(self, step: Callable[[Session], None]) -> None:
        """Run a later step for this session (a replay's, a resync's); a bug in it ends this
        connection, as in data_received, and the server stays."""
        try:
            step(self.session)
        except Exception as exc:  # noqa: BLE001
            log_event("internal_error", _level=logging.ERROR, _exc_info=True, member=self.session.member or "-",
                      session=self.session.sid, error=repr(exc))
            self.abort()

    def _stalled(self, slot: str, buffered: int) -> bool:
        """Output is held back for this peer and it has taken nothing of its buffer for
        ``logon_timeout_s`` (``slot`` keeps when and how much it last had)."""
        loop = asyncio.get_running_loop()
        stuck = getattr(self, slot)
        if stuck is None or buffered < stuck[1]:
            setattr(self, slot, (loop.time(), buffered))
            return False
        return loop.time() - stuck[0] > self.server.config.gateway.logon_timeout_s

    def replay_later(self) -> None:
        asyncio.get_running_loop().call_soon(self._replay_more)

    def _replay_more(self) -> None:
        """Next step of a resume replay, once the socket has taken most of the last one."""
        if self.closing:
            if self.session is not None and self.session.goodbye:
                # logged out, and the transport is closing by itself (the peer's EOF): nothing
                # more of the replay can go, so the peer gets logon_timeout_s to take the rest
                self.close()
            return
        buffered = self.transport.get_write_buffer_size()
        if buffered > self.flow.limit // 4:
            loop = asyncio.get_running_loop()
            if self.session.goodbye:
                # logged out (or shutting down) and owed the rest of its replay: a peer that
                # takes nothing more for logon_timeout_s is cut off, like any closing peer
                if self._stalled("replay_stuck", buffered):
                    self._close_timeout()
                    return
            elif self.session.overflowed and self._stalled("replay_stuck", buffered):
                self._slow()  # its live reports went to this replay, and it reads nothing
                return
            # the peer is slow to read: look again later, backing off while it reads nothing
            # (a peer that heartbeats but never reads would otherwise be polled every ms)
            loop.call_later(self.replay_wait, self._replay_more)
            self.replay_wait = min(self.replay_wait * 2, REPLAY_POLL_MAX)
            return
        self.replay_wait = REPLAY_POLL_MIN
        self.replay_stuck = None
        self._guarded(self.exchange.replay_more)

    def _slow(self) -> None:
        session = self.session
        session.cause = "slow_consumer"
        log_event("slow_consumer", member=session.member or "-", session=session.sid,
                  buffered=self.transport.get_write_buffer_size())
        self.abort()


class WriterPriority:
    """The journal writer thread's nice value: ``writer_nice`` while the load is moderate, 0 at
    peak load.

    The writer shares the event loop's core (the server is pinned to one where it can be): when
    a sync returns, the writer must run to report it, and behind a busy loop it waited, which
    made the order-to-report tail. Ahead of the loop it rarely waits. But at peak load a boosted
    writer preempts the loop after every sync, only to wait for the GIL the loop holds: smaller
    batches and twice the context switches cost 40% of the peak (benchmarks/RESULTS.md). So the
    writer runs boosted while its batches are small (a few records: latency is what counts) and
    at the default while they are large (the loop is saturated: batching is what counts), with
    a gap between the two thresholds so that it does not flap.

    ``update`` runs on the writer thread (``on_durable``). A negative value needs CAP_SYS_NICE or
    an RLIMIT_NICE that allows it (systemd: LimitNICE=); without, nothing changes and the start
    says so."""

    EVERY = 64  # batches between looks at the mean batch size
    BOOSTED_UP_TO = 4.0  # records per batch: boost while at most this (moderate load)
    PLAIN_FROM = 8.0  # and give it up from this (peak load)

    def __init__(self, ledger, nice: int) -> None:
        self.stats = ledger.stats
        self.tid = getattr(getattr(ledger, "journal", None), "writer_native_id", None)
        self.nice = nice
        self.boosted = False
        self.enabled = False
        self._batches = self._records = 0
        self._countdown = self.EVERY
        if nice and self.tid is not None:
            self.enabled = self._set(nice, startup=True)

    def _set(self, nice: int, startup: bool = False) -> bool:
        try:
            os.setpriority(os.PRIO_PROCESS, self.tid, nice)
        except (OSError, AttributeError) as exc:  # EPERM / EACCES; no setpriority on this OS
            if startup:
                log_event("writer_priority_unchanged", nice=nice, error=str(exc),
                          hint="grant CAP_SYS_NICE or LimitNICE= (systemd), or set [gateway] writer_nice = 0")
            return False
        self.boosted = nice == self.nice
        if startup:
            log_event("writer_priority", nice=nice)
        return True

    def update(self) -> None:
        self._countdown -= 1
        if self._countdown or not self.enabled:
            return
        self._countdown = self.EVERY
        stats = self.stats
        batches, records = stats.batches, stats.records
        mean = (records - self._records) / max(1, batches - self._batches)
        self._batches, self._records = batches, records
        if self.boosted and mean >= self.PLAIN_FROM:
            self._set(0)
        elif not self.boosted and mean <= self.BOOSTED_UP_TO:
            self._set(self.nice)


class _SetupError(Exception):
    """The configuration cannot be served (a certificate, two ports the same): exit status 2,
    since restarting with the same file cannot help."""


def _watched_handshakes(on_failure: Callable[[ssl.SSLError], None]) -> type[ssl.SSLObject]:
    """An ``SSLObject`` class (``SSLContext.sslobject_class``) that reports failed handshakes.

    asyncio and uvloop drop a handshake that fails with an ``SSLError`` without a word (it goes
    to the debug log only), so a member whose client speaks plain TCP, or does not trust the
    certificate, would leave no trace. The handshake itself is still the event loop's. Not seen
    here: a peer that goes silent or away mid-handshake (no error is raised: it is dropped
    after ``logon_timeout_s``), and the peer's address (an ``SSLObject`` has no socket)."""

    class WatchedSSLObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise  # more bytes to come: not a failure
            except ssl.SSLError as exc:
                on_failure(exc)
                raise

    return WatchedSSLObject


class Server:
    """Owns the ledger, the exchange core, the listening socket and the metrics endpoint."""

    def __init__(self, config, data_dir, *, host=None, port=None, metrics_port=None,
                 ledger_factory=None, metrics: bool = True, stats_enabled: bool = True) -> None:
        self.config = config
        gw = config.gateway
        self.data_dir = Path(data_dir if data_dir is not None else gw.data_dir)
        self.host = host or gw.host
        self.port = gw.port if port is None else port
        self.metrics_port = gw.metrics_port if metrics_port is None else metrics_port
        self.metrics = metrics
        self.stats_enabled = stats_enabled
        if ledger_factory is None:
            from engine.journal import Ledger

            ledger_factory = Ledger.open
        self.ledger_factory = ledger_factory
        self.exchange: Exchange | None = None
        self.loop = None
        self.stopping: asyncio.Event | None = None
        self.exit_code = 0
        self.started = None  # threading.Event set once listening (for in-process tests)
        self.metrics_port_bound = None
        self.errors: list[dict] = []  # exceptions that reached the loop (a bug; logged)
        self.writer_priority: WriterPriority | None = None  # set once the journal is open

    # -----------------------------------------------------------------------------------------
    def _on_durable(self, seq: int) -> None:
        if self.writer_priority is not None:
            self.writer_priority.update()
        try:
            self.loop.call_soon_threadsafe(self._durable, seq)
        except RuntimeError:
            pass  # loop closed during shutdown; the final flush releases nothing more

    def _durable(self, seq: int) -> None:
        if self.exchange is not None:
            self.exchange.on_durable(seq)

    def _on_error(self, exc: BaseException) -> None:
        def fail() -> None:
            log_event("journal_failed", _level=logging.ERROR, error=repr(exc))
            if self.exchange is not None:
                self.exchange.failed = exc
                self.exchange.draining = True
            self.exit_code = 1
            self.stopping.set()

        try:
            self.loop.call_soon_threadsafe(fail)
        except RuntimeError:
            pass

    def _loop_error(self, loop, context) -> None:
        self.errors.append(context)
        log_event("internal_error", _level=logging.ERROR, message=context.get("message"),
                  exception=repr(context.get("exception")))

    def _run_in_loop(self, fn):
        """Run ``fn`` on the loop thread and wait (the metrics thread reads engine state so)."""
        fut = asyncio.run_coroutine_threadsafe(self._call(fn), self.loop)
        return fut.result(timeout=10)

    async def _call(self, fn):
        return fn()

    def _tls_failed(self, exc: ssl.SSLError) -> None:
        log_event("tls_handshake_failed", error=exc.reason or str(exc))
        if self.exchange is not None:
            self.exchange.stats.disconnects["tls_handshake_failed"] += 1

    def _ssl_context(self):
        gw = self.config.gateway
        if not gw.tls_cert:
            return None
        # name the file in the start_failed line: ssl says only "No such file or directory"
        # or "[SSL] PEM lib"
        for key, path in (("tls_cert", gw.tls_cert), ("tls_key", gw.tls_key)):
            try:
                open(path, "rb").close()
            except OSError as exc:
                raise _SetupError(f"gateway.{key} {path}: {exc.strerror or exc}") from None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(gw.tls_cert, gw.tls_key)
        except ssl.SSLError as exc:
            # short: log values are cut at 128 characters, and the reason must survive
            raise _SetupError(f"gateway.tls_cert {gw.tls_cert}, tls_key {gw.tls_key}: {exc.reason or exc}") from None
        ctx.sslobject_class = _watched_handshakes(self._tls_failed)
        return ctx

    def _start_failed(self, error: str) -> None:
        log_event("start_failed", _level=logging.ERROR, _whole=True, host=self.host, port=self.port,
                  metrics_port=self.metrics_port if self.metrics else "off", error=error)

    async def run(self) -> int:
        self.loop = loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        loop.set_exception_handler(self._loop_error)
        gw = self.config.gateway
        today = _dt.datetime.now(_dt.timezone.utc).date().isoformat()
        # The ports first: a port in use or a bad certificate fails before the journal is
        # opened (and possibly recovered, which takes seconds on a long day). Nothing is
        # served until the journal is open.
        collector = KaboniCollector(runner=self._run_in_loop)
        metrics_server = server = None
        try:
            if self.metrics and self.port == self.metrics_port != 0:
                # uvloop binds the order port without listening until it serves, so the metrics
                # endpoint could take the same port and the order port's listen would fail unseen
                raise _SetupError(f"port and metrics_port are both {self.port}")
            ssl_ctx = self._ssl_context()
            server = await loop.create_server(
                lambda: Connection(self), self.host, self.port, ssl=ssl_ctx, backlog=4096, reuse_address=True,
                start_serving=False,
                # a TLS peer that never finishes its handshake is dropped like one that never logs on
                **({"ssl_handshake_timeout": gw.logon_timeout_s} if ssl_ctx else {}))
            listener = server.sockets[0]
            self.port = listener.getsockname()[1]
            if self.metrics:
                metrics_server = start_metrics_server(collector, self.metrics_port, self.host)
                self.metrics_port_bound = metrics_server[0].server_port
        except (OSError, _SetupError) as exc:  # ssl.SSLError is an OSError too
            self._start_failed(str(exc))
            if server is not None:
                server.close()
            return 2 if isinstance(exc, _SetupError) else 1
        try:
            ledger = self.ledger_factory(
                self.config, self.data_dir, durability=gw.durability, today=today,
                snapshot_every=gw.snapshot_every, on_durable=self._on_durable, on_error=self._on_error,
            )
        except Exception as exc:  # noqa: BLE001 - a journal we cannot open: say so, exit non-zero
            log_event("journal_open_failed", _level=logging.ERROR, _whole=True, data_dir=self.data_dir,
                      error=str(exc))
            server.close()
            _stop_metrics(metrics_server)
            return 2 if type(exc).__name__ == "LeftOutConfigError" else 1  # the file's fault: 2
        self.writer_priority = WriterPriority(ledger, gw.writer_nice)
        try:
            exchange = self.exchange = Exchange(self.config, ledger, clock_ns=time.time_ns,
                                                stats=Stats(self.stats_enabled))
            max_connections, max_pending, nofile, lowered = fd_budget(gw.max_connections, gw.max_pending_logons)
            exchange.guard.set_limits(max_connections, max_pending)
            if lowered:
                log_event("fd_limit_low", _level=logging.WARNING, nofile=nofile, max_connections=max_connections,
                          max_pending_logons=max_pending, configured_max_connections=gw.max_connections,
                          hint="raise the open-file limit: LimitNOFILE= (systemd) or ulimit -n")
            if ledger.recovered:
                log_event("journal_recovered", data_dir=self.data_dir, last_seq=ledger.last_seq,
                          trading_day=ledger.engine.trading_day)
                # Every connection ended with the old process: cancel-on-disconnect orders go now.
                # It names the configuration's instruments and members: a replay under a
                # configuration that leaves one out is refused (it may be used after this).
                exchange._execute(Restarted([ins.symbol for ins in self.config.instruments],
                                            [m.id for m in self.config.members]), "", None, time.monotonic())
                exchange.release(ledger.durable_seq)
            # what the trading schedule asked for while the exchange was down, all of it before
            # anyone can connect (the listening socket accepts only from start_serving on)
            if exchange.catch_up_schedule(time.monotonic()):
                # and it counts before then: a logon shows the durable trading day
                try:
                    exchange.release(ledger.journal.sync())
                except JournalError:
                    pass  # the journal failed: on_error stops the server
            collector.exchange = exchange
            # uvloop listens only now, and drops a listen that fails (another process took the
            # port while the journal opened) without a word: look whether it really listens
            error = f"cannot listen on port {self.port}: address already in use"
            try:
                await server.start_serving()
                listening = listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            except ValueError:  # uvloop closed the socket
                listening = False
            except OSError as exc:  # asyncio says why
                listening, error = False, str(exc)
            if not listening:
                self._start_failed(error)
                self.exit_code = 1
                return 1
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.add_signal_handler(sig, self.stopping.set)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass  # not the main thread (tests run servers in threads)
            ticker = loop.create_task(self._ticker())
            # Start-up objects (config, books, accounts, the journal's index) never become garbage:
            # freeze them so collections only scan what the order path allocates.
            gc.collect()
            gc.freeze()
            # Full collections scan every session's objects (10-20 ms with 3,700 sessions, measured
            # in benchmarks/bench_gateway.py): one every GEN2_EVERY young-generation collections
            # instead of every 10 keeps them to minutes apart at thousands of orders/s.
            gen0, gen1, _ = gc.get_threshold()
            gc.set_threshold(gen0, gen1, GEN2_EVERY)
            # The GIL switch interval is the journal's to set (Journal.open lowers it so its writer
            # thread is not starved by this busy loop); it is not touched here.
            log_event("start", host=self.host, port=self.port, metrics_port=self.metrics_port if self.metrics else "off",
                      data_dir=self.data_dir, trading_day=ledger.engine.trading_day, recovered=ledger.recovered,
                      tls=bool(gw.tls_cert), max_connections=max_connections, nofile=nofile if nofile else "unlimited",
                      members=sum(m.role == "member" for m in self.config.members),
                      operators=sum(m.role == "operator" for m in self.config.members))
            if self.started is not None:
                self.started.set()
            await self.stopping.wait()
            # Drain in stages, each with a time limit.
            log_event("stopping", reason="journal_error" if exchange.failed else "signal")
            server.close()
            ticker.cancel()
            if exchange.failed is None:
                exchange.drain(time.monotonic())
                deadline = loop.time() + 10
                while exchange.outbox and loop.time() < deadline:
                    await asyncio.sleep(0.005)
            else:
                for s in list(exchange.sessions):
                    s.cause = "shutdown"
                    s.sink.abort()
            deadline = loop.time() + 5
            while exchange.sessions and loop.time() < deadline:
                await asyncio.sleep(0.005)
            for s in list(exchange.sessions):
                s.sink.abort()
            await asyncio.sleep(0)
        finally:
            # Whatever happened after the journal opened, its threads and files and the metrics
            # endpoint are closed.
            try:
                ledger.close()
            except Exception as exc:  # noqa: BLE001 - a failed final flush must not hide the exit code
                log_event("journal_close_failed", _level=logging.ERROR, error=repr(exc))
                self.exit_code = 1
            _stop_metrics(metrics_server)
            server.close()
        log_event("stopped", exit_code=self.exit_code, durable_seq=ledger.durable_seq)
        return self.exit_code

    def stop(self) -> None:
        """Ask a running server to drain and stop (from any thread)."""
        self.loop.call_soon_threadsafe(self.stopping.set)

    async def _ticker(self) -> None:
        """Every session is looked at every 0.25 s, a slice at a time (see ``Exchange.tick``),
        and the trading schedule as often."""
        ex = self.exchange
        interval = 0.25 / TICK_PARTS
        part = 0
        while True:
            await asyncio.sleep(interval)
            try:
                now = time.monotonic()
                ex.tick(now)
                part = (part + 1) % TICK_PARTS
                if part == 0:  # the trading schedule, every 0.25 s too
                    ex.run_schedule(time.time_ns(), now)
            except Exception:  # noqa: BLE001 - a bug here must not stop heartbeats for good
                log_event("internal_error", _level=logging.ERROR, _exc_info=True, where="tick")


def _stop_metrics(metrics_server) -> None:
    """Stop the metrics endpoint's thread and close its listening socket."""
    if metrics_server is not None:
        try:
            metrics_server[0].shutdown()
            metrics_server[0].server_close()
        except Exception:  # noqa: BLE001
            pass


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=... event=<name> key=value ...``, one line per record, whatever logged it.

    Gateway events are already ``event=...`` lines. Anything else (the journal's recovery notes,
    snapshot warnings) becomes ``event=<logger> message="..."``, and a traceback goes into a
    ``traceback="..."`` field (JSON-escaped), so every line parses the same way."""

    converter = time.gmtime  # UTC, one token: key=value parsers split on spaces

    def __init__(self) -> None:
        super().__init__("ts=%(asctime)s.%(msecs)03dZ level=%(levelname)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if not message.startswith("event="):
            message = f"event={record.name.rpartition('.')[2]} message={json.dumps(message)}"
        if record.exc_info:
            message += f" traceback={json.dumps(self.formatException(record.exc_info))}"
        return super().format(logging.makeLogRecord(
            {**record.__dict__, "msg": message, "args": None, "exc_info": None, "exc_text": None}))


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger("kaboni")
    if not root.handlers:
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def run(config, data_dir=None, **kwargs) -> int:
    """Run a server until SIGTERM/SIGINT (or a journal failure); return the exit code."""
    import uvloop

    setup_logging()
    server = Server(config, data_dir, **kwargs)
    return uvloop.run(server.run())
