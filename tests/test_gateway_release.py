"""Random interleavings against the gateway's release path: what each session's byte stream
may contain, whatever mix of resume replays, replies, logouts, framing errors, disconnects,
uneven durability and a final drain produced it. Sans-IO days with durability advanced by
hand, and random clients on real sockets; each test that shows a bug says which."""

from __future__ import annotations

import random

import msgspec
import pytest

from gateway._exchange import Exchange
from gateway._session import State

from _fakes import make_config
from test_gateway_review import EntryLedger, enc

SYMS = ("CEA25", "CEA24")
MEMBERS = ("M01", "M02")
_REPLIES = ("Balances", "Error", "AdminAck", "AdminRejected")
_MARKET = ("BookUpdate", "Trade", "InstrumentStatus")


class CmdLedger(EntryLedger):
    """EntryLedger that also remembers the cl_ord_id of the command behind each journal entry."""

    def __init__(self, config):
        self.cl_of = {}
        super().__init__(config)

    def execute(self, cmd, member, ts, session=0, throttled=False):
        seq, events, reports = super().execute(cmd, member, ts, session, throttled)
        self.cl_of[seq] = getattr(cmd, "cl_ord_id", None)
        return seq, events, reports


class StreamSink:
    """A connection as the exchange sees it: decodes what it is given, checks at the moment of
    writing that every report's journal entry is durable, and (like the server's Connection)
    takes nothing once closed."""

    def __init__(self, ledger):
        self.ledger = ledger
        self.got = []
        self.closed = False
        self.aborted = False
        self.replays_pending = 0
        self.lost = False          # connection_lost was called
        self.dropped = False       # the peer went away (not after a close of ours)

    def write(self, b):
        if self.closed:
            return
        while b:
            n = int.from_bytes(b[:4], "big")
            m = msgspec.msgpack.decode(b[4:4 + n])
            b = b[4 + n:]
            if "seq" in m:
                entry = self.ledger.entry_of[(m["member"], m["seq"])]
                assert entry <= self.ledger.durable_seq, ("not durable", m, entry, self.ledger.durable_seq)
            self.got.append(m)

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = self.aborted = True

    def replay_later(self):
        self.replays_pending += 1


class Rec:
    """What the test sent on one connection, to judge what it received."""

    def __init__(self, s, sink, member, resume):
        self.s, self.sink, self.member, self.resume = s, sink, member, resume
        self.requests = []      # ("order", cl_ord_id) or ("reply", type, text fragment), in order
        self.owed = None        # member's last seq when it logged out / was told goodbye
        self.logout = False     # a Logout of ours was processed
        self.drained = False    # logged on when the drain began
        self.unrun = []         # expectations of the frames sent but not yet run (in order)
        self.more = False       # frames left for a later turn (data_received said so)


def _requests(rnd, n, member, role):
    """One chunk of requests: (frame, expected request entry or None) pairs."""
    out = []
    for k in range(rnd.randint(1, 4)):
        tag = f"{n}.{k}"
        r = rnd.random()
        sym = rnd.choice(SYMS)
        if r < 0.35:
            msg = {"type": "NewOrder", "cl_ord_id": f"o{tag}", "instrument": sym,
                   "side": rnd.choice(["buy", "sell"]), "qty": rnd.randint(1, 5),
                   "price": rnd.choice([9150, 9200, 9250, 9300])}
            exp = ("order", f"o{tag}") if role == "member" else ("reply", "Error", "operators")
        elif r < 0.42:
            msg = {"type": "MassCancel", "cl_ord_id": f"mc{tag}"}
            exp = ("order", f"mc{tag}") if role == "member" else ("reply", "Error", "operators")
        elif r < 0.47:
            msg = {"type": "CancelOrder", "cl_ord_id": f"c{tag}", "orig_cl_ord_id": f"o{n - 1}.0"}
            exp = ("order", f"c{tag}") if role == "member" else ("reply", "Error", "operators")
        elif r < 0.60:
            msg = {"type": "QueryBalances"}
            exp = ("reply", "Balances", "") if role == "member" else ("reply", "Error", "operators")
        elif r < 0.66:
            msg = {"type": f"Bad{tag}"}
            exp = ("reply", "Error", f"Bad{tag}")
        elif r < 0.70:
            msg = {"type": "NewOrder", "cl_ord_id": f"f{tag}", "instrument": sym, "side": "buy", "qty": 1.5,
                   "price": 9200}
            exp = ("reply", "Error", "qty:")
        elif r < 0.80:
            if rnd.random() < 0.2:
                msg = {"type": "Subscribe", "instruments": [sym, f"NOPE{tag}"]}
                exp = ("reply", "Error", f"NOPE{tag}")
            else:
                msg = {"type": "Subscribe", "instruments": rnd.sample(SYMS, rnd.randint(1, 2)),
                       "depth": rnd.randint(0, 3)}
                exp = None                          # BookSnapshot: market data
        elif r < 0.89:
            msg = {"type": "Halt", "instrument": sym}
            exp = ("reply", "Error", "operators only") if role == "member" else ("reply", "Admin", "")
        elif r < 0.93:
            msg = {"type": "Logon", "member": member, "token": f"{member}-token"}
            exp = ("reply", "Error", "already logged on")
        else:
            msg = {"type": "Heartbeat"}
            exp = None
        out.append((enc(msg), exp))
    return out


def release_day(seed, drain=False, steps=220):
    rnd = random.Random(seed)
    config = make_config(max_outbound_bytes=rnd.choice([1024, 2048, 4096]),    # replay steps of a few reports
                         max_msgs_per_s=rnd.choice([1000, 1000, 20]))
    ledger = CmdLedger(config)
    ex = Exchange(config, ledger, clock_ns=lambda: 42)
    recs: list[Rec] = []
    clock = [0.0]

    def accepted(rec):
        return bool(rec.sink.got) and rec.sink.got[0]["type"] == "LogonAccepted"

    def sync(rec):
        """Account the frames the exchange has run (those no longer pending) as requests."""
        if not accepted(rec):
            rec.unrun.clear()
            return
        left = len(rec.s.pending)   # a Logout or bad frame is last: it clears nothing unrun
        while len(rec.unrun) > left:
            exp = rec.unrun.pop(0)
            if exp == "logout":
                rec.logout = True
                rec.owed = ledger.engine.last_seq(rec.member)
            elif exp is not None:
                rec.requests.append(exp)

    def feed(rec, data):
        rec.more = ex.data_received(rec.s, data, clock[0])
        sync(rec)

    def connect(member, resume, cod, chunk, tail=None):
        sink = StreamSink(ledger)
        s = ex.connect(sink, clock[0])
        rec = Rec(s, sink, member, resume)
        recs.append(rec)
        logon = {"type": "Logon", "member": member, "token": f"{member}-token", "cancel_on_disconnect": cod}
        if resume is not None:
            logon["resume_from"] = resume
        send(rec, [(enc(logon), None)] + chunk, tail)
        return rec

    def send(rec, chunk, tail=None):
        if tail is not None:
            chunk = chunk + [(tail, "logout" if tail == LOGOUT else None)]
        rec.unrun.extend(exp for _, exp in chunk)
        feed(rec, b"".join(f for f, _ in chunk))

    def lose(rec):
        sync(rec)
        rec.unrun.clear()
        rec.sink.lost = True
        ex.connection_lost(rec.s, "client_close", clock[0])

    ops = connect("ops", rnd.choice([None, 0]), False, [])
    for n in range(steps):
        clock[0] += 0.01
        live = [r for r in recs if r.s.state is State.ACTIVE and r is not ops and not r.more]
        x = rnd.random()
        if x < 0.10 or not live:
            m = rnd.choice(MEMBERS)
            last = ex.released.get(m, 0)
            resume = rnd.randint(0, last) if rnd.random() < 0.6 else None
            if rnd.random() < 0.03:
                resume = rnd.choice([-1, last + 1])                     # invalid_resume
            chunk = _requests(rnd, n, m, "member") if rnd.random() < 0.3 else []
            if rnd.random() < 0.05:
                chunk += [(enc({"type": "QueryBalances"}), ("reply", "Balances", ""))] * 70   # past one turn
            tail = rnd.choice([None] * 8 + [LOGOUT, BAD_FRAME])
            connect(m, resume, rnd.random() < 0.5, chunk, tail)
        elif x < 0.42:
            rec = rnd.choice(live)
            tail = rnd.choice([None] * 14 + [LOGOUT, BAD_FRAME])
            send(rec, _requests(rnd, n, rec.member, "member"), tail)
        elif x < 0.45:
            send(rnd.choice(live), [], LOGOUT)
        elif x < 0.47:
            send(rnd.choice(live), [], BAD_FRAME)
        elif x < 0.52:
            sym = rnd.choice(SYMS)
            msg = rnd.choice([{"type": "Halt", "instrument": sym, "cancel_orders": rnd.random() < 0.5},
                              {"type": "Resume", "instrument": sym},
                              {"type": "Deposit", "ref": f"d{n}", "member": rnd.choice(MEMBERS), "asset": "CNY",
                               "amount": 1},
                              {"type": "SuspendMember", "member": rnd.choice(MEMBERS)},
                              {"type": "ReinstateMember", "member": rnd.choice(MEMBERS)},
                              {"type": "CloseMarket"}, {"type": "EndOfDay"}, {"type": "OpenMarket"}])
            send(ops, [(enc(msg), ("reply", "Admin", ""))])
        elif x < 0.68:
            ledger.durable_seq = rnd.randint(ledger.durable_seq, ledger.last_seq)
            ex.on_durable(ledger.durable_seq)
        elif x < 0.82:
            for r in recs:
                while r.sink.replays_pending and not r.sink.closed and rnd.random() < 0.6:
                    r.sink.replays_pending -= 1
                    ex.replay_more(r.s)
        elif x < 0.85:
            for r in recs:                                           # the server's next turn
                if r.more and not r.sink.closed and rnd.random() < 0.7:
                    feed(r, b"")
        elif x < 0.87:
            rec = rnd.choice(live)
            sym = rnd.choice(SYMS)
            was = sym in rec.s.subscriptions
            send(rec, [(enc({"type": "Unsubscribe", "instruments": [sym]}), None)])
            if was:
                rec.sink.got.append({"type": "(unsubscribed)", "instrument": sym})
        elif x < 0.90:
            rec = rnd.choice([r for r in recs if r.s.state is not State.CLOSED and r is not ops])
            rec.sink.dropped = not rec.sink.closed
            lose(rec)
        else:
            for r in recs:   # transports that were closed finish closing
                if r.sink.closed and not r.sink.lost and rnd.random() < 0.5:
                    lose(r)
    if drain:
        at_drain = [r for r in recs if r.s.state is State.ACTIVE]
        ex.drain(clock[0])
        for r in at_drain:
            r.drained = True
            r.owed = ledger.engine.last_seq(r.member) if r.member != "ops" else 0
    for _ in range(1000):   # the test sends nothing more: let everything run out
        busy = False
        if ledger.durable_seq < ledger.last_seq or ex.outbox:
            ledger.durable_seq = ledger.last_seq
            ex.on_durable(ledger.durable_seq)
            busy = True
        for r in recs:
            if r.more and not r.sink.closed:
                feed(r, b"")
                busy = True
            if r.sink.replays_pending and not r.sink.closed:
                r.sink.replays_pending -= 1
                ex.replay_more(r.s)
                busy = True
            if r.sink.closed and not r.sink.lost:
                lose(r)
                busy = True
        if not busy:
            break
    return ex, ledger, recs


LOGOUT = enc({"type": "Logout"})
BAD_FRAME = b"\x00\x00\x00\x00"


def check_day(seed, ex, ledger, recs, drain):
    for r in recs:
        got, s, m = r.sink.got, r.s, r.member
        where = (seed, s.sid, m, r.resume)
        # no internal error cut anyone off (replies held behind a replay past max_outbound_bytes
        # make a slow consumer: with these tiny bounds, a few Balances do)
        assert not r.sink.aborted or s.cause == "slow_consumer", where
        if not got or got[0]["type"] != "LogonAccepted":
            continue
        # nothing after the goodbye, and the goodbye closes
        types = [f["type"] for f in got]
        if "LogoutAccepted" in types:
            assert types.index("LogoutAccepted") == len(types) - 1, (where, types[-5:])
            assert r.sink.closed, where
        bad = [i for i, f in enumerate(got) if f["type"] == "Error" and f["reason"] == "bad_frame"]
        if bad:                                                  # one Error, then the close
            assert bad == [len(got) - 1] and r.sink.closed, (where, got[bad[0]:][:5])
        # reports: durable before sent (checked by the sink), once, gap-free from the start, in order
        start = r.resume + 1 if r.resume is not None else got[0]["next_seq"]
        pos = {}
        seqs = []
        for i, f in enumerate(got):
            if "seq" in f:
                assert f["member"] == m, where
                seqs.append(f["seq"])
                pos[f["seq"]] = i
        assert seqs == list(range(start, start + len(seqs))), (where, seqs[:20])
        end = start + len(seqs) - 1                              # last seq it got
        # a logged-out / drained session is owed everything up to then before the goodbye, and
        # gets the goodbye in the end (unless its peer went away first)
        if (r.logout or r.drained) and not r.sink.dropped and not r.sink.aborted:
            assert types[-1] == "LogoutAccepted", (where, types[-5:], r.logout, r.drained)
            if m != "ops":
                assert end >= r.owed, (where, end, r.owed)
        if s.state is State.ACTIVE and m != "ops":               # still logged on: it has everything
            assert end == ledger.engine.last_seq(m), (where, end, ledger.engine.last_seq(m))
            assert s.replay_after is None and not s.held, where
        # replies: in request order, never before a report of an earlier request of this session
        replies = [(i, f) for i, f in enumerate(got)
                   if f["type"] in _REPLIES and not (f["type"] == "Error" and f["reason"] == "bad_frame")]
        expected = [(k, q) for k, q in enumerate(r.requests) if q[0] == "reply"]
        assert len(replies) <= len(expected), (where, [f for _, f in replies], expected)
        if s.state is State.ACTIVE or ((r.logout or r.drained) and types[-1] == "LogoutAccepted"):
            assert len(replies) == len(expected), (where, [f for _, f in replies], expected)
        for (i, f), (k, q) in zip(replies, expected):
            _, typ, text = q
            assert f["type"].startswith(typ), (where, f, q)
            assert text in f.get("text", ""), (where, f, q)
            earlier = {q2[1] for q2 in r.requests[:k] if q2[0] == "order"}
            for seq, j in pos.items():
                if ledger.cl_of[ledger.entry_of[(m, seq)]] in earlier:
                    assert j < i, (where, "reply before the report of an earlier request", f, got[j])
        # market data: after a snapshot of its instrument, md_seq gap-free
        md = {}
        for f in got:
            t = f["type"]
            if t == "BookSnapshot":
                md[f["instrument"]] = f["md_seq"]
            elif t == "(unsubscribed)":
                md.pop(f["instrument"], None)
            elif t in _MARKET:
                sym = f["instrument"]
                assert sym in md and f["md_seq"] == md[sym] + 1, (where, f, md.get(sym))
                md[sym] = f["md_seq"]
    # no session is left open for ever once nothing more is sent
    for r in recs:
        if r.sink.closed:
            assert r.s.state is State.CLOSED, (seed, r.s.sid)
        if (r.logout or r.drained) and not r.sink.dropped and not r.sink.aborted:
            assert r.sink.closed and r.s not in ex.sessions, (seed, r.s.sid, r.s.state, r.s.replay_after)
    if drain:
        assert not ex.sessions, (seed, [(s.sid, s.state, s.replay_after) for s in ex.sessions])
    else:
        assert all(s.state is State.ACTIVE for s in ex.sessions), seed
    for group in ex.by_member.values():
        assert all(s.state is not State.CLOSED for s in group), seed


def test_random_days_keep_the_release_path_promises():
    """300 random days of 220 steps (two thirds end in a drain), sans-IO, durability by hand.
    Each session's stream: every report durable when written, once, gap-free from its start,
    in order; replies in request order, never before a report of an earlier request of the
    same session; nothing after LogoutAccepted or the bad_frame Error; LogoutAccepted only
    after every report owed when the Logout (or the drain) came, its own cancel-on-disconnect
    cancels included; market data gap-free after each snapshot; and once nothing more is
    sent, every session that logged out or was drained is closed, and a session still logged
    on has everything and nothing held."""
    for seed in range(300):
        drain = seed % 3 != 0
        ex, ledger, recs = release_day(seed, drain=drain)
        check_day(seed, ex, ledger, recs, drain)



def test_a_framing_error_mid_replay_is_the_last_frame_before_the_close():
    """"The server sends one Error (bad_frame) and closes": during a resume replay the Error,
    held like any reply, was written at the close ahead of the market data released with it,
    so a BookUpdate queued before the bad frame followed the Error (random days, seed 2)."""
    from test_gateway_review import connect, durable, make_exchange, order

    ex, ledger = make_exchange(max_outbound_bytes=4096)      # replay steps of about 1 KB
    a, _ = connect(ex, "M01")
    ex.data_received(a, b"".join(order(f"o{i}") for i in range(40)), 0.0)
    durable(ex, ledger)
    late, sl = connect(ex, "M01", resume_from=0)
    ex.data_received(late, enc({"type": "Subscribe", "instruments": ["CEA25"]}), 0.0)
    durable(ex, ledger)
    assert late.replay_after is not None and sl.frames()[-1]["type"] == "BookSnapshot"
    b, _ = connect(ex, "M02")
    ex.data_received(b, order("b1", side="sell", price=9400), 0.0)   # a BookUpdate for the subscriber
    ex.data_received(late, BAD_FRAME, 0.0)
    durable(ex, ledger)
    got = [(f["type"], f.get("reason")) for f in sl.frames()]
    assert got == [("BookUpdate", None), ("Error", "bad_frame")] and sl.closed, got


def test_a_logged_out_peer_that_half_closes_mid_replay_and_stops_reading_is_cut_off(tmp_path):
    """docs/protocol.md: during a resume replay after a Logout, "a peer that takes nothing more
    for logon_timeout_s meanwhile is cut off". When the peer also half-closed, the transport
    began closing by itself; the next replay step found it closing, the Connection stopped
    stepping the replay, and nobody closed the session: it stayed (logged out, its unread bytes
    buffered) for as long as the peer kept its socket open."""
    import socket
    import time

    from _fakes import ThreadServer

    limit = 256 * 1024                                   # replay steps of 64 KB
    with ThreadServer(make_config(max_outbound_bytes=limit, max_msgs_per_s=1_000_000, logon_timeout_s=1.0),
                      tmp_path) as srv:
        n = 4000
        with socket.create_connection(("127.0.0.1", srv.port)) as sk:
            sk.sendall(enc({"type": "Logon", "member": "M05", "token": "M05-token"}) + b"".join(
                enc({"type": "NewOrder", "cl_ord_id": f"r{i}", "instrument": "CEA23", "side": "sell", "qty": 1,
                     "price": 9000 + i % 50}) for i in range(n)))
            deadline = time.monotonic() + 20
            while srv.call(lambda: srv.exchange.released.get("M05", 0)) < n and time.monotonic() < deadline:
                time.sleep(0.02)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", srv.port))
        try:
            def mine():
                return [s for s in srv.exchange.sessions if s.member in ("", "M05")]

            deadline = time.monotonic() + 5
            while not srv.call(mine) and time.monotonic() < deadline:
                time.sleep(0.01)

            def small_send_buffer():
                mine()[0].sink.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            srv.call(small_send_buffer)

            def buffered():
                got = mine()
                return got[0].sink.transport.get_write_buffer_size() if got and got[0].sink.transport else None

            sock.sendall(enc({"type": "Logon", "member": "M05", "token": "M05-token", "resume_from": 0}))
            deadline = time.monotonic() + 5
            while (buffered() or 0) <= limit // 4 and time.monotonic() < deadline:   # the replay waits for us
                time.sleep(0.01)
            sock.sendall(enc({"type": "Logout"}))
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 5
            while not srv.call(lambda: mine()[0].goodbye) and time.monotonic() < deadline:
                time.sleep(0.01)
            while (left := buffered()) is not None and left > limit // 4 - 8192:   # take some, then stop
                sock.recv(4096)
            assert left, "the scenario needs bytes left unread"
            t0 = time.monotonic()
            while srv.call(lambda: len(srv.exchange.sessions)) and time.monotonic() < t0 + 4:
                time.sleep(0.05)
            assert srv.call(lambda: len(srv.exchange.sessions)) == 0
        finally:
            sock.close()


def _read_frames(data):
    out = []
    while len(data) >= 4:
        n = int.from_bytes(data[:4], "big")
        if len(data) < 4 + n:
            break
        out.append(msgspec.msgpack.decode(data[4:4 + n]))
        data = data[4 + n:]
    return out


async def _client_requests(crnd, k, rec, w, logon):
    """One real-socket client's requests (recorded in ``rec``), then how it ends."""
    import asyncio

    w.write(logon)
    for i in range(crnd.randint(3, 25)):
        x = crnd.random()
        tag = f"{k}.{i}"
        sym = crnd.choice(("CEA25", "CEA23"))
        if x < 0.45:
            msg = {"type": "NewOrder", "cl_ord_id": f"o{tag}", "instrument": sym,
                   "side": crnd.choice(["buy", "sell"]), "qty": crnd.randint(1, 5),
                   "price": crnd.choice([9000, 9020, 9040, 9100]), "tif": crnd.choice(["day", "ioc"])}
            rec["requests"].append(("order", f"o{tag}"))
        elif x < 0.55:
            msg = {"type": "MassCancel", "cl_ord_id": f"m{tag}", "instrument": sym}
            rec["requests"].append(("order", f"m{tag}"))
        elif x < 0.72:
            msg = {"type": "QueryBalances"}
            rec["requests"].append(("reply", "Balances", ""))
        elif x < 0.82:
            msg = {"type": f"Bad{tag}"}
            rec["requests"].append(("reply", "Error", f"Bad{tag}"))
        elif x < 0.94:
            msg = {"type": "Subscribe", "instruments": [sym], "depth": 3}
        else:
            msg = {"type": "Unsubscribe", "instruments": [sym]}
        w.write(enc(msg))
        if crnd.random() < 0.3:
            await asyncio.sleep(crnd.random() * 0.02)
    end = crnd.choice(["logout", "logout", "logout", "stay", "stay", "bad_frame", "go"])
    rec["end"] = end
    if end == "logout":
        w.write(enc({"type": "Logout"}))
    elif end == "bad_frame":
        w.write(b"\x00\x00\x00\x00")
    try:
        await w.drain()
    except ConnectionError:
        pass


@pytest.mark.parametrize("seed", [7, 11])
def test_random_clients_on_real_sockets_keep_the_release_path_promises(tmp_path, seed):
    """Real server, real sockets, small receive buffers (so resume replays are paced and the
    server backs off): clients of two members log on with and without resume_from, enter
    orders (cancel-on-disconnect for some), ask for balances, send invalid messages and
    (un)subscribe, read at their own pace, then log out (often mid-replay), break the framing
    or just go; the rest are told goodbye by a drain. Every stream: reports once, gap-free
    from its start; a reply never before the first report of an earlier request of its own;
    LogoutAccepted last, after the terminal report of every order its session entered when
    that session asked cancel-on-disconnect; a bad_frame Error last; market data gap-free
    after each snapshot."""
    import asyncio
    import socket

    from _fakes import ThreadServer

    rnd = random.Random(seed)
    config = make_config(max_outbound_bytes=256 * 1024, max_msgs_per_s=1_000_000, logon_timeout_s=2.0)
    with ThreadServer(config, tmp_path) as srv:
        port = srv.port

        def small_send_buffers():                      # of the connections not logged on yet
            for s in srv.exchange.sessions:
                if s.state is State.AWAIT_LOGON and s.sink.transport is not None:
                    s.sink.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

        async def open_conn(small):
            sk = socket.socket()
            if small:
                sk.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sk.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(sk, ("127.0.0.1", port))
            conn = await asyncio.open_connection(sock=sk)
            if small:
                await asyncio.sleep(0.01)                   # the server has taken the connection
                await loop.run_in_executor(None, srv.call, small_send_buffers)
            return conn

        async def reader(r, buf, pause):
            while True:
                try:
                    chunk = await r.read(4096)
                except ConnectionError:                     # our own write found it closed
                    return
                if not chunk:
                    return
                buf.append(chunk)
                if pause:
                    await asyncio.sleep(pause)

        async def seed_reports():                       # M01 has a day behind it: replays take steps
            r, w = await open_conn(False)
            w.write(enc({"type": "Logon", "member": "M01", "token": "M01-token"}) + b"".join(
                enc({"type": "NewOrder", "cl_ord_id": f"pre{i}", "instrument": "CEA21", "side": "sell", "qty": 1,
                     "price": 9000 + i % 40, "tif": "gtc"}) for i in range(2000)))
            w.write(enc({"type": "Logout"}))
            await w.drain()
            await asyncio.wait_for(r.read(-1), 20)
            w.close()

        clients = []

        async def client(k, member, start_delay):
            await asyncio.sleep(start_delay)
            crnd = random.Random(k * 1000 + seed)
            r, w = await open_conn(crnd.random() < 0.7)
            buf = []
            rd = asyncio.create_task(reader(r, buf, crnd.choice([0, 0.003, 0.01])))
            resume = crnd.choice([None, 0, 0, crnd.randint(0, 300)]) if member == "M01" else crnd.choice([None, 0])
            cod = crnd.random() < 0.5
            logon = {"type": "Logon", "member": member, "token": f"{member}-token", "cancel_on_disconnect": cod}
            if resume is not None:
                logon["resume_from"] = resume
            rec = {"k": k, "member": member, "resume": resume, "cod": cod, "requests": [], "buf": buf,
                   "end": None}
            clients.append(rec)
            try:
                await _client_requests(crnd, k, rec, w, enc(logon))
            except (ConnectionError, RuntimeError):     # refused (too many sessions) or cut off
                rec["end"] = "refused"
            if rec["end"] == "go":
                await asyncio.sleep(crnd.random() * 0.05)
                w.transport.abort()
                rd.cancel()
                return
            rec["reader"] = rd
            rec["writer"] = w

        async def main():
            await seed_reports()
            await asyncio.gather(*(client(k, rnd.choice(("M01", "M01", "M02")), rnd.random() * 0.3)
                                   for k in range(20)))
            # a drain while replays still run: each logged-on session gets the rest, then goodbye
            await asyncio.sleep(0.05)
            await asyncio.get_running_loop().run_in_executor(None, srv.stop)
            for c in clients:
                if "reader" in c:
                    await asyncio.wait_for(c["reader"], 10)
                    c["writer"].close()

        asyncio.run(asyncio.wait_for(main(), 60))

    for c in clients:
        frames = _read_frames(b"".join(c["buf"]))
        where = (c["k"], c["member"], c["resume"], c["end"])
        if c["end"] == "go" or not frames or frames[0]["type"] == "LogonRejected":
            continue
        assert frames[0]["type"] == "LogonAccepted", (where, frames[0])
        types = [f["type"] for f in frames]
        if c["end"] in ("logout", "stay"):
            assert types[-1] == "LogoutAccepted" and types.count("LogoutAccepted") == 1, (where, types[-5:])
        if c["end"] == "bad_frame":
            assert frames[-1]["type"] == "Error" and frames[-1]["reason"] == "bad_frame", (where, frames[-3:])
        start = c["resume"] + 1 if c["resume"] is not None else frames[0]["next_seq"]
        seqs = [f["seq"] for f in frames if "seq" in f]
        assert seqs == list(range(start, start + len(seqs))), (where, seqs[:10])
        assert all(f["member"] == c["member"] for f in frames if "seq" in f), where
        first = {}
        for i, f in enumerate(frames):
            if "seq" in f and f["cl_ord_id"] not in first:
                first[f["cl_ord_id"]] = i
        replies = [(i, f) for i, f in enumerate(frames) if f["type"] in ("Balances", "Error")
                   and f.get("reason") != "bad_frame"]
        expected = [(k, q) for k, q in enumerate(c["requests"]) if q[0] == "reply"]
        if c["end"] in ("logout", "stay"):
            assert len(replies) == len(expected), (where, len(replies), len(expected))
        for (i, f), (k, q) in zip(replies, expected):
            assert f["type"] == q[1] and q[2] in f.get("text", ""), (where, f, q)
            for q2 in c["requests"][:k]:
                if q2[0] == "order" and q2[1] in first:
                    assert first[q2[1]] < i, (where, "reply before an earlier request's report", f, q2)
            if c["end"] in ("logout", "stay"):
                for q2 in c["requests"][:k]:
                    assert q2[0] != "order" or first.get(q2[1], len(frames)) < i, (
                        where, "reply before an earlier request's report, or without it", q2, f,
                        [(g["type"], g.get("seq"), g.get("cl_ord_id")) for g in frames[i - 3:first.get(q2[1], i) + 3]])
        if c["end"] in ("logout", "stay") and c["cod"]:
            live = set()
            for f in frames:
                if f["type"] == "OrderAccepted" and f["cl_ord_id"].startswith(f"o{c['k']}."):
                    live.add(f["order_id"])
                elif f["type"] == "OrderCancelled" or f["type"] == "Fill" and f["leaves_qty"] == 0:
                    live.discard(f["order_id"])
            assert not live, (where, "orders of a cancel-on-disconnect session left without their cancel", live)
        md = {}
        for f in frames:
            if f["type"] == "BookSnapshot":
                md[f["instrument"]] = f["md_seq"]
            elif f["type"] in _MARKET:
                assert f["md_seq"] == md[f["instrument"]] + 1, (where, f, md)
                md[f["instrument"]] = f["md_seq"]
