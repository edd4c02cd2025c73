"""Member accounts: cash per currency, allowance holdings per instrument, order-id bookkeeping.

Plain mutable records; the engine owns every rule about them (reservations, settlement).
``Cash`` and ``Holding`` are ``__slots__`` classes rather than msgspec Structs: every fill
updates several of their fields, and CPython 3.11 specialises attribute stores only on types
with the default ``__setattr__`` (a Struct's costs about half as much again per store). They
are never encoded; snapshots flatten them into lists.
"""

from __future__ import annotations

from ._book import Order

__all__ = ["Cash", "Holding", "Account"]


class _Record:
    """Fields in ``__slots__`` order, positional or keyword, all defaulting to 0."""

    __slots__ = ()

    def __init__(self, *values: int, **named: int) -> None:
        fields = self.__slots__
        if len(values) > len(fields):
            raise TypeError(f"{type(self).__name__} takes at most {len(fields)} values")
        for name, value in zip(fields, values):
            setattr(self, name, value)
        for name in fields[len(values):]:
            setattr(self, name, named.pop(name, 0))
        if named:
            raise TypeError(f"{type(self).__name__} has no field {next(iter(named))!r}")

    def __repr__(self) -> str:
        body = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({body})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    __hash__ = None  # mutable


class Cash(_Record):
    __slots__ = (
        "total",
        "reserved",  # held for open buy orders (price x qty plus fee reserve)
        "proceeds",  # today's net sale proceeds: spendable, not withdrawable until end of day
    )

    @property
    def available(self) -> int:
        return self.total - self.reserved

    @property
    def withdrawable(self) -> int:
        return max(0, self.total - self.reserved - self.proceeds)


class Holding(_Record):
    __slots__ = (
        "settled",
        "unsettled",  # bought today: not sellable until end of day
        "reserved",  # held for open sell orders
        "open_buy",  # open quantity of resting and incoming buy orders (holding limit)
        # today's settlement figures
        "bought", "sold", "paid", "received", "fees",
    )

    @property
    def available(self) -> int:
        return self.settled - self.reserved


class Account:
    __slots__ = ("member", "suspended", "seq", "cash", "holdings", "live", "taken", "carried")

    def __init__(self, member: str, currencies: list[str], instruments: list[str]) -> None:
        self.member = member
        self.suspended = False
        self.seq = 0  # last report seq
        self.cash = {c: Cash() for c in currencies}
        self.holdings = {s: Holding() for s in instruments}
        self.live: dict[str, Order] = {}  # current cl_ord_id -> live order
        # Every cl_ord_id a new request may not use: the ids used up this trading day plus the
        # ids of live orders. One set, so the duplicate check is one probe (the set grows to
        # tens of thousands of ids a day; the probe is a cache miss, so it is the costly one).
        self.taken: set[str] = set()
        # Ids of live orders from earlier days that were not used today: taken, but not used.
        # Usually empty (only GTC orders outlive a day), so hot paths test it before probing it.
        self.carried: set[str] = set()

    @property
    def used_ids(self) -> set[str]:
        """The cl_ord_ids used up this trading day (state hash, snapshots)."""
        return self.taken - self.carried

    def retire(self, cl: str) -> None:
        """Order ``cl`` is no longer live: if it was carried over (not used today), free its id."""
        if cl in self.carried:
            self.carried.discard(cl)
            self.taken.discard(cl)

    def new_day(self) -> None:
        """End of day: only the live orders' ids stay taken, as carried-over ids."""
        self.taken = set(self.live)
        self.carried = set(self.live)
