"""Price-time priority order book for one instrument.

Each side keeps a dict of key -> ``Level`` and a binary heap (``heapq``) of the keys. Bid keys are
negated prices, so on both sides the best level is the smallest key and "crosses" is
``key <= limit_key``; the best key is cached so matching never searches for it. The heap is
lazy: an emptied level's key stays in it until it reaches the top, where it is popped (a key
is never in the heap twice), so adding and dropping a level costs a C heap operation, not a
sorted-list insertion. Ordered views (depth, snapshots) sort the few live keys on demand.

A level is a FIFO ``deque`` of orders. Cancelling marks the order dead (``leaves == 0``) and
adjusts the level's totals in O(1); dead orders are dropped when they reach the front, or all
at once when they outnumber the live ones, so a level never grows without bound.
"""

from __future__ import annotations

from collections import deque
from heapq import heappop, heappush, nsmallest
from operator import attrgetter

from ._messages import Side, Stp, Tif

__all__ = ["Order", "Level", "SideBook", "NO_PRICE"]

NO_PRICE = 1 << 62  # best key of an empty side: no limit key is ever above it
_leaves = attrgetter("leaves")


class Order:
    """A resting or incoming order. Mutable: the book and the engine update it in place.

    A plain class rather than a msgspec Struct: it is never encoded (snapshots flatten it),
    and as a native class of the compiled engine its fields are C struct members.
    """

    __slots__ = ("order_id", "member", "cl_ord_id", "instrument", "side", "price", "qty", "leaves", "tif",
                 "stp", "session", "reserved")

    def __init__(self, order_id: int, member: str, cl_ord_id: str, instrument: str, side: Side,
                 price: int | None, qty: int, leaves: int, tif: Tif, stp: Stp, session: int, reserved: int) -> None:
        self.order_id = order_id
        self.member = member
        self.cl_ord_id = cl_ord_id
        self.instrument = instrument
        self.side = side
        self.price = price  # None for market orders, which never rest
        self.qty = qty  # total ordered quantity, filled part included
        self.leaves = leaves  # open quantity; 0 once filled or cancelled
        self.tif = tif
        self.stp = stp
        self.session = session  # cancel-on-disconnect session, 0 for none
        self.reserved = reserved  # buy orders: cash still reserved for the open quantity and its fees

    def fields(self) -> list:
        """The fields in constructor order (snapshots)."""
        return [self.order_id, self.member, self.cl_ord_id, self.instrument, self.side, self.price, self.qty,
                self.leaves, self.tif, self.stp, self.session, self.reserved]

    def __repr__(self) -> str:
        return f"Order{tuple(self.fields())!r}"


class Level:
    __slots__ = ("price", "qty", "count", "dead", "orders")

    def __init__(self, price: int) -> None:
        self.price = price
        self.qty = 0  # open quantity of the live orders
        self.count = 0  # number of live orders
        self.dead = 0  # cancelled orders still in the deque
        self.orders: deque[Order] = deque()

    def compact(self) -> None:
        self.orders = deque(filter(_leaves, self.orders))  # the live ones, in order
        self.dead = 0

    def live(self) -> list[Order]:
        return [o for o in self.orders if o.leaves]


class SideBook:
    __slots__ = ("sign", "heap", "in_heap", "levels", "best", "spare")

    def __init__(self, sign: int) -> None:
        self.sign = sign  # +1 for asks, -1 for bids: key = sign * price
        self.heap: list[int] = []  # every live key, plus emptied keys not yet popped
        self.in_heap: set[int] = set()  # the keys in ``heap``
        self.levels: dict[int, Level] = {}
        self.best = NO_PRICE  # smallest live key; always heap[0] when the side is not empty
        self.spare: list[Level] = []  # emptied levels kept for reuse (fewer allocations)

    @property
    def keys(self) -> list[int]:
        """Live keys, best first."""
        return sorted(self.levels)

    def new_level(self, key: int, price: int) -> Level:
        if self.spare:
            level = self.spare.pop()
            level.price = price
        else:
            level = Level(price)
        self.levels[key] = level
        if key not in self.in_heap:
            self.in_heap.add(key)
            heappush(self.heap, key)
        if key < self.best:
            self.best = key
        return level

    def rest(self, order: Order) -> Level:
        """Append an order at the back of its price level."""
        price = order.price
        assert price is not None, "market orders never rest"
        key = self.sign * price
        level = self.levels.get(key)
        if level is None:
            level = self.new_level(key, price)
        level.orders.append(order)
        level.qty += order.leaves
        level.count += 1
        return level

    def drop_level(self, key: int) -> None:
        """Remove an emptied level (no live orders left); it stays readable until reused."""
        levels = self.levels
        level = levels.pop(key)
        if len(self.spare) < 64:
            if level.orders:  # dead orders (a cancelled last order is not counted in dead)
                level.orders.clear()
                level.dead = 0
            self.spare.append(level)
        if key == self.best:
            heap = self.heap
            in_heap = self.in_heap
            while heap and heap[0] not in levels:
                in_heap.discard(heappop(heap))
            self.best = heap[0] if heap else NO_PRICE

    def remove(self, order: Order) -> Level:
        """Take a live order out of the book (cancel, replace); the caller zeroes nothing."""
        price = order.price
        assert price is not None, "market orders never rest"
        key = self.sign * price
        level = self.levels[key]
        level.qty -= order.leaves
        level.count -= 1
        order.leaves = 0
        if level.count == 0:
            self.drop_level(key)
        else:
            level.dead += 1
            if level.dead > 16 and level.dead > level.count:
                level.compact()
        return level

    def depth(self, n: int) -> list[tuple[int, int, int]]:
        out = []
        levels = self.levels
        for key in nsmallest(n, levels):
            level = levels[key]
            out.append((level.price, level.qty, level.count))
        return out

    def orders(self):
        """Live orders, best level first, time order within a level."""
        levels = self.levels
        for key in sorted(levels):
            yield from levels[key].live()
