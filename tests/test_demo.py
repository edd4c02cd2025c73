"""The demo's market simulation, without a server: the price process, the firms against the real
engine (in process), the local books rebuilt from market data, and the terminal view."""

from __future__ import annotations

import random
import re

from hypothesis import given, settings, strategies as st

from engine._config import demo_config
from engine._engine import Engine
from engine._messages import (
    BookSnapshot, BookUpdate, CancelRejected, Deposit, InstrumentStatus, OpenMarket, OrderRejected,
    Trade,
)
from gateway._demo_market import (
    DemoStats, FairPrice, LocalBook, MarketView, demo_instruments, make_firms, render_line,
    render_screen, render_summary, sparkline,
)

CONFIG = demo_config()
SYMBOLS = demo_instruments(CONFIG)
MEMBERS = [m.id for m in CONFIG.members if m.role == "member"]
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def funded_engine() -> Engine:
    engine = Engine(CONFIG, "2026-11-24")
    for m in MEMBERS:
        engine.execute(Deposit(ref=f"cash-{m}", member=m, asset="CNY", amount=CONFIG.initial_cash), "ops", 1)
        for s in SYMBOLS:
            engine.execute(Deposit(ref=f"{s}-{m}", member=m, asset=s, amount=CONFIG.initial_allowances), "ops", 1)
    engine.execute(OpenMarket(), "ops", 1)
    return engine


def simulate(seconds: float, rate: int, seed: int):
    """The demo's loop with the engine in place of the server."""
    engine = funded_engine()
    fair = FairPrice(CONFIG, SYMBOLS, random.Random(seed))
    books = {s: LocalBook(s) for s in SYMBOLS}
    for s in SYMBOLS:
        books[s].apply(engine.book_snapshot(s))
    view = MarketView(fair, books)
    firms = {f.member: f for f in make_firms(MEMBERS, SYMBOLS, seed, "t1")}
    stats = DemoStats(SYMBOLS)
    order = list(firms.values())
    weights = [f.weight for f in order]
    rng = random.Random(seed)
    ts, t, dt = 1, 0.0, 1.0 / rate
    for i in range(int(seconds * rate)):
        t += dt
        fair.step(dt)
        firm = rng.choices(order, weights=weights)[0]
        for command in firm.decide(view):
            stats.on_sent(command)
            ts += 1_000
            for ev in engine.execute(command, firm.member, ts):
                if isinstance(ev, (BookUpdate, Trade, InstrumentStatus)):
                    books[ev.instrument].apply(ev)
                    if isinstance(ev, Trade):
                        stats.on_trade(ev)
                elif getattr(ev, "member", None) in firms:
                    firms[ev.member].on_report(ev)
                    if isinstance(ev, (OrderRejected, CancelRejected)):
                        stats.on_reject(ev.reason)
        if i % (rate // 4) == 0:
            stats.sample(t)
    return engine, fair, books, firms, stats


def test_firms_trade_the_vintages_without_a_single_reject():
    engine, fair, books, firms, stats = simulate(seconds=8, rate=1_000, seed=7)
    engine.check()
    assert stats.rejects == {}
    assert all(f.rejects == {} for f in firms.values())
    assert stats.trades > 1_000
    for sym in SYMBOLS:
        assert stats.instruments[sym].trades > 50, sym
    # makers quote, replace and cancel; takers cross
    assert {"NewOrder", "ReplaceOrder", "CancelOrder"} <= set(stats.sent_by_type)


def test_local_books_rebuilt_from_market_data_match_the_engine():
    engine, fair, books, firms, stats = simulate(seconds=3, rate=1_000, seed=11)
    for sym in SYMBOLS:
        assert (books[sym].best_bid, books[sym].best_ask) == engine.best_prices(sym), sym
        snap = engine.book_snapshot(sym, depth=1_000)
        assert books[sym].bids == {p: q for p, q, _ in snap.bids}
        assert books[sym].asks == {p: q for p, q, _ in snap.asks}
        assert books[sym].gaps == 0
        assert books[sym].md_seq == engine.md_seq(sym)


def test_firms_know_their_own_live_orders():
    engine, fair, books, firms, stats = simulate(seconds=3, rate=1_000, seed=3)
    for member, firm in firms.items():
        live = {o.cl_ord_id: (o.instrument, o.side, o.price, o.leaves) for o in engine.live_orders(member)}
        mine = {cid: (q.instrument, q.side, q.price, q.leaves) for cid, q in firm.live.items()}
        assert mine == live, member


def test_prices_follow_the_fair_price():
    engine, fair, books, firms, stats = simulate(seconds=8, rate=1_000, seed=5)
    for sym in SYMBOLS:
        last = stats.instruments[sym].last
        assert abs(last - fair.fair(sym)) / fair.fair(sym) < 0.01, sym


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32), steps=st.integers(1, 2_000), dt=st.sampled_from([0.001, 0.01, 0.1, 1.0]))
def test_fair_price_stays_on_the_tick_inside_the_band(seed, steps, dt):
    fair = FairPrice(CONFIG, SYMBOLS, random.Random(seed))
    for _ in range(steps):
        fair.step(dt)
    for sym in SYMBOLS:
        price = fair.fair(sym)
        lower, upper = fair.band[sym]
        assert lower < price < upper
        assert price % fair.tick[sym] == 0
        assert abs(price / fair.reference[sym] - 1) < 0.07


def test_fair_price_drifts_and_is_reproducible():
    a, b = (FairPrice(CONFIG, SYMBOLS, random.Random(42)) for _ in range(2))
    seen = set()
    for _ in range(600):
        a.step(0.1)
        b.step(0.1)
        seen.add(a.fair("CEA24"))
        assert a.fair("CEA24") == b.fair("CEA24")
    assert len(seen) > 20


def test_local_book_counts_gaps_and_follows_status():
    book = LocalBook("CEA24")
    book.apply(BookSnapshot("CEA24", 5, [(9_200, 10, 1), (9_190, 5, 1)], [(9_210, 7, 2)], None, 9_200, "open"))
    assert (book.best_bid, book.best_ask) == (9_200, 9_210)
    book.apply(BookUpdate("CEA24", 6, "buy", 9_200, 0, 0))
    book.apply(Trade("CEA24", 7, 1, 9_210, 7, "buy", 1))
    book.apply(BookUpdate("CEA24", 8, "sell", 9_210, 0, 0))
    assert (book.best_bid, book.best_ask, book.last_price) == (9_190, None, 9_210)
    assert book.gaps == 0
    book.apply(InstrumentStatus("CEA24", 10, "halted", 9_200))
    assert book.status == "halted" and book.gaps == 1


def test_firms_stay_quiet_while_an_instrument_is_not_open():
    books = {s: LocalBook(s) for s in SYMBOLS}          # status "closed" until a snapshot says so
    view = MarketView(FairPrice(CONFIG, SYMBOLS, random.Random(1)), books)
    for firm in make_firms(MEMBERS, SYMBOLS, 1, "x"):
        assert firm.decide(view) == []


def test_client_order_ids_are_unique_and_short():
    firms = make_firms(MEMBERS, SYMBOLS, 1, "lr3kq9z")
    ids = [f.next_id() for f in firms for _ in range(1000)]
    assert len(set(ids)) == len(ids)
    assert max(len(i) for i in ids) <= 32


def test_sparkline():
    assert sparkline([]) == ""
    assert sparkline([5, 5, 5]) == "▄▄▄"
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█"
    assert len(sparkline(range(100), width=24)) == 24


def test_screen_shows_progress_rates_and_every_vintage():
    engine, fair, books, firms, stats = simulate(seconds=2, rate=500, seed=2)
    for i in range(100):
        stats.on_latency(1.9, 0.001 + i * 0.00001)
    stats.sessions = 20
    ref = {s: fair.reference[s] for s in SYMBOLS}
    colored = render_screen(stats, books, ref, 2.0, 60, "2026-11-24", "http://127.0.0.1:9101/metrics")
    plain = render_screen(stats, books, ref, 2.0, 60, "2026-11-24", "http://127.0.0.1:9101/metrics", color=False)
    assert [ANSI.sub("", line) for line in colored] == plain
    text = "\n".join(plain)
    assert "2.0 s / 60 s" in text and "20 member sessions" in text
    assert "http://127.0.0.1:9101/metrics" in text
    assert "p99    2.0 ms" in text
    for sym in SYMBOLS:
        row = next(line for line in plain if line.startswith(f" {sym} "))
        bid, ask = engine.best_prices(sym)
        for price in (bid, ask):
            if price is not None:
                assert f"{price / 100:,.2f}" in row
    line = render_line(stats, books, 2.0, 60)
    assert "\n" not in line and not ANSI.search(line)
    assert all(sym in line for sym in SYMBOLS)


def test_summary_says_what_happened_and_where_to_look():
    engine, fair, books, firms, stats = simulate(seconds=2, rate=500, seed=2)
    stats.on_latency(1.0, 0.002)
    ref = {s: fair.reference[s] for s in SYMBOLS}
    text = "\n".join(render_summary(stats, ref, 2.0, "http://127.0.0.1:9101/metrics", "/tmp/kaboni-demo-x"))
    assert f"{stats.trades:,} trades" in text
    assert "Rejected: none." in text
    assert "http://127.0.0.1:9101/metrics" in text and "/tmp/kaboni-demo-x" in text
    assert "deploy/prometheus/prometheus.yml" in text and "deploy/grafana/kaboni.json" in text
    assert "point its target" not in text  # the shipped scrape config fits port 9101
    other = "\n".join(render_summary(stats, ref, 2.0, "http://127.0.0.1:19101/metrics", "/tmp/kaboni-demo-x"))
    assert "That file scrapes port 9101: point its target at http://127.0.0.1:19101/metrics first." in other
    for sym in SYMBOLS:
        vwap = (2 * stats.instruments[sym].value + stats.instruments[sym].volume) // (2 * stats.instruments[sym].volume)
        assert f"{vwap / 100:,.2f}" in text


METRICS_TEXT = """\
# TYPE kaboni_orders_received_total counter
kaboni_orders_received_total{type="NewOrder",outcome="accepted"} 90.0
kaboni_orders_received_total{type="NewOrder",outcome="rejected"} 4.0
kaboni_orders_received_total{type="CancelOrder",outcome="accepted"} 6.0
kaboni_orders_received_total{type="NewOrder",outcome="invalid"} 1.0
# TYPE kaboni_trades_total counter
kaboni_trades_total{instrument="CEA24"} 30.0
kaboni_trades_total{instrument="CEA25"} 12.0
# TYPE kaboni_order_to_report_latency_seconds histogram
kaboni_order_to_report_latency_seconds_bucket{le="0.001"} 50.0
kaboni_order_to_report_latency_seconds_bucket{le="0.0025"} 98.0
kaboni_order_to_report_latency_seconds_bucket{le="0.005"} 99.0
kaboni_order_to_report_latency_seconds_bucket{le="+Inf"} 100.0
kaboni_order_to_report_latency_seconds_count 100.0
kaboni_order_to_report_latency_seconds_sum 0.1
# TYPE kaboni_journal_fsync_seconds histogram
kaboni_journal_fsync_seconds_bucket{le="0.001"} 10.0
kaboni_journal_fsync_seconds_bucket{le="+Inf"} 10.0
kaboni_journal_fsync_seconds_count 10.0
kaboni_journal_fsync_seconds_sum 0.005
# TYPE kaboni_journal_batch_records histogram
kaboni_journal_batch_records_bucket{le="1.0"} 0.0
kaboni_journal_batch_records_bucket{le="+Inf"} 10.0
kaboni_journal_batch_records_count 10.0
kaboni_journal_batch_records_sum 123.0
# TYPE kaboni_journal_bytes_written_total counter
kaboni_journal_bytes_written_total 2500000.0
"""


def test_exchange_figures_from_the_metrics_endpoint():
    from gateway._demo_market import parse_metrics

    fig = parse_metrics(METRICS_TEXT)
    assert (fig.orders, fig.accepted, fig.rejected, fig.trades) == (101, 96, 4, 42)
    assert fig.order_to_report_p99 == 0.005 and fig.fsync_p99 == 0.001
    assert (fig.fsyncs, fig.records, fig.bytes_written) == (10, 123, 2_500_000)
    orders, journal = fig.describe()
    assert "101 orders received (4 rejected), 42 trades" in orders and "<= 5.0 ms" in orders
    assert "123 records durable in 10 fsyncs (12.3 per fsync)" in journal and "2.5 MB" in journal
    assert parse_metrics("").order_to_report_p99 is None


def test_fair_price_rebases_on_a_new_reference():
    fair = FairPrice(CONFIG, SYMBOLS, random.Random(1))
    fair.rebase({"CEA25": 10_000}, {"CEA25": 1_000})
    assert fair.band["CEA25"] == (9_000, 11_000)
    assert abs(fair.fair("CEA25") - 10_000) < 700


def test_settlement_check_recomputes_the_nets():
    from gateway._demo import settlement_check

    line = dict(instrument="CEA25", currency="CNY", bought=0, sold=0, paid=0, received=0, fees=0)
    good = {"trading_day": "2026-11-24", "totals": {"CEA25": {"net_qty": 0, "net_cash": 0}}, "lines": [
        {**line, "member": "M01", "net_qty": -40, "net_cash": 370_000},
        {**line, "member": "M02", "net_qty": 40, "net_cash": -370_000}]}
    assert "2 lines for 2 accounts across 1 vintages" in settlement_check(good)[0]
    assert settlement_check(good)[0].endswith("sum to zero: yes.")
    bad = {**good, "lines": good["lines"][:1]}       # totals claim zero, the lines do not
    assert settlement_check(bad)[0].endswith("sum to zero: NO.")
