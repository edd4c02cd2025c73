"""Member accounts: cash per currency, allowance holdings per instrument, order-id bookkeeping.

Plain mutable records; the engine owns every rule about them (reservations, settlement).
"""

from __future__ import annotations

import msgspec

from ._book import Order

__all__ = ["Cash", "Holding", "Account"]


class Cash(msgspec.Struct, gc=False):
    total: int = 0
    reserved: int = 0  # held for open buy orders (price x qty plus fee reserve)
    proceeds: int = 0  # today's net sale proceeds: spendable, not withdrawable until end of day

    @property
    def available(self) -> int:
        return self.total - self.reserved

    @property
    def withdrawable(self) -> int:
        return max(0, self.total - self.reserved - self.proceeds)


class Holding(msgspec.Struct, gc=False):
    settled: int = 0
    unsettled: int = 0  # bought today: not sellable until end of day
    reserved: int = 0  # held for open sell orders
    open_buy: int = 0  # open quantity of resting and incoming buy orders (holding limit)
    # today's settlement figures
    bought: int = 0
    sold: int = 0
    paid: int = 0
    received: int = 0
    fees: int = 0

    @property
    def available(self) -> int:
        return self.settled - self.reserved


class Account:
    __slots__ = ("member", "suspended", "seq", "cash", "holdings", "live", "used_ids")

    def __init__(self, member: str, currencies: list[str], instruments: list[str]) -> None:
        self.member = member
        self.suspended = False
        self.seq = 0  # last report seq
        self.cash = {c: Cash() for c in currencies}
        self.holdings = {s: Holding() for s in instruments}
        self.live: dict[str, Order] = {}  # current cl_ord_id -> live order
        self.used_ids: set[str] = set()  # cl_ord_ids used up this trading day
