"""The wire: session messages, framing and the one typed decoder for client frames.

Every frame is a 4-byte big-endian length and a MessagePack map. Client frames decode straight
into the engine's command Structs or the session Structs below through one reused typed decoder
over their tagged union. What went wrong decides the answer (protocol.md, "Transport and
framing"): a length out of range, bytes that are not MessagePack, not a map, or a map without a
string ``type`` are a ``FrameError`` (bad_frame, then close); a well-framed map of an unknown
type or with wrong field types is a ``MessageError`` (invalid_message, the session stays).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta

from engine import (
    CancelOrder, CloseMarket, Deposit, EndOfDay, Halt, MassCancel, NewOrder, OpenMarket,
    QueryBalances, ReinstateMember, ReplaceOrder, Resume, SuspendMember, Withdraw,
)

__all__ = [
    "Logon", "Logout", "Heartbeat", "Subscribe", "Unsubscribe",
    "LogonAccepted", "LogonRejected", "LogoutAccepted", "Error",
    "ClientMessage",
    "FrameError", "MessageError", "FrameBuffer", "decode_client", "decode_server", "encode",
    "frame", "HEADER",
]

HEADER = 4


class _Wire(msgspec.Struct, tag_field="type", tag=True, gc=False):
    """Base of the gateway's own session messages; the tag is the class name."""


class Logon(_Wire):
    member: str
    token: str
    resume_from: int | None = None
    cancel_on_disconnect: bool = False
    heartbeat_s: Annotated[int, Meta(ge=1, le=300)] = 10


class Logout(_Wire):
    pass


class Heartbeat(_Wire):
    pass


class Subscribe(_Wire):
    instruments: list[str]
    depth: Annotated[int, Meta(ge=0)] = 10


class Unsubscribe(_Wire):
    instruments: list[str]


class LogonAccepted(_Wire):
    member: str
    role: Literal["member", "operator"]
    next_seq: int
    heartbeat_s: int
    trading_day: str


class LogonRejected(_Wire):
    reason: Literal["bad_credentials", "already_logged_on", "invalid_resume"]
    text: str


class LogoutAccepted(_Wire):
    pass


class Error(_Wire):
    reason: Literal["bad_frame", "invalid_message", "not_logged_on", "not_authorized"]
    text: str


ClientMessage = Union[
    NewOrder, CancelOrder, ReplaceOrder, MassCancel, QueryBalances,
    Halt, Resume, OpenMarket, CloseMarket, EndOfDay, SuspendMember, ReinstateMember, Deposit,
    Withdraw,
    Logon, Logout, Heartbeat, Subscribe, Unsubscribe,
]


class FrameError(Exception):
    """The peer broke the framing: answer bad_frame and close the connection."""


class MessageError(Exception):
    """A well-framed message that is not valid: answer invalid_message, keep the session."""

    def __init__(self, text: str, msg_type: str = "") -> None:
        super().__init__(text)
        self.msg_type = msg_type


_decoder = msgspec.msgpack.Decoder(ClientMessage)
_any = msgspec.msgpack.Decoder()
encode = msgspec.msgpack.Encoder().encode


def frame(body: bytes) -> bytes:
    """Prefix a MessagePack body with its 4-byte big-endian length."""
    return len(body).to_bytes(4, "big") + body


def _describe(exc: msgspec.ValidationError) -> str:
    """msgspec says "Expected `int`, got `float` - at `$.qty`"; lead with the field."""
    message = str(exc)
    what, sep, where = message.rpartition(" - at `")
    if sep:
        return f"{where.rstrip('`').removeprefix('$.')}: {what}"
    if message.startswith("Object missing required field"):
        field = message.rpartition("`")[0].rpartition("`")[2]
        return f"{field}: missing required field"
    return message


def decode_client(body: bytes):
    """Decode one client frame body into a command or session Struct."""
    try:
        return _decoder.decode(body)
    except msgspec.ValidationError as exc:
        # Only the error path pays for a second, untyped decode to tell the two kinds apart.
        try:
            raw = _any.decode(body)
        except (msgspec.DecodeError, ValueError, RecursionError):
            raise FrameError("not a valid MessagePack map") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("type"), str):
            raise FrameError("a frame must be a map with a string `type`") from None
        if any(not isinstance(k, str) for k in raw):
            raise FrameError("map keys must be strings") from None
        if str(exc).startswith("Invalid value") and str(exc).endswith("`$.type`"):
            raise MessageError(f"type: unknown message type {raw['type']!r}", raw["type"]) from None
        raise MessageError(_describe(exc), raw["type"]) from None
    except (msgspec.DecodeError, ValueError, RecursionError):  # invalid UTF-8 is a ValueError
        raise FrameError("not a valid MessagePack map") from None


def decode_server(body: bytes) -> dict:
    """Client side: server frames as plain dicts (reports, market data and replies alike)."""
    msg = _any.decode(body)
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise FrameError("server frame is not a map with a string `type`")
    return msg


class FrameBuffer:
    """Accumulates bytes and yields frame bodies; judges a length from its 4 header bytes alone."""

    __slots__ = ("max_frame", "_buf")

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list:
        """Return the complete frame bodies now available, then a FrameError if a length is bad.

        Frames before a bad header are still returned (they were well framed); nothing after it.
        """
        buf = self._buf
        buf += data
        out = []
        pos = 0
        n = len(buf)
        max_frame = self.max_frame
        while n - pos >= HEADER:
            length = int.from_bytes(buf[pos:pos + 4], "big")
            if length < 1 or length > max_frame:
                del buf[:]
                out.append(FrameError(f"frame length {length} outside 1..{max_frame}"))
                return out
            end = pos + HEADER + length
            if end > n:
                break
            out.append(bytes(buf[pos + HEADER:end]))
            pos = end
        if pos:
            del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)
