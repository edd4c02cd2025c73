"""The gateway over real sockets: orders, reports after durability, replay, market data."""

import asyncio
import socket
import time

import msgspec
import pytest

from engine import CancelOrder, NewOrder, QueryBalances
from gateway.client import Client

from _fakes import ThreadServer, make_config


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.fixture
def server(tmp_path):
    with ThreadServer(make_config(), tmp_path / "data") as s:
        yield s


async def logon(port, member, **kw):
    c = await Client.connect("127.0.0.1", port)
    await c.logon(member, kw.pop("token", f"{member}-token"), **kw)
    return c


def test_two_members_cross(server):
    async def main():
        a = await logon(server.port, "M01")
        b = await logon(server.port, "M02")
        md = await logon(server.port, "M03")
        await md.subscribe(["CEA25"])
        snap = await md.next_market()
        assert snap["type"] == "BookSnapshot" and snap["bids"] == [] and snap["status"] == "open"
        await a.send(NewOrder("s1", "CEA25", "sell", 100, 9300))
        acc = await a.next_report()
        assert acc["type"] == "OrderAccepted" and acc["seq"] == a.logon_reply["next_seq"]
        await b.send(NewOrder("b1", "CEA25", "buy", 60, 9400))
        r = [await b.next_report(), await b.next_report()]
        assert [x["type"] for x in r] == ["OrderAccepted", "Fill"]
        assert r[1]["liquidity"] == "taker" and r[1]["price"] == 9300 and r[1]["qty"] == 60 and r[1]["leaves_qty"] == 0
        fa = await a.next_report()
        assert fa["type"] == "Fill" and fa["liquidity"] == "maker" and fa["price"] == 9300 and fa["leaves_qty"] == 40
        assert fa["trade_id"] == r[1]["trade_id"]
        types = [(await md.next_market())["type"] for _ in range(2)]
        assert types[0] == "BookUpdate"  # the resting sell
        assert types[1] == "Trade"
        book = await md.next_market()
        assert book["type"] == "BookUpdate" and book["qty"] == 40 and book["price"] == 9300
        bal_b = await b.request(QueryBalances())
        assert bal_b["allowances"]["CEA25"]["unsettled"] == 60
        assert bal_b["cash"]["CNY"]["total"] == 1_000_000_000 - 60 * 9300
        bal_a = await a.request(QueryBalances())
        assert bal_a["allowances"]["CEA25"]["reserved"] == 40
        assert bal_a["cash"]["CNY"]["available"] == 1_000_000_000 + 60 * 9300
        for c in (a, b, md):
            await c.logout()
    run(main())


async def reports_until(c, n, timeout=10):
    return [await c.next_report(timeout) for _ in range(n)]


def test_resume_after_disconnect_gets_missed_reports_once_in_order(server):
    async def main():
        a = await logon(server.port, "M01")
        b = await logon(server.port, "M02")
        for i in range(5):
            await a.send(NewOrder(f"s{i}", "CEA24", "sell", 10, 9200 + i))
        seen = await reports_until(a, 5)
        last = seen[-1]["seq"]
        await a.close()
        await b.send(NewOrder("b1", "CEA24", "buy", 35, 9300))
        got = await reports_until(b, 5)  # accepted + 4 fills (3 full, 1 partial)
        assert [r["type"] for r in got] == ["OrderAccepted"] + ["Fill"] * 4
        a2 = await logon(server.port, "M01", resume_from=last)
        assert a2.logon_reply["next_seq"] == last + 5
        missed = await reports_until(a2, 4)
        assert [r["seq"] for r in missed] == list(range(last + 1, last + 5))
        assert all(r["type"] == "Fill" and r["liquidity"] == "maker" for r in missed)
        # live from here on, no duplicates of the replay
        await a2.send(NewOrder("s9", "CEA24", "sell", 1, 9250))
        live = await a2.next_report()
        assert live["seq"] == last + 5 and live["type"] == "OrderAccepted"
        with pytest.raises(asyncio.TimeoutError):
            await a2.next_report(0.3)
        # a full replay from 0 is identical to what was received live
        a3 = await logon(server.port, "M01", resume_from=0)
        everything = await reports_until(a3, last + 5)
        assert everything[last - 5:last] == seen
        assert everything[last:last + 4] == missed
        assert [r["seq"] for r in everything] == list(range(1, last + 6))
        for c in (a2, a3, b):
            await c.logout()
    run(main())


def test_duplicate_and_foreign_cancel(server):
    async def main():
        a = await logon(server.port, "M01")
        b = await logon(server.port, "M02")
        await a.send(NewOrder("x1", "CEA23", "buy", 5, 9000))
        assert (await a.next_report())["type"] == "OrderAccepted"
        await a.send(NewOrder("x1", "CEA23", "buy", 5, 9000))
        r = await a.next_report()
        assert r["type"] == "OrderRejected" and r["reason"] == "duplicate_cl_ord_id" and r["cl_ord_id"] == "x1"
        await b.send(CancelOrder("c1", "x1"))
        r = await b.next_report()
        assert r["type"] == "CancelRejected" and r["reason"] == "unknown_order" and r["orig_cl_ord_id"] == "x1"
        await a.send(CancelOrder("c1", "x1"))
        r = await a.next_report()
        assert r["type"] == "OrderCancelled" and r["reason"] == "requested" and r["cancelled_qty"] == 5
        for c in (a, b):
            await c.logout()
    run(main())


def test_throttle_rejects_are_sequenced(tmp_path):
    with ThreadServer(make_config(max_msgs_per_s=5), tmp_path / "d") as server:
        async def main():
            a = await logon(server.port, "M01")
            for i in range(20):
                a.send_nowait(NewOrder(f"t{i}", "CEA25", "buy", 1, 9000))
            got = await reports_until(a, 20)
            assert [r["seq"] for r in got] == list(range(got[0]["seq"], got[0]["seq"] + 20))
            throttled = [r for r in got if r.get("reason") == "throttled"]
            assert 10 <= len(throttled) <= 15 and all(r["type"] == "OrderRejected" for r in throttled)
            assert sum(r["type"] == "OrderAccepted" for r in got) == 20 - len(throttled)
            # the throttled id is used up
            await asyncio.sleep(1.1)
            await a.send(CancelOrder("c-x", throttled[0]["cl_ord_id"]))
            assert (await a.next_report())["reason"] == "unknown_order"
            await a.send(NewOrder(throttled[0]["cl_ord_id"], "CEA25", "buy", 1, 9000))
            assert (await a.next_report())["reason"] == "duplicate_cl_ord_id"
            await a.logout()
        run(main())


def test_cancel_on_disconnect(server):
    async def main():
        a = await logon(server.port, "M01", cancel_on_disconnect=True)
        watch = await logon(server.port, "M01")
        await a.send(NewOrder("cod1", "CEA22", "sell", 7, 9100))
        await a.send(NewOrder("cod2", "CEA22", "sell", 3, 9150))
        await reports_until(watch, 2)
        await a.close()  # abrupt: no Logout
        r = await reports_until(watch, 2)
        assert [(x["type"], x["reason"], x["cl_ord_id"]) for x in r] == [
            ("OrderCancelled", "disconnect", "cod1"), ("OrderCancelled", "disconnect", "cod2")]
        # Logout ends the connection too
        c = await logon(server.port, "M01", cancel_on_disconnect=True)
        await c.send(NewOrder("cod3", "CEA22", "sell", 1, 9100))
        assert (await watch.next_report())["type"] == "OrderAccepted"
        await c.logout()
        r = await watch.next_report()
        assert r["reason"] == "disconnect" and r["cl_ord_id"] == "cod3"
        assert server.call(lambda: server.exchange.engine.resting("CEA22")) == (0, 0)
        await watch.logout()
    run(main())


def test_heartbeats_and_heartbeat_timeout(server):
    async def main():
        import msgspec
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        body = msgspec.msgpack.encode({"type": "Logon", "member": "M05", "token": "M05-token", "heartbeat_s": 1})
        writer.write(len(body).to_bytes(4, "big") + body)
        frames = []
        t0 = asyncio.get_running_loop().time()
        try:
            while True:
                n = int.from_bytes(await reader.readexactly(4), "big")
                frames.append(msgspec.msgpack.decode(await reader.readexactly(n))["type"])
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        elapsed = asyncio.get_running_loop().time() - t0
        assert frames[0] == "LogonAccepted"
        assert frames.count("Heartbeat") >= 2
        assert 2.9 <= elapsed <= 5
        writer.close()
    run(main())
    assert server.exchange.stats.disconnects["heartbeat_timeout"] == 1


def test_operator_only_messages(server):
    async def main():
        ops = await logon(server.port, "ops")
        assert ops.logon_reply["role"] == "operator"
        m = await logon(server.port, "M01")
        r = await m.request({"type": "Halt", "instrument": "CEA25"})
        assert r == {"type": "Error", "reason": "not_authorized", "text": r["text"]}
        r = await ops.request(NewOrder("o1", "CEA25", "buy", 1, 9250))
        assert r["type"] == "Error" and r["reason"] == "not_authorized"
        r = await ops.request(QueryBalances())
        assert r["reason"] == "not_authorized"
        await m.subscribe(["CEA25"])
        assert (await m.next_market())["status"] == "open"
        r = await ops.request({"type": "Halt", "instrument": "CEA25"})
        assert r == {"type": "AdminAck", "request": "Halt", "instrument": "CEA25", "cancel_orders": False}
        st = await m.next_market()
        assert st["type"] == "InstrumentStatus" and st["status"] == "halted"
        await m.send(NewOrder("o2", "CEA25", "buy", 1, 9250))
        assert (await m.next_report())["reason"] == "instrument_halted"
        r = await ops.request({"type": "Halt", "instrument": "NOPE"})
        assert r["type"] == "AdminRejected" and r["reason"] == "unknown_instrument"
        r = await ops.request({"type": "Deposit", "ref": "dep-1", "member": "M01", "asset": "CNY", "amount": 500})
        assert r["type"] == "AdminAck" and r["amount"] == 500 and "duplicate" not in r
        r = await ops.request({"type": "Deposit", "ref": "dep-1", "member": "M01", "asset": "CNY", "amount": 500})
        assert r["duplicate"] is True
        assert (await m.request(QueryBalances()))["cash"]["CNY"]["total"] == 1_000_000_000 + 500
        await ops.logout()
        await m.logout()
    run(main())


def test_suspend_member(server):
    async def main():
        ops = await logon(server.port, "ops")
        m = await logon(server.port, "M07")
        await m.send(NewOrder("r1", "CEA21", "buy", 3, 8800))
        await m.next_report()
        r = await ops.request({"type": "SuspendMember", "member": "M07"})
        assert r == {"type": "AdminAck", "request": "SuspendMember", "member": "M07"}
        c = await m.next_report()
        assert c["type"] == "OrderCancelled" and c["reason"] == "suspended"
        await m.send(NewOrder("r2", "CEA21", "buy", 3, 8800))
        assert (await m.next_report())["reason"] == "member_suspended"
        # suspended, it may still log on, query balances and mass cancel (docs/protocol.md)
        again = await logon(server.port, "M07")
        assert (await again.request(QueryBalances()))["type"] == "Balances"
        await again.send({"type": "MassCancel", "cl_ord_id": "mc1"})
        done = await again.next_report()
        assert done["type"] == "MassCancelDone", done
        await again.logout()
        assert (await m.next_report()) == done  # every session of the member gets every report
        assert (await ops.request({"type": "ReinstateMember", "member": "M07"}))["type"] == "AdminAck"
        await m.send(NewOrder("r3", "CEA21", "buy", 3, 8800))
        assert (await m.next_report())["type"] == "OrderAccepted"
        await ops.logout()
        await m.logout()
    run(main())


def test_sessions_of_one_member_replay_racing_live_reports(server):
    """Sessions logging on with resume_from=0 while another session trades: each sees 1..N once."""
    async def main():
        trader = await logon(server.port, "M09")
        counter = await logon(server.port, "M10")
        n = 300
        watchers = []

        async def produce():
            for i in range(n):
                trader.send_nowait(NewOrder(f"p{i}", "CEA19-20", "sell", 1, 8500))
                if i % 10 == 0:
                    counter.send_nowait(NewOrder(f"q{i}", "CEA19-20", "buy", 2, 8500))
                if i % 25 == 0:
                    await asyncio.sleep(0.005)
            await trader.writer.drain()

        async def watch(delay):
            await asyncio.sleep(delay)
            c = await logon(server.port, "M09", resume_from=0)
            watchers.append(c)
            return c

        results = await asyncio.gather(produce(), *(watch(d) for d in (0.0, 0.02, 0.05)))
        total = server.call(lambda: server.exchange.engine.last_seq("M09"))
        await asyncio.sleep(0.2)
        total = server.call(lambda: server.exchange.engine.last_seq("M09"))
        for c in results[1:] + [trader]:
            if c is trader:
                start = trader.logon_reply["next_seq"]
            else:
                start = 1
            got = await reports_until(c, total - start + 1)
            assert [r["seq"] for r in got] == list(range(start, total + 1))
            with pytest.raises(asyncio.TimeoutError):
                await c.next_report(0.1)
        for c in results[1:] + [trader, counter]:
            await c.close()
    run(main())


def test_a_resume_larger_than_the_outbound_bound_arrives_whole_and_others_keep_trading(tmp_path, monkeypatch):
    """A member resuming from 0 after a busy day, on a connection that reads slowly (a small
    receive buffer), is sent its reports in steps paced by its reading: the session's outbound
    bound (64 KiB here, about 400 reports) does not cut it off as a slow consumer, and other
    members are served meanwhile. (30,000 reports, about 5.7 MB: more than the kernel's socket
    buffers take, which cut the connection off when the whole replay was written at once.)
    While the peer reads nothing, the waiting replay is looked at after 1 ms, then 2, 4, ... up
    to 100 ms, not every millisecond for as long as the peer stays."""
    from gateway._server import Connection

    polls = []
    replay_more = Connection._replay_more

    def counted(self):
        polls.append(time.monotonic())
        replay_more(self)
    monkeypatch.setattr(Connection, "_replay_more", counted)
    with ThreadServer(make_config(max_outbound_bytes=65_536, max_msgs_per_s=1_000_000), tmp_path / "d") as server:
        n = 30_000

        async def trade():
            a = await logon(server.port, "M05")
            for i in range(n):
                a.send_nowait(NewOrder(f"r{i}", "CEA23", "sell", 1, 9000 + i % 50))
                if i % 500 == 499:
                    await reports_until(a, 500)
            await a.close()
        run(trade())

        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        body = msgspec.msgpack.encode({"type": "Logon", "member": "M05", "token": "M05-token", "resume_from": 0})
        sock.sendall(len(body).to_bytes(4, "big") + body)
        time.sleep(0.5)  # not reading yet: the kernel's buffers fill, the server must wait for us
        since = time.monotonic()
        time.sleep(0.5)
        stalled = sum(t >= since for t in polls)
        assert stalled <= 10, stalled  # every 100 ms by now (every 1 ms before: about 500)

        async def meanwhile():
            other = await logon(server.port, "M06")
            await other.send(NewOrder("live", "CEA23", "sell", 1, 9200))
            assert (await other.next_report())["type"] == "OrderAccepted"
            await other.logout()
        run(meanwhile())

        seqs, buf = [], b""
        deadline = time.monotonic() + 30
        while len(seqs) < n and time.monotonic() < deadline:
            chunk = sock.recv(4096)
            assert chunk, f"the server closed the connection after {len(seqs)} reports"
            buf += chunk
            while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                size = int.from_bytes(buf[:4], "big")
                msg = msgspec.msgpack.decode(buf[4:4 + size])
                buf = buf[4 + size:]
                if "seq" in msg:
                    seqs.append(msg["seq"])
        sock.close()
        assert seqs == list(range(1, n + 1))
        assert server.exchange.stats.disconnects["slow_consumer"] == 0


def test_a_logged_out_peer_that_stops_reading_its_replay_is_cut_off_after_logon_timeout(tmp_path):
    """After a Logout the rest of a resume replay is still owed, so the connection stays until
    it is taken; a peer that takes nothing more for logon_timeout_s is cut off, like any
    closing peer, instead of holding its session for ever."""
    with ThreadServer(make_config(max_outbound_bytes=65_536, max_msgs_per_s=1_000_000, logon_timeout_s=0.5),
                      tmp_path / "d") as server:
        n = 30_000

        async def trade():
            a = await logon(server.port, "M05")
            for i in range(n):
                a.send_nowait(NewOrder(f"r{i}", "CEA23", "sell", 1, 9000 + i % 50))
                if i % 500 == 499:
                    await reports_until(a, 500)
            await a.close()
        run(trade())
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        frames = b""
        for m in ({"type": "Logon", "member": "M05", "token": "M05-token", "resume_from": 0}, {"type": "Logout"}):
            body = msgspec.msgpack.encode(m)
            frames += len(body).to_bytes(4, "big") + body
        sock.sendall(frames)
        deadline = time.monotonic() + 10
        while server.call(lambda: len(server.exchange.sessions)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.call(lambda: len(server.exchange.sessions)) == 0
        assert time.monotonic() < deadline - 8  # about logon_timeout_s after the replay stopped moving
        sock.close()


def test_subscribe_unknown_instrument_subscribes_nothing(server):
    async def main():
        m = await logon(server.port, "M01")
        await m.subscribe(["CEA25", "NOPE"])
        r = await m.next_reply()
        assert r["reason"] == "invalid_message" and "NOPE" in r["text"]
        other = await logon(server.port, "M02")
        await other.send(NewOrder("z", "CEA25", "buy", 1, 9000))
        await other.next_report()
        with pytest.raises(asyncio.TimeoutError):
            await m.next_market(0.3)
        await m.subscribe(["CEA25"], depth=1)
        snap = await m.next_market()
        assert snap["bids"] == [[9000, 1, 1]] and snap["md_seq"] >= 2
        await other.send(NewOrder("z2", "CEA25", "buy", 1, 9001))
        await other.next_report()
        upd = await m.next_market()
        assert upd["md_seq"] == snap["md_seq"] + 1 and upd["price"] == 9001
        await m.unsubscribe(["CEA25"])
        await other.send(NewOrder("z3", "CEA25", "buy", 1, 9002))
        await other.next_report()
        with pytest.raises(asyncio.TimeoutError):
            await m.next_market(0.3)
        await m.logout()
        await other.logout()
    run(main())


def test_journal_failure_stops_the_server_without_reporting(tmp_path):
    from _fakes import FakeLedger

    ledgers = []

    def factory(*a, **kw):
        ledger = FakeLedger.open(*a, **kw)
        ledgers.append(ledger)
        return ledger

    s = ThreadServer(make_config(), tmp_path / "d", ledger_factory=factory)
    with s:
        async def main():
            a = await logon(s.port, "M01")
            await a.send(NewOrder("ok", "CEA25", "buy", 1, 9000))
            assert (await a.next_report())["type"] == "OrderAccepted"
            ledgers[0].fail_writes = True
            await a.send(NewOrder("lost", "CEA25", "buy", 1, 9000))
            with pytest.raises(Exception) as err:
                await a.next_report(5)
            assert "closed" in str(err.value)
        run(main())
        s.thread.join(10)
    assert s.code == 1


def test_a_closing_peer_that_stops_reading_is_cut_off_and_does_not_block_new_logons(tmp_path):
    """A member logs out but never reads its last replies: the server's close waits for a send
    buffer that never drains. Meanwhile that session must not count toward
    max_sessions_per_member (4), and after logon_timeout_s (1 s here) the connection is cut off."""
    config = make_config(logon_timeout_s=1.0, max_outbound_bytes=1 << 22)
    with ThreadServer(config, tmp_path / "d") as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))

        def send(msg):
            body = msgspec.msgpack.encode(msg)
            sock.sendall(len(body).to_bytes(4, "big") + body)

        def buffered():
            return server.call(lambda: [s.sink.transport.get_write_buffer_size()
                                        for s in server.exchange.sessions if s.member == "M01"])

        send({"type": "Logon", "member": "M01", "token": "M01-token"})
        deadline = time.monotonic() + 10
        while not buffered():  # logged on (under load this takes a while)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        while not buffered()[0]:  # the kernel's buffers are full: the rest waits in the transport
            assert time.monotonic() < deadline
            for _ in range(200):
                send({"type": "QueryBalances"})
            time.sleep(0.02)
        send({"type": "Logout"})
        time.sleep(0.1)
        assert buffered()[0] > 0  # closing, but not closed: the peer does not read

        async def four():
            clients = [await logon(server.port, "M01") for _ in range(4)]
            for c in clients:
                await c.logout()
        run(four())

        deadline = time.monotonic() + 5
        while buffered() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert buffered() == []  # cut off after the grace period
        assert server.exchange.stats.disconnects["logout"] == 5
        sock.settimeout(5)
        try:
            while sock.recv(1 << 16):  # what the kernel holds, then the end
                pass
        except ConnectionResetError:
            pass
        sock.close()


def test_a_member_pipelining_a_flood_does_not_hold_up_another_members_order(server):
    """One connection's frames run FRAMES_PER_TURN per loop turn, so an order from another member
    is answered while a flood of 300,000 heartbeats from the first is still being worked through
    (before, the whole flood ran first). The flood ends with a QueryBalances as a marker."""
    import threading

    def frame(msg):
        body = msgspec.msgpack.encode(msg)
        return len(body).to_bytes(4, "big") + body

    flooder = socket.create_connection(("127.0.0.1", server.port))
    flooder.settimeout(30)
    flooder.sendall(frame({"type": "Logon", "member": "M05", "token": "M05-token"}))
    arrivals: list[tuple[str, float]] = []

    def read_flooder():
        buf = b""
        while True:
            try:
                chunk = flooder.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                n = int.from_bytes(buf[:4], "big")
                msg = msgspec.msgpack.decode(buf[4:4 + n])
                buf = buf[4 + n:]
                arrivals.append((msg["type"], time.monotonic()))
                if msg["type"] == "Balances":
                    return

    reader = threading.Thread(target=read_flooder, daemon=True)
    reader.start()
    flood = frame({"type": "Heartbeat"}) * 300_000 + frame({"type": "QueryBalances"})
    sender = threading.Thread(target=flooder.sendall, args=(flood,), daemon=True)

    async def main():
        victim = await logon(server.port, "M06")
        sender.start()
        await asyncio.sleep(0.02)
        await victim.send(NewOrder("v1", "CEA24", "buy", 1, 9000))
        accepted = await victim.next_report()
        at = time.monotonic()
        await victim.close()
        return accepted, at

    accepted, accepted_at = run(main())
    reader.join(30)
    sender.join(30)
    flooder.close()
    assert accepted["type"] == "OrderAccepted"
    balances_at = [t for kind, t in arrivals if kind == "Balances"]
    assert balances_at, arrivals
    assert accepted_at < balances_at[0]


def test_closed_connections_are_freed_without_waiting_for_the_garbage_collector(server):
    """The server makes full collections rare; connections churned by the thousand must not wait
    for one (they piled up by hundreds of MB, with collection pauses of 100-350 ms)."""
    import gc

    from gateway._session import Session

    def sessions() -> int:
        return sum(1 for o in gc.get_objects() if type(o) is Session)

    gc.collect()
    gc.disable()
    try:
        before = sessions()
        for _ in range(100):
            with socket.create_connection(("127.0.0.1", server.port)) as s:
                s.sendall(b"\x00\x00\x00\x00")  # a bad frame: Error, then the server closes
                s.settimeout(5)
                while s.recv(4096):
                    pass
        deadline = time.monotonic() + 5
        while sessions() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sessions() == before
    finally:
        gc.enable()
