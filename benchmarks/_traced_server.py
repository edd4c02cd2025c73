"""``gateway serve`` with per-order timestamps, for ``bench_gateway.py --trace``.

Wraps a few functions of the running server (nothing in gateway/ or engine/ changes) and writes
one JSON line per event to ``$KABONI_TRACE`` when the server exits:

- ``["rx", now, t_in, t_out, seq_before, seq_after, orders]``: ``Exchange.data_received`` (``now``
  is the receive time the server's own latency histogram starts from);
- ``["sync", t1, t2, writer_runnable_s]``: one durable write of the journal's writer thread (the
  group commit), with the time that thread spent runnable but not running during it;
- ``["durable", t, seq]``: the writer thread reporting a batch durable (``Server._on_durable``);
- ``["rel", t_in, t_out, durable_seq, entries]``: ``Exchange.release`` that sent something;
- ``["tick", t_in, t_out]``, ``["gc", t_start, t_end, generation]``.

Times are ``time.monotonic()`` (CLOCK_MONOTONIC, the same clock in every process), so the
benchmark can cut the events into its own measurement windows. ``analyze`` turns one window into
the split the latency target needs: how much of an order's time is the journal's (waiting for
the sync in flight, then its own) and how much is the gateway's.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def install(path: str) -> None:
    import engine.journal._log as log
    import gateway._exchange as exchange

    mono = time.monotonic
    events: list = []
    add = events.append
    local = threading.local()

    def runnable() -> float:
        """This thread's run-queue wait so far (/proc schedstat, field 2), in seconds."""
        f = getattr(local, "f", None)
        if f is None:
            try:
                f = local.f = open(f"/proc/self/task/{threading.get_native_id()}/schedstat", "rb", buffering=0)
            except OSError:
                local.f = False
                return 0.0
        if f is False:
            return 0.0
        f.seek(0)
        return int(f.read().split()[1]) / 1e9

    def timed_io(orig):
        def wrapper(self, *args):
            r1 = runnable()
            t1 = mono()
            n = orig(self, *args)
            t2 = mono()
            add(("sync", t1, t2, runnable() - r1))
            return n
        return wrapper

    log.FileOps.write_durable = timed_io(log.FileOps.write_durable)
    log.FileOps.sync = timed_io(log.FileOps.sync)

    import gateway._server as server

    orig_on_durable = server.Server._on_durable

    def on_durable(self, seq):
        add(("durable", mono(), seq))
        orig_on_durable(self, seq)

    server.Server._on_durable = on_durable

    X = exchange.Exchange
    orig_rx, orig_rel, orig_tick = X.data_received, X.release, X.tick

    def data_received(self, session, data, now):
        t_in = mono()
        s0 = self.ledger.last_seq
        received = self.stats.received
        n0 = sum(received.values())
        orig_rx(self, session, data, now)
        add(("rx", now, t_in, mono(), s0, self.ledger.last_seq, sum(received.values()) - n0))

    def release(self, durable):
        t_in = mono()
        n = len(self.outbox)
        orig_rel(self, durable)
        if n != len(self.outbox):
            add(("rel", t_in, mono(), durable, n - len(self.outbox)))

    def tick(self, now):
        t_in = mono()
        orig_tick(self, now)
        add(("tick", t_in, mono()))

    X.data_received, X.release, X.tick = data_received, release, tick

    started = [0.0]

    def on_gc(phase, info):
        if phase == "start":
            started[0] = mono()
        else:
            add(("gc", started[0], mono(), info["generation"]))

    gc.callbacks.append(on_gc)

    def dump() -> None:
        with open(path, "w") as f:
            for e in events:
                f.write(json.dumps(e))
                f.write("\n")

    atexit.register(dump)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def analyze(path: str, start: float, end: float) -> dict[str, float]:
    """The split of the orders received in [start, end) (monotonic seconds), in milliseconds.

    Every order counts once. For each burst of bytes that appended records: its batch is the first sync that began after
    the append (the writer takes everything pending when it starts a write), its release the
    first ``release`` after the append that covered its seq.
    """
    from bisect import bisect_left

    rx, syncs, rels, ticks, gcs, durable = [], [], [], [], [], []
    with open(path) as f:
        for line in f:
            e = json.loads(line)
            kind = e[0]
            if kind == "rx":
                if e[5] > e[4]:
                    rx.append(e)
            elif kind == "sync":
                syncs.append(e)
            elif kind == "rel":
                rels.append(e)
            elif kind == "tick":
                ticks.append(e)
            elif kind == "gc":
                gcs.append(e)
            elif kind == "durable":
                durable.append(e[2])
    sync_starts = [s[1] for s in syncs]
    rel_ends = [r[2] for r in rels]
    total, journal, gateway, wait, own, after = [], [], [], [], [], []
    for _, now, _t_in, t_out, _s0, s1, orders in rx:
        if not start <= now < end:
            continue
        i = bisect_left(sync_starts, t_out)
        j = bisect_left(rel_ends, t_out)
        while j < len(rels) and rels[j][3] < s1:
            j += 1
        if i >= len(syncs) or j >= len(rels):
            continue
        _, t1, t2, _ = syncs[i]
        released = rels[j][2]
        for _ in range(orders):  # every order of the burst counts (they share these times)
            total.append(released - now)
            journal.append(t2 - t_out)
            gateway.append((released - now) - (t2 - t_out))
            wait.append(t1 - t_out)
            own.append(t2 - t1)
            after.append(released - t2)
    # bursts (one read's orders) whose records went into more than one batch
    split = 0
    bursts = 0
    for _, now, _t_in, _t_out, s0, s1, orders in rx:
        if start <= now < end and orders > 1:
            bursts += 1
            k = bisect_left(durable, s0 + 1)
            split += k < len(durable) and durable[k] < s1
    window = [s for s in syncs if start <= s[1] < end]
    batch = [s[2] - s[1] for s in window]
    slow = [s for s in window if s[2] - s[1] > 0.001]
    slow_time = sum(s[2] - s[1] for s in slow)
    ms = 1e3
    return {
        "orders": len(total),
        "server_p50": _pct(total, 0.5) * ms,
        "server_p99": _pct(total, 0.99) * ms,
        "fsync_batch_p50": _pct(batch, 0.5) * ms,
        "fsync_batch_p99": _pct(batch, 0.99) * ms,
        "fsync_order_p99": _pct(own, 0.99) * ms,
        "wait_prev_p99": _pct(wait, 0.99) * ms,
        "journal_p99": _pct(journal, 0.99) * ms,
        "gateway_p99": _pct(gateway, 0.99) * ms,
        "durable_to_written_p99": _pct(after, 0.99) * ms,
        "slow_sync_time_share": slow_time / max(1e-9, sum(batch)),
        "slow_sync_runnable_share": sum(s[3] for s in slow) / max(1e-9, slow_time),
        "bursts": bursts,
        "split_bursts": split,
        "tick_max": max((t[2] - t[1] for t in ticks if start <= t[1] < end), default=0.0) * ms,
        "gc_max": max((g[2] - g[1] for g in gcs if start <= g[1] < end), default=0.0) * ms,
    }


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    install(os.environ["KABONI_TRACE"])
    from gateway.cli import main

    sys.exit(main(sys.argv[1:]))
