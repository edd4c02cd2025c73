"""The engine's events and state hash stay byte-for-byte what they were before the hot path was tuned.

A seeded stream (a benchmark-like prefix: passive orders, cancels and sweeps from disjoint buyers
and sellers; then a mix of fees, self-trade prevention, replaces, market/IOC/FOK orders, mass
cancels, sessions, halts and end of day) runs through a fresh engine. Every chunk of events is
folded into a SHA-256 digest and compared with the golden digests in
``tests/golden/engine_equivalence.json``, captured from the engine before any optimisation (and
regenerated, with the same unoptimised code plus the rule fixes of the ``tests`` branch, when
those fixes were merged);
``engine.check()`` runs periodically. A deliberate behaviour change regenerates the golden file
with ``python tests/test_engine_equivalence.py --regen`` (and says why in the commit).
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import sys
from pathlib import Path

import msgspec

from engine import (
    CancelOrder, CloseMarket, Deposit, Engine, EndOfDay, ExchangeConfig, Fill, Halt, InstrumentConfig,
    MarketConfig, MassCancel, MemberConfig, NewOrder, OpenMarket, OrderAccepted, OrderCancelled,
    OrderReplaced, QueryBalances, ReplaceOrder, Restarted, Resume, SessionEnded, Withdraw, hash_token,
)

GOLDEN = Path(__file__).parent / "golden" / "engine_equivalence.json"
BUYERS = [f"B{i}" for i in range(1, 9)]
SELLERS = [f"S{i}" for i in range(1, 9)]
MIXED = [f"X{i}" for i in range(1, 5)]
PREFIX = 20_000  # benchmark-like commands
MIX = 6_000  # feature-mix commands
CHUNK = 1_000
CHECK_EVERY = 500


def _config() -> ExchangeConfig:
    members = [MemberConfig("ops", hash_token("ops"), "operator")]
    members += [MemberConfig(m, hash_token(m)) for m in BUYERS + SELLERS + MIXED]
    return ExchangeConfig(
        instruments=[
            InstrumentConfig("BENCH", "CNY", 9_000, max_qty=None, band_bp=9_999, fee_bp=25),
            InstrumentConfig("EUA", "EUR", 7_000, tick=5, qty_step=10, min_qty=10, max_qty=100_000,
                             band_bp=1_000, fee_bp=7, holding_limit=400_000),
        ],
        members=members,
        market=MarketConfig(first_trading_day="2026-11-24"),
    )


class _Live:
    """Live (member, cl_ord_id) pairs with O(1) random choice and removal."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []
        self.pos: dict[tuple[str, str], int] = {}

    def add(self, key) -> None:
        if key not in self.pos:
            self.pos[key] = len(self.items)
            self.items.append(key)

    def remove(self, key) -> None:
        i = self.pos.pop(key, None)
        if i is None:
            return
        last = self.items.pop()
        if last != key:
            self.items[i] = last
            self.pos[last] = i

    def track(self, events) -> None:
        for e in events:
            t = type(e)
            if t is OrderAccepted:
                self.add((e.member, e.cl_ord_id))
            elif t is Fill and e.leaves_qty == 0:
                self.remove((e.member, e.cl_ord_id))
            elif t is OrderCancelled:
                self.remove((e.member, e.orig_cl_ord_id))
                self.remove((e.member, e.cl_ord_id))
            elif t is OrderReplaced:
                self.remove((e.member, e.orig_cl_ord_id))
                self.add((e.member, e.cl_ord_id))


class _Context:
    """What the command generator may look at: the engine (read-only) and the live orders."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.tracker = _Live()


def _commands():
    """Yield (command, member, session) in a fixed, seeded order; reads the engine's book."""
    rng = random.Random(20261124)
    ctx = yield None
    engine = ctx.engine
    ts = 0
    for m in BUYERS + SELLERS + MIXED:
        for asset, amount in (("CNY", 10**13), ("EUR", 10**11), ("BENCH", 10**10), ("EUA", 10**7)):
            ctx = yield Deposit(f"init-{m}-{asset}", m, asset, amount), "ops", 0
    ctx = yield Deposit("small-X4", "X4", "CNY", 1), "ops", 0
    ctx = yield OpenMarket(), "ops", 0

    # 1. Benchmark-like prefix: disjoint buyers and sellers, GTC limit orders, cancels, sweeps.
    tracker = ctx.tracker
    mid = 9_000
    for i in range(1, PREFIX + 1):
        if rng.random() < 0.05:
            mid += 1 if rng.random() < 0.5 else -1
        bid, ask = engine.best_prices("BENCH")
        r = rng.random()
        op = 0 if r < 0.60 else 1 if r < 0.85 else 2
        if op == 1 and not tracker.items:
            op = 0
        if op == 2 and bid is None and ask is None:
            op = 0
        if op == 1:
            member, orig = tracker.items[rng.randrange(len(tracker.items))]
            ctx = yield CancelOrder(f"c{i}", orig), member, 0
            continue
        if op == 0:
            side = rng.randrange(2)
            d = rng.randint(1, 20)
            if side == 0:
                price = mid - d if ask is None else min(mid - d, ask - 1)
            else:
                price = mid + d if bid is None else max(mid + d, bid + 1)
            qty = rng.randint(1, 5_000)
        else:
            side = 0 if rng.random() < 0.5 else 1
            if (side == 0 and ask is None) or (side == 1 and bid is None):
                side = 1 - side
            snap = engine.book_snapshot("BENCH", 3)
            levels = snap.asks if side == 0 else snap.bids
            levels = levels[: rng.randint(1, len(levels))]
            price = levels[-1][0]
            qty = sum(q for _, q, _ in levels[:-1]) + rng.randint(1, levels[-1][1])
            if rng.random() < 0.2:
                qty += rng.randint(1, 2_000)
        member = (BUYERS if side == 0 else SELLERS)[i % 8]
        ctx = yield NewOrder(str(i), "BENCH", "buy" if side == 0 else "sell", qty, price, "gtc"), member, 0

    # 2. Feature mix: everyone trades with everyone on both instruments.
    everyone = BUYERS + SELLERS + MIXED
    seq = 0
    halted = False
    for i in range(MIX):
        seq += 1
        cl = f"m{seq}"
        member = rng.choice(MIXED) if rng.random() < 0.5 else rng.choice(everyone)
        session = rng.choice((0, 0, 1, 2, 3))
        r = rng.random()
        sym = "BENCH" if rng.random() < 0.6 else "EUA"
        bid, ask = engine.best_prices(sym)
        ref = 9_000 if sym == "BENCH" else 7_000
        tick, step = (1, 1) if sym == "BENCH" else (5, 10)
        if r < 0.45:
            side = rng.choice(("buy", "sell"))
            centre = (bid + ask) // 2 if bid is not None and ask is not None else ref
            price = (centre + rng.randint(-15, 15) * tick) // tick * tick
            if rng.random() < 0.03:
                price += 1  # sometimes off the tick (EUA)
            qty = rng.randint(1, 300) * step
            if rng.random() < 0.02:
                qty += 3  # sometimes off the step
            tif = rng.choice((None, "day", "gtc", "gtc", "ioc", "fok"))
            if rng.random() < 0.08:
                price, tif = None, rng.choice((None, "ioc", "fok", "day"))
            stp = rng.choice(("cancel_incoming", "cancel_resting", "cancel_both"))
            if rng.random() < 0.01:
                sym = "NOPE"
            cmd = NewOrder(cl, sym, side, qty, price, tif, stp)
        elif r < 0.65 and tracker.items:
            owner, orig = rng.choice(tracker.items)
            if rng.random() < 0.1:
                owner = rng.choice(everyone)  # maybe someone else's order
            member = owner
            cmd = CancelOrder(cl, orig)
        elif r < 0.85 and tracker.items:
            member, orig = rng.choice(tracker.items)
            o = engine._accounts[member].live[orig]  # read-only peek at the order (KeyError: tracker bug)
            t = o.instrument
            tick, step = (1, 1) if t == "BENCH" else (5, 10)
            choice = rng.random()
            if choice < 0.35:
                qty, price = max(step, o.qty - rng.randint(1, 20) * step), o.price
            elif choice < 0.7:
                qty, price = o.qty, o.price + rng.randint(-6, 6) * tick
            elif choice < 0.9:
                qty, price = o.qty + rng.randint(1, 50) * step, o.price
            else:
                qty, price = o.qty - o.leaves, o.price  # at or below the filled quantity
            cmd = ReplaceOrder(cl, orig, qty, price)
        elif r < 0.87:
            cmd = MassCancel(cl, rng.choice((None, "BENCH", "EUA")), rng.choice((None, "buy", "sell")))
        elif r < 0.88:
            cmd = CancelOrder(cl, "no-such-order")
        elif r < 0.89:
            cmd = NewOrder(f"m{seq - 1}", "BENCH", "buy", 10, 9_000, "gtc")  # duplicate id
        elif r < 0.90:
            cmd = QueryBalances()
        elif r < 0.905:
            cmd = ReplaceOrder(cl, "no-such-order", 10, 9_000)
        elif r < 0.912:
            cmd, member, session = SessionEnded(rng.randint(1, 3)), "", 0
        elif r < 0.915:
            cmd, member, session = Restarted(), "", 0
        elif r < 0.93:
            cmd = (Resume("EUA") if halted else Halt("EUA", rng.random() < 0.5))
            member, session, halted = "ops", 0, not halted
        elif r < 0.95:
            kind = Deposit if rng.random() < 0.5 else Withdraw
            cmd, member, session = kind(f"r{seq % 97}", rng.choice(everyone), rng.choice(("CNY", "EUA")),
                                        rng.randint(1, 10**6)), "ops", 0
        else:
            cmd = NewOrder(cl, "BENCH", rng.choice(("buy", "sell")), rng.randint(1, 500),
                           (bid or ask or 9_000), "ioc", "cancel_both")
        ctx = yield cmd, member, session
    # end of day and a little of the next day
    if halted:
        ctx = yield Resume("EUA"), "ops", 0
    ctx = yield CloseMarket(), "ops", 0
    ctx = yield EndOfDay(), "ops", 0
    ctx = yield OpenMarket(), "ops", 0
    for j in range(200):
        member = rng.choice(everyone)
        side = rng.choice(("buy", "sell"))
        ctx = yield NewOrder(f"d2-{j}", "BENCH", side, rng.randint(1, 2_000), 9_000 + rng.randint(-10, 10),
                                "gtc"), member, rng.choice((0, 1))


@functools.cache
def _run() -> dict:
    engine = Engine(_config())
    ctx = _Context(engine)
    gen = _commands()
    next(gen)
    digests: list[str] = []
    h = hashlib.sha256()
    count = 0
    enc = msgspec.msgpack.Encoder()
    taken = []
    item = gen.send(ctx)
    while True:
        cmd, member, session = item
        count += 1
        taken.append((cmd, member, count, session))
        events = engine.execute(cmd, member, count, session)
        h.update(enc.encode(events))
        ctx.tracker.track(events)
        if count % CHECK_EVERY == 0:
            engine.check()
        if count % CHUNK == 0:
            digests.append(h.hexdigest()[:16])
        try:
            item = gen.send(ctx)
        except StopIteration:
            break
    engine.check()
    digests.append(h.hexdigest()[:16])
    restored = Engine.restore(_config(), engine.snapshot())
    restored.check()
    return {"commands": count, "digests": digests, "state_hash": engine.state_hash(),
            "restored_hash": restored.state_hash(), "taken": taken}


def test_events_and_state_hash_match_the_golden_run():
    golden = json.loads(GOLDEN.read_text())
    got = _run()
    assert got["commands"] == golden["commands"]
    for n, (a, b) in enumerate(zip(got["digests"], golden["digests"])):
        assert a == b, f"events differ from the golden run in commands {n * CHUNK + 1}..{(n + 1) * CHUNK}"
    assert got["digests"] == golden["digests"]
    assert got["state_hash"] == golden["state_hash"]
    assert got["restored_hash"] == got["state_hash"]


if __name__ == "__main__":
    if "--regen" in sys.argv:
        result = _run()
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {GOLDEN}: {result['commands']} commands")
    else:
        print(json.dumps(_run(), indent=1))


def test_the_same_commands_without_events_reach_the_same_state():
    """Journal replay turns the order path's events off (``Engine.events``); the state must not
    notice: the golden run's commands give the golden state hash."""
    run = _run()
    engine = Engine(_config())
    engine.events = False
    for cmd, member, ts, session in run["taken"]:
        engine.execute(cmd, member, ts, session)
    engine.check()
    assert engine.state_hash() == json.loads(GOLDEN.read_text())["state_hash"] == run["state_hash"]
