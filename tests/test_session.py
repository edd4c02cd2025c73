"""The sans-IO core without sockets: framing, decoding, the transition table, the throttle."""

import re

import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from engine import NewOrder
from gateway._session import TABLE, Event, ProtocolStateError, Session, State, TokenBucket
from gateway._wire import FrameBuffer, FrameError, Logon, MessageError, decode_client


def enc(m):
    b = msgspec.msgpack.encode(m)
    return len(b).to_bytes(4, "big") + b


LOGON = {"type": "Logon", "member": "M01", "token": "t"}
ORDER = {"type": "NewOrder", "cl_ord_id": "a", "instrument": "X", "side": "buy", "qty": 1, "price": 5}


def test_frames_split_anywhere_reassemble():
    data = enc(LOGON) + enc(ORDER) + enc({"type": "Heartbeat"})
    for cut in range(len(data) + 1):
        fb = FrameBuffer(65536)
        bodies = fb.feed(data[:cut]) + fb.feed(data[cut:])
        assert [decode_client(b) for b in bodies][1] == NewOrder("a", "X", "buy", 1, 5)
        assert len(bodies) == 3 and fb.pending == 0


def test_length_judged_from_the_header_alone():
    fb = FrameBuffer(100)
    out = fb.feed(enc({"type": "Heartbeat"}) + (101).to_bytes(4, "big"))
    assert len(out) == 2 and isinstance(out[1], FrameError)
    assert isinstance(FrameBuffer(100).feed((0).to_bytes(4, "big"))[0], FrameError)
    assert FrameBuffer(100).feed((100).to_bytes(4, "big")) == []  # waits for the body


def test_logon_first_then_messages_wait_for_the_decision():
    s = Session(1, 65536, 0.0)
    acts = s.receive_data(enc(LOGON) + enc(ORDER), 0.0)
    assert [a for a, _ in acts] == ["logon"] and isinstance(acts[0][1], Logon)
    s.accept()
    acts = s.receive_data(b"", 0.0)
    assert [a for a, _ in acts] == ["message"] and s.state is State.ACTIVE


def test_not_logged_on_and_malformed_logon_close():
    s = Session(1, 65536, 0.0)
    assert s.receive_data(enc(ORDER) + enc(LOGON), 0.0) == [("close", ("not_logged_on", "the first message must be Logon", ""))]
    assert s.state is State.CLOSING and s.receive_data(enc(LOGON), 0.0) == []
    s = Session(1, 65536, 0.0)
    [(action, (reason, text, _))] = s.receive_data(enc({"type": "Logon", "member": "M01"}), 0.0)
    assert (action, reason) == ("close", "invalid_message") and text.startswith("token")


def test_active_session_errors():
    s = Session(1, 65536, 0.0)
    s.receive_data(enc(LOGON), 0.0)
    s.accept()
    acts = s.receive_data(enc(LOGON) + enc({**ORDER, "qty": 1.5}) + enc({"type": "Logout"}) + enc(ORDER), 0.0)
    assert [a for a, _ in acts] == ["error", "error", "logout"]
    assert acts[0][1][:2] == ("invalid_message", "already logged on")
    assert acts[1][1][1].startswith("qty") and acts[1][1][2] == "NewOrder"
    assert s.state is State.CLOSING
    assert s.closed("logout") and not s.closed("client_close") and s.cause == "logout"


def test_table_is_total_for_peer_events_and_strict_for_ours():
    peer = (Event.LOGON, Event.LOGON_INVALID, Event.MESSAGE, Event.LOGOUT, Event.INVALID, Event.BAD_FRAME,
            Event.CLOSE)
    for state in State:
        for event in peer:
            assert (state, event) in TABLE
    s = Session(1, 65536, 0.0)
    s.receive_data(enc(LOGON), 0.0)
    s.accept()
    with pytest.raises(ProtocolStateError, match="ACCEPTED.*ACTIVE"):
        s.accept()


def test_token_bucket():
    b = TokenBucket(10, 0.0)
    assert sum(b.take(0.0) for _ in range(20)) == 10
    assert b.take(0.05) is False and b.take(0.1) is True
    assert sum(b.take(100.0) for _ in range(20)) == 10  # capacity caps the refill


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_decoder_only_raises_frame_or_message_errors(body):
    try:
        decode_client(body)
    except (FrameError, MessageError):
        pass


values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)
types = st.sampled_from(["Logon", "NewOrder", "CancelOrder", "ReplaceOrder", "MassCancel", "Subscribe", "Halt",
                         "Deposit", "Heartbeat", "Nope", ""])


@settings(max_examples=400, deadline=None)
@given(types, st.dictionaries(st.sampled_from(["cl_ord_id", "instrument", "side", "qty", "price", "tif", "member",
                                               "token", "instruments", "amount", "ref", "asset"]), values))
def test_well_framed_maps_never_give_bad_frame(typ, fields):
    try:
        decode_client(msgspec.msgpack.encode({**fields, "type": typ}))
    except MessageError as exc:
        assert re.split(r"[:\[.]", str(exc))[0] in {"type", *fields} or "missing" in str(exc)
    except FrameError:
        pytest.fail("a map with a string type is well framed")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=8))
def test_session_survives_any_byte_stream(chunks):
    s = Session(1, 1024, 0.0)
    for chunk in chunks:
        for action, value in s.receive_data(chunk, 0.0):
            assert action in ("logon", "close", "error", "message", "logout")
            if action == "logon":
                s.accept()
