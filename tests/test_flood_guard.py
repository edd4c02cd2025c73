"""Flood guards (docs/protocol.md "Flood guards", docs/operations.md): a session flooding far
beyond its throttle is cut off and its member's logons refused for a while; a peer address that
keeps failing logons is blocked (never the member it guesses at); caps on connections held and on
connections not logged on; the logs of a flood stay a few lines. Sans-IO, except the caps and
one flood over real sockets."""

from __future__ import annotations

import contextlib
import socket
import struct
import time

import msgspec
import pytest

from engine import ConfigError, parse_config, DEMO_TOML
from gateway._exchange import TICK_PARTS, Exchange
from gateway._guard import LogLimiter, peer_key, power_of_ten
from gateway._session import State

from _fakes import ManualLedger, ThreadServer, decode_frames, enc, logged_lines, make_config


class Sink:
    def __init__(self):
        self.data = b""
        self.closed = False
        self.aborted = False

    def write(self, b):
        assert not self.closed
        self.data += b

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = self.aborted = True

    def replay_later(self):
        pass

    def frames(self):
        out = decode_frames(self.data)
        self.data = b""
        return out


def order(cl, price=9000, side="buy"):
    return enc({"type": "NewOrder", "cl_ord_id": cl, "instrument": "CEA25", "side": side, "qty": 1, "price": price})


def setup(**gateway):
    config = make_config(**gateway)
    ledger = ManualLedger(config)
    return Exchange(config, ledger, clock_ns=lambda: 42), ledger


def connect(ex, member, now=0.0, peer="", token=None, **logon):
    sink = Sink()
    s = ex.connect(sink, now, peer)
    assert s is not None
    ex.data_received(s, enc({"type": "Logon", "member": member, "token": token or f"{member}-token", **logon}), now)
    return s, sink


def run(ex, ledger, session, data, now):
    """Feed ``data`` as the connection would (FRAMES_PER_TURN at a time), then make all durable."""
    more = ex.data_received(session, data, now)
    while more:
        more = ex.data_received(session, b"", now)
    ledger.durable_seq = ledger.last_seq
    ex.on_durable(ledger.last_seq)


# -- throttle abuse ---------------------------------------------------------------------------

def test_a_burst_beyond_the_throttle_gets_throttled_rejects_and_the_session_stays():
    """The first throttled requests get the spec's OrderRejected `throttled` (up to
    throttle_abuse_factor × max_msgs_per_s of them in a burst): nothing changes there."""
    ex, ledger = setup(max_msgs_per_s=10, throttle_abuse_factor=5)
    s, sink = connect(ex, "M01")
    sink.frames()
    run(ex, ledger, s, b"".join(order(f"o{i}") for i in range(60)), 0.0)
    frames = sink.frames()
    assert [f["type"] for f in frames] == ["OrderAccepted"] * 10 + ["OrderRejected"] * 50
    assert {f["reason"] for f in frames[10:]} == {"throttled"}
    assert s.state is State.ACTIVE and not sink.closed
    assert ex.stats.throttled == 50


def test_a_session_flooding_far_beyond_its_throttle_is_cut_off_and_its_cancel_on_disconnect_applies():
    ex, ledger = setup(max_msgs_per_s=10, throttle_abuse_factor=5, throttle_cooldown_s=10.0)
    other, other_sink = connect(ex, "M01")  # the member's other session stays up
    s, sink = connect(ex, "M01", cancel_on_disconnect=True)
    run(ex, ledger, s, order("rest", price=9100), 0.0)
    sink.frames(), other_sink.frames()
    with logged_lines() as lines:
        run(ex, ledger, s, b"".join(order(f"o{i}") for i in range(200)), 0.5)
    frames = sink.frames()
    types = [f["type"] for f in frames]
    # the bucket (full again after 0.5 s), then 50 throttled rejects (the abuse bucket's
    # capacity), then its orders cancelled (cancel-on-disconnect), then the Error
    assert types[:10] == ["OrderAccepted"] * 10
    assert [(f["type"], f["reason"]) for f in frames[10:60]] == [("OrderRejected", "throttled")] * 50
    assert [(f["type"], f.get("reason")) for f in frames[60:]] == [("OrderCancelled", "disconnect")] * 11 + [
        ("Error", "not_authorized")]
    assert "throttled" in frames[-1]["text"] and "10 s" in frames[-1]["text"]
    assert sink.closed and s.state is State.CLOSING
    assert ledger.engine.resting("CEA25") == (0, 0)
    ex.connection_lost(s, "client_close", 0.6)
    assert ex.stats.disconnects["throttle_abuse"] == 1 and ex.stats.throttled == 50
    assert other.state is State.ACTIVE and not other_sink.closed
    # the requests after the cut were not run: their ids are still free for the member
    run(ex, ledger, other, order("o199"), 0.7)
    assert [f["type"] for f in other_sink.frames() if f.get("cl_ord_id") == "o199"] == ["OrderAccepted"]
    assert [line for line in lines if "throttle_abuse" in line] == [
        "event=throttle_abuse member=M01 session=2 peer=- max_msgs_per_s=10 throttled_burst=50 cooldown_s=10 "
        "disconnects=1"]
    with logged_lines() as lines:
        ex.connection_lost(s, "client_close", 0.6)  # (once only)
    assert lines == []


def test_the_member_of_a_session_cut_off_cannot_log_on_again_until_the_cooldown_ends():
    ex, ledger = setup(max_msgs_per_s=10, throttle_abuse_factor=2, throttle_cooldown_s=10.0)
    s, sink = connect(ex, "M02", now=100.0)
    run(ex, ledger, s, b"".join(order(f"o{i}") for i in range(100)), 100.0)
    assert sink.frames()[-1]["reason"] == "not_authorized"
    ex.connection_lost(s, "client_close", 100.0)
    again, again_sink = connect(ex, "M02", now=105.0)
    frames = again_sink.frames()
    assert [(f["type"], f["reason"]) for f in frames] == [("Error", "not_authorized")]
    assert "refused for another 5 s" in frames[0]["text"] and again_sink.closed
    ex.connection_lost(again, "client_close", 105.0)
    assert ex.stats.disconnects["logon_rejected"] == 1
    # the wrong token is still bad_credentials (the cooldown is no oracle for guessers)
    _, bad = connect(ex, "M02", now=106.0, token="nope")
    assert [f["type"] for f in bad.frames()] == ["LogonRejected"]
    # another member is not affected, and after the cooldown M02 is welcome again
    _, other = connect(ex, "M03", now=106.0)
    assert other.frames()[0]["type"] == "LogonAccepted"
    _, later = connect(ex, "M02", now=110.5)
    assert later.frames()[0]["type"] == "LogonAccepted"
    assert ex.cooldown == {}


def test_sending_steadily_under_twice_the_rate_is_throttled_but_never_cut_off_and_more_is():
    """The abuse bucket refills at max_msgs_per_s: a session may keep sending up to twice its
    rate (half of it throttled); faster, it runs dry and the session is cut off."""
    ex, ledger = setup(max_msgs_per_s=20, throttle_abuse_factor=3)
    s, sink = connect(ex, "M01")
    n = 0
    for step in range(200):  # 20 s at 36 requests/s
        now = step * 0.1
        run(ex, ledger, s, b"".join(order(f"a{n + i}") for i in range(4) if (step % 10) or i < 3), now)
        n += 4
    assert s.state is State.ACTIVE and ex.stats.throttled > 100
    fast, fast_sink = connect(ex, "M03")
    for step in range(100):  # 50 requests/s: 30/s throttled, 10/s more than refilled
        run(ex, ledger, fast, b"".join(order(f"b{step}-{i}") for i in range(5)), 30.0 + step * 0.1)
        if fast.state is not State.ACTIVE:
            break
    assert fast.state is State.CLOSING and fast_sink.frames()[-1]["reason"] == "not_authorized"
    assert 5.0 < step * 0.1 < 8.0  # 60 tokens at 10 a second


def test_throttle_abuse_factor_0_never_cuts_off():
    ex, ledger = setup(max_msgs_per_s=10, throttle_abuse_factor=0)
    s, sink = connect(ex, "M01")
    run(ex, ledger, s, b"".join(order(f"o{i}") for i in range(500)), 0.0)
    assert s.state is State.ACTIVE and ex.stats.throttled == 490


# -- logon failures -----------------------------------------------------------------------------

def test_a_peer_guessing_tokens_is_blocked_but_the_member_it_guesses_at_logs_on_from_elsewhere():
    ex, _ = setup(logon_failures_per_peer=3, logon_block_s=60.0)
    with logged_lines() as lines:
        for i in range(3):
            s, sink = connect(ex, "M01", now=1.0 + i, peer="203.0.113.9", token=f"guess{i}")
            assert [f["reason"] for f in sink.frames()] == ["bad_credentials"]
            ex.connection_lost(s, "client_close", 1.0 + i)
        for _ in range(15):  # blocked: closed at once, unread
            assert ex.connect(Sink(), 10.0, "203.0.113.9") is None
        m, msink = connect(ex, "M01", now=10.0, peer="198.51.100.7")
    assert msink.frames()[0]["type"] == "LogonAccepted" and m.state is State.ACTIVE
    assert ex.stats.disconnects["peer_blocked"] == 15
    assert lines[:5] == [
        "event=logon_rejected member=M01 reason=bad_credentials peer=203.0.113.9 rejected=1",
        "event=peer_blocked peer=203.0.113.9 failures=3 block_s=60",
        "event=connection_refused cause=peer_blocked peer=203.0.113.9 refused=1",
        "event=connection_refused cause=peer_blocked peer=203.0.113.9 refused=10",
        "event=logon member=M01 role=member session=4 next_seq=1 resume_from=none cancel_on_disconnect=False",
    ]
    # the block ends after logon_block_s, and the failures counted toward it start again
    assert ex.connect(Sink(), 62.9, "203.0.113.9") is None
    s, sink = connect(ex, "M01", now=63.1, peer="203.0.113.9")
    assert sink.frames()[0]["type"] == "LogonAccepted"


def test_a_connection_opened_before_its_peer_was_blocked_gets_no_more_guesses():
    ex, _ = setup(logon_failures_per_peer=2)
    early = Sink()
    pending = ex.connect(early, 0.0, "203.0.113.9")
    for i in range(2):
        connect(ex, "M01", peer="203.0.113.9", token=f"g{i}")
    ex.data_received(pending, enc({"type": "Logon", "member": "M01", "token": "M01-token"}), 0.5)
    assert early.aborted and early.frames() == [] and pending.state is not State.ACTIVE
    ex.connection_lost(pending, "client_close", 0.5)
    assert ex.stats.disconnects["peer_blocked"] == 1


def test_only_wrong_tokens_for_members_that_exist_count_toward_a_block():
    ex, _ = setup(logon_failures_per_peer=2, max_sessions_per_member=1)
    connect(ex, "M01", peer="192.0.2.1")
    for _ in range(5):  # a second session: already_logged_on, not a guess
        _, sink = connect(ex, "M01", peer="192.0.2.1")
        assert sink.frames()[0]["reason"] == "already_logged_on"
    for i in range(5):  # an unknown member's token can never be guessed right
        _, sink = connect(ex, f"NOPE{i}", peer="192.0.2.1", token="x")
        assert sink.frames()[0]["reason"] == "bad_credentials"
    assert ex.connect(Sink(), 0.0, "192.0.2.1") is not None


def test_failures_spread_wider_than_the_window_do_not_block():
    ex, _ = setup(logon_failures_per_peer=3, logon_block_s=10.0)
    for i in range(10):  # one every 6 s: never 3 within 10 s
        connect(ex, "M01", now=i * 6.0, peer="192.0.2.1", token="x")
    assert ex.connect(Sink(), 60.0, "192.0.2.1") is not None


def test_rejected_logons_are_logged_at_the_1st_10th_100th_of_a_peer_each_minute():
    ex, _ = setup(logon_failures_per_peer=0)  # no blocking: only the log limit
    with logged_lines() as lines:
        for i in range(120):
            s, _ = connect(ex, "NOPE", now=i * 0.1, peer="192.0.2.1", token="x")
            ex.connection_lost(s, "client_close", i * 0.1)
        connect(ex, "NOPE", now=5.0, peer="192.0.2.2", token="x")  # another peer: its own count
        connect(ex, "NOPE", now=70.0, peer="192.0.2.1", token="x")  # a new minute
    assert [line.rsplit(" ", 2)[1:] for line in lines] == [
        ["peer=192.0.2.1", "rejected=1"], ["peer=192.0.2.1", "rejected=10"], ["peer=192.0.2.1", "rejected=100"],
        ["peer=192.0.2.2", "rejected=1"], ["peer=192.0.2.1", "rejected=1"]]
    assert ex.stats.disconnects["logon_rejected"] == 120


def test_logon_timeouts_of_one_peer_are_logged_a_few_times_a_minute():
    ex, _ = setup(max_pending_per_peer=0)
    with logged_lines() as lines:
        for _ in range(30):
            ex.connect(Sink(), 0.0, "192.0.2.1")
        for _ in range(TICK_PARTS):
            ex.tick(10.0)
    assert [line.split(" ", 2)[2] for line in lines] == ["peer=192.0.2.1 timeouts=1", "peer=192.0.2.1 timeouts=10"]


# -- connection caps ------------------------------------------------------------------------------

def test_caps_on_pending_logons_per_peer_and_in_all_and_on_connections():
    ex, _ = setup(max_connections=6, max_pending_logons=4, max_pending_per_peer=2)
    a1, a2 = ex.connect(Sink(), 0.0, "192.0.2.1"), ex.connect(Sink(), 0.0, "192.0.2.1")
    assert ex.connect(Sink(), 0.0, "192.0.2.1") is None  # a third from the same peer
    b1, b2 = ex.connect(Sink(), 0.0, "192.0.2.2"), ex.connect(Sink(), 0.0, "192.0.2.2")
    assert ex.connect(Sink(), 0.0, "192.0.2.3") is None  # 4 pending in all
    assert dict(ex.stats.disconnects) == {"peer_pending_limit": 1, "too_many_pending_logons": 1}
    # a logon frees its pending place (and its peer's)
    ex.data_received(a1, enc({"type": "Logon", "member": "M01", "token": "M01-token"}), 0.0)
    assert a1.state is State.ACTIVE and ex.connect(Sink(), 0.0, "192.0.2.1") is not None
    # so does a connection that ends
    ex.connection_lost(b1, "client_close", 0.0)
    m, _ = connect(ex, "M02", peer="192.0.2.3")
    assert m.state is State.ACTIVE
    assert ex.connect(Sink(), 0.0, "192.0.2.4") is not None
    # 6 connections held: the next is refused whoever it is
    assert len(ex.sessions) == 6 and ex.connect(Sink(), 0.0, "192.0.2.9") is None
    assert ex.stats.disconnects["too_many_connections"] == 1
    assert ex.guard.pending == 4 and len(ex.unlogged) == 4


def test_a_rejected_logon_holds_its_pending_place_until_the_connection_is_gone():
    ex, _ = setup(max_pending_logons=1)
    s, sink = connect(ex, "M01", token="x")
    assert sink.closed and ex.connect(Sink(), 0.0, "") is None
    ex.connection_lost(s, "client_close", 0.0)
    assert ex.connect(Sink(), 0.0, "") is not None


def test_forgotten_peers_are_swept():
    ex, _ = setup(logon_failures_per_peer=5, logon_block_s=10.0)
    for i in range(50):
        s, _ = connect(ex, "M01", now=0.0, peer=f"192.0.2.{i}", token="x")
        ex.connection_lost(s, "client_close", 0.0)
    assert len(ex.guard.peers) == 50
    for _ in range(TICK_PARTS):
        ex.tick(70.0)
    assert ex.guard.peers == {} and ex.log_limit.counts == {}


def test_peer_keys():
    assert peer_key(("192.0.2.1", 5555)) == "192.0.2.1"
    assert peer_key(("2001:db8:1:2:aaaa::1", 5555, 0, 0)) == "2001:db8:1:2::/64"
    assert peer_key(("2001:db8:1:2:bbbb::7%eth0", 1, 0, 0)) == "2001:db8:1:2::/64"
    assert peer_key(("::ffff:192.0.2.1", 5555, 0, 0)) == "192.0.2.1"
    assert peer_key(None) == "" and peer_key("/tmp/sock") == ""
    assert [n for n in range(1, 2000) if power_of_ten(n)] == [1, 10, 100, 1000]
    lim = LogLimiter(60.0)
    assert [lim.hit("k", 0.0) for _ in range(10)] == [1] + [0] * 8 + [10]
    assert lim.hit("k", 60.0) == 1


@pytest.mark.parametrize("setting, value", [
    ("throttle_abuse_factor", -1), ("max_pending_per_peer", -1), ("logon_failures_per_peer", -1),
    ("max_connections", 0), ("max_pending_logons", 0), ("max_pending_logons", 20_000),
    ("throttle_cooldown_s", -1.0), ("logon_block_s", float("nan")), ("logon_block_s", 1e9),
])
def test_flood_guard_settings_are_checked(setting, value):
    text = DEMO_TOML.replace("[gateway]\n", f"[gateway]\n{setting} = {value}\n")
    with pytest.raises(ConfigError, match=f"gateway.{setting}"):
        parse_config(text)


def test_the_caps_are_lowered_to_fit_the_open_file_limit(monkeypatch):
    import resource

    from gateway._server import FD_RESERVE, fd_budget

    limits = {"soft": 1024, "hard": 4096}

    def setrlimit(_, value):
        if value[0] > limits["hard"]:
            raise ValueError("not allowed")
        limits["soft"] = value[0]

    monkeypatch.setattr(resource, "getrlimit", lambda _: (limits["soft"], limits["hard"]))
    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    # raised toward the hard limit when that is enough
    assert fd_budget(2_000, 1_000) == (2_000, 1_000, 2_000 + FD_RESERVE, False)
    # else the caps fit what there is
    assert fd_budget(10_000, 1_000) == (4096 - FD_RESERVE, 1_000, 4096, True)
    limits.update(soft=1024, hard=1024)
    assert fd_budget(10_000, 1_000) == (1024 - FD_RESERVE, (1024 - FD_RESERVE) // 2, 1024, True)


# -- real sockets ---------------------------------------------------------------------------------

def _frame(m):
    return enc(m)


def _recv_frames(sock, timeout=5.0):
    """Every frame until the server closes the connection."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
    except ConnectionResetError:
        pass
    out = []
    while len(data) >= 4:
        n = struct.unpack(">I", data[:4])[0]
        out.append(msgspec.msgpack.decode(data[4:4 + n]))
        data = data[4 + n:]
    return out


def test_connections_beyond_the_pending_cap_are_closed_at_once_and_a_member_gets_in_once_there_is_room(tmp_path):
    with ThreadServer(make_config(max_pending_logons=5, max_pending_per_peer=0), tmp_path) as srv:
        idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(5)]
        deadline = time.monotonic() + 5
        while srv.call(lambda: len(srv.exchange.unlogged)) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        extra = socket.create_connection(("127.0.0.1", srv.port))
        with contextlib.suppress(OSError):  # the reset may come first
            extra.sendall(_frame({"type": "Logon", "member": "M01", "token": "M01-token"}))
        t0 = time.monotonic()
        assert _recv_frames(extra) == []  # closed unread, no answer
        assert time.monotonic() - t0 < 2  # at once, not at the logon timeout
        extra.close()
        idle.pop().close()
        deadline = time.monotonic() + 5
        while srv.call(lambda: len(srv.exchange.unlogged)) > 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        member = socket.create_connection(("127.0.0.1", srv.port))
        member.sendall(_frame({"type": "Logon", "member": "M01", "token": "M01-token"}) + _frame({"type": "Logout"}))
        assert [f["type"] for f in _recv_frames(member)] == ["LogonAccepted", "LogoutAccepted"]
        member.close()
        for s in idle:
            s.close()
        assert srv.call(lambda: srv.exchange.stats.disconnects["too_many_pending_logons"]) == 1


def test_a_flooding_session_is_cut_off_over_tcp_while_another_member_trades_on(tmp_path):
    with ThreadServer(make_config(max_msgs_per_s=100, throttle_abuse_factor=5), tmp_path) as srv:
        victim = socket.create_connection(("127.0.0.1", srv.port))
        victim.sendall(_frame({"type": "Logon", "member": "M02", "token": "M02-token"}))
        flood = socket.create_connection(("127.0.0.1", srv.port))
        flood.sendall(_frame({"type": "Logon", "member": "M09", "token": "M09-token"}))
        # (not much more than it takes: unread bytes would make the server's close a reset)
        flood.sendall(b"".join(order(f"f{i}", price=9000) for i in range(800)))
        frames = _recv_frames(flood)
        types = [f["type"] for f in frames]
        assert types[0] == "LogonAccepted" and frames[-1]["type"] == "Error"
        assert frames[-1]["reason"] == "not_authorized"
        rejects = [f for f in frames if f["type"] == "OrderRejected"]
        assert 500 <= len(rejects) < 700 and {f["reason"] for f in rejects} == {"throttled"}
        flood.close()
        again = socket.create_connection(("127.0.0.1", srv.port))
        again.sendall(_frame({"type": "Logon", "member": "M09", "token": "M09-token"}))
        assert [(f["type"], f["reason"]) for f in _recv_frames(again)] == [("Error", "not_authorized")]
        again.close()
        victim.sendall(order("v1") + _frame({"type": "Logout"}))
        assert [f["type"] for f in _recv_frames(victim)] == ["LogonAccepted", "OrderAccepted", "LogoutAccepted"]
        victim.close()
        assert srv.call(lambda: srv.exchange.stats.disconnects["throttle_abuse"]) == 1
