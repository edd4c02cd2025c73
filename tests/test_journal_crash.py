"""Crash safety with real processes: a child appends real engine commands through a Ledger in
fsync mode and is SIGKILLed at random moments; recovery must hold everything it confirmed."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DAY = "2026-11-24"


def _workload(ledger, run: int, rng: random.Random, out) -> None:
    """Append commands forever; after each, confirm (seq, state hash) pairs that are durable."""
    from engine import CancelOrder, CloseMarket, EndOfDay, MassCancel, NewOrder, OpenMarket, ReplaceOrder, SessionEnded

    members = [f"M{i:02d}" for i in range(1, 9)]
    instruments = ["CEA24", "CEA25"]
    hashes: deque[tuple[int, str]] = deque()
    mine: dict[str, list[str]] = {m: [] for m in members}
    i = 0
    ts = 1_700_000_000_000_000_000 + run * 10**12
    while True:
        i += 1
        ts += 1_000
        m = rng.choice(members)
        r = rng.random()
        cl = f"r{run}-{i}"
        if r < 0.6:
            ins = rng.choice(instruments)
            ref = ledger.engine.reference_price(ins)
            cmd = NewOrder(cl, ins, rng.choice(["buy", "sell"]), rng.randint(1, 40),
                           ref + rng.randint(-20, 20), rng.choice(["day", "gtc", "ioc"]))
            mine[m].append(cl)
            session = rng.choice([0, 0, run * 100 + 1])
        elif r < 0.75 and mine[m]:
            cmd = CancelOrder(cl, rng.choice(mine[m]))
            session = 0
        elif r < 0.9 and mine[m]:
            orig = rng.choice(mine[m])
            cmd = ReplaceOrder(cl, orig, rng.randint(1, 40), ledger.engine.reference_price("CEA25") + rng.randint(-20, 20))
            mine[m].append(cl)
            session = 0
        elif r < 0.93:
            cmd = MassCancel(cl)
            session = 0
        elif r < 0.94:
            cmd, m, session = SessionEnded(run * 100 + 1), "", 0
        elif r < 0.945:
            for c in (CloseMarket(), EndOfDay(), OpenMarket()):
                ledger.execute(c, "ops", ts)
            hashes.append((ledger.last_seq, ledger.engine.state_hash()))
            continue
        else:
            cmd = NewOrder(cl, "CEA25", "buy", 5, None, "ioc")
            session = 0
        throttled = rng.random() < 0.02
        seq, _, _ = ledger.execute(cmd, m, ts, session, throttled)
        if i % 7 == 0:  # a state hash costs a full snapshot encoding: not after every command
            hashes.append((seq, ledger.engine.state_hash()))
        durable = ledger.durable_seq
        k = None
        while hashes and hashes[0][0] <= durable:
            k = hashes.popleft()
        if k is not None:
            out.write(f"{k[0]} {k[1]}\n".encode())


def child_main(directory: str, run: int, seed: int) -> None:
    from engine import demo_config
    from engine.journal import Ledger

    rng = random.Random(seed)
    ledger = Ledger.open(demo_config(), directory, today=DAY, snapshot_every=rng.choice([150, 400, 100_000]),
                         segment_bytes=rng.choice([64 << 10, 1 << 20]))
    from engine import Restarted

    ledger.execute(Restarted(), "", 1)  # as the gateway does after a restart
    out = os.fdopen(1, "wb", buffering=0)
    out.write(f"ready {ledger.last_seq}\n".encode())
    _workload(ledger, run, rng, out)


def _full_replay_hash(directory: Path, through_seq: int) -> str:
    """Engine state after the entries up to ``through_seq``, from record 1, without snapshots."""
    import msgspec

    from engine import Engine, demo_config
    from engine.journal import KIND_ENTRY, KIND_START, EntryRecord, StartRecord, read_records

    engine = None
    dec = msgspec.msgpack.Decoder(EntryRecord)
    for rec in read_records(directory):
        if rec.seq > through_seq:
            break
        if rec.kind == KIND_START:
            engine = Engine(demo_config(), msgspec.msgpack.decode(rec.payload, type=StartRecord).trading_day)
        elif rec.kind == KIND_ENTRY:
            e = dec.decode(rec.payload)
            engine.execute(e.command, e.member, e.ts, e.session, e.throttled)
    return engine.state_hash()


def _run_and_kill(directory: Path, run: int, rng: random.Random) -> tuple[int, str | None]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(Path(__file__)), str(directory), str(run), str(rng.randrange(1 << 30))],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = proc.stdout.readline()
        assert first.startswith(b"ready"), (first, proc.stderr.read())
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    confirmed = [line.split() for line in rest.decode().splitlines() if line]
    if not confirmed:
        return 0, None
    seq, digest = confirmed[-1]
    return int(seq), digest


def _check_recovery(directory: Path, confirmed: int, digest: str | None, seen: int) -> int:
    from engine import demo_config
    from engine.journal import Ledger, read_records, scan_journal

    ledger = Ledger.open(demo_config(), directory, durability="none")
    try:
        last = ledger.last_seq
        # every confirmed record is there, and the file ends at a whole group
        assert last >= confirmed >= 0
        assert last >= seen
        seqs = [r.seq for r in read_records(directory)]
        assert seqs == list(range(1, last + 1))  # no gap, no duplicate
        assert scan_journal(directory).tail_bytes == 0
        recovered_hash = ledger.engine.state_hash()
    finally:
        ledger.close()
    if digest is not None:
        assert _full_replay_hash(directory, confirmed) == digest
    # snapshot + replay (what Ledger.open did) equals a full replay from record 1
    assert _full_replay_hash(directory, last) == recovered_hash
    return last


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_under_load_loses_nothing_confirmed(tmp_path, seed):
    rng = random.Random(seed)
    directory = tmp_path / "journal"
    seen = 0
    total_confirmed = 0
    for run in range(11):
        confirmed, digest = _run_and_kill(directory, run, rng)
        total_confirmed += confirmed > 0
        seen = _check_recovery(directory, confirmed, digest, max(seen, confirmed))
    assert total_confirmed >= 6  # the children really were confirming durable records


if __name__ == "__main__":
    child_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
