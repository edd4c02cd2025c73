"""The demo's simulated market, with no IO: a drifting fair price, member firms that quote and
take around it, a local view of the books, and the terminal rendering.

Everything here is a pure function of its inputs and a seeded ``random.Random``, so the
simulation can be run against an in-process ``Engine`` in tests and against the real server over
TCP by ``kaboni demo`` (``gateway/_demo.py``) with the same code.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

from engine._config import ExchangeConfig, price_band
from engine._messages import (
    BookSnapshot, BookUpdate, CancelOrder, CancelRejected, Fill, InstrumentStatus, NewOrder,
    OrderAccepted, OrderCancelled, OrderRejected, OrderReplaced, ReplaceOrder, Trade,
)

__all__ = [
    "ExchangeFigures", "parse_metrics", "FairPrice", "Quote", "Firm", "LocalBook", "MarketView", "DemoStats", "make_firms",
    "demo_instruments", "render_screen", "render_line", "render_summary", "sparkline",
    "format_price", "format_int", "format_seconds",
]


def demo_instruments(config: ExchangeConfig) -> list[str]:
    """The CEA vintages the demo trades (every CNY instrument of the configuration)."""
    return [i.symbol for i in config.instruments if i.symbol.startswith("CEA")]


# ---------------------------------------------------------------------------------------------
# Price process


class FairPrice:
    """What allowances are "really" worth right now, per vintage, in minor units.

    A common market factor (log scale, mean-reverting towards a slowly wandering trend) moves
    every vintage together, as news about the cap or compliance demand would; each vintage adds a
    small idiosyncratic wobble. The factor stays well inside the price band so the firms' orders
    are never ``price_out_of_band``.
    """

    def __init__(self, config: ExchangeConfig, symbols: list[str], rng: random.Random,
                 volatility: float = 0.0025, max_move: float = 0.06) -> None:
        self.rng = rng
        self.symbols = symbols
        self.reference = {s: config.instrument(s).reference_price for s in symbols}
        self.tick = {s: config.instrument(s).tick for s in symbols}
        self.band = {s: price_band(self.reference[s], config.instrument(s).band_bp, self.tick[s])
                     for s in symbols}
        self.volatility = volatility        # per sqrt(second), log scale
        self.max_move = max_move            # never further than this from the reference
        self.level = 0.0                    # common factor
        self.trend = rng.uniform(-0.4, 0.4) * max_move
        self.wobble = {s: 0.0 for s in symbols}
        self.time = 0.0

    def rebase(self, references: dict[str, int], band_bp: dict[str, int]) -> None:
        """Centre on today's reference prices (yesterday's close, after an end of day)."""
        for s, ref in references.items():
            self.reference[s] = ref
            self.band[s] = price_band(ref, band_bp[s], self.tick[s])

    def step(self, dt: float) -> None:
        rng, root = self.rng, math.sqrt(dt)
        self.time += dt
        # the trend itself wanders, so the price drifts one way for a while and then turns
        self.trend += rng.gauss(0.0, 0.25 * self.max_move) * root / math.sqrt(30.0)
        self.trend = max(-self.max_move, min(self.max_move, self.trend))
        self.level += 0.03 * (self.trend - self.level) * dt + rng.gauss(0.0, self.volatility) * root
        self.level = max(-self.max_move, min(self.max_move, self.level))
        for s in self.symbols:
            w = self.wobble[s]
            self.wobble[s] = w - 0.5 * w * dt + rng.gauss(0.0, self.volatility / 3) * root

    def fair(self, symbol: str) -> int:
        """The fair price on the tick, clamped well inside the band."""
        ref, tick = self.reference[symbol], self.tick[symbol]
        move = max(-self.max_move, min(self.max_move, self.level + self.wobble[symbol]))
        return self.clamp(symbol, round(ref * math.exp(move) / tick) * tick)

    def clamp(self, symbol: str, price: int) -> int:
        lower, upper = self.band[symbol]
        return max(lower, min(upper, price))


# ---------------------------------------------------------------------------------------------
# The firms' picture of the market (from market data)


class LocalBook:
    """Price levels of one instrument rebuilt from ``BookSnapshot`` and ``BookUpdate``."""

    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        self.bids: dict[int, int] = {}
        self.asks: dict[int, int] = {}
        self.md_seq = 0
        self.last_price: int | None = None
        self.reference_price: int | None = None
        self.status = "closed"
        self.gaps = 0

    def apply(self, msg) -> None:
        if isinstance(msg, BookSnapshot):
            self.bids = {p: q for p, q, _ in msg.bids}
            self.asks = {p: q for p, q, _ in msg.asks}
            self.md_seq = msg.md_seq
            self.last_price = msg.last_price
            self.reference_price = msg.reference_price
            self.status = msg.status
            return
        if msg.md_seq != self.md_seq + 1:
            self.gaps += 1
        self.md_seq = msg.md_seq
        if isinstance(msg, BookUpdate):
            levels = self.bids if msg.side == "buy" else self.asks
            if msg.qty:
                levels[msg.price] = msg.qty
            else:
                levels.pop(msg.price, None)
        elif isinstance(msg, Trade):
            self.last_price = msg.price
        elif isinstance(msg, InstrumentStatus):
            self.status = msg.status
            self.reference_price = msg.reference_price

    @property
    def best_bid(self) -> int | None:
        return max(self.bids) if self.bids else None

    @property
    def best_ask(self) -> int | None:
        return min(self.asks) if self.asks else None


@dataclass
class MarketView:
    """What a firm may look at when it decides: fair prices (its "research") and the books."""

    fair: FairPrice
    books: dict[str, LocalBook]

    def mid(self, symbol: str) -> int:
        book = self.books[symbol]
        bid, ask = book.best_bid, book.best_ask
        if bid is not None and ask is not None:
            return (bid + ask) // 2
        if book.last_price is not None:
            return book.last_price
        return self.fair.fair(symbol)


# ---------------------------------------------------------------------------------------------
# Firms


@dataclass
class Quote:
    """One of the firm's own live orders, as its reports describe it."""

    instrument: str
    side: str
    price: int
    leaves: int


class Firm:
    """A member firm's trading desk: decides the next command and learns from its reports.

    ``maker`` firms keep a two-sided quote around the fair price in a few vintages and move it
    (``ReplaceOrder``) as the price drifts; ``taker`` firms (emitters covering their compliance
    position, traders with a view) cross the spread with IOC orders leaning towards the fair
    price, and sometimes rest a day order. Side choices lean back towards balance as a firm's
    net position grows, so nobody runs out of cash or allowances in a demo.
    """

    def __init__(self, member: str, style: str, symbols: list[str], rng: random.Random,
                 run_id: str) -> None:
        self.member = member
        self.style = style
        self.symbols = symbols
        self.rng = rng
        self.prefix = f"{run_id}{member}-"
        self.counter = 0
        self.live: dict[str, Quote] = {}            # cl_ord_id -> live order
        self.pending: set[str] = set()              # sent, no answer yet
        self.position: dict[str, int] = {s: 0 for s in symbols}   # tonnes bought - sold
        self.rejects: dict[str, int] = {}
        # share of the demo's message rate: makers update quotes more often than takers trade
        self.weight = 3.0 if style == "maker" else 1.0

    def next_id(self) -> str:
        self.counter += 1
        return f"{self.prefix}{self.counter}"

    def decide(self, market: MarketView) -> list:
        """The firm's next command(s) given the market; usually exactly one."""
        symbol = self.rng.choice(self.symbols)
        book = market.books[symbol]
        if book.status != "open":
            return []
        if self.style == "maker":
            return self._make(symbol, market)
        return self._take(symbol, market)

    def _make(self, symbol: str, market: MarketView) -> list:
        rng, fair, tick = self.rng, market.fair.fair(symbol), market.fair.tick[symbol]
        side = rng.choice(("buy", "sell"))
        lean = self._lean(symbol)
        if (side == "buy" and lean < -0.6) or (side == "sell" and lean > 0.6):
            side = "sell" if side == "buy" else "buy"
        half = rng.randint(1, 4) * tick
        price = fair - half if side == "buy" else fair + half
        price = market.fair.clamp(symbol, price)
        mine = [(cid, q) for cid, q in self.live.items()
                if q.instrument == symbol and q.side == side and cid not in self.pending]
        qty = rng.randint(2, 30) * 10
        if mine and (len(mine) >= 3 or rng.random() < 0.6):
            cid, quote = rng.choice(mine)
            if quote.price == price:
                return []
            if rng.random() < 0.15:
                self.pending.add(cid)
                return [CancelOrder(cl_ord_id=self.next_id(), orig_cl_ord_id=cid)]
            self.pending.add(cid)
            return [ReplaceOrder(cl_ord_id=self.next_id(), orig_cl_ord_id=cid,
                                 qty=quote.leaves if rng.random() < 0.7 else qty, price=price)]
        return [NewOrder(cl_ord_id=self.next_id(), instrument=symbol, side=side, qty=qty,
                         price=price, tif="gtc")]

    def _take(self, symbol: str, market: MarketView) -> list:
        rng, fair, tick = self.rng, market.fair.fair(symbol), market.fair.tick[symbol]
        mid = market.mid(symbol)
        # buy when the market is below what the firm thinks allowances are worth, and the
        # other way round; lean back when the firm's position is large
        p_buy = 0.5 + 25.0 * (fair - mid) / fair - 0.3 * self._lean(symbol)
        p_buy = max(0.1, min(0.9, p_buy))
        side = "buy" if rng.random() < p_buy else "sell"
        qty = rng.randint(1, 20) * 5
        resting = [cid for cid, q in self.live.items() if cid not in self.pending]
        if resting and (len(resting) > 4 or rng.random() < 0.1):
            cid = rng.choice(resting)
            self.pending.add(cid)
            return [CancelOrder(cl_ord_id=self.next_id(), orig_cl_ord_id=cid)]
        book = market.books[symbol]
        if rng.random() < 0.25:
            # a passive day order a few ticks inside the firm's fair value
            offset = rng.randint(1, 8) * tick
            price = fair - offset if side == "buy" else fair + offset
            return [NewOrder(cl_ord_id=self.next_id(), instrument=symbol, side=side, qty=qty,
                             price=market.fair.clamp(symbol, price), tif="day")]
        # cross the spread up to a few ticks beyond the fair price
        slack = rng.randint(0, 3) * tick
        if side == "buy":
            limit = fair + slack if book.best_ask is None else min(book.best_ask + slack, fair + 6 * tick)
        else:
            limit = fair - slack if book.best_bid is None else max(book.best_bid - slack, fair - 6 * tick)
        return [NewOrder(cl_ord_id=self.next_id(), instrument=symbol, side=side, qty=qty,
                         price=market.fair.clamp(symbol, limit), tif="ioc")]

    def _lean(self, symbol: str) -> float:
        """The firm's net position in the vintage, scaled to about -1..1."""
        return max(-1.0, min(1.0, self.position[symbol] / 20_000))

    def on_report(self, report) -> None:
        """Keep the firm's book of its own orders in step with its reports."""
        if isinstance(report, OrderAccepted):
            if report.price is not None and report.tif in ("day", "gtc"):
                self.live[report.cl_ord_id] = Quote(report.instrument, report.side, report.price, report.qty)
        elif isinstance(report, Fill):
            signed = report.qty if report.side == "buy" else -report.qty
            self.position[report.instrument] = self.position.get(report.instrument, 0) + signed
            quote = self.live.get(report.cl_ord_id)
            if quote is not None:
                quote.leaves = report.leaves_qty
                if not report.leaves_qty:
                    del self.live[report.cl_ord_id]
        elif isinstance(report, OrderCancelled):
            self.live.pop(report.orig_cl_ord_id, None)
            self.live.pop(report.cl_ord_id, None)
            self.pending.discard(report.orig_cl_ord_id)
        elif isinstance(report, OrderReplaced):
            quote = self.live.pop(report.orig_cl_ord_id, None)
            self.pending.discard(report.orig_cl_ord_id)
            if quote is not None and report.leaves_qty:
                quote.price, quote.leaves = report.price, report.leaves_qty
                self.live[report.cl_ord_id] = quote
        elif isinstance(report, CancelRejected):
            self.rejects[report.reason] = self.rejects.get(report.reason, 0) + 1
            if report.orig_cl_ord_id is not None:
                self.pending.discard(report.orig_cl_ord_id)
                if report.reason == "unknown_order":
                    self.live.pop(report.orig_cl_ord_id, None)
        elif isinstance(report, OrderRejected):
            self.rejects[report.reason] = self.rejects.get(report.reason, 0) + 1


def make_firms(members: list[str], symbols: list[str], seed: int, run_id: str) -> list[Firm]:
    """One firm per member: a quarter are market makers, the rest take liquidity."""
    firms = []
    makers = max(1, len(members) // 4)
    for n, member in enumerate(members):
        rng = random.Random(f"{seed}:{member}")
        style = "maker" if n < makers else "taker"
        if style == "maker":
            # each maker covers four vintages, so every vintage has more than one maker
            start = n * 2 % len(symbols)
            chosen = [symbols[(start + k) % len(symbols)] for k in range(min(4, len(symbols)))]
        else:
            chosen = rng.sample(symbols, k=min(len(symbols), rng.randint(2, 4)))
        firms.append(Firm(member, style, chosen, rng, run_id))
    return firms


# ---------------------------------------------------------------------------------------------
# Statistics and the terminal view


@dataclass
class InstrumentStats:
    open: int | None = None
    high: int | None = None
    low: int | None = None
    last: int | None = None
    trades: int = 0
    volume: int = 0
    value: int = 0
    history: deque = field(default_factory=lambda: deque(maxlen=48))


class DemoStats:
    """Counts for the live view and the summary: orders and latency from the firms' clients,
    trades and prices from the public market data."""

    def __init__(self, symbols: list[str], currency: str = "CNY") -> None:
        self.symbols = symbols
        self.currency = currency
        self.instruments = {s: InstrumentStats() for s in symbols}
        self.sent = 0
        self.sent_by_type: dict[str, int] = {}
        self.rejects: dict[str, int] = {}
        self.latencies: list[float] = []          # seconds, client-side, request to first report
        self.recent: deque = deque()             # (time, latency) in the last few seconds
        self.rate_window: deque = deque()        # (time, sent) samples for orders/s
        self.sessions = 0
        self.errors: list[str] = []

    def on_sent(self, command) -> None:
        self.sent += 1
        name = type(command).__name__
        self.sent_by_type[name] = self.sent_by_type.get(name, 0) + 1

    def on_latency(self, now: float, seconds: float) -> None:
        self.latencies.append(seconds)
        self.recent.append((now, seconds))

    def on_reject(self, reason: str) -> None:
        self.rejects[reason] = self.rejects.get(reason, 0) + 1

    def on_trade(self, trade: Trade) -> None:
        st = self.instruments.get(trade.instrument)
        if st is None:
            return
        if st.open is None:
            st.open = trade.price
        st.high = trade.price if st.high is None else max(st.high, trade.price)
        st.low = trade.price if st.low is None else min(st.low, trade.price)
        st.last = trade.price
        st.trades += 1
        st.volume += trade.qty
        st.value += trade.price * trade.qty

    def sample(self, now: float, window: float = 3.0, record_history: bool = True) -> None:
        """Called for every redraw: the rate window; with ``record_history`` also a point of
        each vintage's price history for the sparklines."""
        if record_history:
            for st in self.instruments.values():
                if st.last is not None:
                    st.history.append(st.last)
        self.rate_window.append((now, self.sent))
        while self.rate_window and now - self.rate_window[0][0] > window:
            self.rate_window.popleft()
        while self.recent and now - self.recent[0][0] > window:
            self.recent.popleft()

    @property
    def orders_per_s(self) -> float:
        if len(self.rate_window) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self.rate_window[0], self.rate_window[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    @property
    def trades(self) -> int:
        return sum(st.trades for st in self.instruments.values())

    @property
    def volume(self) -> int:
        return sum(st.volume for st in self.instruments.values())

    @property
    def value(self) -> int:
        return sum(st.value for st in self.instruments.values())

    def recent_p99(self) -> float | None:
        return _quantile(sorted(v for _, v in self.recent), 0.99)

    def quantile(self, q: float) -> float | None:
        return _quantile(sorted(self.latencies), q)


def _quantile(values: list[float], q: float) -> float | None:
    """Nearest-rank quantile of sorted values."""
    if not values:
        return None
    rank = max(1, math.ceil(q * len(values)))
    return values[rank - 1]


@dataclass
class ExchangeFigures:
    """What the exchange itself reports on its metrics endpoint (the operator's view)."""

    orders: int = 0
    accepted: int = 0
    rejected: int = 0
    trades: int = 0
    order_to_report_p99: float | None = None    # upper bound of the bucket holding p99
    fsync_p99: float | None = None
    fsyncs: int = 0
    records: int = 0                            # journal records made durable in those fsyncs
    bytes_written: int = 0

    def describe(self) -> tuple[str, str]:
        """(orders line, journal line)."""
        per = f"{self.records / self.fsyncs:.1f}" if self.fsyncs else "-"
        return (f"{self.orders:,} orders received ({self.rejected:,} rejected), {self.trades:,} trades, "
                f"order-to-report p99 <= {format_seconds(self.order_to_report_p99)}",
                f"{self.records:,} records durable in {self.fsyncs:,} fsyncs ({per} per fsync), "
                f"fsync p99 <= {format_seconds(self.fsync_p99)}, {self.bytes_written / 1e6:,.1f} MB written")


def _bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Upper bound of the first bucket whose cumulative count reaches ``q`` of the total."""
    if not buckets or not buckets[-1][1]:
        return None
    target = q * buckets[-1][1]
    for bound, count in sorted(buckets):
        if count >= target:
            return bound
    return None


def parse_metrics(text: str) -> ExchangeFigures:
    """Read the figures the demo shows from a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    fig = ExchangeFigures()
    hist: dict[str, list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "kaboni_orders_received_total":
                fig.orders += int(value)
                if labels.get("outcome") == "accepted":
                    fig.accepted += int(value)
                elif labels.get("outcome") == "rejected":
                    fig.rejected += int(value)
            elif name == "kaboni_trades_total":
                fig.trades += int(value)
            elif name == "kaboni_journal_bytes_written_total":
                fig.bytes_written = int(value)
            elif name == "kaboni_journal_fsync_seconds_count":
                fig.fsyncs = int(value)
            elif name == "kaboni_journal_batch_records_sum":
                fig.records = int(value)
            elif name.endswith("_bucket") and name in ("kaboni_order_to_report_latency_seconds_bucket",
                                                       "kaboni_journal_fsync_seconds_bucket"):
                hist.setdefault(name, []).append((float(labels["le"]), value))
    fig.order_to_report_p99 = _bucket_quantile(hist.get("kaboni_order_to_report_latency_seconds_bucket", []), 0.99)
    fig.fsync_p99 = _bucket_quantile(hist.get("kaboni_journal_fsync_seconds_bucket", []), 0.99)
    return fig


_BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values, width: int = 24) -> str:
    values = list(values)[-width:]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    if hi == lo:
        return _BLOCKS[3] * len(values)
    return "".join(_BLOCKS[min(7, int((v - lo) * 8 / (hi - lo)))] for v in values)


def format_price(price: int | None, tick_digits: int = 2) -> str:
    if price is None:
        return "-"
    return f"{price / 10 ** tick_digits:,.{tick_digits}f}"


def format_int(n: int) -> str:
    return f"{n:,}"


def format_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 0.001:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


_GREEN, _RED, _DIM, _BOLD, _RESET, _CYAN = "\x1b[32m", "\x1b[31m", "\x1b[2m", "\x1b[1m", "\x1b[0m", "\x1b[36m"


def _c(text: str, code: str, color: bool) -> str:
    return f"{code}{text}{_RESET}" if color else text


def render_screen(stats: DemoStats, books: dict[str, LocalBook], reference: dict[str, int],
                  elapsed: float, total: float, trading_day: str, metrics_url: str,
                  color: bool = True, width: int = 100, exchange: ExchangeFigures | None = None) -> list[str]:
    """The live view, one string per line (no trailing newlines, no cursor movement)."""
    done = min(1.0, elapsed / total) if total else 1.0
    bar_w = 40
    filled = int(done * bar_w)
    bar = "█" * filled + "░" * (bar_w - filled)
    lines = [
        _c(" Kaboni demo exchange", _BOLD, color)
        + f"   trading day {trading_day}   {stats.sessions} member sessions over TCP   journal fsync on",
        f" [{_c(bar, _CYAN, color)}] {elapsed:5.1f} s / {total:.0f} s",
        "",
        f" orders/s {stats.orders_per_s:>8,.0f}   orders {format_int(stats.sent):>9}   trades {format_int(stats.trades):>8}"
        f"   volume {format_int(stats.volume):>10} t   value {format_price(stats.value)} {stats.currency}",
        f" order → report latency p99 {format_seconds(stats.recent_p99()):>9} (last 3 s)"
        f"   p50 {format_seconds(stats.quantile(0.5))}   p99 {format_seconds(stats.quantile(0.99))} (whole run)"
        f"   rejects {sum(stats.rejects.values())}",
        "",
        _c(f" {'vintage':<9} {'bid':>9} {'ask':>9} {'last':>9} {'chg':>7} {'trades':>8} {'volume t':>10}  price",
           _DIM, color),
    ]
    for sym in stats.symbols:
        st, book = stats.instruments[sym], books.get(sym)
        bid = book.best_bid if book else None
        ask = book.best_ask if book else None
        ref = reference.get(sym)
        chg = ""
        if st.last is not None and ref:
            pct = (st.last - ref) * 100 / ref
            chg = _c(f"{pct:+6.2f}%", _GREEN if pct >= 0 else _RED, color)
            chg = chg if color else f"{pct:+6.2f}%"
        else:
            chg = f"{'':>7}"
        status = "" if book is None or book.status == "open" else f"  [{book.status}]"
        lines.append(
            f" {sym:<9} {format_price(bid):>9} {format_price(ask):>9} {format_price(st.last):>9} {chg:>7}"
            f" {format_int(st.trades):>8} {format_int(st.volume):>10}  {sparkline(st.history)}{status}"
        )
    orders, journal = exchange.describe() if exchange else ("(first scrape pending)", "")
    lines += ["", _c(f" exchange {orders}", _DIM, color), _c(f" journal  {journal}", _DIM, color),
              _c(f" metrics  {metrics_url}   (Ctrl-C stops early)", _DIM, color)]
    return [line[: width + 40] for line in lines]  # ANSI codes do not take room


def render_line(stats: DemoStats, books: dict[str, LocalBook], elapsed: float, total: float) -> str:
    """One progress line for logs and pipes."""
    tops = []
    for sym in stats.symbols:
        book = books.get(sym)
        bid = book.best_bid if book else None
        ask = book.best_ask if book else None
        tops.append(f"{sym} {format_price(bid)}/{format_price(ask)}")
    return (f"[{elapsed:5.1f}s/{total:.0f}s] orders/s {stats.orders_per_s:,.0f} orders {stats.sent:,} "
            f"trades {stats.trades:,} volume {stats.volume:,} t p99 {format_seconds(stats.recent_p99())} | "
            + "  ".join(tops))


def render_summary(stats: DemoStats, reference: dict[str, int], elapsed: float, metrics_url: str,
                   data_dir: str, extra: list[str] = (), exchange: ExchangeFigures | None = None) -> list[str]:
    """What happened, in numbers, and where to look next."""
    rate = stats.sent / elapsed if elapsed > 0 else 0.0
    lines = [
        "",
        f"Kaboni demo: {elapsed:.1f} s, {stats.sessions} member firms, {stats.sent:,} order messages"
        f" ({rate:,.0f}/s), {stats.trades:,} trades, {stats.volume:,} t,"
        f" {format_price(stats.value)} {stats.currency} traded.",
        f"Order-to-report latency seen by the firms (journal fsync included): "
        f"p50 {format_seconds(stats.quantile(0.5))}, p99 {format_seconds(stats.quantile(0.99))}, "
        f"p99.9 {format_seconds(stats.quantile(0.999))}, max {format_seconds(stats.quantile(1.0))}.",
    ]
    if exchange is not None:
        orders, journal = exchange.describe()
        lines += [f"The exchange's own metrics: {orders}.", f"Its journal: {journal}."]
    by_type = ", ".join(f"{n:,} {t}" for t, n in sorted(stats.sent_by_type.items()))
    if by_type:
        lines.append(f"Messages: {by_type}.")
    if stats.rejects:
        lines.append("Rejected: " + ", ".join(f"{n:,} {r}" for r, n in sorted(stats.rejects.items())) + "."
                     + (" (unknown_order: a cancel or replace that crossed a fill of the same order on"
                        " the wire, as happens in any fast market.)" if "unknown_order" in stats.rejects else ""))
    else:
        lines.append("Rejected: none.")
    lines += ["", f"{'vintage':<9} {'ref':>8} {'open':>8} {'high':>8} {'low':>8} {'last':>8} {'VWAP':>8} {'trades':>8} {'volume t':>10}"]
    for sym in stats.symbols:
        st = stats.instruments[sym]
        vwap = (2 * st.value + st.volume) // (2 * st.volume) if st.volume else None  # half up, as end of day
        lines.append(
            f"{sym:<9} {format_price(reference.get(sym)):>8} {format_price(st.open):>8} {format_price(st.high):>8}"
            f" {format_price(st.low):>8} {format_price(st.last):>8} {format_price(vwap):>8}"
            f" {st.trades:>8,} {st.volume:>10,}"
        )
    lines += ["", *extra,
              f"Journal and snapshots: {data_dir}",
              f"Metrics (while the exchange runs): {metrics_url}",
              "Watch it in Prometheus: prometheus --config.file=deploy/prometheus/prometheus.yml"
              " (alerts in deploy/prometheus/alerts.yml), dashboard: deploy/grafana/kaboni.json."
              + ("" if ":9101/" in metrics_url else
                 f" That file scrapes port 9101: point its target at {metrics_url} first."),
              "Operations guide: docs/operations.md."]
    return lines
