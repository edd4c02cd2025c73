"""Price-time priority order book for one instrument.

Each side keeps a ``SortedList`` of price keys and a dict of key -> ``Level``. Bid keys are
negated prices, so on both sides the best level is the smallest key and "crosses" is
``key <= limit_key``; the best key is cached so matching never asks the sorted list for it.

A level is a FIFO ``deque`` of orders. Cancelling marks the order dead (``leaves == 0``) and
adjusts the level's totals in O(1); dead orders are dropped when they reach the front, or all
at once when they outnumber the live ones, so a level never grows without bound.
"""

from __future__ import annotations

from collections import deque

import msgspec
from sortedcontainers import SortedList

__all__ = ["Order", "Level", "SideBook", "NO_PRICE"]

NO_PRICE = 1 << 62  # best key of an empty side: no limit key is ever above it


class Order(msgspec.Struct, gc=False):
    """A resting or incoming order. Mutable: the book and the engine update it in place."""

    order_id: int
    member: str
    cl_ord_id: str
    instrument: str
    side: str
    price: int | None  # None for market orders, which never rest
    qty: int  # total ordered quantity, filled part included
    leaves: int  # open quantity; 0 once filled or cancelled
    tif: str
    stp: str
    session: int  # cancel-on-disconnect session, 0 for none
    reserved: int  # buy orders: cash still reserved for the open quantity and its fees


class Level:
    __slots__ = ("price", "qty", "count", "dead", "orders")

    def __init__(self, price: int) -> None:
        self.price = price
        self.qty = 0  # open quantity of the live orders
        self.count = 0  # number of live orders
        self.dead = 0  # cancelled orders still in the deque
        self.orders: deque[Order] = deque()

    def compact(self) -> None:
        self.orders = deque(o for o in self.orders if o.leaves)
        self.dead = 0

    def live(self) -> list[Order]:
        return [o for o in self.orders if o.leaves]


class SideBook:
    __slots__ = ("sign", "keys", "levels", "best")

    def __init__(self, sign: int) -> None:
        self.sign = sign  # +1 for asks, -1 for bids: key = sign * price
        self.keys = SortedList()
        self.levels: dict[int, Level] = {}
        self.best = NO_PRICE

    def rest(self, order: Order) -> Level:
        """Append an order at the back of its price level."""
        key = self.sign * order.price
        level = self.levels.get(key)
        if level is None:
            level = self.levels[key] = Level(order.price)
            self.keys.add(key)
            if key < self.best:
                self.best = key
        level.orders.append(order)
        level.qty += order.leaves
        level.count += 1
        return level

    def drop_level(self, key: int) -> None:
        del self.levels[key]
        keys = self.keys
        keys.remove(key)
        if key == self.best:
            self.best = keys[0] if keys else NO_PRICE

    def remove(self, order: Order) -> Level:
        """Take a live order out of the book (cancel, replace); the caller zeroes nothing."""
        key = self.sign * order.price
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
        for key in self.keys.islice(0, n):
            level = levels[key]
            out.append((level.price, level.qty, level.count))
        return out

    def orders(self):
        """Live orders, best level first, time order within a level."""
        levels = self.levels
        for key in self.keys:
            yield from levels[key].live()
