"""The outbound bound with real sockets: a burst bigger than ``max_outbound_bytes`` (a mass
cancel of 100k orders) does not cut off peers that read. A subscriber's market data stops near
the bound and resumes with a fresh BookSnapshot once its connection has drained; a member's
reports go to a paced replay from the journal. A peer that does not read is still cut off
(``slow_consumer``, its cancel-on-disconnect applies), and no session buffers more than the bound.
"""

from __future__ import annotations

import re
import socket
import threading
import time

import msgspec

import engine as E
from _fakes import ThreadServer, make_config

SYM = "CEA25"
BOUND = 8 * 1024 * 1024  # the default max_outbound_bytes


class Peer:
    """A blocking client. ``read=True``: a thread reads and decodes every frame as fast as it can."""

    def __init__(self, port: int, member: str, *, read: bool = True, rcvbuf: int | None = None, **logon) -> None:
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        self.got: list[dict] = []
        self.eof = False
        self.send({"type": "Logon", "member": member, "token": f"{member}-token", "heartbeat_s": 30, **logon})
        if read:
            threading.Thread(target=self._read, daemon=True).start()
            self.wait(lambda: self.got, "LogonAccepted")
            assert self.got[0]["type"] == "LogonAccepted", self.got[0]

    def send(self, msg: dict) -> None:
        body = msgspec.msgpack.encode(msg)
        self.sock.sendall(len(body).to_bytes(4, "big") + body)

    def _read(self) -> None:
        buf = b""
        decode = msgspec.msgpack.decode
        try:
            while True:
                data = self.sock.recv(1 << 20)
                if not data:
                    break
                buf += data
                i, n = 0, len(buf)
                out = []
                while n - i >= 4:
                    size = int.from_bytes(buf[i:i + 4], "big")
                    if n - i - 4 < size:
                        break
                    out.append(decode(buf[i + 4:i + 4 + size]))
                    i += 4 + size
                buf = buf[i:]
                self.got.extend(out)
        except OSError:
            pass
        self.eof = True

    def wait(self, cond, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.01)

    def close(self) -> None:
        self.sock.close()


def rest_orders(server, member: str, n: int, session=None, prefix: str = "r") -> None:
    """Rest ``n`` one-tonne sells of ``member`` on the server's loop (fast: no socket per order),
    over 200 price levels; with ``session`` they are its cancel-on-disconnect orders."""
    ex = server.exchange

    def run():
        now = time.monotonic()
        sid = 0
        if session is not None:
            sid, session.entered_orders = session.sid, True
        for i in range(n):
            ex._execute(E.NewOrder(f"{prefix}{i}", SYM, "sell", 1, 9300 + i % 200, tif="gtc"), member, None, now, sid)
        ex.release(ex.ledger.durable_seq)

    server.call(run)


def apply_md(book: dict, frames: list[dict]) -> int:
    """Apply a subscriber's market data of SYM (snapshots and updates) to ``book``; asserts that
    md_seq runs gap-free after every snapshot. Returns the number of snapshots."""
    snapshots, md_seq = 0, None
    for f in frames:
        t = f["type"]
        if f.get("instrument") != SYM:
            continue
        if t == "BookSnapshot":
            snapshots += 1
            md_seq = f["md_seq"]
            book.clear()
            book.update({("buy", p): (q, o) for p, q, o in f["bids"]})
            book.update({("sell", p): (q, o) for p, q, o in f["asks"]})
        elif t in ("BookUpdate", "Trade", "InstrumentStatus"):
            assert md_seq is not None and f["md_seq"] == md_seq + 1, (f, md_seq)
            md_seq = f["md_seq"]
            if t == "BookUpdate":
                if f["qty"]:
                    book[(f["side"], f["price"])] = (f["qty"], f["orders"])
                else:
                    book.pop((f["side"], f["price"]), None)
    return snapshots


def biggest_buffers(server) -> tuple[int, int]:
    """The most unsent bytes any session has in its transport, and held behind a replay."""
    ex = server.exchange
    return server.call(lambda: (max([s.outbuf() for s in ex.sessions] or [0]),
                                max([s.held_bytes for s in ex.sessions] or [0])))


def test_fast_readers_survive_a_100k_mass_cancel(tmp_path, caplog):
    """M08 rests 100k orders and cancels them with one MassCancel (about 15 MB of BookUpdates to
    every subscriber and of reports to M08). The subscriber reading as fast as it can stays on,
    its market data resyncs (a BookSnapshot, md_seq gap-free after it) and ends with the book a
    fresh Subscribe shows; M08's reading session gets every report once, in order, and stays on.
    No session's unsent output goes past the bound meanwhile."""
    caplog.set_level("INFO", logger="kaboni")
    config = make_config(max_msgs_per_s=1_000_000, durability="none")
    with ThreadServer(config, tmp_path / "d") as server:
        m08 = Peer(server.port, "M08")
        rest_orders(server, "M08", 100_000)
        m02 = Peer(server.port, "M02")
        m02.send({"type": "NewOrder", "cl_ord_id": "keep", "instrument": SYM, "side": "buy", "qty": 3,
                  "price": 9200, "tif": "gtc"})
        m02.wait(lambda: any(f.get("cl_ord_id") == "keep" for f in m02.got), "M02's order")
        sub = Peer(server.port, "M06")
        sub.send({"type": "Subscribe", "instruments": [SYM], "depth": 1000})
        sub.wait(lambda: any(f["type"] == "BookSnapshot" for f in sub.got), "the first snapshot")
        m08.wait(lambda: sum(f["type"] == "OrderAccepted" for f in m08.got) == 100_000, "M08's accepts")

        peak = [0, 0]
        done = threading.Event()

        def sample():
            while not done.is_set():
                out, held = biggest_buffers(server)
                peak[0], peak[1] = max(peak[0], out), max(peak[1], held)
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        m08.send({"type": "MassCancel", "cl_ord_id": "mc", "instrument": SYM})
        m08.wait(lambda: any(f["type"] == "MassCancelDone" for f in m08.got), "MassCancelDone", 60)
        ex = server.exchange
        # the subscriber has caught up once its last frame shows the book without M08's orders
        book: dict = {}

        def caught_up():
            book.clear()
            frames = list(sub.got)
            apply_md(book, frames)
            return server.call(lambda: not any(s.stale for s in ex.sessions)) and \
                book == {("buy", 9200): (3, 1)}

        sub.wait(caught_up, "the subscriber's book to settle", 60)
        done.set()
        sampler.join()

        fresh = Peer(server.port, "M07")
        fresh.send({"type": "Subscribe", "instruments": [SYM], "depth": 1000})
        fresh.wait(lambda: any(f["type"] == "BookSnapshot" for f in fresh.got), "a fresh snapshot")
        fresh_book: dict = {}
        apply_md(fresh_book, fresh.got)
        snapshots = apply_md(book, list(sub.got))
        assert book == fresh_book
        assert snapshots >= 2 and ex.stats.md_resyncs >= 1  # the burst went stale and resynced
        # the log line says how much was unsent with the burst (it said buffered=0: the socket's
        # part alone, before the burst was written)
        resync = next(r.getMessage() for r in caplog.records if "event=md_resync" in r.getMessage())
        assert int(re.search(r"buffered=(\d+)", resync).group(1)) > config.gateway.max_outbound_bytes // 4
        last_md = [f for f in sub.got if f.get("md_seq") is not None][-1]["md_seq"]
        snap = next(f for f in fresh.got if f["type"] == "BookSnapshot")
        assert last_md == snap["md_seq"]

        seqs = [f["seq"] for f in m08.got if "seq" in f]
        assert seqs == list(range(1, len(seqs) + 1))  # every report once, in order
        assert sum(f["type"] == "OrderCancelled" for f in m08.got) == 100_000
        assert ex.stats.report_overflows >= 1  # they went by the paced replay
        assert ex.stats.disconnects["slow_consumer"] == 0
        assert not sub.eof and not m08.eof
        assert peak[0] <= BOUND and peak[1] <= BOUND, peak
        for p in (m08, m02, sub, fresh):
            p.close()


def test_peers_that_do_not_read_are_still_cut_off_and_their_orders_cancelled(tmp_path):
    """A subscriber and a member that never read: output held back for them (stale market data,
    reports gone to the replay) and not taken for logon_timeout_s (1 s here) makes them slow
    consumers. Their cancel-on-disconnect orders are cancelled; nothing they hold passes the bound."""
    config = make_config(max_msgs_per_s=1_000_000, durability="none", logon_timeout_s=1.0)
    with ThreadServer(config, tmp_path / "d") as server:
        ex = server.exchange
        sub = Peer(server.port, "M06", read=False, rcvbuf=4096, cancel_on_disconnect=True)
        sub.send({"type": "Subscribe", "instruments": [SYM], "depth": 5})
        sub.send({"type": "NewOrder", "cl_ord_id": "b1", "instrument": SYM, "side": "buy", "qty": 1,
                  "price": 9200, "tif": "gtc"})
        member = Peer(server.port, "M09", read=False, rcvbuf=4096, cancel_on_disconnect=True)
        deadline = time.monotonic() + 10
        while server.call(lambda: len([s for s in ex.sessions if s.member in ("M06", "M09")])) < 2 or \
                not server.call(lambda: ex.engine.live_orders("M06")):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        m09 = server.call(lambda: next(s for s in ex.sessions if s.member == "M09"))
        rest_orders(server, "M09", 60_000, session=m09)  # ~10 MB of its own reports: past the bound
        rest_orders(server, "M08", 60_000, prefix="x")   # ~5 MB of BookUpdates for the subscriber
        assert biggest_buffers(server)[0] <= BOUND
        deadline = time.monotonic() + 15
        while ex.stats.disconnects["slow_consumer"] < 2:
            assert time.monotonic() < deadline, dict(ex.stats.disconnects)
            assert biggest_buffers(server)[0] <= BOUND
            time.sleep(0.05)
        assert ex.stats.md_resyncs >= 1 and ex.stats.report_overflows >= 1
        deadline = time.monotonic() + 10
        while server.call(lambda: ex.engine.live_orders("M09") or ex.engine.live_orders("M06")):
            assert time.monotonic() < deadline, "cancel-on-disconnect did not apply"
            time.sleep(0.02)
        sub.close()
        member.close()


def test_closing_connections_of_a_member_are_capped(tmp_path, caplog):
    """A member that logs on, asks for replies it never reads and logs out, again and again, keeps
    at most twice max_sessions_per_member (4) connections: the oldest closing ones are cut off."""
    config = make_config(logon_timeout_s=5.0)
    caplog.set_level("INFO", logger="kaboni")
    query = b"".join([len(b).to_bytes(4, "big") + b for b in [msgspec.msgpack.encode({"type": "QueryBalances"})]] * 4000)
    with ThreadServer(config, tmp_path / "d") as server:
        ex = server.exchange
        peers = []
        for _ in range(12):
            p = Peer(server.port, "M09", read=False, rcvbuf=2048)
            p.sock.sendall(query)  # about 1.2 MB of Balances, more than the kernel's buffers take
            p.send({"type": "Logout"})
            peers.append(p)
            deadline = time.monotonic() + 10
            while server.call(lambda: any(s.member == "M09" and s.state.value == "active" for s in ex.sessions)):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert server.call(lambda: len([s for s in ex.sessions if s.member == "M09"])) <= 8
        assert "event=close_evicted member=M09" in caplog.text
        # a normal client still logs on and out with its goodbye
        ok = Peer(server.port, "M09")
        ok.send({"type": "Logout"})
        ok.wait(lambda: any(f["type"] == "LogoutAccepted" for f in ok.got), "LogoutAccepted")
        for p in peers + [ok]:
            p.close()


# ---------------------------------------------------------------------------------------------
# Sans-IO: random days against a sink that buffers like a transport and a peer that reads at
# random speeds.

class BufferSink:
    """A transport's send buffer: ``take`` is the peer reading; the exchange's hooks are noted."""

    def __init__(self):
        self.unsent = bytearray()
        self.taken = bytearray()
        self.peak = 0
        self.closed = self.aborted = False
        self.replay = self.drain = 0

    def write(self, b):
        if not self.closed:
            self.unsent += b
            self.peak = max(self.peak, len(self.unsent))

    def buffered(self):
        return len(self.unsent)

    def take(self, n):
        self.taken += self.unsent[:n]
        del self.unsent[:n]

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = self.aborted = True

    def replay_later(self):
        self.replay += 1

    def drain_later(self):
        self.drain += 1

    def frames(self):
        out, d, i = [], bytes(self.taken), 0
        while i < len(d):
            n = int.from_bytes(d[i:i + 4], "big")
            out.append(msgspec.msgpack.decode(d[i + 4:i + 4 + n]))
            i += 4 + n
        return out


def _frame(m):
    b = msgspec.msgpack.encode(m)
    return len(b).to_bytes(4, "big") + b


def test_random_bursts_keep_every_report_and_a_consistent_book_within_the_bound():
    """Bursts of orders and mass cancels far past a 16 KiB bound, peers reading at random
    speeds: the subscriber's book always matches the engine's once it has caught up, md_seq is
    gap-free after every snapshot, the member gets every report once and in order, and no
    sink ever holds more than the bound."""
    import random

    from _fakes import ManualLedger
    from gateway._exchange import Exchange

    bound = 16 * 1024
    resyncs = overflows = 0
    for seed in range(25):
        rnd = random.Random(seed)
        config = make_config(max_outbound_bytes=bound, max_msgs_per_s=1_000_000)
        ledger = ManualLedger(config)
        ex = Exchange(config, ledger, clock_ns=lambda: 42)
        sinks = {}
        sessions = {}
        for name, member in (("m", "M01"), ("sub", "M02")):
            sink = BufferSink()
            s = ex.connect(sink, 0.0)
            ex.data_received(s, _frame({"type": "Logon", "member": member, "token": f"{member}-token"}), 0.0)
            sinks[name], sessions[name] = sink, s
        ex.data_received(sessions["sub"], _frame({"type": "Subscribe", "instruments": [SYM], "depth": 1000}), 0.0)
        n = 0

        def durable():
            ledger.durable_seq = ledger.last_seq
            ex.on_durable(ledger.last_seq)

        def serve(name):
            sink, s = sinks[name], sessions[name]
            if sink.buffered() <= bound // 4:
                if sink.replay:
                    sink.replay -= 1
                    ex.replay_more(s)
                if sink.drain:
                    sink.drain -= 1
                    ex.resync(s)

        for step in range(120):
            r = rnd.random()
            if r < 0.4:
                batch = b"".join(_frame({"type": "NewOrder", "cl_ord_id": f"o{n + i}", "instrument": SYM,
                                         "side": "sell", "qty": 1, "price": 9300 + rnd.randrange(50), "tif": "gtc"})
                                 for i in range(rnd.randint(1, 60)))
                n += 60
                ex.data_received(sessions["m"], batch, 0.0)
                while sessions["m"].pending:
                    ex.data_received(sessions["m"], b"", 0.0)
            elif r < 0.5:
                ex.data_received(sessions["m"], _frame({"type": "MassCancel", "cl_ord_id": f"mc{step}"}), 0.0)
            elif r < 0.55:
                ex.data_received(sessions["sub"], _frame({"type": "Subscribe", "instruments": [SYM], "depth": 1000}),
                                 0.0)
            if rnd.random() < 0.7:
                durable()
            for name in sinks:
                sinks[name].take(rnd.choice([0, 100, 5000, 50_000]))
                serve(name)
        durable()
        for _ in range(10_000):  # the peers read everything
            for name in sinks:
                sinks[name].take(1 << 30)
                serve(name)
            if not any(s.replay or s.drain or s.unsent for s in sinks.values()):
                break
        for name, sink in sinks.items():
            assert not sink.aborted and sink.peak <= bound, (seed, name, sink.peak)
        got = sinks["m"].frames()
        seqs = [f["seq"] for f in got if "seq" in f]
        assert seqs == list(range(1, ledger.engine.last_seq("M01") + 1)), seed
        book: dict = {}
        apply_md(book, sinks["sub"].frames())
        snap = ledger.engine.book_snapshot(SYM, 1000)
        assert book == {**{("buy", p): (q, o) for p, q, o in snap.bids},
                        **{("sell", p): (q, o) for p, q, o in snap.asks}}, seed
        resyncs += ex.stats.md_resyncs
        overflows += ex.stats.report_overflows
    assert resyncs > 25 and overflows > 25, (resyncs, overflows)  # the bursts did go past the bound


def test_a_subscribe_resyncs_a_stale_instrument_at_once_and_unsubscribe_forgets_it():
    """While an instrument is stale a Subscribe's own snapshot is the fresh one: incrementals
    follow it at once, and the later drain sends no second snapshot. After an Unsubscribe the
    drain sends nothing for it either."""
    from _fakes import ManualLedger
    from gateway._exchange import Exchange

    config = make_config(max_outbound_bytes=4096, max_msgs_per_s=1_000_000)
    ledger = ManualLedger(config)
    ex = Exchange(config, ledger, clock_ns=lambda: 42)
    sessions = []
    for member in ("M01", "M02"):
        sink = BufferSink()
        s = ex.connect(sink, 0.0)
        ex.data_received(s, _frame({"type": "Logon", "member": member, "token": f"{member}-token"}), 0.0)
        sessions.append((s, sink))
    (m, _), (sub, sink) = sessions
    for sym in (SYM, "CEA24"):
        ex.data_received(sub, _frame({"type": "Subscribe", "instruments": [sym], "depth": 3}), 0.0)

    def burst(sym, k):
        for i in range(40):
            ex.data_received(m, _frame({"type": "NewOrder", "cl_ord_id": f"{sym}{k}.{i}", "instrument": sym,
                                        "side": "sell", "qty": 1, "price": 9300 + i, "tif": "gtc"}), 0.0)
        ledger.durable_seq = ledger.last_seq
        ex.on_durable(ledger.last_seq)

    burst(SYM, 0)
    assert sub.stale == {SYM} and sink.drain == 1
    ex.data_received(sub, _frame({"type": "Subscribe", "instruments": [SYM], "depth": 3}), 0.0)
    assert not sub.stale
    ledger.durable_seq = ledger.last_seq
    ex.on_durable(ledger.last_seq)
    sink.take(1 << 30)
    frames = sink.frames()
    assert frames[-1]["type"] == "BookSnapshot" and frames[-1]["md_seq"] == ex.engine.md_seq(SYM)
    ex.resync(sub)  # the drain comes: nothing stale, nothing sent
    assert not sink.unsent
    burst("CEA24", 1)
    burst(SYM, 2)
    assert sub.stale  # the bound stopped market data again
    ex.data_received(sub, _frame({"type": "Unsubscribe", "instruments": list(sub.stale)}), 0.0)
    ledger.durable_seq = ledger.last_seq
    ex.on_durable(ledger.last_seq)
    sink.take(1 << 30)
    sink.frames()
    ex.resync(sub)
    assert not sink.unsent and not sub.stale
