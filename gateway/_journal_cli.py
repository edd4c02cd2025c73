"""``kaboni journal verify|dump|stats DIR`` and ``kaboni settle DIR --day YYYY-MM-DD``.

Read-only tools over a journal directory: they never truncate or repair anything (opening the
journal for writing does that).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import msgspec
from crc32c import crc32c

from engine import SettlementLine
from engine._config import is_day
from engine.journal import (
    KIND_ENTRY, KIND_FILL, KIND_REPORTS, KIND_START, CorruptJournalError, EntryRecord, FillRecord, JournalError, StartRecord,
    list_segments, read_records, scan_journal,
)
from engine.journal._format import KIND_NAMES, segment_name
from engine.journal._index import IndexUnusable, load_index
from engine.journal._settle import settlement_report
from engine.journal._snapshot import list_snapshots, read_snapshot, snapshot_name

__all__ = ["add_journal_commands"]

_SETTLE_FIELDS = SettlementLine.__struct_fields__


def add_journal_commands(subparsers) -> None:
    """Register ``journal verify|dump|stats DIR`` and ``settle DIR --day D`` on ``subparsers``."""
    journal = subparsers.add_parser("journal", help="inspect a settlement journal")
    jsub = journal.add_subparsers(dest="journal_command", required=True)
    p = jsub.add_parser("verify", help="check every record and snapshot; exit 1 on damage")
    p.add_argument("dir", type=Path)
    p.set_defaults(func=_verify)
    p = jsub.add_parser("dump", help="print records as JSON lines")
    p.add_argument("dir", type=Path)
    p.add_argument("--from", dest="from_seq", type=_count, default=1, help="first seq (default 1)")
    p.add_argument("--kind", choices=["START", "FILL", "ENTRY", "REPORTS"], help="only records of this kind")
    p.add_argument("--limit", type=_count, default=None, help="at most this many records")
    p.set_defaults(func=_dump)
    p = jsub.add_parser("stats", help="counts of records, fills, bytes, segments and snapshots")
    p.add_argument("dir", type=Path)
    p.set_defaults(func=_stats)
    s = subparsers.add_parser("settle", help="end-of-day settlement report from a journal")
    s.add_argument("dir", type=Path)
    s.add_argument("--day", required=True, type=_day, help="trading day, YYYY-MM-DD")
    s.add_argument("--format", choices=["csv", "json"], default="csv")
    s.set_defaults(func=_settle)


def _count(text: str) -> int:
    """A whole number >= 0 for argparse (a negative --limit printed nothing and exited 0)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a whole number >= 0: {text!r}")
    return value


def _day(text: str) -> str:
    if not is_day(text):  # exactly YYYY-MM-DD, as FILL records carry it
        raise argparse.ArgumentTypeError(f"{text!r} is not a YYYY-MM-DD date")
    return text


def _check_dir(args) -> bool:
    path = args.dir
    # named like every other command's errors: "kaboni journal verify: ..."
    name = "kaboni " + (f"journal {args.journal_command}" if getattr(args, "journal_command", None) else args.command)
    if not path.is_dir():
        print(f"{name}: {path} is not a directory", file=sys.stderr)
        return False
    if not list_segments(path):
        print(f"{name}: {path} holds no journal segments (journal-*.kbj)", file=sys.stderr)
        return False
    return True


def _snapshot_fits(directory: Path, body) -> bool:
    """Whether the journal's ENTRY at the snapshot's seq is the one it was taken after."""
    record = next(read_records(directory, body.seq), None)
    return record is not None and record.seq == body.seq and crc32c(record.payload) == body.entry_crc


def _verify(args) -> int:
    if not _check_dir(args):
        return 2
    try:
        result = scan_journal(args.dir)
    except CorruptJournalError as exc:
        print(f"CORRUPT: {exc}", file=sys.stderr)
        return 1
    status = 0
    print(f"{result.records} records (seq {result.first_seq}-{result.last_seq}) in {result.segments} segments, "
          f"{result.bytes} bytes: checksums and sequence OK")
    if result.tail_segment:
        print(f"torn tail: {result.tail_path} holds no segment header ({result.tail_bytes} bytes, "
              "zeros or less than a header: a crash while starting a new segment); removed when the journal is "
              "next opened")
    elif result.tail_bytes:
        print(f"torn tail: {result.tail_bytes} bytes at the end of {result.tail_path} "
              "(an incomplete last write; truncated when the journal is next opened)")
    segments = list_segments(args.dir)
    # sealed segments (the one before a headerless newest segment is the newest once that is
    # removed): their indexes are shortcuts, so a bad one is a note
    for first in segments[:-2 if result.tail_segment else -1]:
        with open(args.dir / segment_name(first), "rb") as f:
            data = f.read()
        try:
            load_index(args.dir, first, data)
        except IndexUnusable as exc:
            print(f"index of segment {first}: not used ({exc}); a replay walks its frames")
        else:
            print(f"index of segment {first}: OK")
    for seq in list_snapshots(args.dir):
        body = read_snapshot(args.dir / snapshot_name(seq))
        if body is None:
            print(f"snapshot at seq {seq}: DAMAGED (skipped at restart)", file=sys.stderr)
            status = 1
        elif seq > result.last_seq:
            print(f"snapshot at seq {seq}: beyond the journal's end (set aside at restart, as .kbs.beyond-end): "
                  f"expected in a copy taken while the exchange ran; in the exchange's own directory records "
                  f"{result.last_seq + 1} to {seq} were lost (docs/operations.md, Recover)")
        elif body.entry_crc >= 0 and not _snapshot_fits(args.dir, body):
            print(f"snapshot at seq {seq}: NOT OF THIS JOURNAL (its entry differs; skipped at restart)",
                  file=sys.stderr)
            status = 1
        else:
            print(f"snapshot at seq {seq}: OK (trading day {body.trading_day})")
    return status


def _plain(obj):
    """Report bodies inside ENTRY records are msgpack too: decode them for reading."""
    if isinstance(obj, bytes):
        try:
            return _plain(msgspec.msgpack.decode(obj))
        except msgspec.DecodeError:
            return obj.hex()
    if isinstance(obj, list):
        return [_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


_FIELDS = {kind: cls.__struct_fields__ for kind, cls in
           ((KIND_START, StartRecord), (KIND_FILL, FillRecord), (KIND_ENTRY, EntryRecord))}


def _dump(args) -> int:
    if not _check_dir(args):
        return 2
    want = {name: kind for kind, name in KIND_NAMES.items()}.get(args.kind)
    out = sys.stdout
    n = 0
    try:
        for rec in read_records(args.dir, args.from_seq):
            if want is not None and rec.kind != want:
                continue
            if args.limit is not None and n >= args.limit:
                break
            n += 1
            fields = _FIELDS.get(rec.kind)
            if rec.kind == KIND_REPORTS:  # more of the next ENTRY's reports
                body = {"reports": _plain(msgspec.msgpack.decode(rec.payload))}
            elif fields is None:  # a kind of a later build: its payload decoded (or in hex), as it is
                body = {"payload": _plain(rec.payload)}
            else:
                body = dict(zip(fields, _plain(msgspec.msgpack.decode(rec.payload))))
            if rec.kind in (KIND_ENTRY, KIND_REPORTS):
                body["reports"] = [{"member": m, "seq": s, "body": b} for m, s, b in body["reports"]]
            line = {"seq": rec.seq, "kind": KIND_NAMES.get(rec.kind, rec.kind), **body}
            out.write(json.dumps(line, separators=(",", ":")) + "\n")
    except CorruptJournalError as exc:
        print(f"CORRUPT: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    return 0


def _stats(args) -> int:
    if not _check_dir(args):
        return 2
    try:
        result = scan_journal(args.dir)
        days: dict[str, int] = {}
        for rec in read_records(args.dir):
            if rec.kind == KIND_FILL:
                day = msgspec.msgpack.decode(rec.payload)[0]
                days[day] = days.get(day, 0) + 1
    except CorruptJournalError as exc:
        print(f"CORRUPT: {exc}", file=sys.stderr)
        return 1
    kinds = {KIND_NAMES.get(k, str(k)): v for k, v in sorted(result.kinds.items())}
    print(f"segments: {result.segments}")
    print(f"records: {result.records} (seq {result.first_seq}-{result.last_seq})")
    print(f"bytes: {result.bytes}")
    for name, count in kinds.items():
        print(f"  {name}: {count}")
    for day, count in sorted(days.items()):
        print(f"fills on {day}: {count}")
    print(f"torn tail bytes: {result.tail_bytes}")
    snapshots = sorted(list_snapshots(args.dir))
    print(f"snapshots: {len(snapshots)}" + (f" (at seq {', '.join(map(str, snapshots))})" if snapshots else ""))
    return 0


def _settle(args) -> int:
    if not _check_dir(args):
        return 2
    try:
        lines = settlement_report(args.dir, args.day)
    except (CorruptJournalError, JournalError) as exc:
        print(f"CORRUPT: {exc}", file=sys.stderr)
        return 1
    if not lines:  # a header alone looked like a failure, or like a day with no trading
        print(f"kaboni settle: no fills on {args.day} in {args.dir}", file=sys.stderr)
    rows = [dict(zip(_SETTLE_FIELDS, msgspec.to_builtins(ln))) for ln in lines]
    if args.format == "json":
        totals: dict[str, dict] = {}
        for r in rows:
            t = totals.setdefault(r["instrument"], {"currency": r["currency"], "net_qty": 0, "net_cash": 0})
            t["net_qty"] += r["net_qty"]
            t["net_cash"] += r["net_cash"]
        json.dump({"trading_day": args.day, "lines": rows, "totals": totals}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        writer = csv.DictWriter(sys.stdout, fieldnames=("trading_day",) + _SETTLE_FIELDS, lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({"trading_day": args.day, **r})
    return 0
