"""Hypothesis throws garbage at a live server: it never crashes and other sessions keep trading."""

import socket

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from _fakes import ThreadServer, make_config


def enc(m):
    b = msgspec.msgpack.encode(m)
    return len(b).to_bytes(4, "big") + b


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ThreadServer(make_config(max_frame=4096, max_msgs_per_s=100_000), tmp_path_factory.mktemp("fuzz")) as s:
        yield s


def read_frames(sock, limit=0.05):
    sock.settimeout(limit)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (socket.timeout, ConnectionError):
        pass
    out = []
    while len(data) >= 4:
        n = int.from_bytes(data[:4], "big")
        out.append(msgspec.msgpack.decode(data[4:4 + n]))
        data = data[4 + n:]
    return out


scalars = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=10) | st.binary(max_size=10)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                      max_leaves=6)
fields = st.sampled_from(["cl_ord_id", "orig_cl_ord_id", "instrument", "side", "qty", "price", "tif", "stp", "member",
                          "token", "instruments", "depth", "amount", "ref", "asset", "resume_from", "heartbeat_s"])
message = st.builds(
    lambda t, f: {**f, "type": t},
    st.sampled_from(["NewOrder", "CancelOrder", "ReplaceOrder", "MassCancel", "QueryBalances", "Subscribe",
                     "Unsubscribe", "Logon", "Logout", "Heartbeat", "Halt", "Deposit", "Nope"]),
    st.dictionaries(fields, values, max_size=6),
)
chunk = st.one_of(
    st.binary(max_size=64),                                        # raw garbage
    message.map(enc),                                              # well framed, maybe invalid
    st.integers(0, 2**32 - 1).map(lambda n: n.to_bytes(4, "big")),  # huge or zero lengths
    message.map(lambda m: enc(m)[:-1]),                            # truncated frame
    st.builds(lambda v: enc(v), values),                           # a frame that may not be a map
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(logon=st.booleans(), chunks=st.lists(chunk, min_size=1, max_size=5))
def test_garbage_never_hurts_the_server_or_others(server, logon, chunks):
    s = socket.create_connection(("127.0.0.1", server.port))
    try:
        if logon:
            s.sendall(enc({"type": "Logon", "member": "M19", "token": "M19-token"}))
        for c in chunks:
            s.sendall(c)
        for frame in read_frames(s):
            assert frame["type"] in {"LogonAccepted", "LogonRejected", "Error", "OrderAccepted", "OrderRejected",
                                     "CancelRejected", "OrderCancelled", "MassCancelDone", "Balances",
                                     "BookSnapshot", "LogoutAccepted", "Fill", "OrderReplaced", "BookUpdate",
                                     "Trade", "Heartbeat"}, frame
    except ConnectionError:
        pass
    finally:
        s.close()


def test_other_sessions_still_trade_after_the_fuzzing(server):
    a = socket.create_connection(("127.0.0.1", server.port))
    b = socket.create_connection(("127.0.0.1", server.port))
    a.sendall(enc({"type": "Logon", "member": "M17", "token": "M17-token"}))
    b.sendall(enc({"type": "Logon", "member": "M18", "token": "M18-token"}))
    a.sendall(enc({"type": "NewOrder", "cl_ord_id": "f1", "instrument": "CEA22", "side": "sell", "qty": 4, "price": 9000}))
    assert [f["type"] for f in read_frames(a, 0.5)] == ["LogonAccepted", "OrderAccepted"]
    b.sendall(enc({"type": "NewOrder", "cl_ord_id": "f2", "instrument": "CEA22", "side": "buy", "qty": 4, "price": 9000}))
    assert [f["type"] for f in read_frames(b, 0.5)] == ["LogonAccepted", "OrderAccepted", "Fill"]
    server.call(server.exchange.engine.check)
    assert server.thread.is_alive()
    assert server.server.errors == []
