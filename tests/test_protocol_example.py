"""The worked example in docs/protocol.md, run as written against a real server.

Outside firms code against that page, so its example must stay true: every message a member
receives there is the one the server sends, in that connection's order, with the page's values
(`ts` only has to follow the page's pattern: equal where the page shows equal stamps).
"""

import json
import re

import msgspec

from _fakes import REPO, ThreadServer, make_config
from test_session_errors import Raw  # a bare socket speaking frames

EXAMPLE = (REPO / "docs" / "protocol.md").read_text().split("## Worked example", 1)[1]
FENCES = re.findall(r"```\n(.*?)```", EXAMPLE, re.S)
HEX = re.compile(r"^[0-9a-f]{2}$")
LINE = re.compile(r"^(M\d\d) (→|←) (\{.*)$")


def _messages():
    """(member, direction, message) for each message line of the example's transcript."""
    out = []
    for line in FENCES[1].splitlines():
        m = LINE.match(line)
        if m:
            message, _ = json.JSONDecoder().raw_decode(m.group(3))  # text after the JSON is a note
            out.append((m.group(1), m.group(2), message))
    return out


def test_the_first_frame_is_byte_for_byte_the_logon_shown():
    shown = bytes(int(t, 16) for line in FENCES[0].splitlines()
                  for t in _leading_hex(line.split()))
    logon = _messages()[0][2]
    body = msgspec.msgpack.encode(logon)
    assert shown == len(body).to_bytes(4, "big") + body


def _leading_hex(tokens):
    for t in tokens:
        if not HEX.match(t):
            return
        yield t


def test_the_worked_example_runs_as_written(tmp_path):
    messages = _messages()
    assert len(messages) > 20
    stamps = {}  # the page's ts -> the server's
    with ThreadServer(make_config(), tmp_path / "data") as server:
        peers = {}
        for member, direction, message in messages:
            if direction == "→":
                if member not in peers:
                    peers[member] = Raw(server.port)
                peers[member].send(message)
                continue
            got = peers[member].recv()
            assert got is not None, f"{member} expected {message}, the connection closed"
            if "ts" in message:
                assert isinstance(got.get("ts"), int)
                assert stamps.setdefault(message["ts"], got["ts"]) == got["ts"], (message, got)
                got = dict(got, ts=message["ts"])
            assert got == message
        assert peers["M01"].recv() is None  # after LogoutAccepted the server closes
        # the page's stamps are distinct where the server's are, and equal where they are equal
        assert len(set(stamps.values())) == len(stamps)
        for peer in peers.values():
            peer.s.close()


def test_the_resume_note_after_the_example_holds(tmp_path):
    """The page's note: had M01 disconnected before the cancel and logged on again with
    resume_from 1, it would first have received its Fill (seq 2), identical to the one above,
    and then live reports from seq 3."""
    assert '`"resume_from": 1`, it would first have received its `Fill` (seq 2)' in " ".join(EXAMPLE.split())
    messages = _messages()
    fill = next(m for member, d, m in messages if member == "M01" and d == "←" and m["type"] == "Fill")
    with ThreadServer(make_config(), tmp_path / "data") as server:
        peers = {}
        for member, direction, message in messages:
            if message["type"] == "CancelOrder":
                break  # M01 "disconnected before the cancel"
            if direction == "→":
                peers.setdefault(member, Raw(server.port)).send(message)
            else:
                received = peers[member].recv()
                if message["type"] == "Fill" and member == "M01":
                    first_fill = received
        peers["M01"].s.close()
        again = Raw(server.port)
        again.send({"type": "Logon", "member": "M01", "token": "M01-token", "resume_from": 1})
        accepted = again.recv()
        assert accepted["type"] == "LogonAccepted" and accepted["next_seq"] == 3
        replayed = again.recv()
        assert replayed == first_fill and dict(replayed, ts=fill["ts"]) == fill
        again.send({"type": "CancelOrder", "cl_ord_id": "a-2", "orig_cl_ord_id": "a-1"})
        live = again.recv()
        assert live["type"] == "OrderCancelled" and live["seq"] == 3
        for peer in (again, peers["M02"]):
            peer.s.close()
