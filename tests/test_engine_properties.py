"""Property-based stress test: random command sequences against the engine (hypothesis, stateful).

After every step the engine's own ``check()`` must pass, and an independent model built only
from the events must agree with the engine:

- every maker fill is the head of the best level of the model's queue (price, then time) and
  at the resting order's price; the taker's fill has the same price and is within its limit;
- report seqs are gap-free per member, md_seq gap-free per instrument; each Trade is followed
  by a BookUpdate of its level;
- a request's cl_ord_id is refused as a duplicate exactly when the protocol says it is taken,
  and a rejected request changes nothing;
- end of day: the closing price is the VWAP of the day's Trades rounded half up to the tick
  (or the previous close), and the settlement lines are the day's fills summed up;
- a market-data consumer that applies only ``BookUpdate``s sees the engine's book;
- reservations equal what the model's open orders need; no balance is negative;
- cash and allowances across members and the fee account equal net deposits;
- a fill takes min(taker's, maker's open qty); FOK is all or nothing and is cancelled only if it
  could not fill against other members before a self-match; an IOC or market rest is
  cancelled only when nothing crosses any more; IOC, FOK and market orders never rest;
- every settlement report nets to zero.

At teardown the same commands on a fresh engine give identical events and the same state hash,
and a snapshot restores to the same state hash.
"""

from __future__ import annotations

from collections import defaultdict

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from engine import (
    AdminAck, BookUpdate, CancelOrder, CancelRejected, CloseMarket, DayEnded, Deposit, Engine, EndOfDay, Fill, Halt,
    InstrumentStatus, MassCancel, NewOrder, OpenMarket, OrderAccepted, OrderCancelled, OrderRejected,
    OrderReplaced, ReinstateMember, ReplaceOrder, Resume, SessionEnded, SuspendMember, Trade, Withdraw,
    price_band,
)
from engine_support import MEMBERS, OPS, config

CONFIG = config()
INSTRUMENTS = {i.symbol: i for i in CONFIG.instruments}
SYMBOLS = list(INSTRUMENTS)
FEE_ACCOUNT = CONFIG.market.fee_account

members = st.sampled_from(MEMBERS)
symbols = st.sampled_from(SYMBOLS)
sides = st.sampled_from(["buy", "sell"])
rarely = st.sampled_from([False] * 12 + [True])
duplicate = st.sampled_from([None] * 8 + ["used", "live", "live"])


def fee_reserve(price: int, qty: int, fee_bp: int) -> int:
    return -(-price * qty * fee_bp // 10_000)


class ModelOrder:
    __slots__ = ("oid", "cl", "member", "symbol", "side", "price", "qty", "leaves", "tif", "filled_now", "rank")

    def __init__(self, oid, cl, member, symbol, side, price, qty, tif):
        self.oid, self.cl, self.member, self.symbol, self.side = oid, cl, member, symbol, side
        self.price, self.qty, self.leaves, self.tif = price, qty, qty, tif
        self.filled_now = 0
        self.rank = None  # entry time in the book; None while not resting


class EngineMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.engine = Engine(CONFIG)
        self.log: list = []          # (command, member, ts, session, throttled)
        self.events: list = []       # every event, in order
        self.ts = 1_000
        self.next_id = defaultdict(int)
        self.used_ids = defaultdict(list)
        self.refs: list[str] = []
        # the model
        self.orders: dict[int, ModelOrder] = {}
        self.rank = 0
        self.seq = defaultdict(int)
        self.md_seq = defaultdict(int)
        self.md_book = {s: {"buy": {}, "sell": {}} for s in SYMBOLS}
        self.external_cash = defaultdict(int)
        self.external_qty = defaultdict(int)
        self.used_today = defaultdict(set)       # member -> cl_ord_ids used this trading day
        self.day_trades = defaultdict(lambda: [0, 0])  # symbol -> [value, qty] of today's trades
        self.day_figures = defaultdict(lambda: [0, 0, 0, 0, 0])  # (member, symbol) -> bought, sold, paid, received, fees
        self.reference = {sym: ins.reference_price for sym, ins in INSTRUMENTS.items()}
        for n, m in enumerate(MEMBERS):
            for asset, amount in (("CNY", 2_000_000), ("EUR", 40_000_000), ("CEA", 60), ("EUA", 2_000)):
                self.do(OPS, Deposit(f"init-{n}-{asset}", m, asset, amount))
        self.do(OPS, OpenMarket())

    # -----------------------------------------------------------------------------------------
    # Driving the engine and following its events

    def do(self, member, command, session=0, throttled=False):
        self.ts += 1
        self.log.append((command, member, self.ts, session, throttled))
        cl = getattr(command, "cl_ord_id", None)
        if cl is not None:
            live_ids = {o.cl for o in self.orders.values() if o.rank is not None and o.member == member}
            duplicate = cl in self.used_today[member] or cl in live_ids
            before = self.visible_state(member)
        events = self.engine.execute(command, member, self.ts, session=session, throttled=throttled)
        self.events.extend(events)
        if cl is not None:
            first = events[0]
            reject = isinstance(first, (OrderRejected, CancelRejected))
            if throttled:
                assert reject and first.reason == "throttled"
            elif duplicate:
                assert reject and first.reason == "duplicate_cl_ord_id", "this cl_ord_id is taken"
            else:
                assert not (reject and first.reason == "duplicate_cl_ord_id"), "this cl_ord_id is free"
            if reject:
                assert len(events) == 1 and first.cl_ord_id == cl
                assert self.visible_state(member) == before, "a rejected request changed something"
            self.used_today[member].add(cl)
        self.follow(command, events)
        return events

    def visible_state(self, member):
        e = self.engine
        return ([e.book_snapshot(s, 1_000) for s in SYMBOLS], e.balances(member),
                [(o.order_id, o.cl_ord_id, o.leaves, o.price) for o in e.live_orders(member)])

    def follow(self, command, events):
        pending: list[ModelOrder] = []
        taker_fill: Fill | None = None
        taker_leaves = 0
        accepted = 0
        unreported: set = set()  # levels that traded and have not had their BookUpdate yet
        for e in events:
            if hasattr(e, "seq"):
                assert e.seq == self.seq[e.member] + 1, f"seq gap for {e.member}: {e}"
                self.seq[e.member] = e.seq
                assert e.ts == self.ts
            if isinstance(e, (BookUpdate, Trade, InstrumentStatus)):
                assert e.md_seq == self.md_seq[e.instrument] + 1, f"md_seq gap: {e}"
                self.md_seq[e.instrument] = e.md_seq
            if isinstance(e, OrderAccepted):
                accepted += 1
                assert e.order_id not in self.orders
                o = ModelOrder(e.order_id, e.cl_ord_id, e.member, e.instrument, e.side, e.price, e.qty, e.tif)
                self.orders[e.order_id] = o
                pending.append(o)
            elif isinstance(e, Fill):
                o = self.orders[e.order_id]
                if e.liquidity == "taker":
                    assert taker_fill is None
                    taker_fill = e
                    taker_leaves = o.leaves
                    assert o.rank is None, "a taker is never resting"
                else:
                    self.check_maker(o, e, taker_fill)
                    assert e.qty == min(o.leaves, taker_leaves), "a fill takes all it can"
                    taker_fill = None
                assert e.qty > 0 and o.leaves - e.qty == e.leaves_qty
                o.leaves = e.leaves_qty
                o.filled_now += e.qty
                ins = INSTRUMENTS[o.symbol]
                assert e.fee == e.price * e.qty * ins.fee_bp // 10_000
                fig = self.day_figures[(e.member, e.instrument)]
                if e.side == "buy":
                    fig[0] += e.qty
                    fig[2] += e.price * e.qty
                else:
                    fig[1] += e.qty
                    fig[3] += e.price * e.qty
                fig[4] += e.fee
                self.day_figures[(FEE_ACCOUNT, e.instrument)][4] += e.fee
                if not o.leaves:
                    o.rank = None
            elif isinstance(e, OrderCancelled):
                o = self.orders[e.order_id]
                assert e.cancelled_qty == o.leaves > 0 and e.leaves_qty == 0
                if e.reason in ("ioc", "fok"):
                    self.check_nothing_more_to_trade(o, e.reason)
                o.leaves = 0
                o.rank = None
            elif isinstance(e, OrderReplaced):
                o = self.orders[e.order_id]
                filled = o.qty - o.leaves
                assert e.leaves_qty == e.qty - filled > 0
                keeps = e.price == o.price and e.qty <= o.qty
                assert e.orig_cl_ord_id == o.cl
                o.qty, o.leaves, o.cl = e.qty, e.leaves_qty, e.cl_ord_id
                if not keeps:
                    o.price = e.price
                    o.rank = None
                    pending.append(o)
            elif isinstance(e, BookUpdate):
                unreported.discard((e.instrument, e.side, e.price))
                levels = self.md_book[e.instrument][e.side]
                if e.qty:
                    assert e.orders > 0
                    levels[e.price] = (e.qty, e.orders)
                else:
                    assert e.orders == 0
                    levels.pop(e.price, None)
            elif isinstance(e, Trade):
                unreported.add((e.instrument, "sell" if e.aggressor == "buy" else "buy", e.price))
                self.day_trades[e.instrument][0] += e.price * e.qty
                self.day_trades[e.instrument][1] += e.qty
            elif isinstance(e, DayEnded):
                self.check_day_ended(e)
            elif isinstance(e, AdminAck) and e.request in ("Deposit", "Withdraw") and e.duplicate is not True:
                sign = 1 if e.request == "Deposit" else -1
                if e.asset in INSTRUMENTS:
                    self.external_qty[e.asset] += sign * e.amount
                else:
                    self.external_cash[e.asset] += sign * e.amount
        assert taker_fill is None, "a taker fill without its maker fill"
        assert not unreported, "a Trade without a BookUpdate of its level after it"
        if isinstance(command, NewOrder):
            assert accepted <= 1
            if accepted:
                o = pending[0]
                if o.tif == "fok":
                    assert o.filled_now in (0, o.qty), "fok filled partly"
                if o.tif in ("ioc", "fok") or o.price is None:
                    assert o.leaves == 0, "ioc, fok and market orders never rest"
        for o in pending:  # what is left of an entering order rests at the back of its level
            o.filled_now = 0
            if o.leaves:
                self.rank += 1
                o.rank = self.rank

    def check_day_ended(self, d: DayEnded):
        for sym in SYMBOLS:
            lines = [l for l in d.settlement if l.instrument == sym]
            assert sum(l.net_qty for l in lines) == 0
            assert sum(l.net_cash for l in lines) == 0
            # the closing price: VWAP of the day's trades rounded half up to the tick, else the old one
            value, qty = self.day_trades[sym]
            tick = INSTRUMENTS[sym].tick
            expected = (2 * value + qty * tick) // (2 * qty * tick) * tick if qty else self.reference[sym]
            assert d.closing_prices[sym] == expected
            self.reference[sym] = expected
        expected_lines = set()
        for (member, sym), (bought, sold, paid, received, fees) in self.day_figures.items():
            ins = INSTRUMENTS[sym]
            if member == FEE_ACCOUNT:
                if fees:
                    expected_lines.add((member, sym, ins.currency, 0, 0, 0, 0, 0, 0, fees))
            elif bought or sold or fees:
                expected_lines.add((member, sym, ins.currency, bought, sold, paid, received, fees,
                                    bought - sold, received - paid - fees))
        got = {(l.member, l.instrument, l.currency, l.bought, l.sold, l.paid, l.received, l.fees, l.net_qty,
                l.net_cash) for l in d.settlement}
        assert got == expected_lines and len(got) == len(d.settlement)
        self.day_trades.clear()
        self.day_figures.clear()
        self.used_today.clear()

    def crossing(self, o: ModelOrder) -> list[ModelOrder]:
        """The model's resting orders that ``o`` would trade with, in priority order."""
        ins = INSTRUMENTS[o.symbol]
        lower, upper = price_band(self.engine.reference_price(o.symbol), ins.band_bp, ins.tick)
        if o.side == "buy":
            limit = o.price if o.price is not None else upper
            opp = [q for q in self.orders.values() if q.rank is not None and q.symbol == o.symbol
                   and q.side == "sell" and q.price <= limit]
            return sorted(opp, key=lambda q: (q.price, q.rank))
        limit = o.price if o.price is not None else lower
        opp = [q for q in self.orders.values() if q.rank is not None and q.symbol == o.symbol
               and q.side == "buy" and q.price >= limit]
        return sorted(opp, key=lambda q: (-q.price, q.rank))

    def check_nothing_more_to_trade(self, o: ModelOrder, reason: str):
        """An ioc rest is cancelled only when nothing crosses any more; a fok only when it
        could not fill whole against other members before its first self-match."""
        assert o.rank is None, "ioc and fok cancels are for incoming orders"
        if reason == "ioc":
            assert not self.crossing(o), "cancelled ioc while it could still trade"
            return
        assert o.filled_now == 0, "a fok is cancelled whole or not at all"
        available = 0
        for q in self.crossing(o):
            if q.member == o.member:
                break
            available += q.leaves
        assert available < o.leaves, "cancelled fok that could fill"

    def check_maker(self, o: ModelOrder, fill: Fill, taker: Fill | None):
        assert taker is not None and taker.trade_id == fill.trade_id
        assert fill.price == taker.price == o.price, "fills are at the resting order's price"
        assert fill.qty == taker.qty and fill.side != taker.side
        assert o.rank is not None, "a maker is resting"
        queue = [q for q in self.orders.values()
                 if q.rank is not None and q.leaves and q.symbol == o.symbol and q.side == o.side]
        best = max(q.price for q in queue) if o.side == "buy" else min(q.price for q in queue)
        assert o.price == best, "price priority"
        assert o.rank == min(q.rank for q in queue if q.price == best), "time priority"
        t = self.orders[taker.order_id]
        lower, upper = price_band(self.engine.reference_price(o.symbol), INSTRUMENTS[o.symbol].band_bp,
                                  INSTRUMENTS[o.symbol].tick)
        limit = t.price if t.price is not None else (upper if t.side == "buy" else lower)
        assert (fill.price <= limit) if t.side == "buy" else (fill.price >= limit), "taker's limit"

    # -----------------------------------------------------------------------------------------
    # Choosing inputs

    def new_cl(self, member: str, dup) -> str:
        """A fresh id, or (dup) the id of a live order or the last id the member used."""
        live = self.engine.live_orders(member)
        if dup == "live" and live:
            return live[0].cl_ord_id
        if dup and self.used_ids[member]:
            return self.used_ids[member][-1]
        self.next_id[member] += 1
        cl = f"{member}-{self.next_id[member]}"
        self.used_ids[member].append(cl)
        return cl

    def price(self, symbol: str, offset: int | None, odd: int) -> int | None:
        if offset is None:
            return None
        ins = INSTRUMENTS[symbol]
        p = self.engine.reference_price(symbol) + offset * ins.tick
        if odd == 1:
            p += 1 if ins.tick > 1 else 10_000  # off the tick, or far outside the band
        return p

    def qty(self, symbol: str, n: int, odd: int) -> int:
        ins = INSTRUMENTS[symbol]
        q = n * ins.qty_step
        if odd == 2:
            q += ins.qty_step // 2 if ins.qty_step > 1 else -q  # off the step, or zero
        return q

    def target(self, member: str, index: int) -> str:
        live = self.engine.live_orders(member)
        if live and index < 9:
            return live[index % len(live)].cl_ord_id
        used = self.used_ids[member]
        return used[index % len(used)] if used else "none"

    # -----------------------------------------------------------------------------------------
    # Rules

    @rule(member=members, symbol=symbols, side=sides, n=st.integers(1, 12),
          offset=st.one_of(st.none(), st.integers(-4, 4), st.integers(-4, 4)),
          tif=st.sampled_from([None, None, "day", "gtc", "ioc", "fok"]),
          stp=st.sampled_from(["cancel_incoming", "cancel_resting", "cancel_both"]),
          session=st.sampled_from([0, 0, 1, 2]), odd=st.sampled_from([0] * 10 + [1, 2]),
          dup=duplicate, throttled=rarely)
    def new_order(self, member, symbol, side, n, offset, tif, stp, session, odd, dup, throttled):
        if offset is None and tif in ("day", "gtc") and odd == 0:
            tif = None  # keep most market orders valid
        cmd = NewOrder(self.new_cl(member, dup), symbol, side, self.qty(symbol, n, odd),
                       self.price(symbol, offset, odd), tif, stp)
        self.do(member, cmd, session=session, throttled=throttled)

    @rule(member=members, index=st.sampled_from([0, 0, 1, 2, 3, 9]), dup=duplicate, throttled=rarely)
    def cancel(self, member, index, dup, throttled):
        self.do(member, CancelOrder(self.new_cl(member, dup), self.target(member, index)), throttled=throttled)

    @rule(member=members, index=st.sampled_from([0, 0, 1, 2, 3, 9]), n=st.integers(1, 12), offset=st.integers(-4, 4),
          same_price=st.booleans(), odd=st.sampled_from([0] * 10 + [1, 2]), dup=duplicate, throttled=rarely)
    def replace(self, member, index, n, offset, same_price, odd, dup, throttled):
        orig = self.target(member, index)
        live = {o.cl_ord_id: o for o in self.engine.live_orders(member)}
        symbol = live[orig].instrument if orig in live else "CEA"
        price = live[orig].price if orig in live and same_price and not odd else self.price(symbol, offset, odd)
        cmd = ReplaceOrder(self.new_cl(member, dup), orig, self.qty(symbol, n, odd), price)
        self.do(member, cmd, throttled=throttled)

    @rule(member=members, symbol=st.one_of(st.none(), symbols), side=st.one_of(st.none(), sides),
          dup=duplicate, throttled=rarely)
    def mass_cancel(self, member, symbol, side, dup, throttled):
        self.do(member, MassCancel(self.new_cl(member, dup), symbol, side), throttled=throttled)

    @rule(member=members, symbol=symbols, side=sides, n=st.integers(1, 8), offset=st.integers(-3, 3),
          tif=st.sampled_from(["day", "gtc"]), session=st.sampled_from([0, 0, 1, 2]))
    def limit_order(self, member, symbol, side, n, offset, tif, session):
        """Plain valid limit orders, so that books fill up and trade."""
        cmd = NewOrder(self.new_cl(member, False), symbol, side, self.qty(symbol, n, 0),
                       self.price(symbol, offset, 0), tif)
        self.do(member, cmd, session=session)

    @rule(member=members, symbol=symbols, side=sides, n=st.integers(1, 8), offset=st.integers(-3, 3),
          tif=st.sampled_from(["day", "gtc"]))
    def another_limit_order(self, member, symbol, side, n, offset, tif):
        self.limit_order(member, symbol, side, n, offset, tif, 0)

    @rule(action=st.sampled_from([
        "halt CEA", "halt EUA", "halt-cancel CEA", "resume CEA", "resume EUA", "open", "close", "eod",
        "cycle", "cycle"]))
    def market_operations(self, action):
        verb, _, symbol = action.partition(" ")
        if verb == "halt":
            self.do(OPS, Halt(symbol))
        elif verb == "halt-cancel":
            self.do(OPS, Halt(symbol, cancel_orders=True))
        elif verb == "resume":
            self.do(OPS, Resume(symbol))
        elif verb == "open":
            self.do(OPS, OpenMarket())
        elif verb == "close":
            self.do(OPS, CloseMarket())
        elif verb == "eod":
            self.do(OPS, EndOfDay())
        else:  # a whole day cycle, so that most of the time the market is open
            self.do(OPS, CloseMarket())
            self.do(OPS, EndOfDay())
            self.do(OPS, OpenMarket())

    @rule(member=members, asset=st.sampled_from(["CNY", "EUR", "CEA", "EUA"]), deposit=st.booleans(),
          amount=st.sampled_from([1, 5, 100, 10_000, 1_000_000, 50_000_000]), repeat=rarely)
    def transfer(self, member, asset, deposit, amount, repeat):
        if repeat and self.refs:
            ref = self.refs[-1]
        else:
            ref = f"ref-{len(self.refs)}"
            self.refs.append(ref)
        self.do(OPS, (Deposit if deposit else Withdraw)(ref, member, asset, amount))

    @rule(session=st.sampled_from([1, 2]))
    def session_ended(self, session):
        self.do("", SessionEnded(session))

    @rule(member=members, suspend=st.sampled_from([True, False, False]))
    def suspension(self, member, suspend):
        self.do(OPS, (SuspendMember if suspend else ReinstateMember)(member))

    @rule()
    def snapshot_and_restore(self):
        """Carry on with a restored engine: it must behave exactly like the original."""
        before = self.engine.state_hash()
        self.engine = Engine.restore(CONFIG, self.engine.snapshot())
        assert self.engine.state_hash() == before

    # -----------------------------------------------------------------------------------------
    # Invariants, after every step

    @invariant()
    def engine_invariants(self):
        self.engine.check()

    @invariant()
    def model_agrees_with_engine(self):
        e = self.engine
        for sym in SYMBOLS:
            assert e.md_seq(sym) == self.md_seq[sym]
            snap = e.book_snapshot(sym, depth=1_000)
            # the market-data consumer's book
            md_bids = sorted(((p, q, n) for p, (q, n) in self.md_book[sym]["buy"].items()), reverse=True)
            md_asks = sorted((p, q, n) for p, (q, n) in self.md_book[sym]["sell"].items())
            assert (snap.bids, snap.asks) == (md_bids, md_asks), "BookUpdates do not add up to the book"
            # the model's book
            levels = {"buy": defaultdict(lambda: [0, 0]), "sell": defaultdict(lambda: [0, 0])}
            for o in self.orders.values():
                if o.rank is not None and o.symbol == sym:
                    lv = levels[o.side][o.price]
                    lv[0] += o.leaves
                    lv[1] += 1
            assert snap.bids == sorted(((p, q, n) for p, (q, n) in levels["buy"].items()), reverse=True)
            assert snap.asks == sorted((p, q, n) for p, (q, n) in levels["sell"].items())
        # reservations from the model's open orders; nothing negative
        for m in MEMBERS:
            b = e.balances(m)
            assert e.last_seq(m) == self.seq[m]
            cash_need = defaultdict(int)
            qty_need = defaultdict(int)
            for o in self.orders.values():
                if o.rank is not None and o.member == m:
                    ins = INSTRUMENTS[o.symbol]
                    if o.side == "buy":
                        cash_need[ins.currency] += o.price * o.leaves + fee_reserve(o.price, o.leaves, ins.fee_bp)
                    else:
                        qty_need[o.symbol] += o.leaves
            for c, v in b.cash.items():
                assert v.reserved == cash_need[c]
                assert min(v.total, v.reserved, v.available, v.withdrawable) >= 0
            for s, h in b.allowances.items():
                assert h.reserved == qty_need[s]
                assert min(h.settled, h.unsettled, h.reserved, h.available) >= 0
        # conservation against the deposits and withdrawals the operators were acknowledged
        fees = e.fee_balances()
        for c in ("CNY", "EUR"):
            assert sum(e.balances(m).cash[c].total for m in MEMBERS) + fees[c] == self.external_cash[c]
        for s in SYMBOLS:
            total = sum(e.balances(m).allowances[s].settled + e.balances(m).allowances[s].unsettled for m in MEMBERS)
            assert total == self.external_qty[s]

    def teardown(self):
        # the same commands on a fresh engine: the same events and the same state
        fresh = Engine(CONFIG)
        events = []
        for command, member, ts, session, throttled in self.log:
            events.extend(fresh.execute(command, member, ts, session=session, throttled=throttled))
        assert events == self.events
        assert fresh.state_hash() == self.engine.state_hash()
        # and a snapshot restores to the same state
        restored = Engine.restore(CONFIG, fresh.snapshot())
        assert restored.state_hash() == fresh.state_hash()
        restored.check()
        # and a journal replay, which runs the commands with events off, reaches it too
        quiet = Engine(CONFIG)
        quiet.events = False
        for command, member, ts, session, throttled in self.log:
            quiet.execute(command, member, ts, session=session, throttled=throttled)
        quiet.check()
        assert quiet.state_hash() == self.engine.state_hash()


EngineMachine.TestCase.settings = settings(
    max_examples=400, stateful_step_count=100, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestEngineProperties = EngineMachine.TestCase
