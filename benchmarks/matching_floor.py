"""How fast could any Python engine be? A floor for ``bench_matching.py``.

Per command of the standard stream, one Python call that does only the work no engine can skip:
probe and add the command's ``cl_ord_id`` in its member's set of the day's ids, and build the
Structs the real engine returns for that command (and the ``Order`` of a new order), from
arguments computed beforehand by a real engine run. No checks, no book, no matching, no
settlement. Timed the same way as ``bench_matching.py`` (process CPU time, gc frozen and off),
against the same plain book in the same process.

    python benchmarks/matching_floor.py [--n 300000] [--repeat 3]

It also times the real engine (``bench_matching.run_engine``). Last line: ``floor_vs_baseline=<x.xx>`` (floor time / plain book time): the share of the plain
book's time that the unavoidable part alone takes; the engine's logic must fit in the rest for
``ratio_vs_baseline`` to reach 1.0.
"""

from __future__ import annotations

import argparse
import sys
import time

from bench_matching import BUYERS, SELLERS, SHARED, engine_commands, gc_off, gc_on, new_engine, run_engine

from engine import NewOrder
from engine._book import Order


def plan(commands) -> list:
    """(cl_ord_id, member, [(Struct class, args)]) per command, from a real engine run."""
    engine = new_engine()
    out = []
    for ts, (cmd, member) in enumerate(commands):
        items = [(type(e), tuple(getattr(e, f) for f in e.__struct_fields__)) for e in engine.execute(cmd, member, ts)]
        if type(cmd) is NewOrder:
            items.append((Order, (1, member, cmd.cl_ord_id, cmd.instrument, cmd.side, cmd.price, cmd.qty, cmd.qty,
                                  "gtc", "cancel_incoming", 0, 0)))
        out.append((cmd.cl_ord_id, member, items))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(SHARED))
    import plainbook
    import workload

    events, _ = workload.generate(args.n, 42)
    commands = engine_commands(events)
    work = plan(commands)
    base_events = [(op, oid, plainbook.Side(side), price, qty) for op, oid, side, price, qty in events]
    ids: dict[str, set] = {m: set() for m in BUYERS + SELLERS}

    def handle(cl, member, items):
        taken = ids[member]
        if cl in taken:
            return None
        taken.add(cl)
        return [cls(*fields) for cls, fields in items]

    floors, bases, engines = [], [], []
    for _ in range(args.repeat):
        for taken in ids.values():
            taken.clear()
        gc_off()
        t0 = time.process_time()
        for cl, member, items in work:
            handle(cl, member, items)
        floors.append(time.process_time() - t0)
        gc_on()
        book = plainbook.OrderBook()
        add, cancel = book.add, book.cancel
        gc_off()
        t0 = time.process_time()
        for op, oid, side, price, qty in base_events:
            if op == 1:
                cancel(oid)
            else:
                add(oid, side, price, qty)
        bases.append(time.process_time() - t0)
        gc_on()
        engines.append(run_engine(commands)[0])
        print(f"floor {floors[-1]:.3f}s cpu, plain book {bases[-1]:.3f}s cpu, engine {engines[-1]:.3f}s cpu;"
              f" floor/plain book {floors[-1] / bases[-1]:.2f}")
    floor, base, eng = min(floors), min(bases), min(engines)
    print(f"best: the engine's logic beyond the floor takes {eng - floor:.3f}s; for ratio 1.0 it would have to"
          f" fit in {base - floor:.3f}s ({(base - floor) / (eng - floor):.0%} of it)")
    print(f"floor_vs_baseline={floor / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
