"""Matching throughput: the full engine against the frozen plain book, same stream, same process.

The standard stream ``workload.generate(n, 42)`` of ``../shared/bench`` (60% passive limit
orders, 25% cancels, 15% orders sweeping 1-3 levels, one instrument) runs through

* the engine, everything on: validation, funds and allowances checks, reservations, fees
  (``fee_bp`` > 0), delivery versus payment, reports and market-data events. Buy orders come from
  members B1..B8 and sell orders from S1..S8 (chosen by order id), all funded generously by
  ``Deposit``; every order is a ``NewOrder`` GTC limit order, every cancel a ``CancelOrder`` of
  the order's ``cl_ord_id``; the instrument has a wide band and no maximum order size;
* the baseline ``plainbook.OrderBook`` (``add`` / ``cancel``), imported from ``../shared/bench``.

Timed region, the same for both: one loop over a pre-built list that calls the engine's
``execute(command, member, ts)`` (ts = the command's index) or the book's ``add`` / ``cancel``,
and drops the result. Outside it: generating the stream, building the command Structs and the
baseline's ``Side`` values, creating, funding and opening the engine, and checking the results.
Clock: the CPU time of this process (``time.process_time``; the benchmark is single-threaded), so
other work on a shared machine does not count; wall time is printed per run as well.
Garbage collection: ``gc.collect(); gc.freeze(); gc.disable()`` before each timed run and
``gc.enable(); gc.unfreeze()`` after, for both (``--gc on`` leaves it enabled for both).

Checks, outside the timing: one extra untimed run of each sums the traded quantity from the
engine's taker ``Fill`` reports and ``Trade`` events and from the baseline's fills, and both must
equal ``stats["traded_qty"]``; every timed engine run must end with the same traded quantity
and trade count (engine state) and pass ``engine.check()``, every timed baseline run with the
stream's final resting orders and best prices.

    python benchmarks/bench_matching.py [--n 1000000] [--repeat 3] [--profile] [--gc off|on]

The last line is ``ratio_vs_baseline=<x.xx>`` (baseline time / engine time, best runs).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine import (  # noqa: E402
    CancelOrder, Deposit, Engine, ExchangeConfig, Fill, InstrumentConfig, MarketConfig, MemberConfig,
    NewOrder, OpenMarket, Trade, hash_token,
)

SHARED = ROOT.parent / "shared" / "bench"
SYMBOL = "CEA-BENCH"
BUYERS = [f"B{i}" for i in range(1, 9)]
SELLERS = [f"S{i}" for i in range(1, 9)]
FEE_BP = 5  # 0.05% per side: fees are really computed and booked on every fill
# Funding per member, about 7x what the 1,000,000-event stream can need (a member's orders
# total at most 1.4e12 minor units of buys or 1.5e8 t of sells), so it is never the limit.
CASH = 10**13  # minor units (10^11 CNY)
ALLOWANCES = 10**9  # tonnes


def config() -> ExchangeConfig:
    members = [MemberConfig("ops", hash_token("ops"), "operator")]
    members += [MemberConfig(m, hash_token(m)) for m in BUYERS + SELLERS]
    return ExchangeConfig(
        instruments=[InstrumentConfig(SYMBOL, "CNY", 9_000, tick=1, qty_step=1, min_qty=1, max_qty=None,
                                      band_bp=9_999, fee_bp=FEE_BP)],
        members=members,
        market=MarketConfig(first_trading_day="2026-11-24"),
    )


def new_engine() -> Engine:
    """A funded, open engine (all outside the timing)."""
    engine = Engine(config())
    for m in BUYERS + SELLERS:
        engine.execute(Deposit(f"cash-{m}", m, "CNY", CASH), "ops", 0)
        engine.execute(Deposit(f"qty-{m}", m, SYMBOL, ALLOWANCES), "ops", 0)
    engine.execute(OpenMarket(), "ops", 0)
    return engine


def engine_commands(events) -> list:
    """(command, member) per stream event: NewOrder GTC limit orders and CancelOrders."""
    out = []
    for op, oid, side, price, qty in events:
        member = (BUYERS if side == 0 else SELLERS)[oid % 8]
        if op == 1:
            out.append((CancelOrder(f"x{oid}", str(oid)), member))
        else:
            out.append((NewOrder(str(oid), SYMBOL, "buy" if side == 0 else "sell", qty, price, "gtc"), member))
    return out


def run_engine(commands) -> tuple[float, Engine]:
    engine = new_engine()
    execute = engine.execute
    gc_off()
    w0, t0 = time.perf_counter(), CLOCK()
    for ts, (cmd, member) in enumerate(commands):
        execute(cmd, member, ts)
    t, w = CLOCK() - t0, time.perf_counter() - w0
    gc_on()
    WALL.append(w)
    return t, engine


def run_baseline(events, plainbook) -> tuple[float, object]:
    book = plainbook.OrderBook()
    add, cancel = book.add, book.cancel
    gc_off()
    w0, t0 = time.perf_counter(), CLOCK()
    for op, oid, side, price, qty in events:
        if op == 1:
            cancel(oid)
        else:
            add(oid, side, price, qty)
    t, w = CLOCK() - t0, time.perf_counter() - w0
    gc_on()
    WALL.append(w)
    return t, book


GC_MODE = "off"
# The clock of the timed region: CPU time of this (single-threaded) process, so that other
# processes on a shared machine do not count; wall time is recorded too and printed per run.
CLOCK = time.process_time
WALL: list[float] = []


def gc_off() -> None:
    gc.collect()
    gc.freeze()
    if GC_MODE == "off":
        gc.disable()


def gc_on() -> None:
    gc.enable()
    gc.unfreeze()


def verify_engine(commands, stats) -> None:
    """Untimed: the traded quantity from the engine's own reports and market data."""
    engine = new_engine()
    taker_qty = trade_qty = trades = 0
    for ts, (cmd, member) in enumerate(commands):
        for e in engine.execute(cmd, member, ts):
            t = type(e)
            if t is Fill:
                if e.liquidity == "taker":
                    taker_qty += e.qty
            elif t is Trade:
                trade_qty += e.qty
                trades += 1
    engine.check()
    want = stats["traded_qty"]
    if not (taker_qty == trade_qty == want and trades == stats["trades"]):
        raise SystemExit(f"engine traded {taker_qty} t (fills) / {trade_qty} t in {trades} trades (market data),"
                         f" stream says {want} t in {stats['trades']}")


def verify_baseline(events, stats, plainbook) -> None:
    book = plainbook.OrderBook()
    traded = 0
    for op, oid, side, price, qty in events:
        if op == 1:
            book.cancel(oid)
        else:
            for f in book.add(oid, side, price, qty):
                traded += f.qty
    if traded != stats["traded_qty"]:
        raise SystemExit(f"baseline traded {traded} t, stream says {stats['traded_qty']} t")


def check_engine_run(engine: Engine, stats) -> None:
    ins = engine._instruments[SYMBOL]
    if ins.day_qty != stats["traded_qty"] or engine._next_trade_id - 1 != stats["trades"]:
        raise SystemExit(f"timed engine run traded {ins.day_qty} t in {engine._next_trade_id - 1} trades")
    engine.check()


def check_baseline_run(book, stats) -> None:
    if len(book) != stats["final_resting_orders"] or (book.best_bid(), book.best_ask()) != tuple(stats["final_bbo"]):
        raise SystemExit("timed baseline run ended with a different book than the stream's")


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def profile_engine(commands, top: int) -> None:
    import cProfile
    import pstats

    engine = new_engine()
    execute = engine.execute
    prof = cProfile.Profile()
    gc_off()
    prof.enable()
    for ts, (cmd, member) in enumerate(commands):
        execute(cmd, member, ts)
    prof.disable()
    gc_on()
    st = pstats.Stats(prof)
    total = st.total_tt
    rows = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    print(f"\ncProfile of the engine run (tottime share of {total:.2f}s profiled):")
    print(f"  {'tottime':>8} {'share':>6} {'calls':>10}  function")
    for (file, line, name), (cc, nc, tt, ct, callers) in rows:
        where = f"{Path(file).name}:{line}" if line else file
        print(f"  {tt:8.3f} {100 * tt / total:5.1f}% {nc:10d}  {name} ({where})")


def main(argv=None) -> int:
    global GC_MODE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="stream length (default 1,000,000)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each (default 3)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--gc", choices=("off", "on"), default="off",
                    help="off: collect+freeze+disable around each timed run (default); on: collect+freeze only")
    ap.add_argument("--profile", action="store_true", help="also print a cProfile of one engine run")
    ap.add_argument("--top", type=int, default=20, help="functions in the profile")
    ap.add_argument("--no-verify", action="store_true", help="skip the untimed event-level check runs")
    args = ap.parse_args(argv)
    GC_MODE = args.gc

    have_shared = (SHARED / "workload.py").exists()
    if have_shared:
        sys.path.insert(0, str(SHARED))
        import plainbook
        import workload
    else:
        plainbook = None
        import random as _random

    print(f"Kaboni matching benchmark: {args.n:,} events, seed {args.seed}")
    print(f"machine: {os.cpu_count()} cores, {cpu_model()}, Python {platform.python_version()}")
    compiled = sys.modules["engine._engine"].__file__.endswith(".so")
    print("engine: " + ("compiled by mypyc" if compiled
                        else "interpreted (no compiled extension: `pip install -e .` builds it)"))
    t0 = time.perf_counter()
    if have_shared:
        events, stats = workload.generate(args.n, args.seed)
    else:
        events, stats = fallback_stream(args.n, args.seed, _random), None
    print(f"stream: {len(events):,} events generated in {time.perf_counter() - t0:.1f}s"
          + (f"; {stats['adds']:,} passive, {stats['cancels']:,} cancels, {stats['aggressive']:,} aggressive,"
             f" {stats['trades']:,} fills, {stats['traded_qty']:,} t traded" if stats else
             " (../shared/bench absent: a local stream, engine figures only)"))
    commands = engine_commands(events)
    base_events = None
    if plainbook is not None:
        base_events = [(op, oid, plainbook.Side(side), price, qty) for op, oid, side, price, qty in events]
    print("timed: the loop calling engine.execute / book.add|cancel over pre-built inputs, results dropped;"
          " not timed: stream, command Structs, Side values, engine set-up and funding, checks")
    print(f"gc: collect + freeze + {'disable' if args.gc == 'off' else 'stay enabled'} around every timed run, for both;"
          " clock: process CPU time (time.process_time), wall time shown per run")

    if stats is not None and not args.no_verify:
        t0 = time.perf_counter()
        verify_engine(commands, stats)
        verify_baseline(base_events, stats, plainbook)
        print(f"check: engine (taker fills and trades) and baseline traded {stats['traded_qty']:,} t"
              f" = stream ({time.perf_counter() - t0:.1f}s, untimed)")

    eng_times, base_times = [], []
    for r in range(args.repeat):
        if base_events is not None:
            t, book = run_baseline(base_events, plainbook)
            check_baseline_run(book, stats)
            base_times.append(t)
            del book
        t, engine = run_engine(commands)
        if stats is not None:
            check_engine_run(engine, stats)
        else:
            engine.check()
        eng_times.append(t)
        del engine
        line = f"run {r + 1}: engine {len(events) / t:,.0f} orders/s ({t:.2f}s cpu, {WALL[-1]:.2f}s wall)"
        if base_times:
            line += (f", baseline {len(events) / base_times[-1]:,.0f} orders/s ({base_times[-1]:.2f}s cpu,"
                     f" {WALL[-2]:.2f}s wall), ratio {base_times[-1] / t:.2f}")
        print(line)

    n = len(events)
    e_best = min(eng_times)
    print(f"engine:   best {n / e_best:,.0f} orders/s, median {n / statistics.median(eng_times):,.0f} orders/s"
          f" ({args.repeat} runs)")
    if args.profile:
        profile_engine(commands, args.top)
    if base_times:
        b_best = min(base_times)
        print(f"baseline: best {n / b_best:,.0f} orders/s, median {n / statistics.median(base_times):,.0f} orders/s"
              f" ({args.repeat} runs)")
        paired = statistics.median(b / e for b, e in zip(base_times, eng_times))
        print(f"ratio: best/best {b_best / e_best:.3f}, median of paired runs {paired:.3f}")
        print(f"ratio_vs_baseline={b_best / e_best:.2f}")
    return 0


def fallback_stream(n: int, seed: int, random) -> list:
    """Without ../shared/bench: a simple seeded stream of passive orders, cancels and crossing
    orders of the same shape (only the engine runs; there is nothing to compare with)."""
    rng = random.Random(seed)
    events, live = [], []
    for i in range(1, n + 1):
        r = rng.random()
        if r < 0.25 and live:
            oid, side, price = live.pop(rng.randrange(len(live)))
            events.append((1, oid, side, price, 0))
            continue
        side = rng.randrange(2)
        if r < 0.85:
            price = 9_000 - rng.randint(1, 20) if side == 0 else 9_000 + rng.randint(1, 20)
            live.append((i, side, price))
        else:
            price = 9_000 + 20 if side == 0 else 9_000 - 20  # crosses; its own fate is not tracked
        events.append((0 if r < 0.85 else 2, i, side, price, rng.randint(1, 5_000)))
    return events


if __name__ == "__main__":
    sys.exit(main())
