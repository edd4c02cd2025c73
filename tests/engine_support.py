"""Shared set-up of the engine tests: a small two-instrument market and a driver for it.

``CEA`` (CNY) has tick 5 and a reference price whose band edges need rounding; ``EUA`` (EUR)
has a quantity step, a fee and a holding limit. The calendar starts on a Friday and has a
holiday on the following Monday, so one EndOfDay already crosses a weekend and a holiday.
"""

from __future__ import annotations

from engine import (
    CancelOrder, Deposit, Engine, MassCancel, NewOrder, OpenMarket, ReplaceOrder, parse_config,
    hash_token,
)
from engine._messages import BookUpdate, InstrumentStatus, Trade

__all__ = ["CONFIG_TOML", "MEMBERS", "config", "Market", "T", "OPS", "reports", "md", "kinds"]

T = 1_764_000_000_000_000_000  # a fixed ts (ns) used by every command unless a test says otherwise
OPS = "ops"

CONFIG_TOML = f"""
[market]
first_trading_day = "2026-11-20"   # a Friday
holidays = ["2026-11-23"]          # the Monday after it
fee_account = "FEES"

[[instruments]]
symbol = "CEA"
currency = "CNY"
reference_price = 9_255            # band 10%: lower 8_330, upper 10_180 (both need rounding)
tick = 5
qty_step = 1
min_qty = 2
max_qty = 1_000
band_bp = 1_000

[[instruments]]
symbol = "EUA"
currency = "EUR"
reference_price = 7_000            # band 5%: 6_650 .. 7_350
tick = 1
qty_step = 100
min_qty = 100
max_qty = 10_000
band_bp = 500
fee_bp = 25
holding_limit = 5_000

[[members]]
id = "ops"
token_sha256 = "{hash_token('ops')}"
role = "operator"

[[members]]
id = "M1"
token_sha256 = "{hash_token('M1')}"

[[members]]
id = "M2"
token_sha256 = "{hash_token('M2')}"

[[members]]
id = "M3"
token_sha256 = "{hash_token('M3')}"
"""

MEMBERS = ("M1", "M2", "M3")


def config(text: str = CONFIG_TOML):
    return parse_config(text, "test.toml")


def reports(events: list) -> list:
    """The member reports among the events (they all carry a seq)."""
    return [e for e in events if hasattr(e, "seq")]


def md(events: list) -> list:
    return [e for e in events if isinstance(e, (BookUpdate, Trade, InstrumentStatus))]


def kinds(events: list) -> list[str]:
    return [type(e).__name__ for e in events]


class Market:
    """An engine with funded members and an open market, and short-hands to drive it.

    Every member gets ``cash`` in both currencies and ``allowances`` tonnes of both instruments
    (settled), unless told otherwise. Every call passes ts ``T`` unless ``ts`` is given.
    """

    def __init__(self, *, cash: int = 100_000_000, allowances: int = 3_000, open: bool = True,
                 toml: str = CONFIG_TOML) -> None:
        self.e = Engine(config(toml))
        n = 0
        for m in MEMBERS:
            for asset, amount in (("CNY", cash), ("EUR", cash), ("CEA", allowances), ("EUA", allowances)):
                if amount:
                    n += 1
                    self.run(OPS, Deposit(f"init-{n}", m, asset, amount))
        if open:
            self.run(OPS, OpenMarket())

    def run(self, member: str, command, ts: int = T, **kw) -> list:
        return self.e.execute(command, member, ts, **kw)

    def new(self, member, cl, side, qty, price, instrument="CEA", tif=None, stp="cancel_incoming", **kw):
        return self.run(member, NewOrder(cl, instrument, side, qty, price, tif, stp), **kw)

    def buy(self, member, cl, qty, price, instrument="CEA", **kw):
        return self.new(member, cl, "buy", qty, price, instrument, **kw)

    def sell(self, member, cl, qty, price, instrument="CEA", **kw):
        return self.new(member, cl, "sell", qty, price, instrument, **kw)

    def cancel(self, member, cl, orig, **kw):
        return self.run(member, CancelOrder(cl, orig), **kw)

    def replace(self, member, cl, orig, qty, price, **kw):
        return self.run(member, ReplaceOrder(cl, orig, qty, price), **kw)

    def mass_cancel(self, member, cl, instrument=None, side=None, **kw):
        return self.run(member, MassCancel(cl, instrument, side), **kw)

    # views
    def seq(self, member: str) -> int:
        return self.e.last_seq(member)

    def mdseq(self, instrument: str = "CEA") -> int:
        return self.e.md_seq(instrument)

    def cash(self, member: str, currency: str = "CNY"):
        return self.e.balances(member).cash[currency]

    def holding(self, member: str, instrument: str = "CEA"):
        return self.e.balances(member).allowances[instrument]

    def book(self, instrument: str = "CEA", depth: int = 10):
        snap = self.e.book_snapshot(instrument, depth)
        return snap.bids, snap.asks
