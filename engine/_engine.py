"""The matching engine: commands in, events out, deterministically.

``Engine.execute(command, member, ts)`` validates a command in the protocol's order of
precedence, applies it to the books and accounts, and returns the events it caused: the
member reports (sequenced per member), market data (sequenced per instrument), operator
replies, and the end-of-day settlement. Time, the member and the cancel-on-disconnect session
come in as arguments; nothing here reads a clock, draws a random number or does IO, so the
same commands always give the same events and the same ``state_hash()``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from operator import attrgetter
from typing import Any, Callable, Final

import msgspec

from ._accounts import Account, Cash, Holding
from ._book import NO_PRICE, Order, SideBook
from ._config import MAX_AMOUNT, MAX_PRICE, ExchangeConfig, InstrumentConfig, price_band
from ._errors import InvariantError, LeftOutError
from ._messages import (
    AdminAck, AdminRejected, AllowanceBalance, Balances, BookSnapshot, BookUpdate, CancelOrder,
    CancelReason, CancelRejected, CashBalance, CloseMarket, DayEnded, Deposit, EndOfDay, Fill, Halt,
    InstrumentStatus, MassCancel, MassCancelDone, NewOrder, OpenMarket, OrderAccepted,
    OrderCancelled, OrderRejected, OrderReplaced, QueryBalances, ReinstateMember, RejectReason,
    ReplaceOrder, Restarted, Resume, SessionEnded, SettlementLine, Side, Status, SuspendMember,
    Trade, Withdraw,
)

__all__ = ["Engine", "InvariantError", "LeftOutError", "SNAPSHOT_VERSION"]

SNAPSHOT_VERSION = 1
BUY: Final = "buy"
SELL: Final = "sell"
OPEN: Final = "open"
HALTED: Final = "halted"
CLOSED: Final = "closed"
SHOWN: Final = 40  # characters of a client's string quoted in a reject's text


def _shown(value: str) -> str:
    """A client's string quoted in a text, cut short: a reject stays a few hundred bytes (a
    frame the server sends must fit in max_frame) whatever a client named."""
    if len(value) <= SHOWN:
        return repr(value)
    return repr(value[:SHOWN]) + "..."


class _Instrument:
    """Run-time state of one instrument: its rules, its book and today's trading figures."""

    __slots__ = (
        "symbol", "currency", "tick", "step", "min_qty", "max_qty", "band_bp", "fee_bp",
        "holding_limit", "reference", "lower", "upper", "status", "md_seq", "last_price",
        "day_value", "day_qty", "bids", "asks", "qty_floor", "price_floor",
        "trades", "traded_qty", "traded_value",
    )

    def __init__(self, cfg: InstrumentConfig) -> None:
        self.symbol = cfg.symbol
        self.currency = cfg.currency
        self.tick = cfg.tick
        self.step = cfg.qty_step
        self.min_qty = cfg.min_qty
        self.max_qty = cfg.max_qty if cfg.max_qty is not None else MAX_AMOUNT  # more can never be held
        self.qty_floor = max(1, cfg.min_qty)  # the hot path's quick range check also rejects qty <= 0
        self.band_bp = cfg.band_bp
        self.fee_bp = cfg.fee_bp
        self.holding_limit = cfg.holding_limit
        self.status: Status = CLOSED
        self.md_seq = 0
        self.last_price: int | None = None
        self.day_value = 0
        self.day_qty = 0
        # Statistics of this process's lifetime (for metrics): not state, not in snapshots.
        self.trades = self.traded_qty = self.traded_value = 0
        self.bids = SideBook(-1)
        self.asks = SideBook(1)
        self.set_reference(cfg.reference_price)

    def set_reference(self, reference: int) -> None:
        self.reference = reference
        self.lower, self.upper = price_band(reference, self.band_bp, self.tick)
        if self.upper > MAX_PRICE:  # only after years of prices rising to absurd levels
            self.upper = MAX_PRICE // self.tick * self.tick
        self.price_floor = max(1, self.lower)  # ... and price <= 0


_IMMEDIATE = frozenset(("ioc", "fok"))


def _by_order_id(ins: "_Instrument") -> list[Order]:
    """An instrument's resting orders, oldest order id first: the order mass cancels go in."""
    return sorted([*ins.bids.orders(), *ins.asks.orders()], key=attrgetter("order_id"))


def _fee_reserve(price: int, qty: int, fee_bp: int) -> int:
    """Cash a buy holds back for its fees: ceil(price x qty x fee_bp / 10,000)."""
    return -(-price * qty * fee_bp // 10_000) if fee_bp else 0


def _too_much(request: str, held: int, asset: str) -> AdminRejected:
    """A deposit the exchange cannot hold: ``MAX_AMOUNT`` of one asset in all accounts together
    keeps every figure a client sees within a signed 64-bit integer."""
    return AdminRejected(request, "invalid_state",
                         f"the exchange holds {held} {asset}; at most {MAX_AMOUNT} in all accounts")


def _next_business_day(day: str, weekend: frozenset[int], holidays: frozenset[str]) -> str:
    date = _dt.date.fromisoformat(day)
    while True:
        date += _dt.timedelta(days=1)
        iso = date.isoformat()
        if date.weekday() not in weekend and iso not in holidays:
            return iso


class Engine:
    """All books and accounts of one exchange; see the module docstring."""

    def __init__(self, config: ExchangeConfig, trading_day: str | None = None) -> None:
        self.config = config
        market = config.market
        day = trading_day or market.first_trading_day
        if day is None:
            raise ValueError("a trading day is needed: configure market.first_trading_day or pass one")
        _dt.date.fromisoformat(day)
        self.trading_day = day
        self._weekend = frozenset(market.weekend)
        self._holidays = frozenset(market.holidays)
        self._instruments = {c.symbol: _Instrument(c) for c in config.instruments}
        self._currencies = config.currencies
        symbols = list(self._instruments)
        self._accounts = {
            m.id: Account(m.id, self._currencies, symbols) for m in config.members if m.role == "member"
        }
        self.fee_account = market.fee_account
        self._fees = {c: Cash() for c in self._currencies}
        # False while a journal is replayed to rebuild the state: the order path then builds no
        # reports, book updates or trades (the journal holds the reports as they were sent),
        # which is about a third of its work. The state changes are the same either way.
        self.events = True
        self._next_order_id = 1
        self._next_trade_id = 1
        self._refs: set[str] = set()
        self._external_cash = {c: 0 for c in self._currencies}  # deposits - withdrawals
        self._external_qty = {s: 0 for s in symbols}
        self._cod: dict[int, dict[int, Order]] = {}  # session -> its cancel-on-disconnect orders
        self._dispatch: dict[type, Callable[[Any, str, int, int, bool], list]] = {
            CancelOrder: self._cancel_order,
            ReplaceOrder: self._replace_order,
            MassCancel: self._mass_cancel,
            QueryBalances: self._query_balances,
            Halt: self._halt,
            Resume: self._resume,
            OpenMarket: self._open_market,
            CloseMarket: self._close_market,
            EndOfDay: self._end_of_day,
            SuspendMember: self._suspend_member,
            ReinstateMember: self._reinstate_member,
            Deposit: self._deposit,
            Withdraw: self._withdraw,
            SessionEnded: self._session_ended,
            Restarted: self._restarted,
        }

    # -----------------------------------------------------------------------------------------
    # Public API

    def execute(self, command, member: str, ts: int, session: int = 0, throttled: bool = False) -> list:
        """Apply one command from ``member`` at ``ts``; return the events it caused.

        ``session`` is non-zero when the command comes from a connection that asked for
        cancel-on-disconnect: orders it enters are cancelled by ``SessionEnded(session)``.
        ``throttled`` tells the engine that the gateway's throttle refused the request, so it
        is rejected ``throttled`` (and still uses up its ``cl_ord_id``).

        With ``events`` set to False (journal replay) the state changes are the same, but the
        order path builds no reports, book updates or trades: the list returned then holds only
        what rarer paths (rejects, replaces, operator replies) built, and means nothing.

        The caller vouches for ``member``: the gateway passes only a logged-on member's id, and
        only an operator's session sends operator commands (the engine does not check roles).
        A member's command with an id the configuration does not list raises ``KeyError`` and
        changes nothing.
        """
        if type(command) is not NewOrder:
            # a subclass of NewOrder is one too: the journal replay's twin, decoded without the
            # field constraints (checked when the order was first taken), need not be rebuilt
            if not isinstance(command, NewOrder):
                return self._dispatch[type(command)](command, member, ts, session, throttled)
        # A NewOrder (most of the traffic) is handled right here, not in a handler method of its
        # own: measured, even a compiled call costs about 8% of the matching benchmark. Keep
        # the two tests above as they are: they narrow ``command`` to NewOrder, so the compiled
        # code reads its fields as ints and strs; one combined test (``and``) loses that and
        # costs 40%. Everything a valid DAY/GTC limit order needs is inline; anything unusual
        # (a reject, a market/IOC/FOK order) takes the general helpers, and a crossing order
        # calls _match.
        acct = self._accounts[member]
        cl = command.cl_ord_id
        taken = acct.taken
        live = acct.live
        if throttled:
            taken.add(cl)
            acct.carried.discard(cl)  # a live order's id from a previous day: now used today too
            return self._reject([], acct, ts, cl, "throttled", "over the session's message rate")
        if cl in taken:  # used today, or a live order's (live ids are always taken)
            acct.carried.discard(cl)  # a live order's id from a previous day: now used today too
            return self._reject([], acct, ts, cl, "duplicate_cl_ord_id", f"cl_ord_id {cl!r} is already used")
        taken.add(cl)
        if acct.suspended:
            return self._reject([], acct, ts, cl, "member_suspended", f"member {member} is suspended")
        try:
            ins = self._instruments[command.instrument]
        except KeyError:
            return self._reject([], acct, ts, cl, "unknown_instrument", f"no instrument {_shown(command.instrument)}")
        if ins.status != OPEN:
            if ins.status == CLOSED:
                return self._reject([], acct, ts, cl, "market_closed", f"{ins.symbol} is closed")
            return self._reject([], acct, ts, cl, "instrument_halted", f"{ins.symbol} is halted")
        qty = command.qty
        price = command.price
        tif = command.tif
        if tif is None:
            tif = "day" if price is not None else "ioc"
        # a quick test for anything off; _check_order then finds the first reject reason
        if (price is None or not ins.qty_floor <= qty <= ins.max_qty or not ins.price_floor <= price <= ins.upper
                or qty % ins.step or price % ins.tick):
            rejected: list = []
            if self._check_order(acct, ins, qty, price, tif, rejected, ts, cl, self._reject) is not True:
                return rejected
        side = command.side
        symbol = ins.symbol
        holding = acct.holdings[symbol]
        if side == BUY:
            limit = ins.holding_limit
            if limit is not None and holding.settled + holding.unsettled + holding.open_buy + qty > limit:
                return self._reject([], acct, ts, cl, "holding_limit", f"would exceed the holding limit of {limit} t")
            cash = acct.cash[ins.currency]
            lim = price if price is not None else ins.upper
            need = lim * qty
            need -= -need * ins.fee_bp // 10_000  # plus the fee reserve, rounded up
            if cash.total - cash.reserved < need:
                return self._reject([], acct, ts, cl, "insufficient_funds",
                                    f"needs {need} {ins.currency}, {cash.total - cash.reserved} available")
            cash.reserved += need
            holding.open_buy += qty
            book = ins.bids
            opp = ins.asks
            key = -lim
            opp_lim = lim  # opposite keys up to this cross
        else:
            if holding.settled - holding.reserved < qty:
                return self._reject([], acct, ts, cl, "insufficient_allowances",
                                    f"needs {qty} t, {holding.settled - holding.reserved} t available")
            holding.reserved += qty
            need = 0
            book = ins.asks
            opp = ins.bids
            key = price if price is not None else ins.lower
            opp_lim = -key
        order_id = self._next_order_id
        self._next_order_id = order_id + 1
        o = Order(order_id, member, cl, symbol, side, price, qty, qty, tif, command.stp, session, need)
        seq = acct.seq + 1
        acct.seq = seq
        emit = self.events
        ev: list = [OrderAccepted(seq, ts, member, cl, order_id, symbol, side, qty, price, tif)] if emit else []
        if tif in _IMMEDIATE or price is None:
            self._enter(o, ins, acct, ev, ts)
            return ev
        if opp.best <= opp_lim:
            # a crossing DAY/GTC limit order: what _enter does, without recomputing the sides
            reason = self._match(o, ins, opp, opp_lim, ev, ts)
            qty = o.leaves
            if not qty:
                return ev
            if reason is not None:
                self._release(o, ins, acct)
                o.leaves = 0
                self._cancelled(ev, o, qty, ts, reason)
                return ev
        # rest (what is left) at the back of its level
        level = book.levels.get(key)
        if level is None:
            level = book.new_level(key, price)
        level.orders.append(o)
        level_qty = level.qty + qty
        level.qty = level_qty
        count = level.count + 1
        level.count = count
        live[cl] = o
        if session:
            self._cod.setdefault(session, {})[order_id] = o
        md = ins.md_seq + 1
        ins.md_seq = md
        if emit:
            ev.append(BookUpdate(symbol, md, side, price, level_qty, count))
        return ev

    @property
    def members(self) -> list[str]:
        return list(self._accounts)

    @property
    def instruments(self) -> list[str]:
        return list(self._instruments)

    def last_seq(self, member: str) -> int:
        """The seq of the member's last report (0 if none yet)."""
        return self._accounts[member].seq

    def status(self, instrument: str) -> str:
        return self._instruments[instrument].status

    def md_seq(self, instrument: str) -> int:
        return self._instruments[instrument].md_seq

    def reference_price(self, instrument: str) -> int:
        return self._instruments[instrument].reference

    def book_snapshot(self, instrument: str, depth: int = 10) -> BookSnapshot:
        ins = self._instruments[instrument]
        return BookSnapshot(
            instrument, ins.md_seq, ins.bids.depth(depth), ins.asks.depth(depth), ins.last_price,
            ins.reference, ins.status,
        )

    def traded(self, instrument: str) -> tuple[int, int, int]:
        """(trades, tonnes, value in minor units) traded in this process's lifetime, replay included."""
        ins = self._instruments[instrument]
        return ins.trades, ins.traded_qty, ins.traded_value

    def best_prices(self, instrument: str) -> tuple[int | None, int | None]:
        ins = self._instruments[instrument]
        bid = -ins.bids.best if ins.bids.best != NO_PRICE else None
        ask = ins.asks.best if ins.asks.best != NO_PRICE else None
        return bid, ask

    def resting(self, instrument: str) -> tuple[int, int]:
        """(resting orders, resting quantity) of an instrument."""
        ins = self._instruments[instrument]
        orders = qty = 0
        for side in (ins.bids, ins.asks):
            for level in side.levels.values():
                orders += level.count
                qty += level.qty
        return orders, qty

    def balances(self, member: str) -> Balances:
        acct = self._accounts[member]
        cash = {
            c: CashBalance(v.total, v.reserved, v.total - v.reserved, v.withdrawable)
            for c, v in acct.cash.items()
        }
        allowances = {
            s: AllowanceBalance(h.settled, h.unsettled, h.reserved, h.settled - h.reserved)
            for s, h in acct.holdings.items()
        }
        return Balances(cash, allowances)

    def fee_balances(self) -> dict[str, int]:
        return {c: v.total for c, v in self._fees.items()}

    def live_orders(self, member: str) -> list[Order]:
        return sorted(self._accounts[member].live.values(), key=lambda o: o.order_id)

    def is_suspended(self, member: str) -> bool:
        return self._accounts[member].suspended

    # -----------------------------------------------------------------------------------------
    # Reports

    def _reject(self, ev: list, acct: Account, ts: int, cl: str, reason: RejectReason, text: str) -> list:
        acct.seq += 1
        ev.append(OrderRejected(acct.seq, ts, acct.member, cl, reason, text))
        return ev

    def _cancel_reject(self, ev, acct, ts, cl, orig, reason, text) -> list:
        acct.seq += 1
        ev.append(CancelRejected(acct.seq, ts, acct.member, cl, orig, reason, text))
        return ev

    def _cancelled(self, ev: list, o: Order, qty: int, ts: int, reason: CancelReason, cl: str | None = None) -> None:
        """Report the cancellation of ``qty`` open tonnes of an order."""
        acct = self._accounts[o.member]
        acct.seq += 1
        if self.events:
            ev.append(OrderCancelled(acct.seq, ts, o.member, cl or o.cl_ord_id, o.order_id, o.cl_ord_id, qty, 0, reason))

    # -----------------------------------------------------------------------------------------
    # Order entry

    def _check_order(self, acct: Account, ins: _Instrument, qty: int, price, tif, ev, ts, cl, reject):
        """Shared checks of NewOrder and ReplaceOrder after the id checks: True if they pass,
        else the events of the reject (``reject``'s result)."""
        if qty <= 0 or qty % ins.step:
            return reject(ev, acct, ts, cl, "invalid_qty", f"qty {qty} is not a positive multiple of the step {ins.step}")
        if qty < ins.min_qty or qty > ins.max_qty:
            limit = "no maximum" if ins.max_qty == MAX_AMOUNT else f"maximum {ins.max_qty}"
            return reject(ev, acct, ts, cl, "qty_out_of_range", f"qty {qty} is outside minimum {ins.min_qty}, {limit}")
        if price is None:
            if tif == "day" or tif == "gtc":
                return reject(ev, acct, ts, cl, "invalid_price", f"a market order cannot be {tif}")
        else:
            if price <= 0 or price % ins.tick:
                return reject(ev, acct, ts, cl, "invalid_price", f"price {price} is not a positive multiple of the tick {ins.tick}")
            if price < ins.lower or price > ins.upper:
                return reject(ev, acct, ts, cl, "price_out_of_band", f"price {price} is outside the band {ins.lower}-{ins.upper}")
        return True

    def _enter(self, o: Order, ins: _Instrument, acct: Account, ev: list, ts: int) -> None:
        """Match an accepted order, then rest or cancel what is left of it."""
        if o.side == BUY:
            opp = ins.asks
            lim = o.price if o.price is not None else ins.upper
        else:
            opp = ins.bids
            lim = -(o.price if o.price is not None else ins.lower)
        reason: CancelReason | None = None
        if opp.best <= lim:
            if o.tif == "fok" and not self._fok_fillable(o, opp, lim):
                reason = "fok"
            else:
                reason = self._match(o, ins, opp, lim, ev, ts)
        if o.leaves:
            if reason is None:
                if o.tif == "fok":  # a market fok too: its reason is fok, not ioc
                    reason = "fok"
                elif o.price is None or o.tif == "ioc":
                    reason = "ioc"
            if reason is not None:
                qty = o.leaves
                self._release(o, ins, acct)
                o.leaves = 0
                self._cancelled(ev, o, qty, ts, reason)
                return
            side = ins.bids if o.side == BUY else ins.asks
            level = side.rest(o)
            acct.live[o.cl_ord_id] = o
            if o.session:
                self._cod.setdefault(o.session, {})[o.order_id] = o
            ins.md_seq += 1
            if self.events:
                ev.append(BookUpdate(ins.symbol, ins.md_seq, o.side, level.price, level.qty, level.count))

    def _fok_fillable(self, o: Order, opp: SideBook, lim: int) -> bool:
        """Can the whole quantity trade now against other members, before any self-match?"""
        want = o.leaves
        member = o.member
        levels = opp.levels
        for key in opp.keys:
            if key > lim:
                return False
            for m in levels[key].orders:
                if m.leaves:
                    if m.member == member:
                        return False
                    want -= m.leaves
                    if want <= 0:
                        return True
        return False

    def _match(self, o: Order, ins: _Instrument, opp: SideBook, lim: int, ev: list, ts: int) -> CancelReason | None:
        """Trade ``o`` against the opposite side; returns a cancel reason for its rest, if any.

        Every fill is delivery versus payment at the resting price, with a fee per side. The
        maker's side is settled fill by fill; the taker's (one account) and the level's totals
        are summed and written once, which gives the same state with fewer attribute writes.
        """
        accounts = self._accounts
        symbol = ins.symbol
        fee_bp = ins.fee_bp
        currency = ins.currency
        taker_side = o.side
        taker_buys = taker_side == BUY
        maker_side: Side = SELL if taker_buys else BUY
        t_member = o.member
        t_cl = o.cl_ord_id
        t_id = o.order_id
        taker = accounts[t_member]
        levels = opp.levels
        append = ev.append
        emit = self.events
        start = left = o.leaves
        trade_id = self._next_trade_id
        md = ins.md_seq
        t_value = t_fee = 0  # the taker's totals over its fills
        price = last_price = None
        reason: CancelReason | None = None
        while left and opp.best <= lim:
            key = opp.best
            level = levels[key]
            orders = level.orders
            price = level.price
            traded = 0  # off this level
            count_before = level.count
            while orders:
                m = orders[0]
                m_left = m.leaves
                if not m_left:
                    orders.popleft()
                    level.dead -= 1
                    continue
                m_member = m.member
                if m_member == t_member:
                    stp = o.stp
                    if stp == "cancel_incoming":
                        reason = "self_trade"
                        break
                    # cancel_resting or cancel_both: the resting order goes
                    orders.popleft()
                    level.count -= 1
                    level.qty -= m_left
                    self._release(m, ins, taker)
                    m.leaves = 0
                    self._forget(m, taker)
                    self._cancelled(ev, m, m_left, ts, "self_trade")
                    if stp == "cancel_both":
                        reason = "self_trade"
                        break
                    continue
                qty = left if left < m_left else m_left
                value = price * qty
                fee = value * fee_bp // 10_000
                left -= qty
                m_left -= qty
                m.leaves = m_left
                traded += qty
                t_value += value
                t_fee += fee
                maker = accounts[m_member]
                m_hold = maker.holdings[symbol]
                m_cash = maker.cash[currency]
                if taker_buys:  # the maker sells: allowances out, cash in
                    m_hold.settled -= qty
                    m_hold.reserved -= qty
                    m_hold.sold += qty
                    m_hold.received += value
                    m_hold.fees += fee
                    value -= fee
                    m_cash.total += value
                    m_cash.proceeds += value
                else:  # the maker buys: pays, and its reservation shrinks to what its rest needs
                    still = price * m_left
                    still -= -still * fee_bp // 10_000
                    m_cash.reserved -= m.reserved - still
                    m.reserved = still
                    m_hold.unsettled += qty
                    m_hold.open_buy -= qty
                    m_hold.bought += qty
                    m_hold.paid += value
                    m_hold.fees += fee
                    m_cash.total -= value + fee
                seq = taker.seq + 1
                taker.seq = seq
                if emit:
                    append(Fill(seq, ts, t_member, t_cl, t_id, trade_id, symbol, taker_side, price, qty, left,
                                "taker", fee))
                seq = maker.seq + 1
                maker.seq = seq
                if emit:
                    append(Fill(seq, ts, m_member, m.cl_ord_id, m.order_id, trade_id, symbol, maker_side, price, qty,
                                m_left, "maker", fee))
                md += 1
                if emit:
                    append(Trade(symbol, md, trade_id, price, qty, taker_side, ts))
                trade_id += 1
                if not m_left:
                    orders.popleft()
                    level.count -= 1
                    del maker.live[m.cl_ord_id]
                    if maker.carried:
                        maker.retire(m.cl_ord_id)
                    if m.session:
                        self._cod[m.session].pop(m.order_id, None)
                if not left:
                    break
            if traded:
                level.qty -= traded
                last_price = price
                md += 1
                if emit:
                    append(BookUpdate(symbol, md, maker_side, price, level.qty, level.count))
            elif level.count != count_before:  # only self-match cancels here; none at all changes nothing
                md += 1
                if emit:
                    append(BookUpdate(symbol, md, maker_side, price, level.qty, level.count))
            if not level.count:
                opp.drop_level(key)
            if reason is not None:
                break
        o.leaves = left
        ins.trades += trade_id - self._next_trade_id
        self._next_trade_id = trade_id
        ins.md_seq = md
        t_qty = start - left
        if t_qty:
            ins.traded_qty += t_qty
            ins.traded_value += t_value
            t_cash = taker.cash[currency]
            t_hold = taker.holdings[symbol]
            if taker_buys:
                o_lim = o.price if o.price is not None else ins.upper
                still = o_lim * left
                still -= -still * fee_bp // 10_000
                t_cash.reserved -= o.reserved - still
                o.reserved = still
                t_cash.total -= t_value + t_fee
                t_hold.unsettled += t_qty
                t_hold.open_buy -= t_qty
                t_hold.bought += t_qty
                t_hold.paid += t_value
                t_hold.fees += t_fee
            else:
                t_hold.settled -= t_qty
                t_hold.reserved -= t_qty
                t_hold.sold += t_qty
                t_hold.received += t_value
                t_hold.fees += t_fee
                t_cash.total += t_value - t_fee
                t_cash.proceeds += t_value - t_fee
            self._fees[currency].total += 2 * t_fee
            ins.day_value += t_value
            ins.day_qty += t_qty
            ins.last_price = last_price
        return reason

    def _release(self, o: Order, ins: _Instrument, acct: Account) -> None:
        """Give back what an order still holds for its open quantity (before leaves is zeroed)."""
        if o.side == BUY:
            acct.cash[ins.currency].reserved -= o.reserved
            o.reserved = 0
            acct.holdings[ins.symbol].open_buy -= o.leaves
        else:
            acct.holdings[ins.symbol].reserved -= o.leaves

    def _forget(self, o: Order, acct: Account) -> None:
        """Drop a finished order from the member's live orders and its session's list."""
        acct.live.pop(o.cl_ord_id, None)
        acct.retire(o.cl_ord_id)
        if o.session:
            # SessionEnded / Restarted have already taken the session's list away
            orders = self._cod.get(o.session)
            if orders is not None:
                orders.pop(o.order_id, None)

    def _cancel_resting(self, o: Order, ev: list, ts: int, reason: CancelReason, cl: str | None = None) -> None:
        """Cancel a resting order: off the book, reservation released, reported."""
        ins = self._instruments[o.instrument]
        acct = self._accounts[o.member]
        side = ins.bids if o.side == BUY else ins.asks
        qty = o.leaves
        self._release(o, ins, acct)
        self._forget(o, acct)
        level = side.remove(o)
        self._cancelled(ev, o, qty, ts, reason, cl)
        ins.md_seq += 1
        if self.events:
            ev.append(BookUpdate(ins.symbol, ins.md_seq, o.side, level.price, level.qty, level.count))

    def _cancel_order(self, cmd: CancelOrder, member: str, ts: int, session: int, throttled: bool) -> list:
        # Hot path: _cancel_resting inlined (same effects, same events).
        acct = self._accounts[member]
        cl = cmd.cl_ord_id
        orig = cmd.orig_cl_ord_id
        taken = acct.taken
        if throttled:
            taken.add(cl)
            acct.carried.discard(cl)
            return self._cancel_reject([], acct, ts, cl, orig, "throttled", "over the session's message rate")
        if cl in taken:  # used today, or a live order's
            acct.carried.discard(cl)  # a live order's id from a previous day: now used today too
            return self._cancel_reject([], acct, ts, cl, orig, "duplicate_cl_ord_id", f"cl_ord_id {cl!r} is already used")
        taken.add(cl)
        o = acct.live.pop(orig, None)  # no longer live once cancelled
        if o is None:
            return self._cancel_reject([], acct, ts, cl, orig, "unknown_order", f"no live order {orig!r}")
        if acct.carried:
            acct.retire(orig)
        ins = self._instruments[o.instrument]
        qty = o.leaves
        side = o.side
        price = o.price
        assert price is not None, "market orders never rest"
        if side == BUY:
            acct.cash[ins.currency].reserved -= o.reserved
            o.reserved = 0
            acct.holdings[ins.symbol].open_buy -= qty
            book = ins.bids
            key = -price
        else:
            acct.holdings[ins.symbol].reserved -= qty
            book = ins.asks
            key = price
        if o.session:
            self._cod[o.session].pop(o.order_id, None)
        level = book.levels[key]
        level.qty -= qty
        count = level.count - 1
        level.count = count
        o.leaves = 0
        if count == 0:
            book.drop_level(key)
        else:
            level.dead += 1
            if level.dead > 16 and level.dead > count:
                level.compact()
        seq = acct.seq + 1
        acct.seq = seq
        md = ins.md_seq + 1
        ins.md_seq = md
        if not self.events:
            return []
        return [OrderCancelled(seq, ts, member, cl or orig, o.order_id, orig, qty, 0, "requested"),
                BookUpdate(ins.symbol, md, side, level.price, level.qty, count)]

    @staticmethod
    def _use_id(acct: Account, cl: str, throttled: bool) -> tuple[str, str] | None:
        """The protocol's id rule: a request uses its ``cl_ord_id`` up, accepted or rejected.

        Returns (reason, text) when the request is refused here (``throttled`` or
        ``duplicate_cl_ord_id``), else None. ``execute`` (NewOrder) and ``_cancel_order`` carry
        inlined copies of these lines, because they are the hot path.
        """
        taken = acct.taken
        if throttled:
            taken.add(cl)
            acct.carried.discard(cl)  # a live order's id from a previous day: now used today too
            return "throttled", "over the session's message rate"
        if cl in taken:  # used today, or a live order's
            acct.carried.discard(cl)  # a live order's id from a previous day: now used today too
            return "duplicate_cl_ord_id", f"cl_ord_id {cl!r} is already used"
        taken.add(cl)
        return None

    def _replace_order(self, cmd: ReplaceOrder, member: str, ts: int, session: int, throttled: bool) -> list:
        acct = self._accounts[member]
        ev: list = []
        cl = cmd.cl_ord_id
        orig = cmd.orig_cl_ord_id
        reject = self._cancel_rejecter(orig)
        refused = self._use_id(acct, cl, throttled)
        if refused is not None:
            return reject(ev, acct, ts, cl, *refused)
        if acct.suspended:
            return reject(ev, acct, ts, cl, "member_suspended", f"member {member} is suspended")
        o = acct.live.get(orig)
        if o is None:
            return reject(ev, acct, ts, cl, "unknown_order", f"no live order {orig!r}")
        ins = self._instruments[o.instrument]
        qty = cmd.qty
        price = cmd.price
        only_lower = price == o.price and qty < o.qty
        if ins.status != OPEN and not only_lower:
            if ins.status == CLOSED:
                return reject(ev, acct, ts, cl, "market_closed", f"{ins.symbol} is closed")
            return reject(ev, acct, ts, cl, "instrument_halted", f"{ins.symbol} is halted")
        if self._check_order(acct, ins, qty, price, o.tif, ev, ts, cl, reject) is not True:
            return ev
        filled = o.qty - o.leaves
        if qty <= filled:
            self._cancel_resting(o, ev, ts, "requested", cl)
            return ev
        leaves = qty - filled
        holding = acct.holdings[ins.symbol]
        if o.side == BUY:
            limit = ins.holding_limit
            if (limit is not None and leaves > o.leaves
                    and holding.settled + holding.unsettled + holding.open_buy - o.leaves + leaves > limit):
                return reject(ev, acct, ts, cl, "holding_limit", f"would exceed the holding limit of {limit} t")
            need = price * leaves + _fee_reserve(price, leaves, ins.fee_bp)
            cash = acct.cash[ins.currency]
            if need - o.reserved > cash.total - cash.reserved:
                return reject(ev, acct, ts, cl, "insufficient_funds",
                              f"needs {need - o.reserved} more {ins.currency}, {cash.total - cash.reserved} available")
        elif leaves - o.leaves > holding.settled - holding.reserved:
            return reject(ev, acct, ts, cl, "insufficient_allowances",
                          f"needs {leaves - o.leaves} t more, {holding.settled - holding.reserved} t available")
        # accepted
        if o.side == BUY:
            acct.cash[ins.currency].reserved += need - o.reserved
            holding.open_buy += leaves - o.leaves
        else:
            holding.reserved += leaves - o.leaves
            need = 0
        old_cl = o.cl_ord_id
        del acct.live[old_cl]
        acct.retire(old_cl)
        side = ins.bids if o.side == BUY else ins.asks
        if price == o.price and qty <= o.qty:
            # keeps its place in the queue
            level = side.levels[side.sign * price]
            level.qty += leaves - o.leaves
            changed = leaves != o.leaves
            o.leaves = leaves
            o.qty = qty
            o.reserved = need
            o.cl_ord_id = cl
            acct.live[cl] = o
            acct.seq += 1
            ev.append(OrderReplaced(acct.seq, ts, member, cl, o.order_id, old_cl, qty, price, leaves))
            if changed:  # a replace to the same qty and price only renames the order
                ins.md_seq += 1
                ev.append(BookUpdate(ins.symbol, ins.md_seq, o.side, level.price, level.qty, level.count))
            return ev
        # loses priority: the old entry dies in place, a new one goes to the back (or trades)
        if o.session:
            # SessionEnded / Restarted have already taken the session's list away
            orders = self._cod.get(o.session)
            if orders is not None:
                orders.pop(o.order_id, None)
        level = side.remove(o)
        ins.md_seq += 1
        ev_update = BookUpdate(ins.symbol, ins.md_seq, o.side, level.price, level.qty, level.count)
        n = Order(o.order_id, member, cl, ins.symbol, o.side, price, qty, leaves, o.tif, o.stp, o.session, need)
        acct.seq += 1
        ev.append(OrderReplaced(acct.seq, ts, member, cl, o.order_id, old_cl, qty, price, leaves))
        ev.append(ev_update)
        self._enter(n, ins, acct, ev, ts)
        return ev

    def _cancel_rejecter(self, orig: str | None):
        def reject(ev, acct, ts, cl, reason, text):
            return self._cancel_reject(ev, acct, ts, cl, orig, reason, text)
        return reject

    def _mass_cancel(self, cmd: MassCancel, member: str, ts: int, session: int, throttled: bool) -> list:
        acct = self._accounts[member]
        ev: list = []
        cl = cmd.cl_ord_id
        refused = self._use_id(acct, cl, throttled)
        if refused is not None:
            return self._cancel_reject(ev, acct, ts, cl, None, *refused)
        if cmd.instrument is not None and cmd.instrument not in self._instruments:
            return self._cancel_reject(ev, acct, ts, cl, None, "unknown_instrument", f"no instrument {_shown(cmd.instrument)}")
        targets = [
            o for o in self.live_orders(member)
            if (cmd.instrument is None or o.instrument == cmd.instrument) and (cmd.side is None or o.side == cmd.side)
        ]
        for o in targets:
            self._cancel_resting(o, ev, ts, "mass_cancel", cl)
        acct.seq += 1
        ev.append(MassCancelDone(acct.seq, ts, member, cl, len(targets)))
        return ev

    def _query_balances(self, cmd, member: str, ts: int, session: int, throttled: bool) -> list:
        return [self.balances(member)]

    def _session_ended(self, cmd: SessionEnded, member: str, ts: int, session: int, throttled: bool) -> list:
        ev: list = []
        orders = self._cod.get(cmd.session)
        if orders:
            # cancelling drops each order from its session's list, so walk a copy
            for o in sorted(orders.values(), key=lambda o: o.order_id):
                if o.leaves:
                    self._cancel_resting(o, ev, ts, "disconnect")
        self._cod.pop(cmd.session, None)
        return ev

    def _restarted(self, cmd: Restarted, member: str, ts: int, session: int, throttled: bool) -> list:
        # replayed under another configuration: what that start ran with must still be there
        lost = [s for s in cmd.instruments or () if s not in self._instruments]
        if cmd.members:
            ids = {m.id for m in self.config.members}
            lost += [m for m in cmd.members if m not in ids]
        if lost:
            raise LeftOutError(f"the configuration leaves out {', '.join(lost)}, which the exchange ran with "
                               "after its newest snapshot")
        ev: list = []
        orders = [o for group in self._cod.values() for o in group.values()]
        for o in sorted(orders, key=lambda o: o.order_id):
            if o.leaves:
                self._cancel_resting(o, ev, ts, "disconnect")
        self._cod.clear()
        return ev

    # -----------------------------------------------------------------------------------------
    # Operator commands

    def _status_event(self, ins: _Instrument, ev: list) -> None:
        ins.md_seq += 1
        ev.append(InstrumentStatus(ins.symbol, ins.md_seq, ins.status, ins.reference))

    def _halt(self, cmd: Halt, member, ts, session, throttled) -> list:
        ins = self._instruments.get(cmd.instrument)
        if ins is None:
            return [AdminRejected("Halt", "unknown_instrument", f"no instrument {_shown(cmd.instrument)}")]
        if ins.status != OPEN:
            return [AdminRejected("Halt", "invalid_state", f"{ins.symbol} is {ins.status}, not open")]
        ev: list = []
        ins.status = HALTED
        self._status_event(ins, ev)
        if cmd.cancel_orders:
            for o in _by_order_id(ins):
                self._cancel_resting(o, ev, ts, "halt")
        ev.append(AdminAck("Halt", instrument=cmd.instrument, cancel_orders=cmd.cancel_orders))
        return ev

    def _resume(self, cmd: Resume, member, ts, session, throttled) -> list:
        ins = self._instruments.get(cmd.instrument)
        if ins is None:
            return [AdminRejected("Resume", "unknown_instrument", f"no instrument {_shown(cmd.instrument)}")]
        if ins.status != HALTED:
            return [AdminRejected("Resume", "invalid_state", f"{ins.symbol} is {ins.status}, not halted")]
        ev: list = []
        ins.status = OPEN
        self._status_event(ins, ev)
        ev.append(AdminAck("Resume", instrument=cmd.instrument))
        return ev

    def _open_market(self, cmd, member, ts, session, throttled) -> list:
        closed = [ins for ins in self._instruments.values() if ins.status == CLOSED]
        if not closed:
            return [AdminRejected("OpenMarket", "invalid_state", "no instrument is closed")]
        ev: list = []
        for ins in closed:
            ins.status = OPEN
            self._status_event(ins, ev)
        ev.append(AdminAck("OpenMarket"))
        return ev

    def _close_market(self, cmd, member, ts, session, throttled) -> list:
        live = [ins for ins in self._instruments.values() if ins.status != CLOSED]
        if not live:
            return [AdminRejected("CloseMarket", "invalid_state", "every instrument is already closed")]
        ev: list = []
        for ins in live:
            ins.status = CLOSED
            self._status_event(ins, ev)
        ev.append(AdminAck("CloseMarket"))
        return ev

    def _suspend_member(self, cmd: SuspendMember, member, ts, session, throttled) -> list:
        acct = self._accounts.get(cmd.member)
        if acct is None:
            return [AdminRejected("SuspendMember", "unknown_member", f"no member {_shown(cmd.member)}")]
        if acct.suspended:
            return [AdminRejected("SuspendMember", "invalid_state", f"member {cmd.member} is already suspended")]
        ev: list = []
        acct.suspended = True
        for o in self.live_orders(cmd.member):
            self._cancel_resting(o, ev, ts, "suspended")
        ev.append(AdminAck("SuspendMember", member=cmd.member))
        return ev

    def _reinstate_member(self, cmd: ReinstateMember, member, ts, session, throttled) -> list:
        acct = self._accounts.get(cmd.member)
        if acct is None:
            return [AdminRejected("ReinstateMember", "unknown_member", f"no member {_shown(cmd.member)}")]
        if not acct.suspended:
            return [AdminRejected("ReinstateMember", "invalid_state", f"member {cmd.member} is not suspended")]
        acct.suspended = False
        return [AdminAck("ReinstateMember", member=cmd.member)]

    def _transfer(self, cmd, request: str, sign: int) -> list:
        def ack(duplicate=msgspec.UNSET):
            return [AdminAck(request, member=cmd.member, ref=cmd.ref, asset=cmd.asset, amount=cmd.amount,
                             duplicate=duplicate)]
        if cmd.ref in self._refs:
            return ack(True)
        acct = self._accounts.get(cmd.member)
        if acct is None:
            return [AdminRejected(request, "unknown_member", f"no member {_shown(cmd.member)}")]
        amount = cmd.amount
        if cmd.asset in acct.cash:
            cash = acct.cash[cmd.asset]
            if sign > 0:
                # Buys spend withdrawable cash first, then today's proceeds, so unspent proceeds
                # never exceed the cash held. Trades move total and proceeds together; clamping
                # before a deposit raises total alone keeps the deposit withdrawable.
                cash.proceeds = min(cash.proceeds, cash.total)
            if sign < 0 and amount > cash.withdrawable:
                return [AdminRejected(request, "insufficient_funds",
                                      f"{cash.withdrawable} {cmd.asset} withdrawable, {amount} asked")]
            if sign > 0 and self._external_cash[cmd.asset] + amount > MAX_AMOUNT:
                return [_too_much(request, self._external_cash[cmd.asset], cmd.asset)]
            cash.total += sign * amount
            self._external_cash[cmd.asset] += sign * amount
        elif cmd.asset in acct.holdings:
            holding = acct.holdings[cmd.asset]
            if sign < 0 and amount > holding.settled - holding.reserved:
                return [AdminRejected(request, "insufficient_allowances",
                                      f"{holding.settled - holding.reserved} t available, {amount} t asked")]
            if sign > 0 and self._external_qty[cmd.asset] + amount > MAX_AMOUNT:
                return [_too_much(request, self._external_qty[cmd.asset], cmd.asset)]
            holding.settled += sign * amount
            self._external_qty[cmd.asset] += sign * amount
        else:
            return [AdminRejected(request, "unknown_instrument", f"no currency or instrument {_shown(cmd.asset)}")]
        self._refs.add(cmd.ref)
        return ack()

    def _deposit(self, cmd: Deposit, member, ts, session, throttled) -> list:
        return self._transfer(cmd, "Deposit", 1)

    def _withdraw(self, cmd: Withdraw, member, ts, session, throttled) -> list:
        return self._transfer(cmd, "Withdraw", -1)

    def _end_of_day(self, cmd, member, ts, session, throttled) -> list:
        open_now = [ins.symbol for ins in self._instruments.values() if ins.status != CLOSED]
        if open_now:
            return [AdminRejected("EndOfDay", "invalid_state", f"not closed: {', '.join(open_now)}")]
        ev: list = []
        day = self.trading_day
        # DAY orders expire
        for ins in self._instruments.values():
            for o in _by_order_id(ins):
                if o.tif == "day":
                    self._cancel_resting(o, ev, ts, "expired")
        # closing prices become the next reference prices
        closing: dict[str, int] = {}
        for ins in self._instruments.values():
            if ins.day_qty:
                d = ins.day_qty * ins.tick
                close = (2 * ins.day_value + d) // (2 * d) * ins.tick
            else:
                close = ins.reference
            closing[ins.symbol] = close
            ins.set_reference(close)
            # GTC orders outside the new band are cancelled
            for o in _by_order_id(ins):
                if o.price is None or o.price < ins.lower or o.price > ins.upper:
                    self._cancel_resting(o, ev, ts, "expired")
            ins.last_price = None
            ins.day_value = ins.day_qty = 0
            self._status_event(ins, ev)
        # settlement report, then settle
        lines: list[SettlementLine] = []
        fee_totals: dict[str, int] = {}
        for acct in self._accounts.values():
            for symbol, h in acct.holdings.items():
                ins = self._instruments[symbol]
                if h.bought or h.sold or h.fees:
                    lines.append(SettlementLine(
                        acct.member, symbol, ins.currency, h.bought, h.sold, h.paid, h.received, h.fees,
                        h.bought - h.sold, h.received - h.paid - h.fees,
                    ))
                    fee_totals[symbol] = fee_totals.get(symbol, 0) + h.fees
                h.settled += h.unsettled
                h.unsettled = h.bought = h.sold = h.paid = h.received = h.fees = 0
            for cash in acct.cash.values():
                cash.proceeds = 0
            acct.new_day()
        for symbol, total in fee_totals.items():
            if total:
                ins = self._instruments[symbol]
                lines.append(SettlementLine(self.fee_account, symbol, ins.currency, 0, 0, 0, 0, 0, 0, total))
        self.trading_day = _next_business_day(day, self._weekend, self._holidays)
        ev.append(DayEnded(day, self.trading_day, closing, lines))
        ev.append(AdminAck("EndOfDay", trading_day=self.trading_day))
        return ev

    # -----------------------------------------------------------------------------------------
    # Snapshots, state hash and invariants

    def _state(self, canonical: bool) -> list:
        """The whole state as plain lists, orders in book order. ``canonical`` sorts the sets
        too, for the state hash; a snapshot leaves them in set order, because sorting a busy
        member's used ids (a million of them) holds the event loop for 0.5 s."""
        instruments = []
        orders = []
        for ins in self._instruments.values():
            instruments.append([ins.symbol, ins.status, ins.reference, ins.md_seq, ins.last_price,
                                ins.day_value, ins.day_qty])
            for side in (ins.bids, ins.asks):
                for o in side.orders():
                    orders.append(o.fields())
        accounts = []
        for acct in self._accounts.values():
            used = acct.taken - acct.carried if acct.carried else acct.taken
            accounts.append([
                acct.member, acct.suspended, acct.seq,
                [[c, *v.fields()] for c, v in acct.cash.items()],
                [[s, *h.fields()] for s, h in acct.holdings.items()],
                sorted(used) if canonical else used,
            ])
        return [
            SNAPSHOT_VERSION, self.trading_day, self._next_order_id, self._next_trade_id,
            sorted(self._refs) if canonical else self._refs,
            instruments, accounts, orders, [[c, v.total] for c, v in self._fees.items()],
            sorted(self._external_cash.items()), sorted(self._external_qty.items()),
        ]

    def snapshot(self) -> bytes:
        """The engine's whole state, encoded; ``Engine.restore`` turns it back into an engine.
        Equal states may encode differently (set order): compare them by ``state_hash``."""
        return msgspec.msgpack.encode(self._state(False))

    def state_hash(self) -> str:
        """SHA-256 of the canonical state: equal hashes mean equal books, accounts and counters."""
        return hashlib.sha256(msgspec.msgpack.encode(self._state(True))).hexdigest()

    @classmethod
    def restore(cls, config: ExchangeConfig, data: bytes) -> "Engine":
        state = msgspec.msgpack.decode(data)
        if state[0] != SNAPSHOT_VERSION:
            raise ValueError(f"snapshot version {state[0]} is not {SNAPSHOT_VERSION}")
        (_, day, next_order_id, next_trade_id, refs, instruments, accounts, orders, fees,
         ext_cash, ext_qty) = state
        engine = cls(config, day)
        engine._next_order_id = next_order_id
        engine._next_trade_id = next_trade_id
        engine._refs = set(refs)
        # What the configuration added since starts empty; what it left out must have no history.
        lost: list[str] = []
        for symbol, status, reference, md_seq, last_price, day_value, day_qty in instruments:
            ins = engine._instruments.get(symbol)
            if ins is None:
                if md_seq:
                    lost.append(symbol)
                continue
            ins.status = status
            ins.set_reference(reference)
            ins.md_seq = md_seq
            ins.last_price = last_price
            ins.day_value = day_value
            ins.day_qty = day_qty
        for member, suspended, seq, cash, holdings, used in accounts:
            acct = engine._accounts.get(member)
            if acct is None:
                if seq or any(any(figures) for _, *figures in cash) or any(any(figures) for _, *figures in holdings):
                    lost.append(member)
                continue
            acct.suspended = suspended
            acct.seq = seq
            for c, total, reserved, proceeds in cash:
                if c in acct.cash:
                    acct.cash[c] = Cash(total, reserved, proceeds)
                elif total or reserved or proceeds:
                    lost.append(f"{c} (held by {member})")
            for s, *figures in holdings:
                if s in acct.holdings:
                    acct.holdings[s] = Holding(*figures)
                elif any(figures):
                    lost.append(f"{s} (held by {member})")
            acct.taken = set(used)
        if lost:
            raise LeftOutError(f"the configuration leaves out {', '.join(dict.fromkeys(lost))}, which the "
                               "snapshot has a history for")
        for fields in orders:
            o = Order(*fields)
            ins = engine._instruments[o.instrument]
            (ins.bids if o.side == BUY else ins.asks).rest(o)
            acct = engine._accounts[o.member]
            acct.live[o.cl_ord_id] = o
            if o.cl_ord_id not in acct.taken:  # live since an earlier day, not used today
                acct.taken.add(o.cl_ord_id)
                acct.carried.add(o.cl_ord_id)
            if o.session:
                engine._cod.setdefault(o.session, {})[o.order_id] = o
        for c, total in fees:
            if c in engine._fees:
                engine._fees[c].total = total
        for c, total in ext_cash:
            if c in engine._external_cash:
                engine._external_cash[c] = total
        for s, total in ext_qty:
            if s in engine._external_qty:
                engine._external_qty[s] = total
        return engine

    def check(self) -> None:
        """Walk every structure and raise ``InvariantError`` if any invariant is broken."""
        def fail(msg: str):
            raise InvariantError(msg)

        reserved_cash: dict[tuple[str, str], int] = {}
        reserved_qty: dict[tuple[str, str], int] = {}
        open_buy: dict[tuple[str, str], int] = {}
        live_ids: set[int] = set()
        for ins in self._instruments.values():
            if ins.bids.best != NO_PRICE and ins.asks.best != NO_PRICE and -ins.bids.best >= ins.asks.best:
                fail(f"{ins.symbol}: crossed book {-ins.bids.best} >= {ins.asks.best}")
            for side, sign, name in ((ins.bids, -1, BUY), (ins.asks, 1, SELL)):
                if len(side.heap) != len(side.in_heap) or set(side.heap) != side.in_heap:
                    fail(f"{ins.symbol} {name}: price-key heap and its key set disagree")
                if not side.in_heap.issuperset(side.levels):
                    fail(f"{ins.symbol} {name}: a level's key is missing from the heap")
                expected_best = min(side.levels) if side.levels else NO_PRICE
                if side.heap and side.heap[0] != expected_best:
                    fail(f"{ins.symbol} {name}: heap top {side.heap[0]} is not the best key {expected_best}")
                if side.best != expected_best:
                    fail(f"{ins.symbol} {name}: cached best {side.best} != {expected_best}")
                for key, level in side.levels.items():
                    live = level.live()
                    if not live:
                        fail(f"{ins.symbol} {name} {level.price}: empty level left in the book")
                    if level.price * sign != key:
                        fail(f"{ins.symbol} {name}: level {level.price} under key {key}")
                    if level.qty != sum(o.leaves for o in live) or level.count != len(live):
                        fail(f"{ins.symbol} {name} {level.price}: level totals differ from its orders")
                    if level.dead != len(level.orders) - len(live):
                        fail(f"{ins.symbol} {name} {level.price}: dead count {level.dead} is wrong")
                    for o in live:
                        if o.side != name or o.price != level.price or o.instrument != ins.symbol:
                            fail(f"order {o.order_id} is in the wrong level")
                        if o.leaves < 0 or o.leaves > o.qty:
                            fail(f"order {o.order_id}: leaves {o.leaves} outside 0..{o.qty}")
                        if self._accounts[o.member].live.get(o.cl_ord_id) is not o:
                            fail(f"order {o.order_id} is not live under {o.cl_ord_id!r}")
                        if o.order_id in live_ids:
                            fail(f"order {o.order_id} rests twice")
                        live_ids.add(o.order_id)
                        k = (o.member, ins.currency if name == BUY else ins.symbol)
                        if o.price is None:
                            fail(f"order {o.order_id}: a market order rests")
                        elif name == BUY:
                            need = o.price * o.leaves + _fee_reserve(o.price, o.leaves, ins.fee_bp)
                            if o.reserved != need:
                                fail(f"order {o.order_id}: reserves {o.reserved}, needs {need}")
                            reserved_cash[k] = reserved_cash.get(k, 0) + o.reserved
                            ko = (o.member, ins.symbol)
                            open_buy[ko] = open_buy.get(ko, 0) + o.leaves
                        else:
                            reserved_qty[k] = reserved_qty.get(k, 0) + o.leaves
                        if o.session and self._cod.get(o.session, {}).get(o.order_id) is not o:
                            fail(f"order {o.order_id} missing from its session's cancel-on-disconnect list")
        total_cash = {c: v.total for c, v in self._fees.items()}
        total_qty = {s: 0 for s in self._instruments}
        for acct in self._accounts.values():
            if not acct.taken.issuperset(acct.live) or not acct.carried <= acct.live.keys():
                fail(f"{acct.member}: a live order's id is not taken, or a carried id is not live")
            for cl, o in acct.live.items():
                if o.cl_ord_id != cl or not o.leaves or o.order_id not in live_ids:
                    fail(f"{acct.member}: live order {cl!r} is not resting")
            for c, v in acct.cash.items():
                if v.total < 0 or v.reserved < 0 or v.proceeds < 0 or v.reserved > v.total:
                    fail(f"{acct.member} {c}: negative or over-reserved cash {v}")
                if v.reserved != reserved_cash.get((acct.member, c), 0):
                    fail(f"{acct.member} {c}: reserved {v.reserved} != open buys {reserved_cash.get((acct.member, c), 0)}")
                total_cash[c] += v.total
            for s, h in acct.holdings.items():
                if min(h.settled, h.unsettled, h.reserved, h.open_buy) < 0 or h.reserved > h.settled:
                    fail(f"{acct.member} {s}: negative or over-reserved holding {h}")
                if h.reserved != reserved_qty.get((acct.member, s), 0):
                    fail(f"{acct.member} {s}: reserved {h.reserved} != open sells")
                if h.open_buy != open_buy.get((acct.member, s), 0):
                    fail(f"{acct.member} {s}: open_buy {h.open_buy} != open buys")
                total_qty[s] += h.settled + h.unsettled
        for c, total in total_cash.items():
            if total != self._external_cash[c]:
                fail(f"{c}: {total} in accounts, {self._external_cash[c]} deposited net")
        for s, total in total_qty.items():
            if total != self._external_qty[s]:
                fail(f"{s}: {total} t in accounts, {self._external_qty[s]} t deposited net")
        for session, group in self._cod.items():
            for oid, o in group.items():
                if not o.leaves or oid not in live_ids:
                    fail(f"session {session}: order {oid} is not resting")
