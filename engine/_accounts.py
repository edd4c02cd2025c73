"""Member accounts: cash per currency, allowance holdings per instrument, order-id bookkeeping.

Plain mutable records; the engine owns every rule about them (reservations, settlement).
``Cash`` and ``Holding`` are plain classes rather than msgspec Structs: every fill updates
several of their fields, and in the compiled engine they are native classes whose fields are
C struct members (interpreted, ``__slots__`` keeps CPython's specialised attribute stores).
They are never encoded; snapshots flatten them into lists.
"""

from __future__ import annotations

from ._book import Order

__all__ = ["Cash", "Holding", "Account"]


class Cash:
    __slots__ = ("total", "reserved", "proceeds")

    def __init__(self, total: int = 0, reserved: int = 0, proceeds: int = 0) -> None:
        self.total = total
        self.reserved = reserved  # held for open buy orders (price x qty plus fee reserve)
        self.proceeds = proceeds  # today's net sale proceeds: spendable, not withdrawable until end of day

    @property
    def available(self) -> int:
        return self.total - self.reserved

    @property
    def withdrawable(self) -> int:
        return max(0, self.total - self.reserved - self.proceeds)

    def fields(self) -> list[int]:
        return [self.total, self.reserved, self.proceeds]

    def __repr__(self) -> str:
        return f"Cash(total={self.total}, reserved={self.reserved}, proceeds={self.proceeds})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cash) and self.fields() == other.fields()

    __hash__ = None  # type: ignore[assignment]  # mutable


class Holding:
    __slots__ = ("settled", "unsettled", "reserved", "open_buy", "bought", "sold", "paid", "received", "fees")

    def __init__(self, settled: int = 0, unsettled: int = 0, reserved: int = 0, open_buy: int = 0,
                 bought: int = 0, sold: int = 0, paid: int = 0, received: int = 0, fees: int = 0) -> None:
        self.settled = settled
        self.unsettled = unsettled  # bought today: not sellable until end of day
        self.reserved = reserved  # held for open sell orders
        self.open_buy = open_buy  # open quantity of resting and incoming buy orders (holding limit)
        # today's settlement figures
        self.bought = bought
        self.sold = sold
        self.paid = paid
        self.received = received
        self.fees = fees

    @property
    def available(self) -> int:
        return self.settled - self.reserved

    def fields(self) -> list[int]:
        return [self.settled, self.unsettled, self.reserved, self.open_buy, self.bought, self.sold, self.paid,
                self.received, self.fees]

    def __repr__(self) -> str:
        names = ("settled", "unsettled", "reserved", "open_buy", "bought", "sold", "paid", "received", "fees")
        return "Holding(" + ", ".join(f"{n}={v}" for n, v in zip(names, self.fields())) + ")"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Holding) and self.fields() == other.fields()

    __hash__ = None  # type: ignore[assignment]  # mutable


class Account:
    __slots__ = ("member", "suspended", "seq", "cash", "holdings", "live", "taken", "carried")

    def __init__(self, member: str, currencies: list[str], instruments: list[str]) -> None:
        self.member = member
        self.suspended = False
        self.seq = 0  # last report seq
        self.cash: dict[str, Cash] = {c: Cash() for c in currencies}
        self.holdings: dict[str, Holding] = {s: Holding() for s in instruments}
        self.live: dict[str, Order] = {}  # current cl_ord_id -> live order
        # Every cl_ord_id a new request may not use: the ids used up this trading day plus the
        # ids of live orders. One set, so the duplicate check is one probe (the set grows to
        # tens of thousands of ids a day; the probe is a cache miss, so it is the costly one).
        self.taken: set[str] = set()
        # Ids of live orders from earlier days that were not used today: taken, but not used.
        # Usually empty (only GTC orders outlive a day), so hot paths test it before probing it.
        self.carried: set[str] = set()

    def retire(self, cl: str) -> None:
        """Order ``cl`` is no longer live: if it was carried over (not used today), free its id."""
        if cl in self.carried:
            self.carried.discard(cl)
            self.taken.discard(cl)

    def new_day(self) -> None:
        """End of day: only the live orders' ids stay taken, as carried-over ids."""
        self.taken = set(self.live)
        self.carried = set(self.live)
