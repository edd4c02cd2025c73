"""Logon rules, framing errors and invalid messages over real sockets."""

import asyncio
import socket
import time

import msgspec
import pytest

from gateway.client import Client

from _fakes import ThreadServer, make_config


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ThreadServer(make_config(logon_timeout_s=0.5, max_outbound_bytes=64 * 1024),
                      tmp_path_factory.mktemp("d")) as s:
        yield s


def enc(m):
    b = msgspec.msgpack.encode(m)
    return len(b).to_bytes(4, "big") + b


class Raw:
    """A bare socket speaking frames, for what the client library would never send."""

    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port))
        self.s.settimeout(5)
        self.buf = b""

    def send(self, data):
        self.s.sendall(data if isinstance(data, bytes) else enc(data))

    def recv(self):
        while True:
            if len(self.buf) >= 4:
                n = int.from_bytes(self.buf[:4], "big")
                if len(self.buf) >= 4 + n:
                    body, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
                    return msgspec.msgpack.decode(body)
            try:
                chunk = self.s.recv(65536)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self.buf += chunk

    def logon(self, member="M01", **kw):
        self.send({"type": "Logon", "member": member, "token": f"{member}-token", **kw})
        r = self.recv()
        assert r["type"] == "LogonAccepted", r
        return r

    def closed(self):
        return self.recv() is None


def test_bad_credentials(server):
    disconnects = server.exchange.stats.disconnects
    before = dict(disconnects)
    r = Raw(server.port)
    r.send({"type": "Logon", "member": "M01", "token": "nope"})
    assert r.recv()["reason"] == "bad_credentials"
    assert r.closed()
    r = Raw(server.port)
    r.send({"type": "Logon", "member": "ghost", "token": "ghost-token"})
    assert r.recv()["reason"] == "bad_credentials"
    assert r.closed()
    deadline = time.monotonic() + 5
    while disconnects["logon_rejected"] < before.get("logon_rejected", 0) + 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert disconnects["logon_rejected"] == before.get("logon_rejected", 0) + 2
    assert disconnects["client_close"] == before.get("client_close", 0)


def test_fifth_session_rejected_only_it_closes(server):
    conns = [Raw(server.port) for _ in range(4)]
    for c in conns:
        c.logon("M11")
    fifth = Raw(server.port)
    fifth.send({"type": "Logon", "member": "M11", "token": "M11-token"})
    assert fifth.recv()["reason"] == "already_logged_on"
    assert fifth.closed()
    conns[0].send({"type": "QueryBalances"})
    assert conns[0].recv()["type"] == "Balances"
    for c in conns:
        c.s.close()


def test_logon_checks_run_credentials_then_the_session_limit_then_resume(server):
    """docs/protocol.md: bad_credentials, already_logged_on, invalid_resume, in that order;
    operators' sessions count toward the limit like members'."""
    for member, token in (("M12", "M12-token"), ("ops", "ops-token")):
        conns = [Raw(server.port) for _ in range(4)]
        for c in conns:
            c.logon(member) if member != "ops" else c.send({"type": "Logon", "member": "ops", "token": token})
            if member == "ops":
                assert c.recv()["type"] == "LogonAccepted"
        for logon, reason in (({"token": "wrong", "resume_from": 10**6}, "bad_credentials"),
                              ({"token": token, "resume_from": 10**6}, "already_logged_on")):
            fifth = Raw(server.port)
            fifth.send({"type": "Logon", "member": member, **logon})
            assert fifth.recv()["reason"] == reason, (member, logon)
            assert fifth.closed()
        for c in conns:
            c.s.close()


def test_invalid_resume(server):
    for k in (-1, 10**6):
        r = Raw(server.port)
        r.send({"type": "Logon", "member": "M12", "token": "M12-token", "resume_from": k})
        assert r.recv()["reason"] == "invalid_resume"
        assert r.closed()


def test_first_frame_must_be_logon(server):
    r = Raw(server.port)
    r.send({"type": "QueryBalances"})
    m = r.recv()
    assert m["type"] == "Error" and m["reason"] == "not_logged_on"
    assert r.closed()
    r = Raw(server.port)
    r.send({"type": "Logon", "member": 5, "token": "x"})
    m = r.recv()
    assert m["reason"] == "invalid_message" and "member" in m["text"]
    assert r.closed()


def test_logon_timeout(server):
    r = Raw(server.port)
    m = r.recv()
    assert m["reason"] == "not_logged_on"
    assert r.closed()


def test_second_logon_and_invalid_messages_keep_the_session(server):
    r = Raw(server.port)
    r.logon("M13")
    r.send({"type": "Logon", "member": "M13", "token": "M13-token"})
    assert r.recv()["reason"] == "invalid_message"
    cases = [
        ({"type": "Nope"}, "type"),
        ({"type": "NewOrder", "cl_ord_id": "a", "instrument": "CEA25", "side": "up", "qty": 1, "price": 9250}, "side"),
        ({"type": "NewOrder", "cl_ord_id": "a", "instrument": "CEA25", "side": "buy", "qty": 1.0, "price": 9250}, "qty"),
        ({"type": "NewOrder", "cl_ord_id": "a", "instrument": "CEA25", "side": "buy", "qty": 1, "price": 92.5}, "price"),
        ({"type": "NewOrder", "cl_ord_id": "a", "instrument": "CEA25", "side": "buy", "price": 9250}, "qty"),
        ({"type": "NewOrder", "cl_ord_id": "a", "instrument": "CEA25", "side": "buy", "qty": 1}, "price"),
        ({"type": "NewOrder", "cl_ord_id": "a", "instrument": "CEA25", "side": "buy", "qty": 1, "price": None,
          "stp": None}, "stp"),
        ({"type": "NewOrder", "cl_ord_id": "x" * 33, "instrument": "CEA25", "side": "buy", "qty": 1, "price": 1}, "cl_ord_id"),
        ({"type": "CancelOrder", "cl_ord_id": "a"}, "orig_cl_ord_id"),
        ({"type": "Subscribe", "instruments": "CEA25"}, "instruments"),
    ]
    for msg, field in cases:
        r.send(msg)
        m = r.recv()
        assert m["type"] == "Error" and m["reason"] == "invalid_message", (msg, m)
        assert m["text"].startswith(field), (msg, m)
    # invalid messages used no cl_ord_id; huge and negative ints are judged by the order checks
    r.send({"type": "NewOrder", "cl_ord_id": "a", "instrument": "CEA25", "side": "buy", "qty": 2**64 - 1, "price": 9250})
    m = r.recv()
    assert m["type"] == "OrderRejected" and m["reason"] == "qty_out_of_range"
    r.send({"type": "NewOrder", "cl_ord_id": "b", "instrument": "CEA25", "side": "buy", "qty": 1, "price": -2**63,
            "extra": [1, 2]})
    assert r.recv()["reason"] == "invalid_price"
    r.send({"type": "QueryBalances"})
    assert r.recv()["type"] == "Balances"


@pytest.mark.parametrize("garbage", [
    (0).to_bytes(4, "big"),
    (65537).to_bytes(4, "big"),
    (2**32 - 1).to_bytes(4, "big"),
    (1).to_bytes(4, "big") + b"\xc1",
    enc([1, 2, 3]),
    enc({"no_type": 1}),
    enc({"type": 7}),
    enc({1: "x", "type": "QueryBalances"}),
    (3).to_bytes(4, "big") + b"\x82\xa4t",  # a truncated map inside a whole frame
    # a string the message defines that is not UTF-8: {"type": "QueryBalances", ...} with a bad type
    (8).to_bytes(4, "big") + b"\x81\xa4type\xa1\xff",
])
def test_framing_errors_close_only_that_connection(server, garbage):
    other = Raw(server.port)
    other.logon("M14")
    r = Raw(server.port)
    r.logon("M15")
    r.send(garbage)
    m = r.recv()
    assert m["type"] == "Error" and m["reason"] == "bad_frame", m
    assert r.closed()
    other.send({"type": "QueryBalances"})
    assert other.recv()["type"] == "Balances"
    other.s.close()


def test_invalid_utf8_inside_an_unknown_key_is_skipped_with_the_key(server):
    r = Raw(server.port)
    r.logon("M16")
    body = b"\x82\xa4type\xadQueryBalances\xa5extra\xa2\xff\xfe"  # {"type": ..., "extra": <not UTF-8>}
    r.send(len(body).to_bytes(4, "big") + body)
    assert r.recv()["type"] == "Balances"
    r.s.close()


def test_slow_consumer_is_disconnected_and_its_orders_cancelled(server):
    async def main():
        watch = await Client.connect("127.0.0.1", server.port)
        await watch.logon("M16", "M16-token")
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(("127.0.0.1", server.port))
        slow.sendall(enc({"type": "Logon", "member": "M16", "token": "M16-token", "cancel_on_disconnect": True}))
        slow.sendall(enc({"type": "NewOrder", "cl_ord_id": "slow1", "instrument": "CEA25", "side": "buy",
                          "qty": 1, "price": 9000}))
        assert (await watch.next_report())["type"] == "OrderAccepted"
        def flood():  # Balances replies (~400 bytes each) that are never read
            query = enc({"type": "QueryBalances"}) * 100
            try:
                for _ in range(500):
                    slow.sendall(query)
            except OSError:
                pass

        flooder = asyncio.get_running_loop().run_in_executor(None, flood)
        r = await watch.next_report()
        assert r["type"] == "OrderCancelled" and r["reason"] == "disconnect"
        assert server.exchange.stats.disconnects["slow_consumer"] >= 1
        slow.close()
        await flooder
        await watch.logout()
    run(main())
