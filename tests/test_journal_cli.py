"""``journal verify|dump|stats`` and ``settle``: through argparse in-process and as a real process."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from engine import DEMO_TOML, CloseMarket, DayEnded, EndOfDay, NewOrder, OpenMarket, parse_config
from engine.journal import Ledger, read_records
from engine.journal._format import segment_name, unpack_position
from gateway._journal_cli import add_journal_commands

ROOT = Path(__file__).resolve().parent.parent
DAY = "2026-11-24"


def cli(*argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="kaboni")
    add_journal_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = args.func(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def day_journal(tmp_path_factory):
    """Two trading days of random trading with fees, ended by EndOfDay; the engine's own
    settlement report of the first day for comparison."""
    d = tmp_path_factory.mktemp("journal")
    toml = DEMO_TOML.replace("band_bp = 1_000", "band_bp = 1_000\nfee_bp = 25")
    cfg = parse_config(toml, "fees")
    rng = random.Random(11)
    settlements = []
    with Ledger.open(cfg, d, today=DAY, durability="none") as ledger:
        for day in range(2):
            for i in range(600):
                m = f"M{rng.randint(1, 6):02d}"
                ins = rng.choice(["CEA24", "CEA25"])
                ref = ledger.engine.reference_price(ins)
                ledger.execute(NewOrder(f"d{day}-{i}", ins, rng.choice(["buy", "sell"]), rng.randint(1, 50),
                                        ref + rng.randint(-10, 10)), m, 10_000 * day + i)
            ledger.execute(CloseMarket(), "ops", 10_000 * day + 9_000)
            _, events, _ = ledger.execute(EndOfDay(), "ops", 10_000 * day + 9_001)
            settlements.append([e for e in events if isinstance(e, DayEnded)][0])
            ledger.execute(OpenMarket(), "ops", 10_000 * day + 9_002)
    return d, settlements


def test_settle_csv_matches_the_engines_end_of_day_report(day_journal):
    d, settlements = day_journal
    code, out, _ = cli("settle", str(d), "--day", DAY)
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rows and all(r["trading_day"] == DAY for r in rows)
    fields = ("member", "instrument", "currency", "bought", "sold", "paid", "received", "fees", "net_qty", "net_cash")
    got = sorted(tuple(r[f] for f in fields) for r in rows)
    want = sorted(tuple(str(v) for v in (ln.member, ln.instrument, ln.currency, ln.bought, ln.sold, ln.paid,
                                          ln.received, ln.fees, ln.net_qty, ln.net_cash))
                  for ln in settlements[0].settlement)
    assert got == want
    assert any(r["member"] == "EXCHANGE" and int(r["net_cash"]) > 0 for r in rows)


def test_settle_json_nets_sum_to_zero_per_instrument(day_journal):
    d, settlements = day_journal
    code, out, _ = cli("settle", str(d), "--day", settlements[1].trading_day, "--format", "json")
    assert code == 0
    report = json.loads(out)
    assert report["trading_day"] == "2026-11-25"
    assert report["totals"] and all(t["net_qty"] == 0 and t["net_cash"] == 0 for t in report["totals"].values())
    assert len(report["lines"]) == len(settlements[1].settlement)
    code, out, err = cli("settle", str(d), "--day", "2020-01-01", "--format", "json")
    assert code == 0 and json.loads(out)["lines"] == []
    assert "no fills on 2020-01-01" in err  # said, not left to a header alone


def test_verify_stats_and_dump(day_journal):
    d, _ = day_journal
    code, out, _ = cli("journal", "verify", str(d))
    assert code == 0 and "checksums and sequence OK" in out and "snapshot at seq" in out
    code, out, _ = cli("journal", "stats", str(d))
    assert code == 0 and "FILL:" in out and f"fills on {DAY}:" in out
    assert "snapshots: 2 (at seq " in out
    code, out, _ = cli("journal", "dump", str(d), "--kind", "FILL", "--limit", "3")
    lines = [json.loads(x) for x in out.splitlines()]
    assert len(lines) == 3 and all(x["kind"] == "FILL" and x["trading_day"] == DAY for x in lines)
    code, out, _ = cli("journal", "dump", str(d), "--from", "300", "--kind", "ENTRY", "--limit", "1")
    entry = json.loads(out)
    assert entry["seq"] >= 300 and entry["command"]["type"] == "NewOrder"
    assert all(r["body"]["seq"] == r["seq"] for r in entry["reports"])


def test_verify_reports_corruption_with_file_and_offset(tmp_path, day_journal):
    src, _ = day_journal
    d = tmp_path / "copy"
    d.mkdir()
    for name in os.listdir(src):
        (d / name).write_bytes((src / name).read_bytes())
    rec = [r for r in read_records(d) if r.seq == 500][0]
    first, off = unpack_position(rec.position)
    path = d / segment_name(first)
    data = bytearray(path.read_bytes())
    data[off + 20] ^= 0x10
    path.write_bytes(bytes(data))
    code, _, err = cli("journal", "verify", str(d))
    assert code == 1 and f"{path}: offset {off}" in err
    code, _, err = cli("settle", str(d), "--day", DAY)
    assert code == 1 and "CORRUPT" in err
    # a torn tail is reported, not an error
    d2 = tmp_path / "torn"
    d2.mkdir()
    for name in os.listdir(src):
        (d2 / name).write_bytes((src / name).read_bytes())
    seg = sorted(p for p in d2.iterdir() if p.suffix == ".kbj")[-1]
    os.truncate(seg, seg.stat().st_size - 7)
    code, out, _ = cli("journal", "verify", str(d2))
    assert code == 0 and "torn tail" in out


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        cli("settle", str(tmp_path), "--day", "24/11/2026")
    code, _, err = cli("journal", "verify", str(tmp_path / "missing"))
    assert code == 2 and err.startswith("kaboni journal verify: ") and "not a directory" in err
    (tmp_path / "empty").mkdir()
    for command in (("journal", "verify"), ("journal", "stats"), ("journal", "dump"), ("settle",)):
        extra = ("--day", DAY) if command == ("settle",) else ()
        code, out, err = cli(*command, str(tmp_path / "empty"), *extra)
        assert code == 2 and "holds no journal segments" in err and out == "", command
        assert err.startswith(f"kaboni {' '.join(command)}: "), err


def test_python_m_gateway_settle_runs_as_a_process(day_journal):
    d, _ = day_journal
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "gateway", "settle", str(d), "--day", DAY],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("trading_day,member,instrument")


def test_verify_reports_each_sealed_segments_index(tmp_path):
    from engine.journal import Journal, list_segments
    from engine.journal._index import index_name

    j = Journal.open(tmp_path, durability="none", segment_bytes=2048)
    for i in range(300):
        j.append(2, b"fill-%d" % i * 5)
    j.close()
    first, second = list_segments(tmp_path)[:2]
    code, out, _ = cli("journal", "verify", str(tmp_path))
    assert code == 0 and f"index of segment {first}: OK" in out and f"index of segment {second}: OK" in out
    (tmp_path / index_name(second)).write_bytes(b"not an index")
    code, out, _ = cli("journal", "verify", str(tmp_path))
    assert code == 0 and f"index of segment {second}: not used" in out  # a shortcut, not the data
