"""The gateway's core without IO: sessions, the ledger, and the outbox gated by durability.

``Exchange`` takes bytes from connections (``data_received``), runs commands through the
``Ledger`` and puts everything they cause (reports, market data, replies, errors, closes) into
one outbox in journal order, tagged with the journal seq of the command. ``on_durable(seq)``
releases the outbox up to that seq, so nothing leaves before its command is durable, and a
session's replies stay in the order of its requests. Time is an argument; a connection is a
``sink`` with ``write(bytes)``, ``close()`` (after flushing), ``abort()`` and
``replay_later()`` (call ``replay_more(session)`` once the peer has taken what was written).

Replay on logon is race-free because the loop is single-threaded: a member's reports up to
``released[member]`` are read from the journal, later ones come from the outbox. A long replay
goes out ``REPLAY_CHUNK`` reports at a time, paced by the peer's reading, each step reading a
bounded part of the journal (``Ledger.report_step``), so it neither stalls the loop nor overruns
the session's outbound bound; live reports wait until it has caught up.

The same bound holds for bursts (one mass cancel can make 100k reports and BookUpdates): live
reports and market data stop at half of ``max_outbound_bytes`` of unsent output. The reports
then come by that paced replay (``_overflow``); the market data by a fresh BookSnapshot once the
connection has drained (``_stale``, ``sink.drain_later()``, ``resync``). A sink with
``buffered()`` says how much it holds; one without (tests' in-memory sinks) is never held back.
"""

from __future__ import annotations

import datetime as _dt
import hmac
import json
import logging
import math
import re
import struct
from time import monotonic
from collections import deque
from typing import Callable

import msgspec

import engine as E
from engine import hash_token
from engine.journal import JournalError, JournalFailedError

from ._guard import PRUNE_EVERY, LogLimiter, PeerGuard, power_of_ten
from ._metrics import Stats
from ._schedule import CLOSE, END_OF_DAY, OPEN, Schedule
from ._session import Event, Session, State, TokenBucket
from ._wire import (
    Error, Heartbeat, LogonAccepted, LogonRejected, LogoutAccepted, Subscribe, Unsubscribe,
    encode, frame,
)

__all__ = ["Exchange", "log_event"]

log = logging.getLogger("kaboni")

REPORT_TYPES = frozenset(E.REPORTS)
MARKET_TYPES = frozenset((E.BookUpdate, E.Trade, E.InstrumentStatus))
REPLY_TYPES = frozenset((E.AdminAck, E.AdminRejected, E.Balances))
_OrderRejected, _CancelRejected = E.OrderRejected, E.CancelRejected
_hdr = struct.Struct(">I").pack
ORDER_TYPES = frozenset(E.ORDER_COMMANDS)
ORDER_NAMES = frozenset(c.__name__ for c in E.ORDER_COMMANDS)
OPERATOR_TYPES = frozenset(E.OPERATOR_COMMANDS)
OPERATOR_NAMES = frozenset(c.__name__ for c in E.OPERATOR_COMMANDS)
REPLAY_CHUNK = 1024  # reports per step of a resume replay at most (about 200 KB; and a quarter of the bound)
_NEVER = 1 << 62  # a min_seq no report reaches
_HEARTBEAT = frame(encode(Heartbeat()))
_LOGOUT_ACCEPTED = frame(encode(LogoutAccepted()))
_DUMMY_HASH = hash_token("\x00no such member\x00")

# A tick looks at one of TICK_PARTS slices of the sessions (by session id), so with thousands
# of sessions no single tick holds the loop for long (a tick writes the heartbeats it owes).
TICK_PARTS = 50

# outbox delivery kinds
_REPORT, _SESSION, _MARKET, _CLOSE, _DAY = range(5)


# Frames of one connection run per loop turn. A client pipelining thousands of messages in one
# read (heartbeats, QueryBalances, garbage fields) would otherwise hold the loop for tens of
# milliseconds while every other member waits; past this many, the connection stops reading and
# goes on in a later turn (TCP backpressure, nothing refused). Measured with one flooding member:
# a victim's p99 went from seconds to about 10 ms.
FRAMES_PER_TURN = 64

_PLAIN = re.compile(r"[A-Za-z0-9_.:/@+,-]+")  # a log value written as it is; anything else JSON-quoted
MAX_LOG_VALUE = 128  # characters of a value in a log line; longer ones end in "..."


def log_event(event: str, *, _level: int = logging.INFO, _exc_info: bool = False, _whole: bool = False,
              **fields) -> None:
    """One structured line: ``event=<name> key=value ...``. A value that is not a plain token is
    written as a JSON string, so quotes, newlines and control characters are escaped: a value
    from the peer (a member id in a Logon, before any authentication) can never end the line or
    forge another field or line. ``_level`` and ``_exc_info`` as for ``Logger.log``; ``_whole``
    keeps long values whole (the start's failures, where the remedy is at the end and no peer
    chose anything)."""
    parts = [f"event={event}"]
    for k, v in fields.items():
        v = str(v)
        if len(v) > MAX_LOG_VALUE and not _whole:
            v = v[:MAX_LOG_VALUE] + "..."
        parts.append(f"{k}={v}" if _PLAIN.fullmatch(v) else f"{k}={json.dumps(v)}")
    log.log(_level, " ".join(parts), exc_info=_exc_info)


ERROR_TEXT = 200  # characters: an Error's text may quote what a client sent (msgspec does), cut short


class _Cut(Exception):
    """The session was cut off in the middle of its frames (throttle abuse): run no more of them."""


def _error(reason: str, text: str) -> bytes:
    if len(text) > ERROR_TEXT:  # a frame the server sends must fit in max_frame too
        text = text[:ERROR_TEXT] + "..."
    return frame(encode(Error(reason, text)))


class Exchange:
    """All sessions of one server around one ``Ledger``; see the module docstring."""

    def __init__(self, config: E.ExchangeConfig, ledger, *, clock_ns: Callable[[], int],
                 stats: Stats | None = None) -> None:
        self.config = config
        self.ledger = ledger
        self.engine = ledger.engine
        self.clock_ns = clock_ns                 # wall-clock ts for commands (ns since epoch)
        self.stats = stats or Stats()
        self.stats.traded_base = {sym: self.engine.traded(sym) for sym in self.engine.instruments}
        gw = config.gateway
        self.max_frame = gw.max_frame
        self.replay_step_bytes = max(1, gw.max_outbound_bytes // 4)  # a replay step stays well under the bound
        self.max_outbound = gw.max_outbound_bytes
        # live reports and market data stop at this much unsent output (see release)
        self.high_water = max(1, gw.max_outbound_bytes // 2)
        self._resync_snapshots: dict[tuple[str, int], tuple[int, bytes]] = {}  # see resync
        self.max_sessions = gw.max_sessions_per_member
        self.rate = gw.max_msgs_per_s
        self.logon_timeout = gw.logon_timeout_s
        # flood guards (docs/operations.md "Flood guards")
        self.guard = PeerGuard(gw)
        self.log_limit = LogLimiter()
        self.unlogged: set[Session] = set()  # connections not (yet) logged on, as the guard counts them
        self.abuse_burst = gw.throttle_abuse_factor * gw.max_msgs_per_s  # 0: never cut off
        self.throttle_cooldown = gw.throttle_cooldown_s
        self.cooldown: dict[str, float] = {}  # member -> until when its logons are refused
        self._next_prune = 0.0
        self.credentials = {m.id: (m.token_sha256, m.role) for m in config.members}
        self.sessions: set[Session] = set()
        self._tick_parts: list[set[Session]] = [set() for _ in range(TICK_PARTS)]
        self._next_part = 0
        self.by_member: dict[str, list[Session]] = {}
        self.subscribers: dict[str, tuple[Session, ...]] = {s: () for s in self.engine.instruments}
        self.released = {m: self.engine.last_seq(m) for m in self.engine.members}
        self.trading_day = self.engine.trading_day  # the durable one: an EndOfDay counts once released
        self.outbox: deque = deque()  # (journal seq, kind, target, a, frame bytes, receive time or None)
        self.next_sid = 1
        self.draining = False
        self.failed: BaseException | None = None
        # the trading schedule; its edges missed while the exchange was down count from the
        # last command a member or operator sent before this start
        self.schedule = Schedule(config.schedule, ledger.last_sent_ts()) if config.schedule.active else None

    # -----------------------------------------------------------------------------------------
    # Connections

    def connect(self, sink, now: float, peer: str = "") -> Session | None:
        """A new connection from ``peer`` (its address as ``_guard.peer_key`` gives it; "" if
        unknown). None if a flood guard refuses it: the caller closes it at once, unread."""
        cause = self.guard.admit(peer, len(self.sessions), now)
        if cause:
            self.stats.disconnects[cause] += 1
            # one line per cause (and peer, for the causes that are about one peer) now and then
            key = (cause, peer) if cause in ("peer_blocked", "peer_pending_limit") else (cause,)
            n = self.log_limit.hit(key, now)
            if n:
                log_event("connection_refused", _level=logging.WARNING, cause=cause, peer=peer or "-", refused=n)
            return None
        session = Session(self.next_sid, self.max_frame, now)
        self.next_sid += 1
        session.sink = sink
        outbuf = getattr(sink, "buffered", None)
        if outbuf is not None:
            session.outbuf = outbuf
        session.peer = peer
        self.sessions.add(session)
        self.unlogged.add(session)
        self._tick_parts[session.sid % TICK_PARTS].add(session)
        return session

    def _logged_on_or_gone(self, session: Session) -> None:
        if session in self.unlogged:
            self.unlogged.discard(session)
            self.guard.logged_on_or_gone(session.peer)

    def data_received(self, session: Session, data: bytes, now: float) -> bool:
        """Run what ``data`` completes, at most ``FRAMES_PER_TURN`` frames; True if frames are
        left for a later turn (the connection then stops reading until they are done)."""
        if self.draining:
            return False
        try:
            self._data_received(session, data, now)
        except _Cut:
            pass  # cut off for throttle abuse: the rest of its frames are dropped
        except JournalFailedError:
            # the journal failed (its writer thread said so first): the server is stopping with
            # journal_failed, and this session ends with the others, nothing more sent
            session.cause = "shutdown"
            session.sink.abort()
        except Exception as exc:  # noqa: BLE001 - a bug: this connection goes, the server stays
            log_event("internal_error", _level=logging.ERROR, _exc_info=True, member=session.member or "-",
                      session=session.sid, error=repr(exc))
            session.sink.abort()
        self.release(self.ledger.durable_seq)
        return bool(session.pending) and session.state is State.ACTIVE

    def _data_received(self, session: Session, data: bytes, now: float) -> None:
        budget = FRAMES_PER_TURN
        actions = session.receive_data(data, now, budget)
        while actions:
            budget -= len(actions)
            for action, value in actions:
                if action == "message":
                    self._message(session, value, now)
                elif action == "logon":
                    self._logon(session, value, now)
                elif action == "error":
                    reason, text, msg_type = value
                    if session.state is State.ACTIVE and self._refusal(session, msg_type):
                        # the role decides first: malformed or not, it is not theirs to send
                        self._refuse(session, msg_type)
                        continue
                    self._to_session(session, _error(reason, text))
                    if msg_type in ORDER_NAMES and self.stats.enabled:
                        self.stats.invalid[msg_type] += 1
                elif action == "close":
                    reason, text, _ = value
                    self._to_session(session, _error(reason, text))
                    # (unless the session already ended for a reason of its own: a slow consumer)
                    session.cause = session.cause or ("framing_error" if reason == "bad_frame" else "client_close")
                    self._close_after_flush(session)
                elif action == "logout":
                    self._end_session(session, now)
                    session.cause = session.cause or "logout"
                    if session.replay_after is not None:
                        session.goodbye = True  # owed the rest of its replay first: replay_more says goodbye
                    else:
                        self._to_session(session, _LOGOUT_ACCEPTED)
                        self._close_after_flush(session)
            # frames that arrived with a Logon wait for its decision
            actions = session.receive_data(b"", now, budget) if session.pending and budget > 0 else None

    def connection_lost(self, session: Session, cause: str, now: float) -> None:
        """The connection ended for any reason; clean up once and cancel its orders if asked."""
        was_active = session.state is State.ACTIVE or (session.state is State.CLOSING and session.member)
        if not session.closed(cause):
            return
        self.sessions.discard(session)
        self._logged_on_or_gone(session)
        self._tick_parts[session.sid % TICK_PARTS].discard(session)
        if session.member:
            group = self.by_member.get(session.member)
            if group and session in group:
                group.remove(session)
        if session.subscriptions:
            for sym in session.subscriptions:
                self.subscribers[sym] = tuple(s for s in self.subscribers[sym] if s is not session)
        if was_active and session.member:
            self._end_session(session, now)
            log_event("logoff", member=session.member, session=session.sid, cause=session.cause)
        self.stats.disconnects[session.cause] += 1
        self.release(self.ledger.durable_seq)

    def _end_session(self, session: Session, now: float) -> None:
        """SessionEnded for a cancel-on-disconnect session that entered orders (once)."""
        if session.cancel_on_disconnect and session.entered_orders and self.failed is None:
            session.entered_orders = False
            self._execute(E.SessionEnded(session.sid), "", None, now)

    def tick(self, now: float) -> None:
        """Logon timeouts, heartbeats and heartbeat timeouts for the next slice of the sessions
        (one of ``TICK_PARTS``, in turn): the server calls this ``TICK_PARTS`` times as often as
        each session needs looking at."""
        part = self._next_part
        self._next_part = (part + 1) % TICK_PARTS
        if part == 0 and now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY
            self.guard.prune(now)
            self.log_limit.prune(now)
        for s in list(self._tick_parts[part]):
            state = s.state
            if state is State.ACTIVE:
                hb = s.heartbeat_s
                if now - s.last_rx > 3 * hb:
                    s.cause = "heartbeat_timeout"
                    log_event("heartbeat_timeout", member=s.member, session=s.sid)
                    s.sink.abort()
                elif now - s.last_tx >= hb:
                    s.last_tx = now
                    s.sink.write(_HEARTBEAT)
            elif state is State.AWAIT_LOGON and now - s.opened > self.logon_timeout:
                s.handle(Event.GOODBYE)
                s.cause = "logon_timeout"
                if not s.peer:
                    log_event("logon_timeout", session=s.sid)
                else:  # a connection flood from one peer: a few lines a minute
                    n = self.log_limit.hit(("logon_timeout", s.peer), now)
                    if n:
                        log_event("logon_timeout", session=s.sid, peer=s.peer, timeouts=n)
                s.sink.write(_error("not_logged_on", f"no Logon within {self.logon_timeout:g} s"))
                s.sink.close()

    def session_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for group in self.by_member.values():
            for s in group:
                if s.state is State.ACTIVE:  # logged on; not a session being closed
                    counts[s.role] = counts.get(s.role, 0) + 1
        return counts

    # -----------------------------------------------------------------------------------------
    # Logon

    def _logon(self, session: Session, logon, now: float) -> None:
        if session.peer and self.guard.blocked(session.peer, now):
            # blocked for guessing since this connection opened: no more guesses, no answer
            session.reject()
            session.cause = "peer_blocked"
            session.sink.abort()
            return
        member = logon.member
        stored, role = self.credentials.get(member, (_DUMMY_HASH, ""))
        ok = hmac.compare_digest(hash_token(logon.token), stored) and role != ""
        reject = None
        until = self.cooldown.get(member, 0.0) if ok else 0.0
        if not ok:
            reject = ("bad_credentials", "unknown member or wrong token")
        elif now < until:
            # the spec's LogonRejected reasons do not fit: refused like any request it may not make
            reject = ("throttle_cooldown", f"{member} was disconnected for flooding throttled requests; "
                                           f"logons refused for another {math.ceil(until - now)} s")
        else:
            self.cooldown.pop(member, None)
            group = self.by_member.setdefault(member, [])
            # The last durable report, not the engine's last: a report still waiting for the
            # journal may never exist (a crash reuses its seq), so it is not promised here; it
            # reaches this session live once it is durable (min_seq = last + 1).
            last = self.released.get(member, 0) if role == "member" else 0
            # a session that logged out or is being closed no longer counts, even if its peer
            # is slow to take its last bytes
            live = sum(1 for s in group if s.state is State.ACTIVE)
            if live >= self.max_sessions:
                reject = ("already_logged_on", f"{member} already has {live} sessions")
            elif logon.resume_from is not None and not 0 <= logon.resume_from <= last:
                reject = ("invalid_resume", f"resume_from {logon.resume_from} is outside 0..{last}")
        if reject is not None:
            session.reject()
            session.cause = "logon_rejected"
            reason, text = reject
            if reason == "throttle_cooldown":
                session.sink.write(_error("not_authorized", text))
            else:
                session.sink.write(frame(encode(LogonRejected(reason, text))))
            session.sink.close()
            self._logon_rejected(session, member, reason, now)
            return
        session.accept()
        self._evict_closing(group, live)
        self._logged_on_or_gone(session)
        session.member = member
        session.role = role
        session.cancel_on_disconnect = logon.cancel_on_disconnect
        session.heartbeat_s = logon.heartbeat_s
        session.bucket = TokenBucket(self.rate, now)
        next_seq = last + 1
        session.last_tx = now
        session.sink.write(frame(encode(LogonAccepted(member, role, next_seq, logon.heartbeat_s,
                                                      self.trading_day))))
        group.append(session)
        if logon.resume_from is not None:
            session.replay_after = logon.resume_from
            self.replay_more(session)
        else:
            session.min_seq = next_seq
        log_event("logon", member=member, role=role, session=session.sid, next_seq=next_seq,
                  resume_from=logon.resume_from if logon.resume_from is not None else "none",
                  cancel_on_disconnect=logon.cancel_on_disconnect)

    def _evict_closing(self, group: list[Session], live: int) -> None:
        """A member's connections, logged on or closing (logged out, still flushing its last
        bytes), stay within twice ``max_sessions_per_member``: before a new session joins, the
        oldest closing ones are cut off. A peer that logs out and on again without reading would
        otherwise pin ``max_outbound_bytes`` per connection for ``logon_timeout_s`` each."""
        closing = [s for s in group if s.state is State.CLOSING and s.outbuf() > 0]  # (an empty one goes by itself)
        for s in closing[:max(0, len(closing) + live + 1 - 2 * self.max_sessions)]:
            group.remove(s)  # gone from the member's count now; connection_lost follows
            log_event("close_evicted", member=s.member, session=s.sid, buffered=max(0, s.outbuf()))
            s.sink.abort()

    def _logon_rejected(self, session: Session, member: str, reason: str, now: float) -> None:
        """Log a rejected logon: the 1st, 10th, 100th... of its peer each minute (a guessing or
        reconnecting peer would otherwise write a line per attempt), and count a wrong token
        for a member that exists toward blocking the peer (a guess at an unknown member's token
        cannot succeed, so it costs nothing to let it be)."""
        peer = session.peer
        if not peer:
            log_event("logon_rejected", member=member, reason=reason)
            return
        n = self.log_limit.hit(("logon_rejected", peer), now)
        if n:
            log_event("logon_rejected", member=member, reason=reason, peer=peer, rejected=n)
        if reason == "bad_credentials" and member in self.credentials and self.guard.logon_failed(peer, now):
            log_event("peer_blocked", _level=logging.WARNING, peer=peer, failures=self.guard.failures_allowed,
                      block_s=f"{self.guard.block_s:g}")

    def replay_more(self, session: Session) -> None:
        """Send a resuming session its next step of reports from the journal (``REPLAY_CHUNK``
        reports, or a quarter of ``max_outbound_bytes``); once it has caught up with what is
        released, it takes live reports from then on."""
        after = session.replay_after
        if after is None or session.state is State.CLOSED:
            return
        member = session.member
        released = self.released.get(member, 0)
        if after < released:
            # a member's report seqs are gap-free: the bodies of after + 1, after + 2, ... A step
            # also reads a bounded part of the journal (a member with few reports on a long
            # journal may get none in one step): the loop is never held long, and the next step
            # reads on where this one stopped
            try:
                bodies, session.replay_mark = self.ledger.report_step(
                    member, after, min(released, after + REPLAY_CHUNK), self.replay_step_bytes, session.replay_mark)
            except JournalError as exc:  # a damaged older segment: the journal cannot give them
                # no Error reason of the protocol fits; the connection ends, the operator is told
                log_event("replay_failed", _level=logging.ERROR, member=member, session=session.sid,
                          resume_after=after, error=str(exc))
                session.cause = "replay_failed"
                session.sink.abort()
                return
            step = [frame(body) for body in bodies]
            through = after + len(step)
            if session.held:  # replies whose earlier reports are in this step go right after it
                step += session.take_held(through)
            if step:
                session.sink.write(b"".join(step))
            if through < released:
                session.replay_after = through
                session.min_seq = _NEVER  # live reports wait behind the replay
                session.sink.replay_later()
                return
            after = through
        if session.held:
            session.sink.write(b"".join(session.take_held()))
        session.replay_after = None
        session.replay_mark = None
        session.min_seq = after + 1
        if session.goodbye:  # logged out or shutting down: now that the replay is done
            self._to_session(session, _LOGOUT_ACCEPTED)
            self._close_after_flush(session)
            self.release(self.ledger.durable_seq)

    # -----------------------------------------------------------------------------------------
    # Messages of a logged-on session

    def _message(self, session: Session, msg, now: float) -> None:
        cls = type(msg)
        if cls in ORDER_TYPES:
            if session.role != "member":
                self._refuse(session, cls.__name__)
                return
            throttled = not session.bucket.take(now)
            if throttled:
                self._throttled(session, now)
            session.entered_orders = True
            self._execute(msg, session.member, session, now,
                          session.sid if session.cancel_on_disconnect else 0, throttled)
        elif cls is Heartbeat:
            pass
        elif cls in OPERATOR_TYPES:
            if session.role != "operator":
                self._refuse(session, cls.__name__)
                return
            self._operator(msg, session.member, session, now)
        elif cls is E.QueryBalances:
            if session.role != "member":
                self._refuse(session, cls.__name__)
                return
            self._to_session(session, frame(encode(self.engine.balances(session.member))))
        elif cls is Subscribe:
            self._subscribe(session, msg)
        elif cls is Unsubscribe:
            instruments = self._instruments(session, msg.instruments)
            if instruments is None:
                return
            for sym in instruments:
                if sym in session.subscriptions:
                    session.subscriptions.discard(sym)
                    session.stale.discard(sym)
                    self.subscribers[sym] = tuple(s for s in self.subscribers[sym] if s is not session)
        else:  # pragma: no cover - the decoder's union and this dispatch must agree
            raise AssertionError(f"no handler for {cls.__name__}")

    def _throttled(self, session: Session, now: float) -> None:
        """A throttled request: it draws on the session's second bucket (capacity
        ``throttle_abuse_factor`` × ``max_msgs_per_s``, refilled at ``max_msgs_per_s``); once that
        is empty, the session is cut off instead (raises ``_Cut``)."""
        burst = self.abuse_burst
        if burst:
            abuse = session.abuse
            if abuse is None:
                abuse = session.abuse = TokenBucket(self.rate, now, burst)
            if not abuse.take(now):
                self._cut_for_abuse(session, now)
                raise _Cut
        self.stats.throttled += 1

    def _cut_for_abuse(self, session: Session, now: float) -> None:
        """Disconnect a session that keeps sending far beyond its throttle, and refuse its
        member's logons for ``throttle_cooldown_s``: every throttled request is journaled and
        uses up a ``cl_ord_id`` for the day, so unbounded, they fill memory and disk."""
        member = session.member
        session.cause = "throttle_abuse"
        cooldown = self.throttle_cooldown
        if cooldown > 0:
            self.cooldown[member] = now + cooldown
        n = self.log_limit.hit(("throttle_abuse", member), now)
        if n:
            log_event("throttle_abuse", _level=logging.WARNING, member=member, session=session.sid,
                      peer=session.peer or "-", max_msgs_per_s=self.rate, throttled_burst=self.abuse_burst,
                      cooldown_s=f"{cooldown:g}", disconnects=n)
        self._end_session(session, now)  # its cancel-on-disconnect, before the Error
        session.handle(Event.GOODBYE)  # nothing more it sent is read
        session.pending.clear()
        self._to_session(session, _error(
            "not_authorized", f"disconnected for flooding: {self.abuse_burst} throttled requests beyond "
                              f"max_msgs_per_s {self.rate}; logons refused for {cooldown:g} s"))
        self._close_after_flush(session)

    @staticmethod
    def _refusal(session: Session, msg_type: str) -> str:
        """Why a message of this type is not for this session's role ("" if it is)."""
        if session.role == "member" and msg_type in OPERATOR_NAMES:
            return f"{msg_type} is for operators only"
        if session.role == "operator":
            if msg_type in ORDER_NAMES:
                return "operators cannot enter orders"
            if msg_type == "QueryBalances":
                return "operators have no accounts"
        return ""

    def _refuse(self, session: Session, request: str) -> None:
        """Answer ``not_authorized``. A member trying operator messages is worth an operator's
        attention: logged (level WARNING) at the session's 1st, 10th, 100th... refusal, so a
        client repeating it cannot flood the log."""
        self._to_session(session, _error("not_authorized", self._refusal(session, request)))
        session.refused += 1
        n = session.refused
        if power_of_ten(n):
            log_event("not_authorized", _level=logging.WARNING, member=session.member, role=session.role,
                      session=session.sid, request=request, refused=n)

    def _instruments(self, session: Session, instruments: list[str]) -> list[str] | None:
        """A (Un)Subscribe's instruments once each, in order; None (and an Error sent) if one
        is unknown. Duplicates go first: one frame naming an instrument thousands of times
        would otherwise build as many snapshots."""
        instruments = list(dict.fromkeys(instruments))
        for sym in instruments:
            if sym not in self.subscribers:
                self._to_session(session, _error("invalid_message", f"instruments: unknown instrument {sym!r}"))
                return None
        return instruments

    def _subscribe(self, session: Session, msg: Subscribe) -> None:
        instruments = self._instruments(session, msg.instruments)
        if instruments is None:
            return
        for sym in instruments:
            # The snapshot waits behind the commands already run; events after it follow it.
            self._to_session(session, frame(self._book_snapshot(sym, msg.depth)), market=True)
            session.md_depth[sym] = msg.depth
            if sym not in session.subscriptions or sym in session.stale:
                # events queued before now (for an earlier subscription) are in the snapshot
                session.md_since[sym] = self.ledger.last_seq
                session.stale.discard(sym)
            if sym not in session.subscriptions:
                session.subscriptions.add(sym)
                self.subscribers[sym] = self.subscribers[sym] + (session,)

    def _book_snapshot(self, instrument: str, depth: int) -> bytes:
        """The snapshot's body, with at most as many levels per side as fit in max_frame (the
        deepest go first): a wide band can hold thousands of levels."""
        snapshot = self.engine.book_snapshot(instrument, depth)
        body = encode(snapshot)
        if len(body) <= self.max_frame:
            return body
        fits, low, high = b"", 0, max(len(snapshot.bids), len(snapshot.asks))
        while low <= high:  # the most levels per side that fit
            mid = (low + high) // 2
            body = encode(msgspec.structs.replace(snapshot, bids=snapshot.bids[:mid], asks=snapshot.asks[:mid]))
            if len(body) <= self.max_frame:
                fits, low = body, mid + 1
            else:
                high = mid - 1
        return fits

    def _operator(self, msg, operator: str, session: Session | None, now: float) -> None:
        """Run an operator command (``session`` None: the trading schedule's, journaled with no
        member and logged as ``operator=schedule``) and log what it did."""
        events = self._execute(msg, operator, session, now)
        cls = type(msg)
        fields = {f: getattr(msg, f) for f in msg.__struct_fields__}
        who = operator or "schedule"
        for ev in events:
            t = type(ev)
            if t is E.DayEnded:
                log_event("end_of_day", trading_day=ev.trading_day, next_trading_day=ev.next_trading_day,
                          operator=who)
            elif t is E.AdminAck and cls is not E.EndOfDay:  # end of day is logged from DayEnded
                if ev.duplicate is True:
                    fields["duplicate"] = True
                log_event(cls.__name__.lower(), operator=who, **fields)
            elif t is E.AdminRejected:
                log_event("admin_rejected", operator=who, request=ev.request, reason=ev.reason, **fields)

    def run_schedule(self, now_ns: int, now: float, log: bool = True) -> bool:
        """Carry out what the trading schedule asks for at wall-clock time ``now_ns``: open the
        market if any instrument is closed; close it if any is not; end the day (closing first).
        Nothing while draining or without a schedule. True if an edge was due (then the next
        edge is logged, unless ``log`` is false)."""
        schedule = self.schedule
        if schedule is None or self.draining or self.failed is not None:
            return False
        engine = self.engine
        edge = schedule.due(engine.trading_day, now_ns)
        if edge is None:
            return False
        statuses = [engine.status(sym) for sym in engine.instruments]
        if edge == OPEN:
            if "closed" in statuses:
                self._operator(E.OpenMarket(), "", None, now)
        else:
            if any(status != "closed" for status in statuses):
                self._operator(E.CloseMarket(), "", None, now)
            if edge == END_OF_DAY:
                self._operator(E.EndOfDay(), "", None, now)
        if log:
            self.log_schedule(now_ns)
        self.release(self.ledger.durable_seq)
        return True

    def catch_up_schedule(self, now: float) -> int:
        """At start, before connections are accepted: carry out every edge missed while the
        exchange was down (each missed trading day ends in turn, reading the clock again after
        each step), then close a market left open outside the sessions (an edited schedule, or
        an OpenMarket by hand before the restart; a CloseMarket or Halt by hand stands), and log
        the next edge once. Returns the number of steps that were due."""
        schedule = self.schedule
        if schedule is None:
            return 0
        steps = 0
        while self.run_schedule(self.clock_ns(), now, log=False):
            steps += 1
        now_ns = self.clock_ns()
        engine = self.engine
        if (self.failed is None and schedule.wanted(engine.trading_day, now_ns) == CLOSE
                and any(engine.status(sym) == "open" for sym in engine.instruments)):
            self._operator(E.CloseMarket(), "", None, now)
            self.release(self.ledger.durable_seq)
            steps += 1
        self.log_schedule(now_ns)
        return steps

    def log_schedule(self, now_ns: int) -> None:
        """Log the trading schedule's next edge on the current trading day (``edge=none`` if the
        day has none left: a schedule without an end of day leaves ending it to an operator)."""
        schedule = self.schedule
        if schedule is None:
            return
        day = self.engine.trading_day
        nxt = schedule.next_edge(day, now_ns)
        if nxt is not None:
            log_event("schedule_next", trading_day=day, edge=nxt[1],
                      at=_dt.datetime.fromtimestamp(nxt[0] // 1_000_000_000, schedule.zone).isoformat())
        else:
            log_event("schedule_next", trading_day=day, edge="none")

    # -----------------------------------------------------------------------------------------
    # Running commands and the outbox

    def _execute(self, cmd, member: str, session: Session | None, now: float, sid: int = 0,
                 throttled: bool = False) -> list:
        ts = self.clock_ns()
        seq, events, reports = self.ledger.execute(cmd, member, ts, sid, throttled)
        out = self.outbox
        rep = iter(reports)
        stats = self.stats
        cls = type(cmd)
        # The first report of an order-entry request decides its outcome and carries the
        # receive time for the order-to-report latency; counting costs a few dict operations.
        first = stats.enabled and cls in ORDER_TYPES
        for ev in events:
            t = type(ev)
            if t in REPORT_TYPES:
                m, body = next(rep)
                if first:
                    first = False
                    out.append((seq, _REPORT, m, ev.seq, _hdr(len(body)) + body, now))
                    stats.received[cls] += 1
                    if t is _OrderRejected or t is _CancelRejected:
                        stats.rejected[cls] += 1
                        stats.rejects[ev.reason] += 1
                else:
                    out.append((seq, _REPORT, m, ev.seq, _hdr(len(body)) + body, None))
            elif t in MARKET_TYPES:
                sym = ev.instrument
                subs = self.subscribers[sym]
                if subs:
                    body = encode(ev)
                    out.append((seq, _MARKET, subs, sym, _hdr(len(body)) + body, None))
            elif t in REPLY_TYPES:
                if session is not None:
                    out.append((seq, _SESSION, session, None, frame(encode(ev)), None))
            elif t is E.DayEnded:
                out.append((seq, _DAY, None, ev.next_trading_day, None, None))
        return events

    def _to_session(self, session: Session, data: bytes, market: bool = False) -> None:
        """Queue a reply behind everything already queued (so it cannot overtake). ``market``:
        a BookSnapshot, which like all market data does not wait for a resume replay."""
        self.outbox.append((self.ledger.last_seq, _SESSION, session, True if market else None, data, None))

    def _close_after_flush(self, session: Session) -> None:
        self.outbox.append((self.ledger.last_seq, _CLOSE, session, None, None, None))

    def on_durable(self, seq: int) -> None:
        """The journal made everything up to ``seq`` durable (called on the loop's thread)."""
        self.release(seq)

    def release(self, durable: int) -> None:
        """Send everything queued up to journal seq ``durable``: one write per session."""
        out = self.outbox
        if not out or out[0][0] > durable:
            return
        by_member = self.by_member
        released = self.released
        latency = self.stats.latencies.append
        now = monotonic()
        closed, active = State.CLOSED, State.ACTIVE
        batches: dict[Session, list[bytes]] = {}
        # The outbound bound: a session's live reports and market data stop where they would take
        # its unsent output (what the transport holds plus what this round gives it: room, counted
        # from the session's first frame of the round) past high_water. Reports then come by a
        # paced replay from the journal, market data by a fresh BookSnapshot once the connection
        # has drained. One frame always goes to a connection with nothing unsent.
        high = self.high_water
        while out and out[0][0] <= durable:
            seq, kind, target, a, data, t0 = out.popleft()
            if kind == _REPORT:
                released[target] = a
                if t0 is not None:
                    latency(now - t0)
                group = by_member.get(target)
                if group:
                    n = len(data)
                    for s in group:
                        if a >= s.min_seq and s.state is not closed:
                            b = batches.get(s)
                            if b is None:
                                b = batches[s] = []
                                s.room = high - s.outbuf()
                            room = s.room - n
                            if room < 0 and s.room < high and s.state is active and not self.draining:
                                # (a session told goodbye gets its last reports in one write)
                                self._overflow(s, a)
                                continue
                            s.room = room
                            b.append(data)
            elif kind == _MARKET:
                n = len(data)
                for s in target:
                    if a in s.subscriptions and s.state is not closed and seq > s.md_since[a]:
                        b = batches.get(s)
                        if b is None:
                            b = batches[s] = []
                            s.room = high - s.outbuf()
                        room = s.room - n
                        if room < 0 and s.room < high:
                            self._stale(s, a)
                            continue
                        s.room = room
                        b.append(data)
            elif kind == _SESSION:
                if target.state is not closed:
                    if target.replay_after is not None and a is None:
                        # a reply must not overtake the reports of earlier requests, which wait
                        # behind the resume replay (a BookSnapshot, market data, does not wait)
                        held_bytes = target.hold(released.get(target.member, 0), data)
                        if held_bytes > self.max_outbound >= held_bytes - len(data):  # replies it does not read
                            target.cause = "slow_consumer"
                            log_event("slow_consumer", member=target.member, session=target.sid,
                                      buffered=target.held_bytes)
                            target.sink.abort()
                    else:
                        b = batches.get(target)
                        if b is None:
                            b = batches[target] = []
                            target.room = high - target.outbuf()
                        target.room -= len(data)  # replies are never held back, but they take room
                        b.append(data)
            elif kind == _DAY:
                self.trading_day = a
            else:  # _CLOSE
                b = batches.pop(target, None)
                if target.held:  # closing mid-replay (a framing error): its replies still go,
                    # after the market data released with them (the Error is the last frame)
                    b = (b or []) + target.take_held()
                if b:
                    target.sink.write(b"".join(b))
                if target.state is not closed:
                    target.handle(Event.GOODBYE)
                    target.sink.close()
        for s, frames in batches.items():
            if frames:  # (none when the bound stopped everything)
                s.last_tx = now
                s.sink.write(frames[0] if len(frames) == 1 else b"".join(frames))
        if len(self.stats.latencies) > 65_536:
            self.stats.order_to_report()  # fold into the histogram (normally done at scrape time)

    def _overflow(self, session: Session, seq: int) -> None:
        """The member's report ``seq`` would take the session past the bound: from it on, its
        reports come from the journal by the paced replay (as after a ``resume_from``), so the
        peer gets each once, in order, as fast as it reads."""
        session.replay_after = seq - 1  # reports are gap-free per member: it has had all up to seq - 1
        session.min_seq = _NEVER
        session.overflowed = True
        self.stats.report_overflows += 1
        # unsent: what the connection holds plus what this release has queued for it
        log_event("reports_overflow", member=session.member, session=session.sid, seq=seq,
                  buffered=self.high_water - session.room)
        session.sink.replay_later()

    def _stale(self, session: Session, instrument: str) -> None:
        """Market data of ``instrument`` would take the session past the bound: none of it more
        until the connection has drained, then a fresh BookSnapshot (``resync``)."""
        session.md_since[instrument] = _NEVER
        first = not session.stale
        session.stale.add(instrument)
        self.stats.md_resyncs += 1
        session.resyncs = n = session.resyncs + 1
        if power_of_ten(n):  # the session's 1st, 10th, 100th... : no flood of lines
            log_event("md_resync", member=session.member or "-", session=session.sid, instrument=instrument,
                      buffered=self.high_water - session.room, resyncs=n)
        if first:
            session.sink.drain_later()

    def resync(self, session: Session) -> None:
        """The connection has drained: a fresh BookSnapshot of each instrument whose market data
        stopped (``_stale``), then its incrementals again, exactly as after a Subscribe."""
        stale = session.stale
        if not stale or session.state is not State.ACTIVE:
            return
        last = self.ledger.last_seq
        cache = self._resync_snapshots
        for sym in sorted(stale):
            # thousands of subscribers resync after one burst: one snapshot per state of the book
            key = (sym, session.md_depth[sym])
            hit = cache.get(key)
            if hit is None or hit[0] != last:
                if len(cache) > 1024:
                    cache.clear()
                hit = cache[key] = (last, frame(self._book_snapshot(*key)))
            self._to_session(session, hit[1], market=True)
            session.md_since[sym] = last  # later events follow the snapshot; earlier ones are in it
        stale.clear()
        self.release(self.ledger.durable_seq)

    # -----------------------------------------------------------------------------------------
    # Shutdown

    def drain(self, now: float) -> None:
        """Stop taking input; end every session (cancel-on-disconnect applies), say goodbye."""
        self.draining = True
        # Every cancel first, then the goodbyes: a session's LogoutAccepted must come after the
        # cancels of its member's other sessions (and a subscriber's after their BookUpdates).
        for s in list(self.sessions):
            if s.state is State.ACTIVE or (s.state is State.CLOSING and s.member):  # closing ones too
                self._end_session(s, now)
        for s in list(self.sessions):
            if s.state is State.ACTIVE:
                s.cause = s.cause or "shutdown"  # a slow consumer cut off just before stays one
                if s.replay_after is not None:
                    s.goodbye = True  # owed the rest of its replay first: replay_more says goodbye
                    continue
                self._to_session(s, _LOGOUT_ACCEPTED)
                self._close_after_flush(s)
            elif s.state is State.AWAIT_LOGON:
                s.cause = "shutdown"
                s.handle(Event.GOODBYE)
                s.sink.close()
        self.release(self.ledger.durable_seq)
