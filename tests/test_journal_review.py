"""Review findings in the settlement journal: each test failed before its fix."""

from __future__ import annotations

import os
import random
import shutil

import msgspec
import pytest

from engine import NewOrder, demo_config
from engine.journal import Ledger
from engine.journal._snapshot import list_snapshots, read_snapshot, snapshot_name, write_snapshot

pytestmark = pytest.mark.timeout(60)

DAY = "2026-11-24"
MEMBERS = [f"M{i:02d}" for i in range(1, 7)]


def orders(rng: random.Random, n: int, prefix: str = "o"):
    for i in range(n):
        yield (NewOrder(f"{prefix}{i}", "CEA25", rng.choice(["buy", "sell"]), rng.randint(1, 20),
                        9250 + rng.randint(-10, 10)), rng.choice(MEMBERS))


def fill_ledger(ledger: Ledger, n: int, seed: int = 1, ts0: int = 1_000) -> None:
    for k, (cmd, m) in enumerate(orders(random.Random(seed), n)):
        ledger.execute(cmd, m, ts0 + k)


def test_an_unusable_snapshot_falls_back_to_a_full_replay_from_record_1(tmp_path):
    """A snapshot that reads back whole but cannot be restored (here: an engine snapshot of
    another version, as after an upgrade) must leave a full replay from the START record. The
    loop over snapshots reused the name of the START record, so the "full" replay began at the
    unusable snapshot's entry on a fresh engine: a silently wrong state."""
    with Ledger.open(demo_config(), tmp_path, today=DAY, durability="none", snapshot_every=10**9) as ledger:
        fill_ledger(ledger, 200)
        ledger.snapshot()
        ledger.wait_snapshots()
        fill_ledger(ledger, 50, seed=2, ts0=5_000)
        live_hash = ledger.engine.state_hash()
        ledger.journal.sync()
        snaps = list_snapshots(tmp_path)
    for s in list_snapshots(tmp_path):
        if s not in snaps:
            os.unlink(tmp_path / snapshot_name(s))  # the one close() wrote
    (seq,) = snaps
    body = read_snapshot(tmp_path / snapshot_name(seq))
    state = msgspec.msgpack.decode(body.engine)
    state[0] += 1  # an engine snapshot format this build does not read
    write_snapshot(tmp_path, msgspec.structs.replace(body, engine=msgspec.msgpack.encode(state)), sync=False)
    with Ledger.open(demo_config(), tmp_path, durability="none") as ledger:
        assert ledger.engine.state_hash() == live_hash
