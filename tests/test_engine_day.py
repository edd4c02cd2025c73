"""End of day, market states, operator commands, sessions, snapshots and configuration."""

from __future__ import annotations

import pytest

from engine import (
    AdminAck, AdminRejected, BookUpdate, CloseMarket, ConfigError, DayEnded, Deposit, Engine,
    EndOfDay, Halt, InstrumentStatus, OpenMarket, OrderCancelled, Restarted, Resume, SessionEnded,
    MAX_AMOUNT, MAX_PRICE, SettlementLine, price_band, Withdraw, load_config, parse_config,
)
from engine_support import CONFIG_TOML, OPS, T, Market, config, kinds, reports


def end_of_day(m: Market, ts: int = T) -> list:
    m.run(OPS, CloseMarket())
    return m.run(OPS, EndOfDay(), ts=ts)


def day_ended(events) -> DayEnded:
    (d,) = [e for e in events if isinstance(e, DayEnded)]
    return d


# ---------------------------------------------------------------------------------------------
# End of day


def test_end_of_day_exact_events():
    m = Market()
    m.buy("M1", "day", 10, 9_000)
    m.sell("M2", "gtc", 10, 9_500, tif="gtc")
    m.run(OPS, CloseMarket())
    md_cea, md_eua = m.mdseq("CEA"), m.mdseq("EUA")
    ev = m.run(OPS, EndOfDay(), ts=T + 9)
    assert ev == [
        OrderCancelled(2, T + 9, "M1", "day", 1, "day", 10, 0, "expired"),
        BookUpdate("CEA", md_cea + 1, "buy", 9_000, 0, 0),
        InstrumentStatus("CEA", md_cea + 2, "closed", 9_255),
        InstrumentStatus("EUA", md_eua + 1, "closed", 7_000),
        DayEnded("2026-11-20", "2026-11-24", {"CEA": 9_255, "EUA": 7_000}, []),
        AdminAck("EndOfDay", trading_day="2026-11-24"),
    ]
    assert m.e.trading_day == "2026-11-24"  # Friday -> (weekend, Monday holiday) -> Tuesday
    assert [o.cl_ord_id for o in m.e.live_orders("M2")] == ["gtc"]
    assert m.cash("M1").reserved == 0
    m.e.check()


def test_end_of_day_rejected_unless_every_instrument_is_closed():
    m = Market()
    assert m.run(OPS, EndOfDay()) == [AdminRejected("EndOfDay", "invalid_state", m.run(OPS, EndOfDay())[0].text)]
    m.run(OPS, Halt("CEA"))
    assert m.run(OPS, EndOfDay())[0].reason == "invalid_state"
    m.run(OPS, CloseMarket())  # closes the halted instrument too
    assert m.e.status("CEA") == "closed" and m.e.status("EUA") == "closed"
    assert kinds(m.run(OPS, EndOfDay()))[-1] == "AdminAck"
    # a fresh exchange is closed: EndOfDay is allowed at once
    m2 = Market(open=False)
    assert kinds(m2.run(OPS, EndOfDay()))[-1] == "AdminAck"


def test_trading_day_advances_over_weekends_and_holidays():
    m = Market(open=False)
    days = []
    for _ in range(6):
        days.append(m.run(OPS, EndOfDay())[-1].trading_day)
    # 2026-11-20 is a Friday; 2026-11-23 (Monday) is a configured holiday
    assert days == ["2026-11-24", "2026-11-25", "2026-11-26", "2026-11-27", "2026-11-30", "2026-12-01"]
    assert m.e.trading_day == "2026-12-01"


def test_custom_weekend():
    toml = CONFIG_TOML.replace('fee_account = "FEES"', 'fee_account = "FEES"\nweekend = [5]')
    m = Market(open=False, toml=toml)  # Saturday off only
    assert m.run(OPS, EndOfDay())[-1].trading_day == "2026-11-22"  # Sunday


def test_closing_price_is_vwap_rounded_half_up_to_the_tick():
    m = Market()
    m.sell("M1", "a", 2, 9_255)
    m.buy("M2", "b", 2, 9_255)
    m.sell("M1", "c", 2, 9_260)
    m.buy("M2", "d", 2, 9_260)
    # VWAP = (2 x 9,255 + 2 x 9,260) / 4 = 9,257.5 = 1,851.5 ticks -> half up -> 1,852 ticks = 9,260
    d = day_ended(end_of_day(m))
    assert d.closing_prices == {"CEA": 9_260, "EUA": 7_000}
    assert m.e.reference_price("CEA") == 9_260
    assert m.e.book_snapshot("CEA").reference_price == 9_260


def test_closing_price_rounds_down_below_half():
    m = Market()
    m.sell("M1", "a", 6, 9_255)
    m.buy("M2", "b", 6, 9_255)
    m.sell("M1", "c", 2, 9_260)
    m.buy("M2", "d", 2, 9_260)
    # (6 x 9,255 + 2 x 9,260) / 8 = 9,256.25 -> 1,851.25 ticks -> 9,255
    assert day_ended(end_of_day(m)).closing_prices["CEA"] == 9_255


def test_closing_price_is_the_previous_close_without_trades_and_sets_the_band():
    m = Market()
    m.sell("M1", "a", 10, 10_180)
    m.buy("M2", "b", 10, 10_180)  # close 10,180: next band 9,165 .. 11,195
    m.buy("M3", "gtc-low", 10, 9_160, tif="gtc")   # outside the next band: expires
    m.buy("M3", "gtc-edge", 10, 9_165, tif="gtc")  # on the next lower edge: stays
    m.sell("M3", "gtc-high", 10, 10_180, tif="gtc")
    assert m.book("CEA")[0][0][0] == 9_165
    ev = end_of_day(m, ts=T + 1)
    assert [(e.cl_ord_id, e.reason) for e in reports(ev)] == [("gtc-low", "expired")]
    assert day_ended(ev).closing_prices["CEA"] == 10_180
    m.run(OPS, OpenMarket())
    assert m.buy("M1", "x", 10, 9_160)[0].reason == "price_out_of_band"
    assert kinds(m.sell("M1", "z", 10, 11_195))[0] == "OrderAccepted"
    assert m.sell("M1", "w", 10, 11_200)[0].reason == "price_out_of_band"
    # no trades the next day: the close carries over
    m.cancel("M1", "cz", "z")
    d = day_ended(end_of_day(m))
    assert d.closing_prices["CEA"] == 10_180
    assert m.e.book_snapshot("CEA").last_price is None
    m.e.check()


def test_gtc_sell_above_next_band_expires():
    m = Market()
    m.sell("M1", "a", 10, 8_330)
    m.buy("M2", "b", 10, 8_330)  # close 8,330: next upper = floor(9,163 / 5) x 5 = 9,160
    m.sell("M3", "hi", 10, 9_165, tif="gtc")
    m.sell("M3", "ok", 10, 9_160, tif="gtc")
    ev = end_of_day(m)
    assert [(e.cl_ord_id, e.reason) for e in reports(ev)] == [("hi", "expired")]
    assert m.holding("M3").reserved == 10
    m.e.check()


def test_settlement_unsettled_becomes_settled_and_report_nets_to_zero():
    m = Market()
    m.sell("M1", "s1", 300, 7_003, "EUA")
    m.buy("M2", "b1", 300, 7_010, "EUA")   # fee 5,252 each side
    m.sell("M2", "s2", 100, 7_000, "EUA")
    m.buy("M3", "b2", 100, 7_000, "EUA")   # fee 1,750 each side
    m.sell("M3", "s3", 5, 9_255)
    m.buy("M1", "b3", 5, 9_260)
    m.buy("M1", "open", 5, 9_000)  # a DAY buy that expires
    ev = end_of_day(m)
    d = day_ended(ev)
    assert d.trading_day == "2026-11-20" and d.next_trading_day == "2026-11-24"
    lines = {(l.member, l.instrument): l for l in d.settlement}
    assert lines[("M1", "EUA")] == SettlementLine("M1", "EUA", "EUR", 0, 300, 0, 2_100_900, 5_252, -300,
                                                  2_100_900 - 5_252)
    assert lines[("M2", "EUA")] == SettlementLine("M2", "EUA", "EUR", 300, 100, 2_100_900, 700_000, 7_002, 200,
                                                  700_000 - 2_100_900 - 7_002)
    assert lines[("M3", "EUA")] == SettlementLine("M3", "EUA", "EUR", 100, 0, 700_000, 0, 1_750, 100,
                                                  -700_000 - 1_750)
    assert lines[("FEES", "EUA")] == SettlementLine("FEES", "EUA", "EUR", 0, 0, 0, 0, 0, 0, 14_004)
    assert lines[("M1", "CEA")] == SettlementLine("M1", "CEA", "CNY", 5, 0, 46_275, 0, 0, 5, -46_275)
    assert lines[("M3", "CEA")] == SettlementLine("M3", "CEA", "CNY", 0, 5, 0, 46_275, 0, -5, 46_275)
    assert len(d.settlement) == 6
    for sym in ("CEA", "EUA"):
        assert sum(l.net_qty for l in d.settlement if l.instrument == sym) == 0
        assert sum(l.net_cash for l in d.settlement if l.instrument == sym) == 0
    assert m.e.fee_balances() == {"CNY": 0, "EUR": 14_004}
    # unsettled -> settled
    for member, sym, settled in (("M2", "EUA", 3_200), ("M3", "EUA", 3_100), ("M1", "CEA", 3_005)):
        h = m.holding(member, sym)
        assert (h.settled, h.unsettled) == (settled, 0)
    # the next day's report starts from zero
    m.run(OPS, OpenMarket())
    assert day_ended(end_of_day(m)).settlement == []
    m.e.check()


def test_proceeds_are_withdrawable_only_after_end_of_day():
    m = Market(cash=1_000)
    m.sell("M1", "s", 10, 9_255)
    m.run(OPS, Deposit("d", "M2", "CNY", 92_550))
    m.buy("M2", "b", 10, 9_255)
    c = m.cash("M1")
    assert (c.total, c.available, c.withdrawable) == (93_550, 93_550, 1_000)
    assert m.run(OPS, Withdraw("w1", "M1", "CNY", 1_001))[0].reason == "insufficient_funds"
    assert kinds(m.run(OPS, Withdraw("w2", "M1", "CNY", 1_000))) == ["AdminAck"]
    end_of_day(m)
    assert m.cash("M1").withdrawable == 92_550
    assert kinds(m.run(OPS, Withdraw("w3", "M1", "CNY", 92_550))) == ["AdminAck"]
    assert m.cash("M1").total == 0
    m.e.check()


def test_withdrawable_excludes_reserved_cash():
    m = Market(cash=100_000)
    m.buy("M1", "b", 10, 9_000)
    assert m.cash("M1").withdrawable == 10_000
    assert m.run(OPS, Withdraw("w", "M1", "CNY", 10_001))[0].reason == "insufficient_funds"
    assert m.run(OPS, Withdraw("w", "M1", "CNY", 10_000))[0] == AdminAck(
        "Withdraw", member="M1", ref="w", asset="CNY", amount=10_000)


# ---------------------------------------------------------------------------------------------
# Market states


def test_market_states_and_status_events():
    m = Market(open=False)
    assert m.e.status("CEA") == "closed" and m.mdseq("CEA") == 0
    ev = m.run(OPS, OpenMarket())
    assert ev == [InstrumentStatus("CEA", 1, "open", 9_255), InstrumentStatus("EUA", 1, "open", 7_000),
                  AdminAck("OpenMarket")]
    assert m.run(OPS, OpenMarket())[0].reason == "invalid_state"
    assert m.run(OPS, Resume("CEA"))[0].reason == "invalid_state"
    ev = m.run(OPS, Halt("CEA"))
    assert ev == [InstrumentStatus("CEA", 2, "halted", 9_255), AdminAck("Halt", instrument="CEA", cancel_orders=False)]
    assert m.run(OPS, Halt("CEA"))[0].reason == "invalid_state"
    assert m.run(OPS, Halt("XX"))[0] == AdminRejected("Halt", "unknown_instrument", m.run(OPS, Halt("XX"))[0].text)
    assert m.run(OPS, Resume("XX"))[0].reason == "unknown_instrument"
    ev = m.run(OPS, Resume("CEA"))
    assert ev == [InstrumentStatus("CEA", 3, "open", 9_255), AdminAck("Resume", instrument="CEA")]
    m.run(OPS, Halt("EUA"))
    ev = m.run(OPS, CloseMarket())
    assert ev == [InstrumentStatus("CEA", 4, "closed", 9_255), InstrumentStatus("EUA", 3, "closed", 7_000),
                  AdminAck("CloseMarket")]
    assert m.run(OPS, CloseMarket())[0].reason == "invalid_state"
    assert m.run(OPS, Halt("CEA"))[0].reason == "invalid_state"  # only an open instrument halts
    assert m.e.book_snapshot("EUA").status == "closed"


def test_open_market_leaves_halted_instruments_halted():
    m = Market()
    m.run(OPS, Halt("CEA"))
    m.run(OPS, CloseMarket())
    m.run(OPS, OpenMarket())
    m.run(OPS, Halt("EUA"))
    ev = m.run(OPS, OpenMarket())
    assert ev[0].reason == "invalid_state"  # nothing is closed
    assert m.e.status("EUA") == "halted"


def test_halt_keeps_orders_unless_asked_to_cancel():
    m = Market()
    m.buy("M1", "a", 10, 9_000)
    m.sell("M2", "b", 10, 9_500, tif="gtc")
    m.buy("M1", "e", 100, 7_000, "EUA")
    ev = m.run(OPS, Halt("CEA"))
    assert reports(ev) == [] and m.e.resting("CEA") == (2, 20)
    m.run(OPS, Resume("CEA"))
    md0 = m.mdseq()
    ev = m.run(OPS, Halt("CEA", cancel_orders=True), ts=T + 3)
    assert ev == [
        InstrumentStatus("CEA", md0 + 1, "halted", 9_255),
        OrderCancelled(3, T + 3, "M1", "a", 1, "a", 10, 0, "halt"),
        BookUpdate("CEA", md0 + 2, "buy", 9_000, 0, 0),
        OrderCancelled(2, T + 3, "M2", "b", 2, "b", 10, 0, "halt"),
        BookUpdate("CEA", md0 + 3, "sell", 9_500, 0, 0),
        AdminAck("Halt", instrument="CEA", cancel_orders=True),
    ]
    assert m.e.resting("EUA") == (1, 100)  # other instruments untouched
    assert m.cash("M1", "CNY").reserved == 0 and m.cash("M1", "EUR").reserved == 700_000 + 1_750
    assert m.holding("M2").reserved == 0
    m.e.check()


def test_snapshot_shows_the_book_and_status():
    m = Market()
    m.buy("M1", "a", 10, 9_000)
    m.buy("M2", "b", 5, 9_000)
    m.buy("M2", "c", 5, 8_995)
    m.sell("M3", "d", 7, 9_500)
    snap = m.e.book_snapshot("CEA", depth=1)
    assert (snap.bids, snap.asks, snap.status, snap.last_price, snap.md_seq) == (
        [(9_000, 15, 2)], [(9_500, 7, 1)], "open", None, m.mdseq())


# ---------------------------------------------------------------------------------------------
# Deposits and withdrawals


def test_deposit_and_withdraw_are_idempotent_by_ref():
    m = Market(cash=0, allowances=0)
    ev = m.run(OPS, Deposit("r1", "M1", "CNY", 500))
    assert ev == [AdminAck("Deposit", member="M1", ref="r1", asset="CNY", amount=500)]
    ev = m.run(OPS, Deposit("r1", "M1", "CNY", 500))
    assert ev == [AdminAck("Deposit", member="M1", ref="r1", asset="CNY", amount=500, duplicate=True)]
    assert m.cash("M1").total == 500
    # a ref is a ref: a different request under a used ref changes nothing either
    assert m.run(OPS, Withdraw("r1", "M1", "CNY", 100))[0].duplicate is True
    assert m.cash("M1").total == 500
    m.run(OPS, Deposit("a1", "M1", "CEA", 30))
    m.run(OPS, Deposit("a1", "M1", "CEA", 30))
    assert m.holding("M1").settled == 30
    assert kinds(m.run(OPS, Withdraw("w1", "M1", "CEA", 10))) == ["AdminAck"]
    assert m.run(OPS, Withdraw("w1", "M1", "CEA", 10))[0].duplicate is True
    assert m.holding("M1").settled == 20
    # the quantity step binds orders, not holdings (docs/protocol.md): EUA's step is 100
    assert kinds(m.run(OPS, Deposit("a2", "M1", "EUA", 150))) == ["AdminAck"]
    assert m.holding("M1", "EUA").settled == 150
    m.e.check()


def test_rejected_transfers_do_not_use_up_their_ref():
    m = Market(cash=0, allowances=0)
    assert m.run(OPS, Withdraw("w", "M1", "CNY", 1)) == [
        AdminRejected("Withdraw", "insufficient_funds", m.run(OPS, Withdraw("w", "M1", "CNY", 1))[0].text)]
    m.run(OPS, Deposit("d", "M1", "CNY", 5))
    assert kinds(m.run(OPS, Withdraw("w", "M1", "CNY", 1))) == ["AdminAck"]
    assert m.cash("M1").total == 4


def test_transfer_rejects():
    m = Market(cash=0, allowances=0)
    assert m.run(OPS, Deposit("x1", "M9", "CNY", 5))[0].reason == "unknown_member"
    assert m.run(OPS, Deposit("x2", "FEES", "CNY", 5))[0].reason == "unknown_member"
    assert m.run(OPS, Deposit("x3", "ops", "CNY", 5))[0].reason == "unknown_member"
    assert m.run(OPS, Deposit("x4", "M1", "USD", 5))[0].reason == "unknown_instrument"
    assert m.run(OPS, Withdraw("x5", "M1", "CEA99", 5))[0].reason == "unknown_instrument"
    m.run(OPS, Deposit("d", "M1", "CEA", 10))
    m.run(OPS, OpenMarket())
    m.sell("M1", "s", 4, 9_255)
    assert m.run(OPS, Withdraw("x6", "M1", "CEA", 7))[0].reason == "insufficient_allowances"
    assert kinds(m.run(OPS, Withdraw("x7", "M1", "CEA", 6))) == ["AdminAck"]
    assert m.holding("M1").settled == 4
    m.e.check()


def test_deposits_stop_at_what_a_64_bit_client_can_hold():
    """All accounts together hold at most MAX_AMOUNT of a currency or an instrument: a deposit
    beyond it is refused and changes nothing (a bigger balance could not be sent to a member)."""
    m = Market(cash=0, allowances=0)
    assert kinds(m.run(OPS, Deposit("c1", "M1", "CNY", MAX_AMOUNT - 10))) == ["AdminAck"]
    assert kinds(m.run(OPS, Deposit("c2", "M2", "CNY", 10))) == ["AdminAck"]
    before = m.e.state_hash()
    for ref, member, asset, amount in [("c3", "M2", "CNY", 1), ("c4", "M1", "CNY", 2**64 - 1),
                                       ("a1", "M1", "CEA", MAX_AMOUNT + 1)]:
        rejected = m.run(OPS, Deposit(ref, member, asset, amount))
        assert [(r.request, r.reason) for r in rejected] == [("Deposit", "invalid_state")]
        assert str(MAX_AMOUNT) in rejected[0].text
    assert m.e.state_hash() == before
    assert kinds(m.run(OPS, Deposit("a2", "M1", "CEA", MAX_AMOUNT))) == ["AdminAck"]
    assert kinds(m.run(OPS, Withdraw("w1", "M1", "CNY", 5))) == ["AdminAck"]
    assert kinds(m.run(OPS, Deposit("c3", "M2", "CNY", 5))) == ["AdminAck"]  # the refused ref was not used up
    assert m.cash("M1").total + m.cash("M2").total == MAX_AMOUNT
    m.e.check()


def test_prices_never_reach_the_books_empty_side_key():
    """A band may reach MAX_PRICE (the configuration stops it there); a close at the top makes
    the next day's formula go higher, and the band is then held at MAX_PRICE."""
    top = MAX_PRICE // 5 * 5
    reference = top * 10_000 // 11_000 // 5 * 5
    lower, upper = price_band(reference, 1_000, 5)
    assert upper <= MAX_PRICE < price_band(upper, 1_000, 5)[1]
    m = Market(cash=0, toml=CONFIG_TOML.replace("reference_price = 9_255", f"reference_price = {reference}"))
    m.run(OPS, Deposit("big", "M1", "CNY", 2 * upper))
    m.sell("M2", "s", 2, upper)
    assert kinds(reports(m.buy("M1", "b", 2, upper))) == ["OrderAccepted", "Fill", "Fill"]
    end_of_day(m)
    m.run(OPS, OpenMarket())
    assert m.e.book_snapshot("CEA").reference_price == upper
    assert kinds(reports(m.sell("M2", "s2", 2, top))) == ["OrderAccepted"]
    assert reports(m.sell("M2", "s3", 2, top + 5))[0].reason == "price_out_of_band"
    assert m.e.book_snapshot("CEA").asks[0][0] == top  # a real best ask, not an empty side
    m.e.check()


# ---------------------------------------------------------------------------------------------
# Cancel on disconnect


def test_session_ended_cancels_only_that_sessions_resting_orders():
    m = Market()
    m.buy("M1", "a", 10, 9_000, session=7)
    m.buy("M1", "b", 10, 9_000)             # no cancel-on-disconnect
    m.buy("M1", "c", 10, 8_995, session=8)
    m.sell("M2", "d", 10, 9_500, session=7)
    m.sell("M1", "filled", 4, 9_400, session=7)
    m.buy("M3", "take", 4, 9_400)
    md0 = m.mdseq()
    ev = m.run("", SessionEnded(7), ts=T + 2)
    assert ev == [
        OrderCancelled(ev[0].seq, T + 2, "M1", "a", 1, "a", 10, 0, "disconnect"),
        BookUpdate("CEA", md0 + 1, "buy", 9_000, 10, 1),
        OrderCancelled(2, T + 2, "M2", "d", 4, "d", 10, 0, "disconnect"),
        BookUpdate("CEA", md0 + 2, "sell", 9_500, 0, 0),
    ]
    assert m.run("", SessionEnded(7)) == []
    assert [o.cl_ord_id for o in m.e.live_orders("M1")] == ["b", "c"]
    m.e.check()


def test_replaced_order_keeps_cancel_on_disconnect():
    m = Market()
    m.buy("M1", "a", 10, 9_000, session=3)
    m.replace("M1", "a2", "a", 10, 9_005)  # from another (plain) session: loses priority
    m.replace("M1", "a3", "a2", 8, 9_005)  # keeps priority
    ev = m.run("", SessionEnded(3))
    assert [(e.cl_ord_id, e.reason) for e in reports(ev)] == [("a3", "disconnect")]
    m.e.check()


def test_restarted_cancels_every_cancel_on_disconnect_order():
    m = Market()
    m.buy("M1", "a", 10, 9_000, session=1)
    m.buy("M2", "b", 10, 9_000, session=2)
    m.buy("M3", "c", 10, 9_000)
    ev = m.run("", Restarted())
    assert [(e.member, e.cl_ord_id, e.reason) for e in reports(ev)] == [
        ("M1", "a", "disconnect"), ("M2", "b", "disconnect")]
    assert m.e.resting("CEA") == (1, 10)
    m.e.check()


# ---------------------------------------------------------------------------------------------
# Snapshot, restore and the state hash


def _busy_market() -> Market:
    m = Market()
    m.sell("M1", "a", 10, 9_260, tif="gtc", session=4)
    m.sell("M2", "b", 5, 9_255)
    m.buy("M3", "c", 8, 9_260)
    m.buy("M3", "d", 100, 7_000, "EUA")
    m.sell("M1", "e", 300, 6_990, "EUA")
    m.replace("M1", "a2", "a", 9, 9_260)
    m.run(OPS, Halt("EUA"))
    return m


def test_snapshot_restore_gives_the_same_state_and_behaviour():
    m = _busy_market()
    m2 = Market.__new__(Market)
    m2.e = Engine.restore(config(), m.e.snapshot())
    assert m2.e.state_hash() == m.e.state_hash()
    m2.e.check()
    for x in (m, m2):
        x.ev = []
        x.ev += x.buy("M2", "z", 10, 9_260)
        x.ev += x.run("", SessionEnded(4))
        x.ev += x.run(OPS, Resume("EUA"))
        x.ev += x.buy("M2", "a", 300, 7_100, "EUA")
        x.ev += end_of_day(x)
    assert m.ev == m2.ev
    assert m.e.state_hash() == m2.e.state_hash()


def test_state_hash_changes_with_state():
    m = Market()
    h0 = m.e.state_hash()
    m.buy("M1", "a", 10, 9_000)
    h1 = m.e.state_hash()
    assert h1 != h0
    m.e.balances("M1")
    m.e.book_snapshot("CEA")
    assert m.e.state_hash() == h1  # views change nothing


def test_restore_rejects_another_version():
    import msgspec
    m = Market()
    state = msgspec.msgpack.decode(m.e.snapshot())
    state[0] = 999
    with pytest.raises(ValueError, match="version"):
        Engine.restore(config(), msgspec.msgpack.encode(state))


# ---------------------------------------------------------------------------------------------
# Configuration errors name the file, the key and the problem


def _bad(text: str, *needles: str):
    with pytest.raises(ConfigError) as info:
        parse_config(text, "bad.toml")
    message = str(info.value)
    assert message.startswith("bad.toml: "), message
    for n in needles:
        assert n in message, message
    return message


def test_config_bad_toml():
    _bad("[[instruments]\nsymbol = 1", "not valid TOML")


def test_config_wrong_types():
    _bad(CONFIG_TOML.replace("tick = 5", 'tick = "5"'), "instruments[0].tick", "Expected `int`, got `str`")
    _bad(CONFIG_TOML.replace("tick = 5", "tick = 5.0"), "instruments[0].tick", "int")
    _bad(CONFIG_TOML.replace("tick = 5", "tick = true"), "instruments[0].tick")
    _bad(CONFIG_TOML.replace("fee_bp = 25", 'fee_bp = [25]'), "instruments[1].fee_bp")
    _bad(CONFIG_TOML.replace("fee_bp = 25", "fee_bq = 25"), "instruments[1]", "fee_bq")
    _bad(CONFIG_TOML.replace('symbol = "CEA"\n', ""), "instruments[0]", "symbol")
    _bad('[market]\nfirst_trading_day = "2026-01-01"\n', "instruments")
    with pytest.raises(ConfigError, match=r"^test\.toml: Object missing required field `instruments`$"):
        parse_config("", "test.toml")


@pytest.mark.parametrize("old,new,key", [
    ("tick = 5", "tick = 0", "instruments[0].tick"),
    ("tick = 5", "tick = -5", "instruments[0].tick"),
    ("qty_step = 1\n", "qty_step = 0\n", "instruments[0].qty_step"),
    ("min_qty = 2", "min_qty = 0", "instruments[0].min_qty"),
    ("min_qty = 100", "min_qty = 150", "instruments[1].min_qty"),
    ("max_qty = 1_000", "max_qty = 1", "instruments[0].max_qty"),
    ("reference_price = 9_255", "reference_price = 9_256", "instruments[0].reference_price"),
    ("reference_price = 9_255", "reference_price = 0", "instruments[0].reference_price"),
    ("band_bp = 1_000", "band_bp = 10_000", "instruments[0].band_bp"),
    ("band_bp = 1_000", "band_bp = -1", "instruments[0].band_bp"),
    ("fee_bp = 25", "fee_bp = -1", "instruments[1].fee_bp"),
    ("holding_limit = 5_000", "holding_limit = 0", "instruments[1].holding_limit"),
    ("holding_limit = 5_000", f"holding_limit = {2**63}", "instruments[1].holding_limit"),
    ("max_qty = 1_000", f"max_qty = {2**63}", "instruments[0].max_qty"),
    ("reference_price = 9_255", f"reference_price = {2**63 - 5}", "instruments[0].reference_price"),
    ('symbol = "EUA"', 'symbol = "CEA"', "instruments[1].symbol"),
    ('currency = "EUR"', 'currency = "E1"', "instruments[1].currency"),
    ('id = "M2"', 'id = "M1"', "members[2].id"),
    ('id = "M2"', 'id = "FEES"', "members[2].id"),
    ('id = "M2"', 'id = "CEA"', "members[2].id"),
    ('role = "operator"', 'role = "admin"', "members[0].role"),
    ('first_trading_day = "2026-11-20"', 'first_trading_day = "2026-13-01"', "market.first_trading_day"),
    ('holidays = ["2026-11-23"]', 'holidays = ["tomorrow"]', "market.holidays[0]"),
    # found by the operator audit: each was accepted
    ('currency = "EUR"', 'currency = "eur"', "instruments[1].currency"),
    ('currency = "EUR"', 'currency = "EURO"', "instruments[1].currency"),
    ('symbol = "EUA"', 'symbol = "CNY"', "instruments[1].symbol"),  # then a Deposit of it is cash
    ('max_qty = 10_000', 'max_qty = 10_050', "instruments[1].max_qty"),
    ('fee_account = "FEES"', 'fee_account = "EUA"', "market.fee_account"),
    ('fee_account = "FEES"', 'fee_account = "EUR"', "market.fee_account"),
    ('first_trading_day = "2026-11-20"', 'first_trading_day = "2026-11-21"', "market.first_trading_day"),
    ('first_trading_day = "2026-11-20"', 'first_trading_day = "2026-11-23"', "market.first_trading_day"),
])
def test_config_bad_values(old, new, key):
    assert old in CONFIG_TOML
    _bad(CONFIG_TOML.replace(old, new, 1), key)


def test_config_initial_funding_fits_in_the_exchange():
    members = sum(m.role == "member" for m in parse_config(CONFIG_TOML).members)
    assert members >= 2
    per_member = MAX_AMOUNT // members
    parse_config(f"initial_cash = {per_member}\ninitial_allowances = {per_member}\n" + CONFIG_TOML)
    _bad(f"initial_cash = {per_member + 1}\n" + CONFIG_TOML, "initial_cash", "in all")
    _bad(f"initial_allowances = {per_member + 1}\n" + CONFIG_TOML, "initial_allowances", "in all")
    _bad("initial_allowances = -1\n" + CONFIG_TOML, "initial_allowances", "negative")  # named initial_cash


def test_config_bad_token_digest():
    toml = CONFIG_TOML.replace('token_sha256 = "', 'token_sha256 = "X', 1)
    _bad(toml, "members[0].token_sha256")


def test_config_gateway_section_errors():
    _bad(CONFIG_TOML + '\n[gateway]\ndurability = "sometimes"\n', "gateway.durability")
    _bad(CONFIG_TOML + "\n[gateway]\nmax_msgs_per_s = 0\n", "gateway.max_msgs_per_s")
    _bad(CONFIG_TOML + '\n[gateway]\ntls_cert = "a.pem"\n', "gateway.tls_cert")
    _bad(CONFIG_TOML + "\n[gateway]\nport = \"x\"\n", "gateway.port")
    _bad(CONFIG_TOML + "\n[gateway]\nport = 65536\n", "gateway.port")
    _bad(CONFIG_TOML + "\n[gateway]\nport = -1\n", "gateway.port")
    _bad(CONFIG_TOML + "\n[gateway]\nmetrics_port = 70000\n", "gateway.metrics_port")
    _bad(CONFIG_TOML + "\n[gateway]\nlogon_timeout_s = 0\n", "gateway.logon_timeout_s")
    _bad(CONFIG_TOML + "\n[gateway]\nlogon_timeout_s = -5.0\n", "gateway.logon_timeout_s")
    _bad(CONFIG_TOML + "\n[gateway]\nlogon_timeout_s = nan\n", "gateway.logon_timeout_s")
    _bad(CONFIG_TOML + "\n[gateway]\nlogon_timeout_s = inf\n", "gateway.logon_timeout_s")
    # settings under which nothing works: no Logon fits, every reply is a slow consumer, no address
    _bad(CONFIG_TOML + "\n[gateway]\nmax_frame = 1\n", "gateway.max_frame", "1024")
    _bad(CONFIG_TOML + "\n[gateway]\nmax_frame = 1023\n", "gateway.max_frame", "1024")
    _bad(CONFIG_TOML + "\n[gateway]\nmax_outbound_bytes = 1\n", "gateway.max_outbound_bytes", "256")
    _bad(CONFIG_TOML + '\n[gateway]\nhost = ""\n', "gateway.host")
    _bad(CONFIG_TOML.replace('fee_account = "FEES"', 'fee_account = ""'), "market.fee_account")
    cfg = parse_config(CONFIG_TOML + "\n[gateway]\nmax_frame = 1024\nmax_outbound_bytes = 256\n")
    assert (cfg.gateway.max_frame, cfg.gateway.max_outbound_bytes) == (1024, 256)
    # a market whose Balances reply is larger than max_frame
    many = "".join(f'[[instruments]]\nsymbol = "X{i:03d}"\ncurrency = "CNY"\nreference_price = 100\n'
                   for i in range(40))
    _bad(CONFIG_TOML + many + "\n[gateway]\nmax_frame = 1024\n", "gateway.max_frame",
         "too small for a Balances reply of these 42 instruments")
    cfg = parse_config(CONFIG_TOML + "\n[gateway]\nport = 0\nmetrics_port = 65535\nlogon_timeout_s = 0.5\n")
    assert (cfg.gateway.port, cfg.gateway.metrics_port, cfg.gateway.logon_timeout_s) == (0, 65535, 0.5)


def test_load_config_names_the_file(tmp_path):
    path = tmp_path / "exchange.toml"
    path.write_text(CONFIG_TOML.replace("tick = 5", "tick = 0"))
    with pytest.raises(ConfigError, match=r"exchange\.toml: instruments\[0\]\.tick: must be positive"):
        load_config(path)
    with pytest.raises(ConfigError, match="missing.toml: cannot read"):
        load_config(tmp_path / "missing.toml")
    path.write_text(CONFIG_TOML)
    cfg = load_config(path)
    assert [i.symbol for i in cfg.instruments] == ["CEA", "EUA"]
    assert cfg.instrument("EUA").holding_limit == 5_000


def test_engine_needs_a_trading_day():
    cfg = parse_config(CONFIG_TOML.replace('first_trading_day = "2026-11-20"', ""))
    with pytest.raises(ValueError):
        Engine(cfg)
    assert Engine(cfg, "2027-01-04").trading_day == "2027-01-04"


def test_deposit_after_spending_sale_proceeds_is_withdrawable():
    """Buys spend withdrawable cash first, then today's proceeds; a later deposit is free cash."""
    m = Market(cash=0)
    m.run(OPS, Deposit("d0", "M2", "CNY", 1_000_000))
    m.run(OPS, Deposit("d00", "M3", "CNY", 1_000_000))
    m.sell("M1", "s", 10, 9_255)
    m.buy("M2", "b", 10, 9_255)          # M1: 92,550 of proceeds, none withdrawable
    m.sell("M2", "s2", 10, 9_255)
    m.buy("M1", "b2", 10, 9_255)         # M1 spends all of it
    assert m.cash("M1").total == 0
    m.run(OPS, Deposit("d1", "M1", "CNY", 500))
    c = m.cash("M1")
    assert (c.total, c.available, c.withdrawable) == (500, 500, 500)
    assert kinds(m.run(OPS, Withdraw("w1", "M1", "CNY", 500))) == ["AdminAck"]
    # part of the proceeds spent: the rest stays locked until end of day
    m.sell("M1", "s3", 10, 9_255)        # sells the allowances it still holds settled
    m.buy("M3", "b3", 10, 9_255)
    m.sell("M3", "s4", 4, 9_255)
    m.buy("M1", "b4", 4, 9_255)          # spends 37,020 of 92,550
    m.run(OPS, Deposit("d2", "M1", "CNY", 1_000))
    c = m.cash("M1")
    assert (c.total, c.withdrawable) == (92_550 - 37_020 + 1_000, 1_000)
    assert m.run(OPS, Withdraw("w2", "M1", "CNY", 1_001))[0].reason == "insufficient_funds"
    m.e.check()
