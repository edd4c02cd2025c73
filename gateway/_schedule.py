"""The trading schedule: when the gateway opens and closes the market and ends the day by itself.

The market rules let a schedule drive the market states (CEA: 09:30-11:30 and 13:00-15:00
Beijing time on trading days) while operators can still open and close by hand. So the schedule
acts on its edges, not on a state it would keep imposing: at a session's start the market
opens, at its end it closes, at the end-of-day time it closes (if anything is open) and the day
ends. Between edges an operator's OpenMarket, CloseMarket or Halt stands.

The edges are local times (``[schedule] timezone``) on the engine's trading day, so a day that
ends early by hand (the trading day already advanced) waits for the next trading day's edges,
and a weekend or holiday has none. Opens and closes missed while the exchange was down count once
it is up again, measured from the last command a member or operator sent (``Ledger.last_sent_ts``:
an edge carried out before changes nothing when run again): a restart after the lunch break's
start closes a market that a crash left open. The end of day is different: the engine's trading
day has not ended, so once its end-of-day time has passed it is due whatever was sent after it
(a schedule edited to end earlier, a crash between a command and the edge), and the next
trading day's edges count from that end; after an outage of several days each trading day ends
in turn. The first check on a new journal takes the latest edge before it: a journal created
mid-session opens.

What the schedule wants at a time (``wanted``) is for the start: a market that a restart finds
open outside the sessions is closed (``Exchange.catch_up_schedule``).

Pure logic: the caller passes the wall-clock time; ``Exchange.run_schedule`` runs the commands.
"""

from __future__ import annotations

import datetime as _dt
import zoneinfo

from engine import ScheduleConfig
from engine._config import session_bounds, time_of_day

__all__ = ["Schedule", "OPEN", "CLOSE", "END_OF_DAY"]

OPEN = "open"
CLOSE = "close"
END_OF_DAY = "end_of_day"


class Schedule:
    """A configuration's edges by trading day, and how far they have been carried out."""

    def __init__(self, config: ScheduleConfig, applied_ns: int | None) -> None:
        self.zone = zoneinfo.ZoneInfo(config.timezone)
        self.times: list[tuple[int, str]] = []  # (seconds after local midnight, edge), in order
        for window in config.sessions:
            bounds = session_bounds(window)
            if bounds is None:  # parse_config refuses it: only a hand-built ScheduleConfig gets here
                raise ValueError(f"not a session: {window!r}")
            self.times.append((bounds[0], OPEN))
            self.times.append((bounds[1], CLOSE))
        if config.end_of_day is not None:
            eod = time_of_day(config.end_of_day)
            if eod is None:
                raise ValueError(f"not a time of day: {config.end_of_day!r}")
            self.times.append((eod, END_OF_DAY))  # after a close at the same time
        self.times.sort(key=lambda t: t[0])  # stable
        # opens and closes at or before this time (ns since the epoch) have been carried out; None: none yet
        self.applied_ns = applied_ns
        self.ended = ""  # the trading day whose end of day was last asked for: once, even if refused
        self._day = ""
        self._edges: list[tuple[int, str]] = []

    def edges(self, day: str) -> list[tuple[int, str]]:
        """(ns since the epoch, edge) of trading day ``day`` (YYYY-MM-DD), in order."""
        if day != self._day:
            date = _dt.date.fromisoformat(day)
            self._edges = [(self._ns(date, seconds), edge) for seconds, edge in self.times]
            self._day = day
        return self._edges

    def _ns(self, date: _dt.date, seconds: int) -> int:
        local = _dt.datetime(date.year, date.month, date.day, seconds // 3600, seconds // 60 % 60, seconds % 60,
                             tzinfo=self.zone)
        return int(local.timestamp()) * 1_000_000_000  # whole seconds: exact

    def due(self, day: str, now_ns: int) -> str | None:
        """What trading day ``day``'s edges ask for at ``now_ns``, once: ``END_OF_DAY`` if its
        time has come (whatever was carried out before: the day has not ended), else the latest
        ``OPEN`` or ``CLOSE`` not yet carried out; None if nothing. Taken as carried out on
        return."""
        applied = self.applied_ns
        latest = None
        for at, edge in self.edges(day):
            if at > now_ns:
                break
            if edge == END_OF_DAY:
                if day == self.ended:  # asked for already (an EndOfDay refused): the operator's now
                    continue
                self.ended = day
                self.applied_ns = at  # the schedule ended the day: the next day's edges all count
                return END_OF_DAY
            if applied is None or at > applied:
                latest = edge
        if latest is not None:
            self.applied_ns = now_ns
        return latest

    def wanted(self, day: str, now_ns: int) -> str | None:
        """The state trading day ``day``'s sessions give at ``now_ns``, carried out or not:
        ``OPEN`` in a session, ``CLOSE`` after one; None before its first edge."""
        latest = None
        for at, edge in self.edges(day):
            if at > now_ns:
                break
            if edge != END_OF_DAY:
                latest = edge
        return latest

    def next_edge(self, day: str, now_ns: int) -> tuple[int, str] | None:
        """The first edge of ``day`` after ``now_ns``, for the log."""
        return next(((at, edge) for at, edge in self.edges(day) if at > now_ns), None)

