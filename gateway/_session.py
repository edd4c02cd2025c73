"""The session life cycle as a transition table (h11 style): bytes in, actions out.

A ``Session`` knows nothing of sockets or the engine. ``receive_data`` frames and decodes the
peer's bytes and runs each result through ``TABLE``; the result is a list of ``(action, value)``
pairs for the exchange core to carry out: ``"logon"`` (a Logon to check), ``"message"`` (a
command or session message of a logged-on session), ``"logout"``, ``"error"`` (send an Error,
keep the session) and ``"close"`` (send an Error, then close). The exchange reports its logon
decision back with ``accept`` or ``reject``.
"""

from __future__ import annotations

from collections import deque
from enum import Enum

from ._wire import FrameBuffer, FrameError, Logon, Logout, MessageError, decode_client

__all__ = ["State", "Event", "TABLE", "Session", "TokenBucket", "ProtocolStateError", "table_markdown"]


class State(Enum):
    AWAIT_LOGON = "await_logon"
    ACTIVE = "active"
    CLOSING = "closing"
    CLOSED = "closed"


class Event(Enum):
    LOGON = "logon"                  # a well-formed Logon
    LOGON_INVALID = "logon_invalid"  # a malformed Logon
    MESSAGE = "message"              # any other well-formed message
    LOGOUT = "logout"
    INVALID = "invalid"              # a well-framed but invalid message (not a Logon)
    BAD_FRAME = "bad_frame"
    ACCEPTED = "accepted"            # the exchange accepted the Logon
    REJECTED = "rejected"            # the exchange rejected the Logon
    CLOSE = "close"                  # the connection ended (any cause)
    GOODBYE = "goodbye"              # the server closes after flushing (timeout, logout, shutdown)


class ProtocolStateError(RuntimeError):
    """Our own misuse of the table (an event the state does not allow): a bug, fail loudly."""


S, E = State, Event
# (state, event) -> (next state, action, Error reason or None)
TABLE: dict[tuple[State, Event], tuple[State, str, str | None]] = {
    (S.AWAIT_LOGON, E.LOGON): (S.AWAIT_LOGON, "logon", None),
    (S.AWAIT_LOGON, E.LOGON_INVALID): (S.CLOSING, "close", "invalid_message"),
    (S.AWAIT_LOGON, E.MESSAGE): (S.CLOSING, "close", "not_logged_on"),
    (S.AWAIT_LOGON, E.LOGOUT): (S.CLOSING, "close", "not_logged_on"),
    (S.AWAIT_LOGON, E.INVALID): (S.CLOSING, "close", "not_logged_on"),
    (S.AWAIT_LOGON, E.BAD_FRAME): (S.CLOSING, "close", "bad_frame"),
    (S.AWAIT_LOGON, E.ACCEPTED): (S.ACTIVE, "none", None),
    (S.AWAIT_LOGON, E.REJECTED): (S.CLOSING, "none", None),
    (S.ACTIVE, E.LOGON): (S.ACTIVE, "error", "invalid_message"),
    (S.ACTIVE, E.LOGON_INVALID): (S.ACTIVE, "error", "invalid_message"),
    (S.ACTIVE, E.MESSAGE): (S.ACTIVE, "message", None),
    (S.ACTIVE, E.LOGOUT): (S.CLOSING, "logout", None),
    (S.ACTIVE, E.INVALID): (S.ACTIVE, "error", "invalid_message"),
    (S.ACTIVE, E.BAD_FRAME): (S.CLOSING, "close", "bad_frame"),
}
for _state in State:
    TABLE[(_state, E.CLOSE)] = (S.CLOSED, "none", None)
    TABLE[(_state, E.GOODBYE)] = (S.CLOSED if _state is S.CLOSED else S.CLOSING, "none", None)
for _event in (E.LOGON, E.LOGON_INVALID, E.MESSAGE, E.LOGOUT, E.INVALID, E.BAD_FRAME):
    # After a close decision nothing more the peer sends is read.
    TABLE[(S.CLOSING, _event)] = (S.CLOSING, "ignore", None)
    TABLE[(S.CLOSED, _event)] = (S.CLOSED, "ignore", None)
_ACTIVE_MESSAGE = TABLE[(S.ACTIVE, E.MESSAGE)][1:]


def table_markdown() -> str:
    """The transition table as a Markdown table (docs/protocol.md is drawn from it)."""
    rows = ["| state | event | next state | action |", "|---|---|---|---|"]
    for (state, event), (nxt, action, reason) in TABLE.items():
        if action == "ignore" or state is S.CLOSED:
            continue
        what = action if reason is None else f"{action} (`{reason}`)"
        rows.append(f"| {state.value} | {event.value} | {nxt.value} | {what} |")
    return "\n".join(rows)


class TokenBucket:
    """Rate ``rate`` per second and capacity ``capacity`` (default: the rate); starts full;
    ``take`` says whether a message may pass."""

    __slots__ = ("rate", "tokens", "stamp", "capacity")

    def __init__(self, rate: float, now: float, capacity: float | None = None) -> None:
        self.rate = rate
        self.capacity = rate if capacity is None else capacity
        self.tokens = float(self.capacity)
        self.stamp = now

    def take(self, now: float) -> bool:
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.capacity:
            tokens = self.capacity
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False


def _unbounded() -> int:
    """A sink that cannot say what it buffers (an in-memory one in tests) is never held back."""
    return -(1 << 60)


class Session:
    """One connection's protocol state: framing, decoding and the transition table."""

    __slots__ = (
        "state", "frames", "sid", "member", "role", "cancel_on_disconnect", "heartbeat_s",
        "bucket", "last_rx", "last_tx", "opened", "subscriptions", "min_seq", "entered_orders",
        "cause", "sink", "pending", "replay_after", "goodbye", "md_since", "held",
        "held_bytes", "refused", "replay_mark", "md_depth", "stale", "overflowed", "outbuf", "room",
        "resyncs", "peer", "abuse",
    )

    def __init__(self, sid: int, max_frame: int, now: float) -> None:
        self.state = State.AWAIT_LOGON
        self.frames = FrameBuffer(max_frame)
        self.sid = sid
        self.member = ""
        self.role = ""
        self.cancel_on_disconnect = False
        self.heartbeat_s = 10
        self.bucket: TokenBucket | None = None
        self.opened = now
        self.last_rx = now
        self.last_tx = now
        self.subscriptions: set[str] = set()
        self.md_since: dict[str, int] = {}  # journal seq at subscribing: older market data is in the snapshot
        self.md_depth: dict[str, int] = {}  # the depth subscribed, for a resync's snapshot
        # instruments whose market data stopped because the connection was near its bound: a
        # fresh BookSnapshot once it has drained (Exchange.resync)
        self.stale: set[str] = set()
        self.resyncs = 0          # times its market data went stale (logged at 1, 10, 100, ...)
        self.overflowed = False   # its live reports went over the bound: they come by replay
        self.outbuf = _unbounded  # the sink's bytes not yet sent (set by Exchange.connect)
        self.room = 0             # bytes it may still be given in this release round
        self.min_seq = 0          # reports with a lower seq are not sent live (no resume_from)
        self.replay_after: int | None = None  # resuming: reports after this seq still come from the journal
        self.replay_mark = None  # where the last replay step stopped reading (Ledger.report_step)
        self.entered_orders = False
        self.refused = 0  # requests answered not_authorized (logged at 1, 10, 100, ...)
        self.peer = ""  # the peer address it counts under (gateway/_guard.py); "" unknown
        # throttled requests draw on this second bucket (throttle_abuse_factor); empty: cut off
        self.abuse: TokenBucket | None = None
        self.goodbye = False      # logged out or shutting down: LogoutAccepted once the resume replay is done
        # replies released while the resume replay runs, each with the member's last report seq
        # before it: they go out once the replay has passed that report
        self.held: list[tuple[int, bytes]] = []
        self.held_bytes = 0  # bounded by max_outbound_bytes, like what the transport buffers
        self.cause = ""           # why the connection ended
        self.sink = None          # the transport side (set by the server)
        self.pending: deque = deque()

    def hold(self, after_seq: int, data: bytes) -> int:
        """Keep a reply until the resume replay has sent the member's report ``after_seq`` (the
        last one before the reply); returns the bytes now held."""
        self.held.append((after_seq, data))
        self.held_bytes += len(data)
        return self.held_bytes

    def take_held(self, through: int | None = None) -> list[bytes]:
        """The held replies whose earlier reports are out by seq ``through`` (all if None)."""
        held = self.held
        n = len(held) if through is None else next((i for i, (s, _) in enumerate(held) if s > through), len(held))
        taken = [data for _, data in held[:n]]
        del held[:n]
        self.held_bytes -= sum(map(len, taken))
        return taken

    def handle(self, event: Event) -> tuple[str, str | None]:
        if event is E.MESSAGE and self.state is S.ACTIVE:  # the hot path, same table entry
            return _ACTIVE_MESSAGE
        try:
            next_state, action, reason = TABLE[(self.state, event)]
        except KeyError:
            raise ProtocolStateError(f"event {event.name} is not allowed in state {self.state.name}") from None
        self.state = next_state
        return action, reason

    def receive_data(self, data: bytes, now: float, limit: int = 1 << 62) -> list[tuple[str, object]]:
        """Frame ``data``; decode at most ``limit`` of the frames waiting and return the actions
        the table chose, in order. Frames beyond ``limit`` wait in ``pending`` for a later call.

        A ``"logon"`` action is always last: later frames wait in ``pending`` until the exchange
        has decided (``accept``/``reject``) and calls ``receive_data(b"", now)`` again.
        """
        if data:
            self.last_rx = now
            self.pending.extend(self.frames.feed(data))
        out: list[tuple[str, object]] = []
        pending = self.pending
        while pending and len(out) < limit and self.state is not State.CLOSING and self.state is not State.CLOSED:
            body = pending.popleft()
            msg_type = ""
            if isinstance(body, FrameError):
                event, value = E.BAD_FRAME, str(body)
            else:
                try:
                    msg = decode_client(body)
                except FrameError as exc:
                    event, value = E.BAD_FRAME, str(exc)
                except MessageError as exc:
                    event = E.LOGON_INVALID if exc.msg_type == "Logon" else E.INVALID
                    value = str(exc)
                    msg_type = exc.msg_type
                else:
                    cls = type(msg)
                    event = E.LOGON if cls is Logon else E.LOGOUT if cls is Logout else E.MESSAGE
                    value = msg
            action, reason = self.handle(event)
            if reason is not None:
                if event is E.LOGON:
                    value = "already logged on"
                elif reason == "not_logged_on":
                    value = "the first message must be Logon"
                out.append((action, (reason, value, msg_type)))
            else:
                out.append((action, value))
            if action == "logon":
                break
        if self.state is State.CLOSING or self.state is State.CLOSED:
            pending.clear()
        return out

    def accept(self) -> None:
        self.handle(E.ACCEPTED)

    def reject(self) -> None:
        self.handle(E.REJECTED)

    def closed(self, cause: str) -> bool:
        """The connection ended; True the first time (the caller then cleans up once)."""
        if self.state is State.CLOSED:
            return False
        self.cause = self.cause or cause
        self.handle(E.CLOSE)
        return True
