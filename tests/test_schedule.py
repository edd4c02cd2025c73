"""The trading schedule: configuration, its edges, and the gateway carrying them out."""

from __future__ import annotations

import datetime as dt
import logging
import time

import msgspec
import pytest

import engine as E
from engine import ConfigError, ScheduleConfig, parse_config
from engine.journal import Ledger
from gateway._exchange import Exchange
from gateway._schedule import CLOSE, END_OF_DAY, OPEN, Schedule

from _fakes import ThreadServer, make_config
from engine_support import CONFIG_TOML
from test_gateway_review import Sink, connect, enc

CEA = ScheduleConfig("Asia/Shanghai", ["09:30-11:30", "13:00-15:00"], "15:30")
SHANGHAI = dt.timezone(dt.timedelta(hours=8))  # no daylight saving: a fixed offset is the same


def at(day: str, hhmm: str, tz=SHANGHAI) -> int:
    """ns since the epoch of local time ``hhmm`` on ``day``."""
    h, m = map(int, hhmm.split(":"))
    y, mo, d = map(int, day.split("-"))
    return int(dt.datetime(y, mo, d, h, m, tzinfo=tz).timestamp()) * 1_000_000_000


# ---------------------------------------------------------------------------------------------
# Configuration


def _bad(schedule: str, key: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(CONFIG_TOML + "\n[schedule]\n" + schedule, "s.toml")
    assert str(info.value).startswith(f"s.toml: {key}: "), info.value
    assert needle in str(info.value)


def test_a_schedule_is_configured_in_local_times_and_checked_at_load():
    config = parse_config(CONFIG_TOML + '\n[schedule]\ntimezone = "Asia/Shanghai"\n'
                          'sessions = ["09:30-11:30", "13:00-15:00:30"]\nend_of_day = "15:30"\n')
    assert config.schedule == ScheduleConfig("Asia/Shanghai", ["09:30-11:30", "13:00-15:00:30"], "15:30")
    assert config.schedule.active
    assert not parse_config(CONFIG_TOML).schedule.active  # none by default: operators do it by hand
    _bad('timezone = "Asia/Beijing"\n', "schedule.timezone", "not a known time zone")
    _bad('sessions = ["9:30-11:30"]\n', "schedule.sessions[0]", "not 'HH:MM-HH:MM'")
    _bad('sessions = ["09:30"]\n', "schedule.sessions[0]", "not 'HH:MM-HH:MM'")
    _bad('sessions = ["09:30-24:00"]\n', "schedule.sessions[0]", "not 'HH:MM-HH:MM'")
    _bad('sessions = ["22:00-02:00"]\n', "schedule.sessions[0]", "cannot span midnight")
    _bad('sessions = ["09:30-09:30"]\n', "schedule.sessions[0]", "ends before it starts")
    _bad('sessions = ["13:00-15:00", "09:30-11:30"]\n', "schedule.sessions[1]", "does not start after")
    _bad('sessions = ["09:30-11:30", "11:30-15:00"]\n', "schedule.sessions[1]", "does not start after")
    _bad('end_of_day = "3pm"\n', "schedule.end_of_day", "not 'HH:MM'")
    _bad('sessions = ["09:30-15:00"]\nend_of_day = "14:00"\n', "schedule.end_of_day", "before the last session ends")
    _bad('session = ["09:30-15:00"]\n', "schedule", "session")  # unknown keys are refused


# ---------------------------------------------------------------------------------------------
# The edges (pure)


def test_edges_are_local_times_on_the_trading_day_daylight_saving_included():
    s = Schedule(CEA, None)
    assert s.edges("2026-11-24") == [(at("2026-11-24", "09:30"), OPEN), (at("2026-11-24", "11:30"), CLOSE),
                                     (at("2026-11-24", "13:00"), OPEN), (at("2026-11-24", "15:00"), CLOSE),
                                     (at("2026-11-24", "15:30"), END_OF_DAY)]
    berlin = Schedule(ScheduleConfig("Europe/Berlin", ["09:00-17:30"]), None)
    utc = dt.timezone.utc
    assert berlin.edges("2026-03-27")[0][0] == at("2026-03-27", "08:00", utc)  # CET, UTC+1
    assert berlin.edges("2026-03-30")[0][0] == at("2026-03-30", "07:00", utc)  # CEST, UTC+2
    # the end of day shares the last close's time: the close comes first
    same = Schedule(ScheduleConfig("UTC", ["09:00-15:00"], "15:00"), None)
    assert [e for _, e in same.edges("2026-11-24")] == [OPEN, CLOSE, END_OF_DAY]


def test_each_edge_is_due_once_in_order():
    day = "2026-11-24"
    s = Schedule(CEA, at(day, "08:00"))
    assert s.due(day, at(day, "09:29")) is None
    assert s.due(day, at(day, "09:30")) == OPEN
    assert s.due(day, at(day, "10:00")) is None  # an operator's CloseMarket at 09:45 would stand
    assert s.due(day, at(day, "11:31")) == CLOSE
    assert s.due(day, at(day, "13:00")) == OPEN
    assert s.due(day, at(day, "15:00")) == CLOSE
    assert s.due(day, at(day, "15:29")) is None
    assert s.due(day, at(day, "15:30")) == END_OF_DAY
    assert s.due(day, at(day, "16:00")) is None
    # the next trading day's edges come after
    assert s.due("2026-11-25", at("2026-11-25", "09:30")) == OPEN


def test_edges_missed_while_down_count_once_and_only_the_latest():
    day = "2026-11-24"
    s = Schedule(CEA, at(day, "09:00"))  # the last command before the outage
    assert s.due(day, at(day, "12:00")) == CLOSE  # 09:30 open and 11:30 close missed: closed
    s = Schedule(CEA, at(day, "10:00"))
    assert s.due(day, at(day, "13:10")) == OPEN
    # down past the end of day: the day ends first (it closes whatever is open)
    s = Schedule(CEA, at(day, "10:00"))
    assert s.due(day, at("2026-11-25", "10:00")) == END_OF_DAY
    assert s.due("2026-11-25", at("2026-11-25", "10:00")) == OPEN  # then the next day, mid-session
    # nothing missed: an operator's choice before the restart stands
    s = Schedule(CEA, at(day, "10:00"))
    assert s.due(day, at(day, "10:05")) is None


def test_a_new_journal_takes_the_latest_edge_before_it():
    day = "2026-11-24"
    assert Schedule(CEA, None).due(day, at(day, "10:00")) == OPEN
    assert Schedule(CEA, None).due(day, at(day, "12:00")) == CLOSE
    assert Schedule(CEA, None).due(day, at(day, "08:00")) is None
    # a trading day ahead of the calendar (the day ended early by hand): its edges wait
    assert Schedule(CEA, None).due("2026-11-25", at(day, "16:00")) is None


def test_the_end_of_day_is_due_once_its_time_has_passed_whatever_was_sent_after_it():
    day = "2026-11-24"
    # B3: the last command (04:50) came after the end of day of a schedule edited to end earlier
    s = Schedule(ScheduleConfig("UTC", ["04:00-04:30"], "04:31"), at(day, "04:50", dt.timezone.utc))
    assert s.due(day, at(day, "04:55", dt.timezone.utc)) == END_OF_DAY
    assert s.due(day, at(day, "04:56", dt.timezone.utc)) is None  # once: a refused EndOfDay is left to operators
    assert s.due("2026-11-25", at("2026-11-25", "04:00", dt.timezone.utc)) == OPEN  # the next day's edges follow
    # a crash between a command and the edge it came just after: the day still ends
    s = Schedule(CEA, at(day, "15:30") + 100_000_000)
    assert s.due(day, at(day, "15:31")) == END_OF_DAY
    # days traded through without an end of day (no schedule then): each ends, then the current
    # day's edges count from the schedule's own end of day, not from the last order
    s = Schedule(CEA, at("2026-11-25", "10:00"))
    now = at("2026-11-25", "10:05")
    assert [s.due(d, now) for d in ("2026-11-23", "2026-11-24", "2026-11-25")] == [END_OF_DAY, END_OF_DAY, OPEN]


def test_what_the_sessions_want_at_a_time():
    day = "2026-11-24"
    s = Schedule(CEA, at(day, "16:00"))  # carried out or not makes no difference
    assert [s.wanted(day, at(day, hhmm)) for hhmm in ("08:00", "09:30", "11:29", "11:30", "13:00", "15:10", "16:00")] \
        == [None, OPEN, OPEN, CLOSE, OPEN, CLOSE, CLOSE]
    assert s.wanted("2026-11-25", at(day, "16:00")) is None  # a trading day ahead of the calendar


# ---------------------------------------------------------------------------------------------
# The gateway carrying it out (the Exchange around a real Ledger)


class Clock:
    def __init__(self, ns: int) -> None:
        self.ns = ns

    def __call__(self) -> int:
        return self.ns


def scheduled_exchange(tmp_path, clock: Clock, schedule: ScheduleConfig = CEA):
    config = msgspec.structs.replace(make_config(), schedule=schedule)
    ledger = Ledger.open(config, tmp_path / "data", durability="none", today="2026-11-24")
    return Exchange(config, ledger, clock_ns=clock), ledger


def restarted(ex, tmp_path, clock):
    """The exchange started again on the same journal (its ledger closed before)."""
    ledger = Ledger.open(ex.config, tmp_path / "data", durability="none")
    return Exchange(ex.config, ledger, clock_ns=clock), ledger


def run(ex, clock, day, hhmm):
    clock.ns = at(day, hhmm)
    ex.run_schedule(clock.ns, 0.0)


def statuses(ex):
    return {ex.engine.status(sym) for sym in ex.engine.instruments}


def test_the_gateway_opens_closes_and_ends_the_day_on_schedule(tmp_path, caplog):
    day = "2026-11-24"
    clock = Clock(at(day, "08:00"))
    ex, ledger = scheduled_exchange(tmp_path, clock)
    try:
        assert ex.schedule.applied_ns is None  # a new journal: only its set-up, which has no time
        s, sink = connect(ex, "M01")
        ex.data_received(s, enc({"type": "Subscribe", "instruments": ["CEA25"]}), 0.0)
        ledger.journal.sync()
        ex.release(ledger.durable_seq)
        sink.frames()
        caplog.set_level(logging.INFO, logger="kaboni")
        run(ex, clock, day, "09:00")
        assert statuses(ex) == {"open"}  # the demo's open_on_start; before 09:30 nothing is due
        run(ex, clock, day, "09:30")
        assert statuses(ex) == {"open"}  # already open: nothing to do
        run(ex, clock, day, "11:30")
        assert statuses(ex) == {"closed"}
        ex.data_received(s, enc({"type": "NewOrder", "cl_ord_id": "a", "instrument": "CEA25", "side": "buy",
                                 "qty": 1, "price": 9000}), 0.0)
        run(ex, clock, day, "13:00")
        assert statuses(ex) == {"open"}
        ex.data_received(s, enc({"type": "NewOrder", "cl_ord_id": "b", "instrument": "CEA25", "side": "buy",
                                 "qty": 1, "price": 9000}), 0.0)
        run(ex, clock, day, "15:30")  # the 15:00 close and the end of day, together
        assert statuses(ex) == {"closed"} and ex.engine.trading_day == "2026-11-25"
        ledger.journal.sync()
        ex.release(ledger.durable_seq)
        frames = sink.frames()
        status = [f["status"] for f in frames if f["type"] == "InstrumentStatus"]
        assert status == ["closed", "open", "closed", "closed"]  # the last: the next day's reference price
        rejected = [f for f in frames if f["type"] == "OrderRejected"]
        assert [r["reason"] for r in rejected] == ["market_closed"]
        expired = [f for f in frames if f["type"] == "OrderCancelled"]
        assert [(e["orig_cl_ord_id"], e["reason"]) for e in expired] == [("b", "expired")]
        logged = [r.getMessage() for r in caplog.records]
        assert any("event=closemarket operator=schedule" in m for m in logged)
        assert any("event=openmarket operator=schedule" in m for m in logged)
        assert any("event=end_of_day" in m and "trading_day=2026-11-24" in m and "operator=schedule" in m
                   for m in logged)
        # the next trading day (Wednesday) opens at its 09:30
        run(ex, clock, "2026-11-25", "09:29")
        assert statuses(ex) == {"closed"}
        run(ex, clock, "2026-11-25", "09:30")
        assert statuses(ex) == {"open"}
    finally:
        ledger.close()


def test_an_operator_keeps_the_market_closed_until_the_next_edge_also_across_a_restart(tmp_path):
    day = "2026-11-24"
    clock = Clock(at(day, "09:45"))
    ex, ledger = scheduled_exchange(tmp_path, clock)
    run(ex, clock, day, "09:45")  # mid-session on a new journal: open (it already is)
    ops, _ = connect(ex, "ops")
    clock.ns = at(day, "10:00")
    ex.data_received(ops, enc({"type": "CloseMarket"}), 0.0)
    assert statuses(ex) == {"closed"}
    run(ex, clock, day, "10:30")
    assert statuses(ex) == {"closed"}  # the operator's close stands between edges
    ledger.close()
    # restarted at 10:40: no edge was missed since the last command (10:00)
    ex, ledger = restarted(ex, tmp_path, clock)
    try:
        assert ex.schedule.applied_ns == at(day, "10:00")
        run(ex, clock, day, "10:40")
        assert statuses(ex) == {"closed"}
        run(ex, clock, day, "13:00")
        assert statuses(ex) == {"open"}
    finally:
        ledger.close()


def test_a_restart_carries_out_what_was_missed_while_down(tmp_path):
    day = "2026-11-24"
    clock = Clock(at(day, "10:00"))
    ex, ledger = scheduled_exchange(tmp_path, clock)
    s, _ = connect(ex, "M01")
    ex.data_received(s, enc({"type": "NewOrder", "cl_ord_id": "a", "instrument": "CEA25", "side": "buy",
                             "qty": 1, "price": 9000}), 0.0)  # journaled at 10:00, market open
    ledger.close()
    # down from 10:00 until the next morning at 10:00, and down again right after journaling the
    # restart's Restarted: the gateway's own commands do not count as the exchange having run
    clock.ns = at("2026-11-25", "09:59")
    again, ledger = restarted(ex, tmp_path, clock)
    again._execute(E.Restarted(), "", None, 0.0)
    ledger.close()
    clock.ns = at("2026-11-25", "10:00")
    ex, ledger = restarted(ex, tmp_path, clock)
    try:
        assert ex.schedule.applied_ns == at(day, "10:00")  # M01's order, the last command sent
        # the day ends, then the new one is mid-session
        ex.run_schedule(clock.ns, 0.0)
        assert ex.engine.trading_day == "2026-11-25" and statuses(ex) == {"closed"}
        ex.run_schedule(clock.ns, 0.0)  # one step per check
        assert statuses(ex) == {"open"}
        assert not ex.engine.live_orders("M01")  # the DAY order expired with its day
    finally:
        ledger.close()


def test_nothing_is_scheduled_while_draining_or_without_a_schedule(tmp_path):
    day = "2026-11-24"
    clock = Clock(at(day, "11:00"))
    ex, ledger = scheduled_exchange(tmp_path, clock)
    try:
        ex.draining = True
        run(ex, clock, day, "11:30")
        assert statuses(ex) == {"open"}
    finally:
        ledger.close()
    ex, ledger = scheduled_exchange(tmp_path / "none", clock, ScheduleConfig())
    try:
        assert ex.schedule is None
        run(ex, clock, day, "11:30")
        assert statuses(ex) == {"open"}
    finally:
        ledger.close()


# ---------------------------------------------------------------------------------------------
# A real server


def test_a_server_closes_the_market_at_the_end_of_a_session_it_started_in(tmp_path):
    """The session's end a few seconds ahead, in a zone where it is daytime now; a subscriber
    over a real socket sees the market close and an order after it rejected."""
    from gateway.client import Client

    now = dt.datetime.now(dt.timezone.utc)
    hours = (12 - now.hour) % 24
    hours = hours - 24 if hours > 14 else hours  # Etc zones run from UTC-12 to UTC+14
    zone = f"Etc/GMT{'-' if hours > 0 else '+'}{abs(hours)}" if hours else "UTC"
    local = now.astimezone(dt.timezone(dt.timedelta(hours=hours)))
    end = local + dt.timedelta(seconds=3)
    schedule = ScheduleConfig(zone, [f"00:00:00-{end:%H:%M:%S}"])
    config = make_config()
    config = msgspec.structs.replace(config, schedule=schedule, market=msgspec.structs.replace(
        config.market, first_trading_day=local.date().isoformat()))
    import asyncio

    async def scenario(port):
        client = await Client.connect("127.0.0.1", port)
        try:
            await client.logon("M01", "M01-token")
            await client.subscribe(["CEA25"])
            seen = []
            deadline = time.monotonic() + 10
            while "closed" not in seen and time.monotonic() < deadline:
                msg = await client.next_market(timeout=deadline - time.monotonic())
                if msg["type"] in ("BookSnapshot", "InstrumentStatus"):
                    seen.append(msg["status"])
            await client.send({"type": "NewOrder", "cl_ord_id": "late", "instrument": "CEA25", "side": "buy",
                               "qty": 1, "price": 9000})
            return seen, await client.next_report()
        finally:
            await client.close()

    with ThreadServer(config, tmp_path / "data") as server:
        seen, report = asyncio.run(scenario(server.port))
    assert seen == ["open", "closed"]  # the snapshot's, then the session's end
    assert report["type"] == "OrderRejected" and report["reason"] == "market_closed"


# ---------------------------------------------------------------------------------------------
# At start: catching up before connections, an edited schedule


UTC = dt.timezone.utc


def schedule_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "event=schedule_next" in r.getMessage()]


def test_a_restart_with_an_edited_schedule_ends_a_day_whose_end_has_passed(tmp_path, caplog):
    """B3: the first run's schedule ends the day at 05:31; a member orders at 04:50; the restart's
    schedule ends it at 04:31, already past: the market closes and the day ends at start."""
    day = "2026-11-24"
    clock = Clock(at(day, "04:50", UTC))
    ex, ledger = scheduled_exchange(tmp_path, clock, ScheduleConfig("UTC", ["04:00-05:30"], "05:31"))
    ex.catch_up_schedule(0.0)
    assert statuses(ex) == {"open"}
    s, _ = connect(ex, "M01")
    ex.data_received(s, enc({"type": "NewOrder", "cl_ord_id": "a", "instrument": "CEA25", "side": "buy",
                             "qty": 1, "price": 9000}), 0.0)
    ledger.close()
    config = msgspec.structs.replace(ex.config, schedule=ScheduleConfig("UTC", ["04:00-04:30"], "04:31"))
    clock.ns = at(day, "04:55", UTC)
    ledger = Ledger.open(config, tmp_path / "data", durability="none")
    ex = Exchange(config, ledger, clock_ns=clock)
    try:
        caplog.set_level(logging.INFO, logger="kaboni")
        ex.catch_up_schedule(0.0)
        assert statuses(ex) == {"closed"} and ex.engine.trading_day == "2026-11-25"
        assert not ex.engine.live_orders("M01")  # the DAY order expired with its day
        logged = [r.getMessage() for r in caplog.records]
        assert any("event=closemarket operator=schedule" in m for m in logged)
        assert any("event=end_of_day trading_day=2026-11-24" in m for m in logged)
        assert schedule_lines(caplog) == [
            "event=schedule_next trading_day=2026-11-25 edge=open at=2026-11-25T04:00:00+00:00"]
        run(ex, clock, day, "13:00")  # nothing more today
        assert ex.engine.trading_day == "2026-11-25" and statuses(ex) == {"closed"}
    finally:
        ledger.close()


def test_a_restart_outside_the_sessions_closes_a_market_left_open_but_not_an_operators_close(tmp_path, caplog):
    """The sessions edited shorter: 12:00 is after the new close (11:30) but before the last
    command (11:45), so no close is missed; the market the old schedule left open closes at
    start. Inside a session a restart leaves an operator's CloseMarket as it is."""
    day = "2026-11-24"
    clock = Clock(at(day, "10:00"))
    ex, ledger = scheduled_exchange(tmp_path, clock, ScheduleConfig("Asia/Shanghai", ["09:30-15:00"], "15:30"))
    ex.catch_up_schedule(0.0)
    s, _ = connect(ex, "M01")
    clock.ns = at(day, "11:45")
    ex.data_received(s, enc({"type": "NewOrder", "cl_ord_id": "a", "instrument": "CEA25", "side": "buy",
                             "qty": 1, "price": 9000}), 0.0)
    ledger.close()
    clock.ns = at(day, "12:00")
    config = msgspec.structs.replace(ex.config, schedule=CEA)
    ledger = Ledger.open(config, tmp_path / "data", durability="none")
    ex = Exchange(config, ledger, clock_ns=clock)
    try:
        caplog.set_level(logging.INFO, logger="kaboni")
        assert ex.schedule.applied_ns == at(day, "11:45")  # the 11:30 close counts as carried out
        assert ex.catch_up_schedule(0.0) == 1
        assert statuses(ex) == {"closed"}
        assert schedule_lines(caplog) == [
            "event=schedule_next trading_day=2026-11-24 edge=open at=2026-11-24T13:00:00+08:00"]
        # an operator closes during the afternoon session; a restart then leaves it closed
        run(ex, clock, day, "13:00")
        assert statuses(ex) == {"open"}
        ops, _ = connect(ex, "ops")
        clock.ns = at(day, "13:10")
        ex.data_received(ops, enc({"type": "CloseMarket"}), 0.0)
        ledger.close()
        clock.ns = at(day, "13:20")
        ledger = Ledger.open(config, tmp_path / "data", durability="none")
        ex = Exchange(config, ledger, clock_ns=clock)
        assert ex.catch_up_schedule(0.0) == 0
        assert statuses(ex) == {"closed"}
    finally:
        ledger.close()


def test_catching_up_runs_every_missed_trading_day_at_once_and_logs_the_next_edge_once(tmp_path, caplog):
    """D1 and R9: a new journal whose first trading day is weeks back ends each day in one call
    (the server makes it before it listens), then opens the current day mid-session."""
    clock = Clock(at("2026-11-25", "10:00"))
    config = msgspec.structs.replace(make_config(), schedule=CEA)
    config = msgspec.structs.replace(config, market=msgspec.structs.replace(config.market,
                                                                            first_trading_day="2026-11-02"))
    ledger = Ledger.open(config, tmp_path / "data", durability="none")
    ex = Exchange(config, ledger, clock_ns=clock)
    try:
        caplog.set_level(logging.INFO, logger="kaboni")
        assert ex.catch_up_schedule(0.0) == 17 + 1  # the weekdays 2026-11-02..24, then the open
        assert ex.engine.trading_day == "2026-11-25" and statuses(ex) == {"open"}
        ends = [r.getMessage() for r in caplog.records if "event=end_of_day" in r.getMessage()]
        assert len(ends) == 17 and "trading_day=2026-11-24 next_trading_day=2026-11-25" in ends[-1]
        assert schedule_lines(caplog) == [
            "event=schedule_next trading_day=2026-11-25 edge=close at=2026-11-25T11:30:00+08:00"]
        run(ex, clock, "2026-11-25", "10:00")  # the first tick after start: nothing more
        assert len(schedule_lines(caplog)) == 1
    finally:
        ledger.close()


def test_a_schedule_without_an_end_of_day_says_when_it_has_no_edge_left(tmp_path, caplog):
    day = "2026-11-24"
    clock = Clock(at(day, "16:00"))
    ex, ledger = scheduled_exchange(tmp_path, clock, ScheduleConfig("Asia/Shanghai", ["09:30-15:00"]))
    try:
        caplog.set_level(logging.INFO, logger="kaboni")
        ex.catch_up_schedule(0.0)
        assert statuses(ex) == {"closed"} and ex.engine.trading_day == day
        assert schedule_lines(caplog) == ["event=schedule_next trading_day=2026-11-24 edge=none"]
    finally:
        ledger.close()


def test_a_server_ends_the_missed_trading_days_before_it_accepts_connections(tmp_path, caplog):
    """D1 over a real socket: a new journal whose first trading day is a week back, in a zone
    where today's end of day has passed; a member logging on at once already sees the trading
    day after today, and nothing ends after the ``start`` line."""
    from gateway.client import Client

    now = dt.datetime.now(dt.timezone.utc)
    hours = (12 - now.hour) % 24
    hours = hours - 24 if hours > 14 else hours
    zone = f"Etc/GMT{'-' if hours > 0 else '+'}{abs(hours)}" if hours else "UTC"
    today = now.astimezone(dt.timezone(dt.timedelta(hours=hours))).date()  # about noon there
    first = today - dt.timedelta(days=7 + today.weekday())  # a Monday, 7 to 13 days back
    expected = today + dt.timedelta(days=1)
    while expected.weekday() >= 5:
        expected += dt.timedelta(days=1)
    config = make_config()
    config = msgspec.structs.replace(config, schedule=ScheduleConfig(zone, ["00:00-00:01"], "00:02"),
                                     market=msgspec.structs.replace(config.market, first_trading_day=first.isoformat()))
    import asyncio

    async def logon(port):
        client = await Client.connect("127.0.0.1", port)
        try:
            return await client.logon("M01", "M01-token")
        finally:
            await client.close()

    caplog.set_level(logging.INFO, logger="kaboni")
    with ThreadServer(config, tmp_path / "data") as server:
        reply = asyncio.run(logon(server.port))
        time.sleep(0.6)  # two ticks of the schedule: nothing left to do
        logged = [r.getMessage() for r in caplog.records]
    assert reply["trading_day"] == expected.isoformat()
    start = next(i for i, m in enumerate(logged) if m.startswith("event=start "))
    ends = [i for i, m in enumerate(logged) if m.startswith("event=end_of_day ")]
    business_days = sum(1 for d in range((expected - first).days) if (first + dt.timedelta(days=d)).weekday() < 5)
    assert len(ends) == business_days and ends[-1] < start
    assert sum(m.startswith("event=schedule_next ") for m in logged) == 1
