"""Matching: price-time priority, order types, cancel/replace, mass cancel, self-trade
prevention, fees, reservations and delivery versus payment, asserted event by event."""

from __future__ import annotations

from engine import (
    BookUpdate, Fill, Halt, CloseMarket, MassCancelDone, OrderAccepted, OrderCancelled,
    OrderReplaced, Resume, Trade,
)
from engine_support import OPS, T, Market, kinds, md, reports


def fills(events, member=None):
    return [(e.member, e.order_id, e.price, e.qty, e.leaves_qty, e.liquidity)
            for e in events if isinstance(e, Fill) and (member is None or e.member == member)]


def assert_md_gap_free(m: Market, events, instrument="CEA", start=None):
    seqs = [e.md_seq for e in md(events) if e.instrument == instrument]
    if start is not None:
        assert seqs[0] == start + 1
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else True
    if seqs:
        assert seqs[-1] == m.mdseq(instrument)


# ---------------------------------------------------------------------------------------------
# Price-time priority


def test_price_time_priority_fills_at_resting_prices_with_exact_events():
    m = Market()
    assert m.sell("M1", "a", 10, 9_260) == [
        OrderAccepted(1, T, "M1", "a", 1, "CEA", "sell", 10, 9_260, "day"),
        BookUpdate("CEA", 2, "sell", 9_260, 10, 1),
    ]
    m.sell("M2", "b", 5, 9_255)   # better price, later
    m.sell("M3", "c", 7, 9_260)   # same price as a, later
    m.sell("M2", "d", 4, 9_265)
    assert m.book()[1] == [(9_255, 5, 1), (9_260, 17, 2), (9_265, 4, 1)]
    md0 = m.mdseq()
    t = T + 1
    ev = m.buy("M3", "x", 12, 9_265, ts=t)
    # best price first (b), then the oldest at 9,260 (a); each at the resting order's price
    assert ev == [
        OrderAccepted(2, t, "M3", "x", 5, "CEA", "buy", 12, 9_265, "day"),
        Fill(3, t, "M3", "x", 5, 1, "CEA", "buy", 9_255, 5, 7, "taker", 0),
        Fill(3, t, "M2", "b", 2, 1, "CEA", "sell", 9_255, 5, 0, "maker", 0),
        Trade("CEA", md0 + 1, 1, 9_255, 5, "buy", t),
        BookUpdate("CEA", md0 + 2, "sell", 9_255, 0, 0),
        Fill(4, t, "M3", "x", 5, 2, "CEA", "buy", 9_260, 7, 0, "taker", 0),
        Fill(2, t, "M1", "a", 1, 2, "CEA", "sell", 9_260, 7, 3, "maker", 0),
        Trade("CEA", md0 + 3, 2, 9_260, 7, "buy", t),
        BookUpdate("CEA", md0 + 4, "sell", 9_260, 10, 2),
    ]
    assert m.book()[1] == [(9_260, 10, 2), (9_265, 4, 1)]
    # the buyer paid the resting prices, not its limit, and reserves nothing more
    assert m.cash("M3").total == 100_000_000 - 5 * 9_255 - 7 * 9_260
    assert m.cash("M3").reserved == 0
    m.e.check()


def test_price_time_priority_across_levels():
    m = Market()
    m.sell("M1", "a", 10, 9_260)
    m.sell("M2", "b", 5, 9_255)
    m.sell("M3", "c", 7, 9_260)
    m.sell("M1", "d", 4, 9_265)
    md0 = m.mdseq()
    ev = m.buy("M2", "x", 20, 9_260, ts=T + 1)
    t = T + 1
    # M2's own order "b" at 9,255 is first: cancel_incoming stops at once, nothing trades
    assert ev == [
        OrderAccepted(2, t, "M2", "x", 5, "CEA", "buy", 20, 9_260, "day"),
        OrderCancelled(3, t, "M2", "x", 5, "x", 20, 0, "self_trade"),
    ]
    assert m.mdseq() == md0  # nothing changed in the book
    md0 = m.mdseq()
    ev = m.buy("M3", "y", 20, 9_260, ts=t)
    # M3's "c" sits behind M1's "a" at 9,260: b (5) fills, then a (10), then c is M3's own
    assert ev == [
        OrderAccepted(2, t, "M3", "y", 6, "CEA", "buy", 20, 9_260, "day"),
        Fill(3, t, "M3", "y", 6, 1, "CEA", "buy", 9_255, 5, 15, "taker", 0),
        Fill(4, t, "M2", "b", 2, 1, "CEA", "sell", 9_255, 5, 0, "maker", 0),
        Trade("CEA", md0 + 1, 1, 9_255, 5, "buy", t),
        BookUpdate("CEA", md0 + 2, "sell", 9_255, 0, 0),
        Fill(4, t, "M3", "y", 6, 2, "CEA", "buy", 9_260, 10, 5, "taker", 0),
        Fill(3, t, "M1", "a", 1, 2, "CEA", "sell", 9_260, 10, 0, "maker", 0),
        Trade("CEA", md0 + 3, 2, 9_260, 10, "buy", t),
        BookUpdate("CEA", md0 + 4, "sell", 9_260, 7, 1),
        OrderCancelled(5, t, "M3", "y", 6, "y", 5, 0, "self_trade"),
    ]
    m.e.check()


def test_sweep_then_rest_and_time_order_within_level():
    m = Market()
    for i, mem in enumerate(["M1", "M2", "M1", "M2"]):
        m.sell(mem, f"s{i}", 3, 9_300)
    m.sell("M1", "hi", 3, 9_305)
    ev = m.buy("M3", "b", 20, 9_300)
    assert fills(ev, "M3") == [("M3", 6, 9_300, 3, 17, "taker"), ("M3", 6, 9_300, 3, 14, "taker"),
                               ("M3", 6, 9_300, 3, 11, "taker"), ("M3", 6, 9_300, 3, 8, "taker")]
    assert [e.order_id for e in ev if isinstance(e, Fill) and e.liquidity == "maker"] == [1, 2, 3, 4]
    assert [e.trade_id for e in ev if isinstance(e, Trade)] == [1, 2, 3, 4]
    # one BookUpdate for the whole level, after its trades; then the rest rests
    assert kinds(ev)[-2:] == ["BookUpdate", "BookUpdate"]
    assert ev[-2] == BookUpdate("CEA", ev[-3].md_seq + 1, "sell", 9_300, 0, 0)
    assert ev[-1] == BookUpdate("CEA", ev[-2].md_seq + 1, "buy", 9_300, 8, 1)
    assert m.book() == ([(9_300, 8, 1)], [(9_305, 3, 1)])
    assert m.e.best_prices("CEA") == (9_300, 9_305)
    assert m.e.resting("CEA") == (2, 11)
    m.e.check()


def test_sell_aggressor_fills_at_bid_prices():
    m = Market()
    m.buy("M1", "b1", 5, 9_300)
    m.buy("M2", "b2", 5, 9_310)
    ev = m.sell("M3", "s", 8, 9_250)
    assert fills(ev, "M3") == [("M3", 3, 9_310, 5, 3, "taker"), ("M3", 3, 9_300, 3, 0, "taker")]
    assert [(e.price, e.aggressor) for e in ev if isinstance(e, Trade)] == [(9_310, "sell"), (9_300, "sell")]
    # the buyer at 9,310 paid 9,310; the seller got both prices
    assert m.cash("M3").total == 100_000_000 + 5 * 9_310 + 3 * 9_300
    assert m.book() == ([(9_300, 2, 1)], [])
    m.e.check()


def test_ids_are_deterministic_and_md_seq_gap_free():
    def run():
        m = Market()
        out = []
        out += m.sell("M1", "a", 10, 9_260)
        out += m.buy("M2", "b", 4, 9_260)
        out += m.buy("M3", "c", 10, 9_265)
        out += m.sell("M2", "d", 3, None)
        out += m.cancel("M3", "x", "c")
        return m, out
    m1, ev1 = run()
    m2, ev2 = run()
    assert ev1 == ev2 and m1.e.state_hash() == m2.e.state_hash()
    assert [e.order_id for e in ev1 if isinstance(e, OrderAccepted)] == [1, 2, 3, 4]
    assert [e.trade_id for e in ev1 if isinstance(e, Trade)] == [1, 2, 3]
    assert_md_gap_free(m1, ev1, start=1)  # md_seq 1 was the OpenMarket status


# ---------------------------------------------------------------------------------------------
# Market orders, ioc, fok, day, gtc


def test_market_buy_sweeps_to_the_band_edge_and_never_rests():
    m = Market()
    m.sell("M1", "a", 5, 9_300)
    m.sell("M2", "b", 5, 10_180)  # the upper edge
    ev = m.buy("M3", "mkt", 15, None)
    assert ev[0] == OrderAccepted(1, T, "M3", "mkt", 3, "CEA", "buy", 15, None, "ioc")
    assert fills(ev, "M3") == [("M3", 3, 9_300, 5, 10, "taker"), ("M3", 3, 10_180, 5, 5, "taker")]
    assert ev[-1] == OrderCancelled(4, T, "M3", "mkt", 3, "mkt", 5, 0, "ioc")
    assert m.book() == ([], [])
    c = m.cash("M3")
    assert c.reserved == 0 and c.total == 100_000_000 - 5 * 9_300 - 5 * 10_180
    assert m.holding("M3").unsettled == 10
    m.e.check()


def test_market_order_without_liquidity_is_cancelled_whole():
    m = Market()
    ev = m.sell("M1", "mkt", 10, None)
    assert ev == [OrderAccepted(1, T, "M1", "mkt", 1, "CEA", "sell", 10, None, "ioc"),
                  OrderCancelled(2, T, "M1", "mkt", 1, "mkt", 10, 0, "ioc")]
    ev = m.sell("M1", "fok", 10, None, tif="fok")
    assert ev[-1].reason == "fok"
    assert md(ev) == []
    assert m.holding("M1").reserved == 0
    m.e.check()


def test_market_sell_trades_down_to_the_lower_edge():
    m = Market()
    m.buy("M1", "a", 5, 8_330)
    ev = m.sell("M2", "mkt", 5, None)
    assert fills(ev, "M2") == [("M2", 2, 8_330, 5, 0, "taker")]
    assert kinds(ev) == ["OrderAccepted", "Fill", "Fill", "Trade", "BookUpdate"]


def test_ioc_partial_fill_then_cancel():
    m = Market()
    m.sell("M1", "a", 4, 9_255)
    ev = m.buy("M2", "i", 10, 9_260, tif="ioc")
    assert kinds(ev) == ["OrderAccepted", "Fill", "Fill", "Trade", "BookUpdate", "OrderCancelled"]
    assert ev[-1] == OrderCancelled(3, T, "M2", "i", 2, "i", 6, 0, "ioc")
    assert m.cash("M2").reserved == 0
    ev = m.buy("M2", "j", 10, 9_260, tif="ioc")
    assert kinds(ev) == ["OrderAccepted", "OrderCancelled"] and ev[-1].cancelled_qty == 10
    assert m.book() == ([], [])
    m.e.check()


def test_fok_all_or_nothing():
    m = Market()
    m.sell("M1", "a", 4, 9_255)
    m.sell("M2", "b", 4, 9_260)
    m.sell("M3", "c", 4, 9_270)
    before = (m.book(), m.cash("M2"), m.mdseq())
    ev = m.buy("M2", "f1", 9, 9_260, tif="fok")  # only 8 up to 9,260 (and b is M2's own)
    assert ev == [OrderAccepted(2, T, "M2", "f1", 4, "CEA", "buy", 9, 9_260, "fok"),
                  OrderCancelled(3, T, "M2", "f1", 4, "f1", 9, 0, "fok")]
    assert (m.book(), m.cash("M2"), m.mdseq()) == before
    ev = m.buy("M3", "f2", 9, 9_260, tif="fok")  # 8 available: not enough
    assert kinds(ev) == ["OrderAccepted", "OrderCancelled"] and ev[-1].reason == "fok"
    ev = m.buy("M3", "f3", 8, 9_260, tif="fok")  # exactly enough, across two levels
    assert fills(ev, "M3") == [("M3", 6, 9_255, 4, 4, "taker"), ("M3", 6, 9_260, 4, 0, "taker")]
    assert m.book() == ([], [(9_270, 4, 1)])
    m.e.check()


def test_fok_stops_at_a_self_match_even_when_more_would_follow():
    m = Market()
    m.sell("M1", "a", 4, 9_255)
    m.sell("M2", "own", 4, 9_255)
    m.sell("M3", "c", 10, 9_255)
    before = (m.book(), m.mdseq())
    for stp in ("cancel_incoming", "cancel_resting", "cancel_both"):
        ev = m.buy("M2", f"f-{stp}", 8, 9_255, tif="fok", stp=stp)
        assert kinds(ev) == ["OrderAccepted", "OrderCancelled"] and ev[-1].reason == "fok"
        assert (m.book(), m.mdseq()) == before  # the own resting order is untouched
    # fillable before the self-match: trades normally
    ev = m.buy("M2", "f-ok", 4, 9_255, tif="fok")
    assert fills(ev, "M2") == [("M2", 7, 9_255, 4, 0, "taker")]
    m.e.check()


def test_day_expires_and_gtc_rests_across_end_of_day():
    from engine import EndOfDay, OpenMarket
    m = Market()
    m.buy("M1", "day", 10, 9_000)
    m.buy("M1", "gtc", 10, 9_005, tif="gtc")
    m.run(OPS, CloseMarket())
    ev = m.run(OPS, EndOfDay(), ts=T + 5)
    assert reports(ev) == [OrderCancelled(3, T + 5, "M1", "day", 1, "day", 10, 0, "expired")]
    m.run(OPS, OpenMarket())
    assert [o.cl_ord_id for o in m.e.live_orders("M1")] == ["gtc"]
    assert m.cash("M1").reserved == 10 * 9_005
    ev = m.sell("M2", "s", 10, 9_005)
    assert fills(ev, "M1") == [("M1", 2, 9_005, 10, 0, "maker")]
    m.e.check()


# ---------------------------------------------------------------------------------------------
# Cancel and replace


def test_cancel_releases_exactly():
    m = Market()
    m.buy("M1", "b", 10, 9_000, "CEA")
    m.sell("M2", "s", 4, 9_000)
    assert m.cash("M1").reserved == 6 * 9_000
    md0 = m.mdseq()
    ev = m.cancel("M1", "c", "b")
    assert ev == [OrderCancelled(3, T, "M1", "c", 1, "b", 6, 0, "requested"),
                  BookUpdate("CEA", md0 + 1, "buy", 9_000, 0, 0)]
    assert m.cash("M1").reserved == 0
    m.sell("M1", "s2", 10, 9_500)
    assert m.holding("M1").reserved == 10
    m.cancel("M1", "c2", "s2")
    assert m.holding("M1").reserved == 0
    m.e.check()


def test_cancel_allowed_while_halted_and_closed():
    m = Market()
    m.buy("M1", "a", 10, 9_000)
    m.buy("M1", "b", 10, 9_000)
    m.run(OPS, Halt("CEA"))
    assert kinds(m.cancel("M1", "c1", "a")) == ["OrderCancelled", "BookUpdate"]
    m.run(OPS, CloseMarket())
    assert kinds(m.cancel("M1", "c2", "b")) == ["OrderCancelled", "BookUpdate"]
    m.e.check()


def _queue(m: Market, price=9_000):
    m.buy("M1", "a", 10, price)
    m.buy("M2", "b", 10, price)
    m.buy("M3", "c", 10, price)


def _who_fills(m: Market, qty, price=9_000, seller="M3", cl="s"):
    ev = m.sell(seller, cl, qty, price)
    return [(e.member, e.qty) for e in ev if isinstance(e, Fill) and e.liquidity == "maker"]


def test_replace_lower_qty_keeps_priority():
    m = Market()
    _queue(m)
    ev = m.replace("M1", "a2", "a", 6, 9_000)
    md0 = m.mdseq()
    assert ev == [OrderReplaced(2, T, "M1", "a2", 1, "a", 6, 9_000, 6),
                  BookUpdate("CEA", md0, "buy", 9_000, 26, 3)]
    assert m.cash("M1").reserved == 6 * 9_000
    # M3's own order "c" is last in the queue; the fills go to a then b
    assert _who_fills(m, 16, seller="M3") == [("M1", 6), ("M2", 10)]
    m.e.check()


def test_replace_same_qty_same_price_keeps_priority():
    m = Market()
    _queue(m)
    assert kinds(m.replace("M1", "a2", "a", 10, 9_000)) == ["OrderReplaced"]
    assert _who_fills(m, 10, seller="M3") == [("M1", 10)]


def test_replace_higher_qty_goes_to_the_back():
    m = Market()
    _queue(m)
    md0 = m.mdseq()
    ev = m.replace("M1", "a2", "a", 12, 9_000)
    assert ev == [OrderReplaced(2, T, "M1", "a2", 1, "a", 12, 9_000, 12),
                  BookUpdate("CEA", md0 + 1, "buy", 9_000, 20, 2),
                  BookUpdate("CEA", md0 + 2, "buy", 9_000, 32, 3)]
    assert m.cash("M1").reserved == 12 * 9_000
    assert _who_fills(m, 22, seller="M3") == [("M2", 10)]  # stops at M3's own c
    m.e.check()


def test_replace_price_change_goes_to_the_back_of_the_new_level():
    m = Market()
    _queue(m)
    m.buy("M2", "d", 10, 9_005)
    ev = m.replace("M1", "a2", "a", 10, 9_005)
    assert kinds(ev) == ["OrderReplaced", "BookUpdate", "BookUpdate"]
    assert m.book()[0] == [(9_005, 20, 2), (9_000, 20, 2)]
    assert _who_fills(m, 20, seller="M3") == [("M2", 10), ("M1", 10)]
    # and back down again: behind b
    m.buy("M1", "e", 10, 9_000)
    assert m.book()[0] == [(9_000, 30, 3)]
    m.e.check()


def test_replace_keeps_order_id_and_fills_report_the_new_id():
    m = Market()
    m.buy("M1", "a", 10, 9_000)
    m.replace("M1", "a2", "a", 10, 9_005)
    ev = m.sell("M2", "s", 3, 9_005)
    assert [(e.cl_ord_id, e.order_id, e.leaves_qty) for e in ev if isinstance(e, Fill) and e.member == "M1"] == [
        ("a2", 1, 7)]


def test_replace_at_or_below_filled_cancels_the_rest():
    m = Market()
    m.buy("M1", "a", 10, 9_000)
    m.sell("M2", "s", 4, 9_000)
    md0 = m.mdseq()
    ev = m.replace("M1", "r", "a", 4, 9_000)
    assert ev == [OrderCancelled(3, T, "M1", "r", 1, "a", 6, 0, "requested"),
                  BookUpdate("CEA", md0 + 1, "buy", 9_000, 0, 0)]
    assert m.cash("M1").reserved == 0 and m.e.live_orders("M1") == []
    m.buy("M1", "b", 10, 9_000)
    m.sell("M2", "s2", 4, 9_000)
    ev = m.replace("M1", "r2", "b", 2, 9_100)  # below filled, price change too: still a cancel
    assert reports(ev) == [OrderCancelled(6, T, "M1", "r2", 3, "b", 6, 0, "requested")]
    m.e.check()


def test_replace_keeps_filled_part_in_qty():
    m = Market()
    m.buy("M1", "a", 10, 9_000)
    m.sell("M2", "s", 4, 9_000)
    ev = m.replace("M1", "r", "a", 8, 9_000)
    assert ev[0] == OrderReplaced(3, T, "M1", "r", 1, "a", 8, 9_000, 4)
    assert m.book()[0] == [(9_000, 4, 1)]
    assert m.cash("M1").reserved == 4 * 9_000
    m.e.check()


def test_replace_that_crosses_trades_like_a_new_order():
    m = Market()
    m.buy("M1", "a", 10, 9_000)
    m.sell("M2", "s", 6, 9_100)
    ev = m.replace("M1", "r", "a", 10, 9_100)
    assert kinds(ev) == ["OrderReplaced", "BookUpdate", "Fill", "Fill", "Trade", "BookUpdate", "BookUpdate"]
    assert fills(ev, "M1") == [("M1", 1, 9_100, 6, 4, "taker")]
    assert ev[2].cl_ord_id == "r"
    assert m.book() == ([(9_100, 4, 1)], [])
    assert m.cash("M1").reserved == 4 * 9_100
    # a crossing replace that fills completely leaves nothing live
    m.sell("M2", "s2", 4, 9_150)
    m.sell("M3", "s3", 2, 9_150)
    ev = m.replace("M1", "r2", "r", 10, 9_150)
    assert fills(ev, "M1") == [("M1", 1, 9_150, 4, 0, "taker")]
    assert m.e.live_orders("M1") == []
    assert m.book() == ([], [(9_150, 2, 1)])
    m.e.check()


def test_replace_while_halted_or_closed_only_lowers():
    m = Market()
    m.buy("M1", "a", 10, 9_000)
    m.sell("M1", "s", 10, 9_500)
    m.run(OPS, Halt("CEA"))
    assert m.replace("M1", "r1", "a", 11, 9_000)[0].reason == "instrument_halted"
    assert m.replace("M1", "r2", "a", 8, 9_005)[0].reason == "instrument_halted"
    assert m.replace("M1", "r3", "a", 10, 9_000)[0].reason == "instrument_halted"  # not lower
    assert kinds(m.replace("M1", "r4", "a", 8, 9_000)) == ["OrderReplaced", "BookUpdate"]
    m.run(OPS, CloseMarket())
    assert m.replace("M1", "r5", "r4", 9, 9_000)[0].reason == "market_closed"
    assert kinds(m.replace("M1", "r6", "s", 4, 9_500)) == ["OrderReplaced", "BookUpdate"]
    assert m.holding("M1").reserved == 4 and m.cash("M1").reserved == 8 * 9_000
    m.e.check()


def test_replace_funds_and_allowances_on_increase():
    m = Market(cash=10 * 9_000 + 9_000, allowances=12)
    m.buy("M1", "a", 10, 9_000)
    assert m.replace("M1", "r1", "a", 12, 9_000)[0].reason == "insufficient_funds"
    assert m.replace("M1", "r2", "a", 10, 9_905)[0].reason == "insufficient_funds"
    assert kinds(m.replace("M1", "r3", "a", 11, 9_000))[0] == "OrderReplaced"
    assert m.cash("M1").available == 0
    # lowering the price frees cash at once
    m.replace("M1", "r4", "r3", 11, 8_500)
    assert m.cash("M1").reserved == 11 * 8_500
    m.sell("M2", "s", 10, 9_500)
    assert m.replace("M2", "r5", "s", 13, 9_500)[0].reason == "insufficient_allowances"
    assert kinds(m.replace("M2", "r6", "s", 12, 9_500))[0] == "OrderReplaced"
    assert m.holding("M2").reserved == 12
    m.e.check()


# ---------------------------------------------------------------------------------------------
# Mass cancel


def test_mass_cancel_by_instrument_and_side():
    m = Market()
    m.buy("M1", "b1", 10, 9_000)
    m.sell("M1", "s1", 10, 9_500)
    m.buy("M1", "b2", 100, 7_000, "EUA")
    m.sell("M1", "s2", 100, 7_100, "EUA")
    m.buy("M2", "other", 10, 9_000)
    md0 = m.mdseq()
    ev = m.mass_cancel("M1", "mc1", "CEA", "buy")
    assert ev == [OrderCancelled(5, T, "M1", "mc1", 1, "b1", 10, 0, "mass_cancel"),
                  BookUpdate("CEA", md0 + 1, "buy", 9_000, 10, 1),
                  MassCancelDone(6, T, "M1", "mc1", 1)]
    ev = m.mass_cancel("M1", "mc2", None, "sell")
    assert [(e.orig_cl_ord_id, e.cl_ord_id) for e in reports(ev)[:-1]] == [("s1", "mc2"), ("s2", "mc2")]
    assert ev[-1].cancelled == 2
    ev = m.mass_cancel("M1", "mc3")
    assert [e.orig_cl_ord_id for e in reports(ev)[:-1]] == ["b2"] and ev[-1].cancelled == 1
    ev = m.mass_cancel("M1", "mc4")
    assert ev == [MassCancelDone(12, T, "M1", "mc4", 0)]
    assert [o.cl_ord_id for o in m.e.live_orders("M2")] == ["other"]
    assert m.cash("M1").reserved == 0 and m.cash("M1", "EUR").reserved == 0
    m.e.check()


def test_mass_cancel_while_halted():
    m = Market()
    m.buy("M1", "b1", 10, 9_000)
    m.run(OPS, Halt("CEA"))
    assert m.mass_cancel("M1", "mc")[-1].cancelled == 1


# ---------------------------------------------------------------------------------------------
# Self-trade prevention


def _stp_book(m: Market):
    m.sell("M2", "o1", 5, 9_255)
    m.sell("M1", "own", 5, 9_255)
    m.sell("M2", "o2", 5, 9_260)


def test_stp_cancel_incoming_keeps_earlier_fills():
    m = Market()
    _stp_book(m)
    ev = m.buy("M1", "x", 20, 9_260)
    assert fills(ev, "M1") == [("M1", 4, 9_255, 5, 15, "taker")]
    assert reports(ev)[-1] == OrderCancelled(4, T, "M1", "x", 4, "x", 15, 0, "self_trade")
    assert m.book() == ([], [(9_255, 5, 1), (9_260, 5, 1)])
    assert m.e.live_orders("M1")[0].cl_ord_id == "own"
    assert m.cash("M1").reserved == 0
    m.e.check()


def test_stp_cancel_resting_goes_on_matching():
    m = Market()
    _stp_book(m)
    ev = m.buy("M1", "x", 20, 9_260, stp="cancel_resting")
    assert [(type(e).__name__, getattr(e, "cl_ord_id", None)) for e in reports(ev)] == [
        ("OrderAccepted", "x"), ("Fill", "x"), ("Fill", "o1"), ("OrderCancelled", "own"),
        ("Fill", "x"), ("Fill", "o2")]
    cancel = [e for e in ev if isinstance(e, OrderCancelled)][0]
    assert cancel == OrderCancelled(4, T, "M1", "own", 2, "own", 5, 0, "self_trade")
    assert m.book() == ([(9_260, 10, 1)], [])
    assert m.holding("M1").reserved == 0
    m.e.check()


def test_stp_cancel_both():
    m = Market()
    _stp_book(m)
    ev = m.buy("M1", "x", 20, 9_260, stp="cancel_both")
    assert [(e.cl_ord_id, e.cancelled_qty, e.reason) for e in ev if isinstance(e, OrderCancelled)] == [
        ("own", 5, "self_trade"), ("x", 15, "self_trade")]
    assert fills(ev, "M1") == [("M1", 4, 9_255, 5, 15, "taker")]
    assert m.book() == ([], [(9_260, 5, 1)])
    assert m.cash("M1").reserved == 0 and m.holding("M1").reserved == 0
    m.e.check()


def test_stp_seller_side_and_other_members_unaffected():
    m = Market()
    m.buy("M1", "own", 5, 9_300)
    ev = m.sell("M1", "x", 5, 9_300, stp="cancel_resting")
    assert [(e.cl_ord_id, e.reason) for e in ev if isinstance(e, OrderCancelled)] == [("own", "self_trade")]
    assert m.book() == ([], [(9_300, 5, 1)])
    m.e.check()


# ---------------------------------------------------------------------------------------------
# Fees, reservations and delivery versus payment


def test_fees_floor_per_side_and_fee_account():
    m = Market()
    m.sell("M1", "s", 300, 7_003, "EUA")
    ev = m.buy("M2", "b", 300, 7_010, "EUA")
    # value 2,100,900; fee = floor(2,100,900 x 25 / 10,000) = floor(5,252.25) = 5,252 per side
    f = [e for e in ev if isinstance(e, Fill)]
    assert [(e.member, e.fee, e.price) for e in f] == [("M2", 5_252, 7_003), ("M1", 5_252, 7_003)]
    assert m.e.fee_balances() == {"CNY": 0, "EUR": 10_504}
    assert m.cash("M2", "EUR").total == 100_000_000 - 2_100_900 - 5_252
    assert m.cash("M1", "EUR").total == 100_000_000 + 2_100_900 - 5_252
    assert m.cash("M2", "EUR").reserved == 0  # filled below its limit: the difference is released
    assert m.holding("M2", "EUA").unsettled == 300 and m.holding("M1", "EUA").settled == 2_700
    m.e.check()


def test_fee_reserve_is_ceil_and_released_per_fill():
    m = Market()
    m.buy("M1", "b", 300, 7_001, "EUA")
    # 2,100,300 + ceil(5,250.75)
    assert m.cash("M1", "EUR").reserved == 2_100_300 + 5_251
    ev = m.sell("M2", "s", 100, 6_900, "EUA")
    assert [e.fee for e in ev if isinstance(e, Fill)] == [1_750, 1_750]  # floor(1,750.25)
    # still reserves for 200 t at its limit with the ceil of the fee on that
    assert m.cash("M1", "EUR").reserved == 1_400_200 + 3_501
    m.sell("M3", "s", 200, 7_001, "EUA")
    assert m.cash("M1", "EUR").reserved == 0
    assert m.cash("M1", "EUR").total == 100_000_000 - 2_100_300 - 1_750 - 3_500
    m.e.check()


def test_zero_fee_instrument_and_fill_fee_zero():
    m = Market()
    m.sell("M1", "s", 10, 9_255)
    ev = m.buy("M2", "b", 10, 9_255)
    assert [e.fee for e in ev if isinstance(e, Fill)] == [0, 0]
    assert m.e.fee_balances() == {"CNY": 0, "EUR": 0}


def test_buy_filling_below_limit_releases_difference_at_once():
    m = Market()
    m.sell("M2", "s", 4, 9_000)
    m.buy("M1", "b", 10, 9_100)
    c = m.cash("M1")
    assert c.total == 100_000_000 - 4 * 9_000
    assert c.reserved == 6 * 9_100
    m.e.check()


def test_dvp_moves_cash_and_allowances_together():
    m = Market()
    before = (m.cash("M1").total, m.holding("M1").settled, m.cash("M2").total, m.holding("M2").settled)
    m.sell("M1", "s", 7, 9_255)
    m.buy("M2", "b", 7, 9_255)
    after = (m.cash("M1").total, m.holding("M1").settled, m.cash("M2").total, m.holding("M2").settled)
    assert after == (before[0] + 64_785, before[1] - 7, before[2] - 64_785, before[3])
    assert m.holding("M2").unsettled == 7
    assert m.cash("M1").withdrawable == before[0]  # proceeds are not withdrawable today
    m.e.check()


# ---------------------------------------------------------------------------------------------
# Market data only reports levels that changed


def test_self_match_at_the_front_publishes_no_book_update_for_the_untouched_level():
    m = Market()
    m.sell("M1", "own", 5, 9_255)
    m.sell("M2", "other", 5, 9_255)
    md0 = m.mdseq()
    ev = m.buy("M1", "x", 5, 9_255)
    assert ev == [OrderAccepted(2, T, "M1", "x", 3, "CEA", "buy", 5, 9_255, "day"),
                  OrderCancelled(3, T, "M1", "x", 3, "x", 5, 0, "self_trade")]
    assert m.mdseq() == md0
    # fills at the level before the self-match do change it: one update, after the trade
    m.sell("M3", "front", 2, 9_250)
    ev = m.buy("M1", "y", 5, 9_255)
    assert kinds(ev) == ["OrderAccepted", "Fill", "Fill", "Trade", "BookUpdate", "OrderCancelled"]
    assert ev[4] == BookUpdate("CEA", m.mdseq(), "sell", 9_250, 0, 0)
    m.e.check()


def test_replace_to_the_same_quantity_and_price_publishes_nothing():
    m = Market()
    m.buy("M1", "a", 10, 9_000)
    md0 = m.mdseq()
    assert m.replace("M1", "a2", "a", 10, 9_000) == [OrderReplaced(2, T, "M1", "a2", 1, "a", 10, 9_000, 10)]
    assert m.mdseq() == md0
    assert m.e.live_orders("M1")[0].cl_ord_id == "a2"


def test_reservations_are_exact_after_every_kind_of_event():
    """M1's reserved cash and allowances on the fee-charging EUA, step by step."""
    from engine import EndOfDay, OpenMarket, SessionEnded, SuspendMember

    def r(price, qty):  # a buy's reservation: price x qty plus the ceil of its fee
        return price * qty + -(-price * qty * 25 // 10_000)

    m = Market()

    def check(cash, allowances):
        assert (m.cash("M1", "EUR").reserved, m.holding("M1", "EUA").reserved) == (cash, allowances)
        m.e.check()

    m.buy("M1", "b1", 200, 7_000, "EUA")
    check(r(7_000, 200), 0)
    m.buy("M1", "b2", 100, 7_010, "EUA", tif="gtc", session=5)
    check(r(7_000, 200) + r(7_010, 100), 0)
    m.sell("M2", "s1", 100, 6_990, "EUA")                      # fills b2 at 7,010
    check(r(7_000, 200), 0)
    m.sell("M2", "s2", 100, 7_000, "EUA")                      # half of b1
    check(r(7_000, 100), 0)
    m.replace("M1", "b1a", "b1", 300, 7_000)                   # higher qty: 200 open
    check(r(7_000, 200), 0)
    m.replace("M1", "b1b", "b1a", 300, 6_990)                  # lower price
    check(r(6_990, 200), 0)
    m.replace("M1", "b1c", "b1b", 200, 6_990)                  # lower qty keeps its place
    check(r(6_990, 100), 0)
    m.buy("M1", "mkt", 100, None, "EUA")                       # nothing to buy: all released
    check(r(6_990, 100), 0)
    m.sell("M3", "s3", 100, 7_100, "EUA")
    m.buy("M1", "ioc", 200, 7_150, "EUA", tif="ioc")           # 100 at 7,100, rest cancelled
    check(r(6_990, 100), 0)
    m.buy("M1", "fok", 200, 7_150, "EUA", tif="fok")           # nothing to fill: cancelled whole
    check(r(6_990, 100), 0)
    m.sell("M1", "s4", 500, 7_300, "EUA")
    m.sell("M1", "s5", 200, 7_200, "EUA", tif="gtc", session=5)
    check(r(6_990, 100), 700)
    m.buy("M3", "b3", 100, 7_200, "EUA")                       # fills half of s5
    check(r(6_990, 100), 600)
    m.run("", SessionEnded(5))                                 # cancels the rest of s5
    check(r(6_990, 100), 500)
    m.replace("M1", "s4a", "s4", 300, 7_300)
    check(r(6_990, 100), 300)
    m.sell("M1", "self", 100, 6_990, "EUA", tif="ioc", stp="cancel_resting")  # cancels own b1c
    check(0, 300)
    m.buy("M1", "gtc", 100, 7_000, "EUA", tif="gtc")
    m.buy("M1", "day", 100, 7_001, "EUA")
    check(r(7_000, 100) + r(7_001, 100), 300)
    m.run(OPS, CloseMarket())
    m.run(OPS, EndOfDay())                                     # DAY orders expire
    check(r(7_000, 100), 0)
    m.run(OPS, OpenMarket())
    m.sell("M1", "s6", 100, 7_300, "EUA", tif="gtc")
    m.run(OPS, Halt("EUA", cancel_orders=True))
    check(0, 0)
    m.run(OPS, Resume("EUA"))
    m.buy("M1", "b9", 100, 7_000, "EUA")
    m.mass_cancel("M1", "mc", "EUA", "buy")
    check(0, 0)
    m.buy("M1", "b10", 100, 7_000, "EUA")
    m.run(OPS, SuspendMember("M1"))
    check(0, 0)
