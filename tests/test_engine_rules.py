"""Order checks: every reject reason of the protocol, its boundaries, and the order of precedence.

Each precedence test builds a request that fails two adjacent checks and asserts that the
earlier one is the reason. A rejected request must change nothing but the member's seq and
its used-up cl_ord_id.
"""

from __future__ import annotations

import pytest

from engine import (
    CancelOrder, CancelRejected, Deposit, EndOfDay, Halt, MassCancel, NewOrder, OpenMarket, CloseMarket,
    MassCancelDone, OrderAccepted, QueryBalances, ReplaceOrder,
    OrderCancelled, OrderRejected, OrderReplaced, ReinstateMember, Resume, SuspendMember, price_band,
)
from engine_support import OPS, T, Market, kinds, reports


def rejected(events, reason):
    """The request got exactly one report: a reject with ``reason``."""
    assert len(events) == 1, events
    assert isinstance(events[0], (OrderRejected, CancelRejected)), events
    assert events[0].reason == reason, events[0]
    return events[0]


def accepted(events):
    assert isinstance(events[0], OrderAccepted), events
    return events[0]


def state_without_seqs(m: Market):
    """Books and balances: what a reject must leave unchanged."""
    e = m.e
    return (
        [e.book_snapshot(s) for s in e.instruments],
        [e.balances(x) for x in e.members],
        e.fee_balances(),
        [(o.order_id, o.cl_ord_id, o.leaves) for x in e.members for o in e.live_orders(x)],
    )


# ---------------------------------------------------------------------------------------------
# Exact reject reports


def test_reject_report_fields():
    m = Market()
    ev = m.buy("M1", "b1", 0, 9255, ts=T + 7)
    assert ev == [OrderRejected(1, T + 7, "M1", "b1", "invalid_qty", ev[0].text)]
    assert "step" in ev[0].text
    ev = m.cancel("M1", "c1", "nope", ts=T + 8)
    assert ev == [CancelRejected(2, T + 8, "M1", "c1", "nope", "unknown_order", ev[0].text)]
    ev = m.mass_cancel("M1", "mc1", "XXX")
    assert ev == [CancelRejected(3, T, "M1", "mc1", None, "unknown_instrument", ev[0].text)]
    assert m.seq("M1") == 3 and m.seq("M2") == 0


# ---------------------------------------------------------------------------------------------
# Precedence: the first failing check wins, for each adjacent pair


def _poor_market():
    """M3 has no cash and no allowances at all."""
    m = Market()
    from engine import Withdraw
    for asset in ("CNY", "EUR", "CEA", "EUA"):
        amount = m.cash("M3", asset).total if asset in ("CNY", "EUR") else m.holding("M3", asset).settled
        m.run(OPS, Withdraw(f"drain-{asset}", "M3", asset, amount))
    return m


NEW_ORDER_PRECEDENCE = [
    # (name, set-up, order as (member, cl, side, qty, price, instrument, tif), expected reason, kw)
    ("throttled>duplicate", "used_b1", ("M1", "b1", "buy", 10, 9255, "CEA", None), "throttled", True),
    ("duplicate>suspended", "used_b1_suspended", ("M1", "b1", "buy", 10, 9255, "CEA", None), "duplicate_cl_ord_id", False),
    ("suspended>unknown_instrument", "suspended", ("M1", "x", "buy", 10, 9255, "NOPE", None), "member_suspended", False),
    ("unknown_instrument>market_closed", "closed", ("M1", "x", "buy", 10, 9255, "NOPE", None), "unknown_instrument", False),
    ("market_closed>invalid_qty", "closed", ("M1", "x", "buy", 0, 9255, "CEA", None), "market_closed", False),
    ("instrument_halted>invalid_qty", "halted", ("M1", "x", "buy", 0, 9255, "CEA", None), "instrument_halted", False),
    ("invalid_qty>qty_out_of_range(step)", "", ("M1", "x", "buy", 10_050, 7000, "EUA", None), "invalid_qty", False),
    ("invalid_qty>qty_out_of_range(negative)", "", ("M1", "x", "buy", -1, 9255, "CEA", None), "invalid_qty", False),
    ("qty_out_of_range>invalid_price", "", ("M1", "x", "buy", 1, 9257, "CEA", None), "qty_out_of_range", False),
    ("qty_out_of_range>invalid_price(market day)", "", ("M1", "x", "buy", 1_001, None, "CEA", "day"), "qty_out_of_range", False),
    ("invalid_price>price_out_of_band", "", ("M1", "x", "buy", 10, 20_001, "CEA", None), "invalid_price", False),
    ("invalid_price(negative)>price_out_of_band", "", ("M1", "x", "sell", 10, -5, "CEA", None), "invalid_price", False),
    ("price_out_of_band>holding_limit", "", ("M1", "x", "buy", 2_100, 7_351, "EUA", None), "price_out_of_band", False),
    ("price_out_of_band>insufficient_allowances", "poor", ("M3", "x", "sell", 10, 10_185, "CEA", None), "price_out_of_band", False),
    ("price_out_of_band>insufficient_funds", "poor", ("M3", "x", "buy", 10, 8_325, "CEA", None), "price_out_of_band", False),
    ("holding_limit>insufficient_funds", "poor", ("M3", "x", "buy", 5_100, 7_000, "EUA", None), "holding_limit", False),
]


@pytest.mark.parametrize("name,setup,order,reason,throttled", NEW_ORDER_PRECEDENCE,
                         ids=[p[0] for p in NEW_ORDER_PRECEDENCE])
def test_new_order_precedence(name, setup, order, reason, throttled):
    m = _poor_market() if setup == "poor" else Market(open=setup != "closed")
    if setup.startswith("used_b1"):
        accepted(m.buy("M1", "b1", 10, 9000))
    if setup.endswith("suspended"):
        m.run(OPS, SuspendMember("M1"))
    if setup == "halted":
        m.run(OPS, Halt("CEA"))
    before = state_without_seqs(m)
    member, cl, side, qty, price, instrument, tif = order
    ev = m.new(member, cl, side, qty, price, instrument, tif, throttled=throttled)
    assert rejected(ev, reason).cl_ord_id == cl
    assert state_without_seqs(m) == before


def test_both_checks_fail_alone_too():
    """The later reasons of the precedence table are real on their own (the table is not vacuous)."""
    m = _poor_market()
    rejected(m.sell("M3", "a", 10, 9255), "insufficient_allowances")
    rejected(m.buy("M3", "b", 10, 9255), "insufficient_funds")
    rejected(m.buy("M1", "c", 2_100, 7_000, "EUA"), "holding_limit")
    rejected(m.buy("M1", "d", 10, 10_185), "price_out_of_band")
    rejected(m.buy("M1", "e", 10, 9_257), "invalid_price")
    rejected(m.buy("M1", "f", 1, 9_255), "qty_out_of_range")


def test_replace_precedence():
    m = Market()
    accepted(m.buy("M1", "b1", 10, 9000))
    accepted(m.buy("M1", "b2", 10, 9000))
    # throttled > duplicate
    rejected(m.replace("M1", "b2", "b1", 5, 9000, throttled=True), "throttled")
    # duplicate > unknown_order (the id of a live order is taken)
    rejected(m.replace("M1", "b2", "zz", 5, 9000), "duplicate_cl_ord_id")
    # unknown_order > market checks and qty checks
    m.run(OPS, Halt("CEA"))
    rejected(m.replace("M1", "r1", "zz", 0, 9000), "unknown_order")
    # instrument_halted > invalid_qty (a raise of the price is not "only lowering")
    rejected(m.replace("M1", "r2", "b1", 0, 9005), "instrument_halted")
    m.run(OPS, Resume("CEA"))
    # invalid_qty > qty_out_of_range > invalid_price > price_out_of_band > funds
    rejected(m.replace("M1", "r3", "b1", -3, 9001), "invalid_qty")
    rejected(m.replace("M1", "r4", "b1", 1_001, 9001), "qty_out_of_range")
    rejected(m.replace("M1", "r5", "b1", 10, 20_001), "invalid_price")
    rejected(m.replace("M1", "r6", "b1", 10, 0), "invalid_price")
    rejected(m.replace("M1", "r7", "b1", 10, 10_185), "price_out_of_band")
    m.run(OPS, CloseMarket())
    rejected(m.replace("M1", "r8", "b1", 20, 9000), "market_closed")
    # suspended > unknown_order
    m.run(OPS, OpenMarket())
    m.run(OPS, SuspendMember("M2"))
    rejected(m.replace("M2", "r9", "zz", 10, 9000), "member_suspended")
    rejected(m.replace("M2", "r9", "zz", 10, 9000), "duplicate_cl_ord_id")
    m.e.check()


def test_replace_precedence_holding_limit_before_funds():
    m = _poor_market()
    m.run(OPS, Deposit("d1", "M3", "EUR", 7_000 * 100 + 1_750))
    accepted(m.buy("M3", "b1", 100, 7_000, "EUA"))
    rejected(m.replace("M3", "r1", "b1", 5_100, 7_000), "holding_limit")
    rejected(m.replace("M3", "r2", "b1", 5_000, 7_351), "price_out_of_band")
    rejected(m.replace("M3", "r3", "b1", 5_000, 7_000), "insufficient_funds")


def test_cancel_and_mass_cancel_precedence():
    m = Market()
    accepted(m.buy("M1", "b1", 10, 9000))
    rejected(m.cancel("M1", "b1", "b1", throttled=True), "throttled")
    rejected(m.cancel("M1", "b1", "nope"), "duplicate_cl_ord_id")
    rejected(m.cancel("M1", "c1", "nope"), "unknown_order")
    rejected(m.mass_cancel("M1", "c1", "NOPE", throttled=True), "throttled")
    rejected(m.mass_cancel("M1", "c1", "NOPE"), "duplicate_cl_ord_id")
    rejected(m.mass_cancel("M1", "c2", "NOPE"), "unknown_instrument")
    assert [o.cl_ord_id for o in m.e.live_orders("M1")] == ["b1"]


# ---------------------------------------------------------------------------------------------
# duplicate_cl_ord_id: which ids are taken


def test_ids_used_up_by_accepted_rejected_and_throttled_requests():
    m = Market()
    accepted(m.buy("M1", "acc", 10, 9000))
    rejected(m.buy("M1", "rej", 0, 9000), "invalid_qty")
    rejected(m.buy("M1", "thr", 10, 9000, throttled=True), "throttled")
    rejected(m.cancel("M1", "cxl", "nope"), "unknown_order")
    rejected(m.cancel("M1", "cxt", "acc", throttled=True), "throttled")
    rejected(m.replace("M1", "rpl", "nope", 10, 9000), "unknown_order")
    rejected(m.mass_cancel("M1", "mct", throttled=True), "throttled")
    assert isinstance(m.mass_cancel("M1", "mc", "EUA")[-1], MassCancelDone)
    before = state_without_seqs(m)
    for cl in ("acc", "rej", "thr", "cxl", "cxt", "rpl", "mct", "mc"):
        rejected(m.buy("M1", cl, 10, 9000), "duplicate_cl_ord_id")
        rejected(m.sell("M1", cl, 10, 9000), "duplicate_cl_ord_id")
        rejected(m.cancel("M1", cl, "acc"), "duplicate_cl_ord_id")
        rejected(m.replace("M1", cl, "acc", 5, 9000), "duplicate_cl_ord_id")
        rejected(m.mass_cancel("M1", cl), "duplicate_cl_ord_id")
    assert state_without_seqs(m) == before
    # ids are per member
    accepted(m.buy("M2", "acc", 10, 9000))
    # the rejected duplicate changed nothing: "acc" is still live and cancellable
    assert kinds(m.cancel("M1", "c-acc", "acc")) == ["OrderCancelled", "BookUpdate"]


def test_ids_of_filled_and_cancelled_orders_stay_used_today():
    m = Market()
    accepted(m.sell("M1", "s1", 10, 9255))
    m.buy("M2", "b1", 10, 9255)
    accepted(m.sell("M1", "s2", 10, 9255))
    m.cancel("M1", "c2", "s2")
    rejected(m.sell("M1", "s1", 10, 9255), "duplicate_cl_ord_id")
    rejected(m.sell("M1", "s2", 10, 9255), "duplicate_cl_ord_id")


def test_ids_reset_after_end_of_day_except_live_orders():
    m = Market()
    accepted(m.buy("M1", "gtc", 10, 9000, tif="gtc"))
    accepted(m.buy("M1", "day", 10, 9000))
    accepted(m.buy("M1", "old", 10, 9000, tif="gtc"))
    assert reports(m.replace("M1", "moved", "old", 10, 9005))[0].cl_ord_id == "moved"
    rejected(m.buy("M1", "bad", 0, 9000), "invalid_qty")
    m.run(OPS, CloseMarket())
    m.run(OPS, EndOfDay())
    m.run(OPS, OpenMarket())
    # the live GTC orders' current ids are still taken, on every kind of request
    rejected(m.buy("M1", "gtc", 10, 9000), "duplicate_cl_ord_id")
    rejected(m.cancel("M1", "moved", "gtc"), "duplicate_cl_ord_id")
    rejected(m.mass_cancel("M1", "gtc"), "duplicate_cl_ord_id")
    # everything else is free again: the expired DAY order's, the rejected one's, and the
    # replaced order's former id
    for cl in ("day", "bad", "old"):
        accepted(m.buy("M1", cl, 10, 9000))
    # and the new day's ids are used up again
    rejected(m.buy("M1", "day", 10, 9000), "duplicate_cl_ord_id")
    m.e.check()


@pytest.mark.parametrize("request_kind", ["buy", "cancel", "replace", "mass_cancel"])
def test_a_throttled_request_uses_up_a_live_orders_id_from_an_earlier_day(request_kind):
    """Like a duplicate, a throttled request with the id of a live order carried over from an
    earlier day uses that id up for today: it stays taken after the order ends."""
    m = Market()
    accepted(m.buy("M1", "A", 10, 9000, tif="gtc"))
    m.run(OPS, CloseMarket())
    m.run(OPS, EndOfDay())
    m.run(OPS, OpenMarket())
    throttled_request = {
        "buy": lambda: m.buy("M1", "A", 10, 9000, throttled=True),
        "cancel": lambda: m.cancel("M1", "A", "A", throttled=True),
        "replace": lambda: m.replace("M1", "A", "A", 5, 9000, throttled=True),
        "mass_cancel": lambda: m.mass_cancel("M1", "A", throttled=True),
    }[request_kind]
    rejected(throttled_request(), "throttled")
    assert kinds(m.cancel("M1", "c", "A"))[0] == "OrderCancelled"
    rejected(m.buy("M1", "A", 10, 9000), "duplicate_cl_ord_id")
    m.e.check()


def test_replace_moves_the_current_id():
    m = Market()
    accepted(m.buy("M1", "b1", 10, 9000))
    ev = m.replace("M1", "b2", "b1", 8, 9000)
    assert ev[0] == OrderReplaced(2, T, "M1", "b2", 1, "b1", 8, 9000, 8)
    rejected(m.cancel("M1", "c1", "b1"), "unknown_order")
    ev = m.replace("M1", "b3", "b2", 6, 9000)
    assert ev[0].orig_cl_ord_id == "b2"
    ev = m.cancel("M1", "c2", "b3")
    assert ev[0] == OrderCancelled(5, T, "M1", "c2", 1, "b3", 6, 0, "requested")
    # the replaced ids are used up for the day
    rejected(m.buy("M1", "b2", 10, 9000), "duplicate_cl_ord_id")


# ---------------------------------------------------------------------------------------------
# Instrument, state and quantity checks


def test_unknown_instrument():
    m = Market()
    ev = m.buy("M1", "x", 10, 9255, "CEA99")
    assert rejected(ev, "unknown_instrument").text
    rejected(m.mass_cancel("M1", "mc", "CEA99"), "unknown_instrument")


def test_market_closed_and_instrument_halted():
    m = Market(open=False)
    rejected(m.buy("M1", "a", 10, 9255), "market_closed")
    rejected(m.sell("M1", "b", 10, 9255, "EUA"), "market_closed")
    m.run(OPS, OpenMarket())
    accepted(m.buy("M1", "c", 10, 9000))
    m.run(OPS, Halt("CEA"))
    rejected(m.buy("M1", "d", 10, 9255), "instrument_halted")
    accepted(m.buy("M1", "e", 100, 7000, "EUA"))  # only CEA is halted
    m.run(OPS, Resume("CEA"))
    accepted(m.buy("M1", "f", 10, 9000))


@pytest.mark.parametrize("qty,instrument,price", [
    (0, "CEA", 9255), (-1, "CEA", 9255), (-100, "EUA", 7000), (150, "EUA", 7000), (1, "EUA", 7000),
    (10_001, "EUA", 7000),
])
def test_invalid_qty(qty, instrument, price):
    m = Market()
    rejected(m.buy("M1", "x", qty, price, instrument), "invalid_qty")
    rejected(m.sell("M1", "y", qty, None, instrument), "invalid_qty")


@pytest.mark.parametrize("qty,instrument,ok", [
    (1, "CEA", False), (2, "CEA", True), (1_000, "CEA", True), (1_001, "CEA", False),
    (100, "EUA", True), (10_000, "EUA", True), (10_100, "EUA", False),
])
def test_qty_range_is_inclusive(qty, instrument, ok):
    m = Market(allowances=20_000)
    price = 9000 if instrument == "CEA" else 7000
    ev = m.sell("M1", "x", qty, 10_000 if instrument == "CEA" else 7300, instrument)
    assert accepted(ev) if ok else rejected(ev, "qty_out_of_range")
    if instrument == "CEA":  # (EUA buys of this size would hit the holding limit)
        ev = m.buy("M2", "y", qty, price, instrument)
        assert accepted(ev) if ok else rejected(ev, "qty_out_of_range")


@pytest.mark.parametrize("price,tif", [(0, None), (-5, None), (9_257, None), (9_256, "gtc"),
                                       (None, "day"), (None, "gtc")])
def test_invalid_price(price, tif):
    m = Market()
    rejected(m.buy("M1", "x", 10, price, tif=tif), "invalid_price")
    rejected(m.sell("M1", "y", 10, price, tif=tif), "invalid_price")


def test_market_orders_take_ioc_and_fok_and_default_to_ioc():
    m = Market()
    assert accepted(m.buy("M1", "a", 10, None)).tif == "ioc"
    assert accepted(m.buy("M1", "b", 10, None, tif="ioc")).tif == "ioc"
    assert accepted(m.buy("M1", "c", 10, None, tif="fok")).tif == "fok"
    assert accepted(m.buy("M1", "d", 10, 9255)).tif == "day"
    m.e.check()


def test_price_band_formula_rounds_inwards():
    # ref 9255, 10%: 10180.5 floors to 10180 and 8329.5 ceils to 8330 (tick 5)
    assert price_band(9_255, 1_000, 5) == (8_330, 10_180)
    assert price_band(7_000, 500, 1) == (6_650, 7_350)
    assert price_band(9_250, 1_000, 1) == (8_325, 10_175)
    assert price_band(1_003, 1_000, 10) == (910, 1_100)  # 902.7 -> 910, 1103.3 -> 1100
    assert price_band(100, 0, 1) == (100, 100)


@pytest.mark.parametrize("price,ok", [(8_325, False), (8_330, True), (10_180, True), (10_185, False),
                                      (9_255, True)])
def test_price_out_of_band_edges(price, ok):
    m = Market()
    for side in ("buy", "sell"):
        ev = m.new("M1", f"{side}{price}", side, 10, price)
        assert accepted(ev) if ok else rejected(ev, "price_out_of_band")
        if ok:
            m.cancel("M1", f"c{side}{price}", f"{side}{price}")


def test_price_out_of_band_eua_edges():
    m = Market()
    rejected(m.buy("M1", "a", 100, 6_649, "EUA"), "price_out_of_band")
    rejected(m.sell("M1", "b", 100, 7_351, "EUA"), "price_out_of_band")
    accepted(m.buy("M1", "c", 100, 6_650, "EUA"))
    accepted(m.sell("M1", "d", 100, 7_350, "EUA"))


# ---------------------------------------------------------------------------------------------
# Holding limit, funds and allowances


def test_holding_limit_counts_settled_unsettled_and_resting_buys():
    m = Market()  # everyone holds 3,000 EUA settled; the limit is 5,000
    accepted(m.buy("M1", "a", 1_000, 7_000, "EUA"))  # 3,000 + 1,000 resting
    rejected(m.buy("M1", "b", 1_100, 7_000, "EUA"), "holding_limit")
    accepted(m.buy("M1", "c", 1_000, 6_900, "EUA"))  # 5,000 exactly: allowed
    rejected(m.buy("M1", "d", 100, None, "EUA"), "holding_limit")
    # resting sells do not count, and selling does not make room until it trades
    accepted(m.sell("M1", "e", 1_000, 7_300, "EUA"))
    rejected(m.buy("M1", "f", 100, 6_900, "EUA"), "holding_limit")
    # a fill moves quantity from resting buys to unsettled: still counted
    m.sell("M2", "s", 1_000, 7_000, "EUA")
    h = m.holding("M1", "EUA")
    assert (h.settled, h.unsettled) == (3_000, 1_000)
    rejected(m.buy("M1", "g", 100, 6_900, "EUA"), "holding_limit")
    # the sell trading lowers the holding
    m.buy("M3", "t", 1_000, 7_300, "EUA")
    accepted(m.buy("M1", "h", 1_000, 6_900, "EUA"))
    # a cancel frees room
    m.cancel("M1", "ch", "h")
    accepted(m.buy("M1", "i", 1_000, 6_900, "EUA"))
    # no limit on CEA
    accepted(m.buy("M1", "j", 1_000, 9_000))
    m.e.check()


def test_holding_limit_on_replace_increase_only():
    m = Market()
    accepted(m.buy("M1", "a", 2_000, 7_000, "EUA"))
    rejected(m.replace("M1", "r1", "a", 2_100, 7_000), "holding_limit")
    # a price change at the same quantity is fine
    assert kinds(m.replace("M1", "r2", "a", 2_000, 7_001))[0] == "OrderReplaced"
    m.e.check()


def test_insufficient_funds_exact_edge_with_fee_reserve():
    m = _poor_market()
    # 100 t at 7,001 with 25 bp: 700,100 + ceil(1,750.25) = 701,851
    m.run(OPS, Deposit("d1", "M3", "EUR", 701_850))
    rejected(m.buy("M3", "a", 100, 7_001, "EUA"), "insufficient_funds")
    m.run(OPS, Deposit("d2", "M3", "EUR", 1))
    ev = m.buy("M3", "b", 100, 7_001, "EUA")
    accepted(ev)
    c = m.cash("M3", "EUR")
    assert (c.total, c.reserved, c.available) == (701_851, 701_851, 0)
    rejected(m.buy("M3", "c", 100, 6_650, "EUA"), "insufficient_funds")
    m.e.check()


def test_insufficient_funds_without_fee_and_for_market_buys():
    m = _poor_market()
    m.run(OPS, Deposit("d1", "M3", "CNY", 10 * 9_255))
    accepted(m.buy("M3", "a", 10, 9_255))
    rejected(m.buy("M3", "b", 2, 8_330), "insufficient_funds")
    m.cancel("M3", "c", "a")
    # a market buy needs the band's upper edge: 10 x 10,180
    rejected(m.buy("M3", "d", 10, None), "insufficient_funds")
    accepted(m.buy("M3", "e", 9, None))
    m.e.check()


def test_market_buy_fee_reserve_at_band_edge():
    m = _poor_market()
    # 100 t at the upper edge 7,350: 735,000 + ceil(1,837.5) = 736,838
    m.run(OPS, Deposit("d1", "M3", "EUR", 736_837))
    rejected(m.buy("M3", "a", 100, None, "EUA"), "insufficient_funds")
    m.run(OPS, Deposit("d2", "M3", "EUR", 1))
    assert kinds(m.buy("M3", "b", 100, None, "EUA")) == ["OrderAccepted", "OrderCancelled"]
    assert m.cash("M3", "EUR").reserved == 0


def test_insufficient_allowances():
    m = Market(allowances=0)
    m.run(OPS, Deposit("a1", "M1", "CEA", 20))
    rejected(m.sell("M1", "a", 21, 9_255), "insufficient_allowances")
    accepted(m.sell("M1", "b", 15, 9_255))
    rejected(m.sell("M1", "c", 6, 9_255), "insufficient_allowances")  # 5 left after the reserve
    rejected(m.sell("M1", "d", 6, None), "insufficient_allowances")
    accepted(m.sell("M1", "e", 5, 9_300))
    h = m.holding("M1")
    assert (h.settled, h.reserved, h.available) == (20, 20, 0)
    m.e.check()


def test_bought_today_is_not_sellable_until_end_of_day():
    m = Market(allowances=0)
    m.run(OPS, Deposit("a1", "M2", "CEA", 50))
    m.sell("M2", "s", 50, 9_255)
    m.buy("M1", "b", 50, 9_255)
    h = m.holding("M1")
    assert (h.settled, h.unsettled, h.reserved, h.available) == (0, 50, 0, 0)
    rejected(m.sell("M1", "x", 2, 9_255), "insufficient_allowances")
    from engine import Withdraw
    assert m.run(OPS, Withdraw("w", "M1", "CEA", 1))[0].reason == "insufficient_allowances"
    m.run(OPS, CloseMarket())
    m.run(OPS, EndOfDay())
    m.run(OPS, OpenMarket())
    h = m.holding("M1")
    assert (h.settled, h.unsettled, h.available) == (50, 0, 50)
    accepted(m.sell("M1", "x", 50, 9_255))


def test_sale_proceeds_buy_at_once():
    m = Market(cash=0)
    m.sell("M1", "s", 10, 9_255)
    m.buy("M2", "nothing", 2, 8_330)  # M2 has no cash
    assert m.e.last_seq("M2") == 1
    m.run(OPS, Deposit("c", "M2", "CNY", 92_550))
    m.buy("M2", "b", 10, 9_255)
    assert m.cash("M1").available == 92_550
    accepted(m.buy("M1", "again", 10, 9_255))


# ---------------------------------------------------------------------------------------------
# unknown_order and member_suspended


def test_unknown_order_for_other_members_filled_cancelled_and_missing_orders():
    m = Market()
    accepted(m.buy("M1", "mine", 10, 9_000))
    rejected(m.cancel("M2", "c1", "mine"), "unknown_order")
    rejected(m.replace("M2", "r1", "mine", 5, 9_000), "unknown_order")
    m.sell("M1", "filled", 10, 9_300)
    m.buy("M2", "take", 10, 9_300)
    rejected(m.cancel("M1", "c2", "filled"), "unknown_order")
    rejected(m.replace("M1", "r2", "filled", 20, 9_300), "unknown_order")
    m.cancel("M1", "c3", "mine")
    rejected(m.cancel("M1", "c4", "mine"), "unknown_order")
    rejected(m.replace("M1", "r4", "mine", 20, 9_000), "unknown_order")
    rejected(m.cancel("M1", "c5", "never"), "unknown_order")
    # an ioc/market order never rests, so it is never cancellable
    m.buy("M1", "ioc", 10, 9_000, tif="ioc")
    rejected(m.cancel("M1", "c6", "ioc"), "unknown_order")
    m.e.check()


def test_member_suspended():
    m = Market()
    accepted(m.buy("M1", "b1", 10, 9_000))
    accepted(m.sell("M1", "s1", 10, 9_500, tif="gtc"))
    ev = m.run(OPS, SuspendMember("M1"))
    assert [(e.cl_ord_id, e.reason, e.cancelled_qty) for e in reports(ev)] == [
        ("b1", "suspended", 10), ("s1", "suspended", 10)]
    assert kinds(ev) == ["OrderCancelled", "BookUpdate", "OrderCancelled", "BookUpdate", "AdminAck"]
    assert m.e.is_suspended("M1")
    rejected(m.buy("M1", "b2", 10, 9_000), "member_suspended")
    rejected(m.replace("M1", "r1", "b1", 5, 9_000), "member_suspended")
    assert m.cash("M1").reserved == 0 and m.holding("M1").reserved == 0
    assert m.run(OPS, SuspendMember("M1"))[0].reason == "invalid_state"
    assert m.run(OPS, SuspendMember("M9"))[0].reason == "unknown_member"
    assert m.run(OPS, ReinstateMember("M9"))[0].reason == "unknown_member"
    assert kinds(m.run(OPS, ReinstateMember("M1"))) == ["AdminAck"]
    assert m.run(OPS, ReinstateMember("M1"))[0].reason == "invalid_state"
    rejected(m.buy("M1", "b2", 10, 9_000), "duplicate_cl_ord_id")  # used up while suspended
    accepted(m.buy("M1", "b3", 10, 9_000))
    # other members were never affected
    accepted(m.buy("M2", "b1", 10, 9_000))
    m.e.check()


def test_a_duplicate_of_a_previous_days_live_order_uses_the_id_up_for_today():
    """Every request uses up its id for the day, the rejected duplicate included: once the
    live order is gone, its id stays taken until the next end of day."""
    for request in ("new", "cancel", "replace", "mass"):
        m = Market()
        accepted(m.buy("M1", "X", 10, 9_000, tif="gtc"))
        m.run(OPS, CloseMarket())
        m.run(OPS, EndOfDay())
        m.run(OPS, OpenMarket())
        if request == "new":
            rejected(m.buy("M1", "X", 10, 9_000), "duplicate_cl_ord_id")
        elif request == "cancel":
            rejected(m.cancel("M1", "X", "nope"), "duplicate_cl_ord_id")
        elif request == "replace":
            rejected(m.replace("M1", "X", "X", 5, 9_000), "duplicate_cl_ord_id")
        else:
            rejected(m.mass_cancel("M1", "X", "EUA"), "duplicate_cl_ord_id")
        assert kinds(m.cancel("M1", "c", "X")) == ["OrderCancelled", "BookUpdate"]
        rejected(m.buy("M1", "X", 10, 9_000), "duplicate_cl_ord_id")
        m.run(OPS, CloseMarket())
        m.run(OPS, EndOfDay())
        m.run(OPS, OpenMarket())
        accepted(m.buy("M1", "X", 10, 9_000))


@pytest.mark.parametrize("qty,price,reason", [
    (2**64 - 1, 9_255, "qty_out_of_range"),
    (-(2**63), 9_255, "invalid_qty"),
    (10, 2**64 - 2, "invalid_price"),       # off the tick of 5
    (10, 2**64 - 1, "price_out_of_band"),   # on the tick
    (10, -(2**63), "invalid_price"),
])
def test_extreme_integers_are_judged_by_the_checks(qty, price, reason):
    m = Market()
    rejected(m.buy("M1", "b", qty, price), reason)
    rejected(m.sell("M1", "s", qty, price), reason)
    accepted(m.buy("M1", "ok", 10, 9_000))
    rejected(m.replace("M1", "r", "ok", qty, price), reason)
    m.e.check()


def test_very_large_maximum_quantity():
    from engine_support import CONFIG_TOML
    m = Market(toml=CONFIG_TOML.replace("max_qty = 1_000\n", "max_qty = 1_000_000_000_000\n"), allowances=0)
    rejected(m.buy("M1", "b", 10**12 + 1, 9_000), "qty_out_of_range")
    rejected(m.buy("M1", "c", 10**12, 9_000), "insufficient_funds")


def test_suspended_member_cancels_find_nothing_to_cancel():
    """Suspension cancelled every resting order, so a cancel is unknown_order and a mass cancel
    cancels nothing; cancels are always allowed, so neither is rejected member_suspended."""
    m = Market()
    accepted(m.buy("M1", "b1", 10, 9_000))
    m.run(OPS, SuspendMember("M1"))
    rejected(m.cancel("M1", "c1", "b1"), "unknown_order")
    assert m.mass_cancel("M1", "mc1") == [MassCancelDone(4, T, "M1", "mc1", 0)]
    rejected(m.cancel("M1", "c1", "b1"), "duplicate_cl_ord_id")


@pytest.mark.parametrize("command", [
    NewOrder("c1", "CEA", "buy", 7, 9250), CancelOrder("c2", "live"), ReplaceOrder("c3", "live", 3, 9251),
    MassCancel("c4"), QueryBalances(),
], ids=lambda c: type(c).__name__)
def test_a_member_command_from_an_unlisted_member_raises_and_changes_nothing(command):
    """The engine trusts its caller (the gateway) for who is sending; a wrong id is a bug there,
    so it raises instead of reporting to a member that does not exist."""
    m = Market()
    accepted(m.buy("M1", "live", 5, 9250))
    before = (state_without_seqs(m), m.e.state_hash())
    with pytest.raises(KeyError):
        m.e.execute(command, "NOPE", T)
    assert (state_without_seqs(m), m.e.state_hash()) == before
