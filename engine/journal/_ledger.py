"""The engine with its journal: what the gateway drives (no asyncio inside).

``Ledger.execute`` runs a command through the engine and appends one group to the journal:
a FILL settlement record per fill, then the command's ENTRY (time, origin, the command and
the exact msgpack bodies of the member reports it produced). Reports may be sent once
``on_durable`` has announced the entry's seq. Restart = newest valid snapshot + replay of the
entries after it; without a snapshot, a replay from the journal's first record.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import mmap
import os
import queue
import threading
import typing
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
from crc32c import crc32c

from .._config import ExchangeConfig
from .._engine import Engine, LeftOutError
from .._messages import REPORTS, Command, DayEnded, Deposit, Fill, NewOrder, OpenMarket, QueryBalances, Restarted
from .._replay import run_entries
from ._format import (
    FORMAT_VERSION, FRAME_SIZE, KIND_ENTRY, KIND_FILL, KIND_REPORTS, KIND_START, EntryRecord, StartRecord,
    segment_name,
)
from ._log import (
    SWITCH_INTERVAL, CorruptJournalError, FileOps, Journal, JournalError, JournalFailedError, JournalStats,
    list_segments,
)
from ._snapshot import SnapshotBody, list_snapshots, prune_snapshots, read_snapshot, snapshot_name, write_snapshot

__all__ = ["Ledger", "config_digest", "INDEX_STEP", "INDEX_GAP", "SCAN_BYTES"]

log = logging.getLogger("kaboni.journal")

BEYOND_END = ".beyond-end"  # suffix of a snapshot set aside at open: of seqs this journal does not hold

_REPORT_TYPES = frozenset(REPORTS)  # a set: the type test runs for every event of every command
INDEX_STEP = 32  # a member's report index has an entry at least every INDEX_STEP reports
# ... and for every report this many journal bytes (or a segment) past the member's last entry,
# so that a read of its reports never walks more than this between two of them
INDEX_GAP = 256 << 10
SCAN_BYTES = 256 << 10  # journal bytes one report_step reads at most (a few ms), found reports or not
_JUMP_BYTES = 4 << 10  # what a jump to an index entry counts against that (a file open and a read)
_KEEP_ROWS = 2_048  # a record with this many reports is kept decoded for the next replay step
_SCAN_CHUNK = 16 << 10  # bytes a report read takes from the file at a time: it jumps about
# A command's reports beyond this many go into REPORTS records before its ENTRY (same group): a
# report is at most a few hundred bytes here (cancels and expiries), so each record stays far
# below MAX_PAYLOAD however many orders an end of day, a restart or a mass cancel touches
REPORTS_PER_RECORD = 20_000


class _EntryReports(msgspec.Struct, array_like=True, gc=False):
    """An ENTRY with its command left undecoded: all ``reports`` needs."""

    ts: int
    member: str
    session: int
    throttled: bool
    command: msgspec.Raw
    reports: list[tuple[str, int, bytes]]


def _unconstrained(cls, instruments: tuple[str, ...] = ()):
    """A twin of command class ``cls`` (same tag, fields and defaults) without the field
    constraints. Replay decodes journaled commands into these: they were validated when they
    were first taken, and the regular expression on ``cl_ord_id`` alone costs more than the
    rest of the decoding. ``_REPLAY_CLASS`` maps a twin back to its class.

    With ``instruments``, a plain ``str`` field named ``instrument`` becomes a ``Literal`` of
    them, so that decoding hands out the configuration's own string objects (see
    ``_replay_types``)."""
    fields = []
    for f in msgspec.structs.fields(cls):
        tp = f.type
        if typing.get_origin(tp) is typing.Annotated:
            tp = typing.get_args(tp)[0]
        if instruments and f.name == "instrument" and tp is str:
            tp = typing.Literal[instruments]
        if f.default is not msgspec.NODEFAULT:
            fields.append((f.name, tp, f.default))
        elif f.default_factory is not msgspec.NODEFAULT:
            fields.append((f.name, tp, msgspec.field(default_factory=f.default_factory)))
        else:
            fields.append((f.name, tp))
    info = msgspec.inspect.type_info(cls)
    # a subclass, so that the engine takes a NewOrder twin as a NewOrder as it is
    return msgspec.defstruct(f"_Replay{cls.__name__}", fields, bases=(cls,), tag_field=info.tag_field,
                             tag=info.tag, gc=False)


_REPLAY_CLASS = {_unconstrained(cls): cls for cls in typing.get_args(Command)}


def _entry_tuple(member: typing.Any, commands: typing.Iterable[type]) -> typing.Any:
    """An ENTRY as the replay decodes it: a tuple (ts, member, session, throttled, command, the
    report bodies left alone). A tuple, not a Struct: the compiled loop unpacks it at once,
    cheaper than reading five attributes."""
    return tuple[int, member, int, bool, typing.Union[tuple(commands)], msgspec.Raw]  # type: ignore[misc]


class _ReplayTypes(typing.NamedTuple):
    decode: Callable[[typing.Any], typing.Any]  # entries of this configuration's names
    fallback: Callable[[typing.Any], typing.Any]  # any entry (names as plain strings)
    classes: dict[type, type]  # every twin -> the command class it stands for
    new_order: type  # the NewOrder twin ``decode`` gives


@functools.lru_cache(maxsize=4)
def _replay_types(instruments: tuple[str, ...], members: tuple[str, ...]) -> _ReplayTypes:
    """The replay's decoders for a configuration's instruments and members.

    Member ids and instrument symbols are decoded as ``Literal`` values: msgspec then returns
    the configuration's own string objects instead of new ones, which saves the allocations
    and makes the engine's dictionary lookups identity hits (a full replay about 4% faster). An
    entry with a name the configuration does not list (a reject for an unknown instrument, a
    journal written under another configuration) fails that decoder and takes ``fallback``.
    """
    twins = {_unconstrained(cls, instruments): cls for cls in typing.get_args(Command)}
    return _ReplayTypes(msgspec.msgpack.Decoder(_entry_tuple(typing.Literal[members], twins)).decode,
                        _entry_decoder.decode, {**twins, **_REPLAY_CLASS},
                        next(t for t, cls in twins.items() if cls is NewOrder))


_entry_decoder = msgspec.msgpack.Decoder(_entry_tuple(str, _REPLAY_CLASS))
_entry_reports_decoder = msgspec.msgpack.Decoder(_EntryReports)
_report_rows_decoder = msgspec.msgpack.Decoder(list[tuple[str, int, bytes]])


def _report_rows(record) -> list[tuple[str, int, bytes]]:
    """The (member, seq, body) rows of an ENTRY or a REPORTS record; none for the others."""
    kind = record.kind
    if kind == KIND_ENTRY:
        return _entry_reports_decoder.decode(record.payload).reports
    if kind == KIND_REPORTS:
        return _report_rows_decoder.decode(record.payload)
    return []


_start_decoder = msgspec.msgpack.Decoder(StartRecord)


class _EntryOrigin(msgspec.Struct, array_like=True, gc=False):
    """An ENTRY's first two fields (array-like decoding ignores the rest)."""

    ts: int
    member: str


_entry_origin_decoder = msgspec.msgpack.Decoder(_EntryOrigin)


def _skip_first(batches: Iterator[tuple[mmap.mmap | bytes, list[int]]]) -> Iterator[tuple[mmap.mmap | bytes, list[int]]]:
    """The replay's batches without their first payload."""
    first = True
    for data, spans in batches:
        if first and spans:
            first = False
            spans = spans[2:]
        yield data, spans


class _SnapshotHead(msgspec.Struct, array_like=True, gc=False):
    """An engine snapshot's instruments and accounts, the rest left undecoded (Engine._state)."""

    version: int
    trading_day: str
    next_order_id: int
    next_trade_id: int
    refs: msgspec.Raw
    instruments: list[tuple[str, str, int, int, int | None, int, int]]
    accounts: list[tuple[str, bool, int, list[list[typing.Any]], list[list[typing.Any]], msgspec.Raw]]


_snapshot_head_decoder = msgspec.msgpack.Decoder(_SnapshotHead)


def _with_history(engine_state: bytes) -> tuple[list[str], list[str]]:
    """The instruments and members an engine snapshot has a history for: an instrument with
    market data or held by anyone, a member with reports or any balance."""
    try:
        head = _snapshot_head_decoder.decode(engine_state)
    except msgspec.MsgspecError:
        return [], []  # a snapshot of another version: Engine.restore says why it cannot use it
    held = set()
    members = []
    for member, _, seq, cash, holdings, _ in head.accounts:
        busy = [symbol for symbol, *amounts in holdings if any(amounts)]
        held.update(busy)
        if seq or busy or any(any(amounts) for _, *amounts in cash):
            members.append(member)
    instruments = [symbol for symbol, _, _, md_seq, *_ in head.instruments if md_seq or symbol in held]
    return instruments, members


def _check_kept(config: ExchangeConfig, instruments, members, where: str) -> None:
    """Refuse a configuration that leaves out an instrument or member the journal has."""
    symbols = {ins.symbol for ins in config.instruments}
    ids = {m.id for m in config.members}
    lost = [s for s in instruments if s not in symbols] + [m for m in members if m not in ids]
    if lost:
        raise LeftOutConfigError(f"the configuration leaves out {', '.join(lost)}, which {where}; their orders, "
                           f"trades and balances would vanish from the state. {_KEEP_THEM}")


class LeftOutConfigError(JournalError):
    """The configuration leaves out an instrument or member the journal has a history for: a
    problem of the configuration file (restarting with the same file cannot help)."""


_KEEP_THEM = "Start with a configuration that keeps them (docs/operations.md, Changing the configuration)"


def _what_differs(config: ExchangeConfig, head: StartRecord) -> str:
    """For the warning: the names added since START, else the settings (the digest covers the
    instruments' and members' entries, tokens included, and the market rules)."""
    if head.instruments is None or head.members is None:
        return "instruments, members or market rules (this journal's START does not list them)"
    added = [i.symbol for i in config.instruments if i.symbol not in head.instruments]
    added += [m.id for m in config.members if m.id not in head.members]
    if added:
        return f"added {', '.join(added)}" + " (and perhaps settings)"
    return "instrument or member settings (tokens included) or market rules"


def config_digest(config: ExchangeConfig) -> str:
    """SHA-256 of what decides replay: instruments, members and market rules."""
    enc = msgspec.msgpack.encode([config.instruments, config.members, config.market])
    return hashlib.sha256(enc).hexdigest()


class Ledger:
    """The engine with its journal: what the gateway drives. No asyncio inside."""

    def __init__(self) -> None:  # use Ledger.open
        raise TypeError("use Ledger.open(config, directory, ...)")

    @classmethod
    def open(cls, config: ExchangeConfig, directory: str | Path, *, durability: str = "fsync",
             today: str | None = None, snapshot_every: int = 100_000,
             on_durable: Callable[[int], None] | None = None,
             on_error: Callable[[BaseException], None] | None = None,
             segment_bytes: int = 64 << 20, file_ops: FileOps | None = None,
             switch_interval: float | None = SWITCH_INTERVAL) -> "Ledger":
        """Recover (newest valid snapshot + replay of the records after it), or create a new
        journal: trading day = config.market.first_trading_day or ``today``. A new journal also
        journals the initial funding and OpenMarket if config.open_on_start."""
        if snapshot_every <= 0:
            raise ValueError("snapshot_every must be positive")
        self = object.__new__(cls)
        self.config = config
        self.directory = Path(directory)
        self.snapshot_every = snapshot_every
        self._sync = durability == "fsync"
        self._encode = msgspec.msgpack.Encoder().encode
        self._currency = {ins.symbol: ins.currency for ins in config.instruments}
        self._idx_seq: dict[str, array] = {}
        self._idx_pos: dict[str, array] = {}
        # entries replayed at open but not yet indexed: (first position, last seq), see _ensure_index
        self._unindexed: tuple[int, int] | None = None
        # the last large record of reports decoded by _scan, by position: a 200k mass cancel's
        # reports take 10 records of 20,000, and decoding one again for each 1,024-report step
        # of each session's replay made the steps quadratic (30 ms each near its end)
        self._rows_at: tuple[int, list] = (-1, [])
        self._snap_queue: queue.Queue = queue.Queue()
        self._snap_thread: threading.Thread | None = None
        self._closed = False
        self.journal = Journal.open(self.directory, durability=durability, segment_bytes=segment_bytes,
                                    on_durable=on_durable, on_error=on_error, file_ops=file_ops,
                                    switch_interval=switch_interval)
        try:
            if self.journal.last_seq == 0:
                self.recovered = False
                self._create(today)
            else:
                self.recovered = True
                self._recover()
        except BaseException:
            self.journal.close()
            raise
        self._snap_thread = threading.Thread(target=self._snapshot_worker, name="kaboni-snapshots", daemon=True)
        self._snap_thread.start()
        return self

    # ------------------------------------------------------------------------------------------
    # Creation and recovery

    def _create(self, today: str | None) -> None:
        config = self.config
        day = config.market.first_trading_day or today
        if day is None:
            raise ValueError("a new journal needs a trading day: market.first_trading_day or today")
        self.engine = Engine(config, day)
        start = StartRecord(FORMAT_VERSION, day, config_digest(config), config.market.fee_account,
                            [ins.symbol for ins in config.instruments], [m.id for m in config.members])
        records = [(KIND_START, self._encode(start))]
        setup: list = []
        for m in config.members:
            if m.role != "member":
                continue
            if config.initial_cash:
                for currency in config.currencies:
                    setup.append(Deposit(f"init-cash-{m.id}-{currency}", m.id, currency, config.initial_cash))
            if config.initial_allowances:
                for ins in config.instruments:
                    setup.append(Deposit(f"init-allowances-{m.id}-{ins.symbol}", m.id, ins.symbol,
                                         config.initial_allowances))
        if config.open_on_start:
            setup.append(OpenMarket())
        # The start record and the set-up are one group: a crash leaves all of it or none.
        for command in setup:
            self.engine.execute(command, "", 0)
            records.append((KIND_ENTRY, self._encode(EntryRecord(0, "", 0, False, command, []))))
        self.journal.append_group(records)
        self.journal.sync()
        self._snap_seq = 0

    def _recover(self) -> None:
        journal = self.journal
        config = self.config
        first = next(journal.records(1, 1), None)
        if first is None:  # the segment that held record 1 is gone
            start = list_segments(self.directory)[0]
            raise CorruptJournalError(self.directory / segment_name(start), 0,
                                      f"the journal starts at seq {start}: record 1 (START) is missing")
        if first.kind != KIND_START:
            raise JournalError(f"record 1 of {self.directory} is not a START record")
        head = _start_decoder.decode(first.payload)
        if head.config_sha256 != config_digest(config):
            log.warning("the configuration differs from the one this journal was started with: %s",
                        _what_differs(config, head))
        _check_kept(config, head.instruments or (), head.members or (), "it was started with")
        start = None
        unusable = (JournalError, ValueError, KeyError, TypeError, msgspec.MsgspecError)
        for body in self._snapshots():
            try:
                at = next(iter(journal.read_at(body.position)), None)
                if at is None or at.seq != body.seq or at.kind != KIND_ENTRY:
                    raise ValueError(f"no ENTRY with seq {body.seq} at its position")
                if body.entry_crc >= 0 and crc32c(at.payload) != body.entry_crc:
                    raise ValueError(f"the ENTRY with seq {body.seq} is not the one it was taken after "
                                     "(a snapshot of another journal)")
            except unusable as exc:
                log.warning("snapshot at seq %d is unusable (%s); trying an older one", body.seq, exc)
                continue
            # this journal's own snapshot: refused outright if the configuration leaves out what
            # it has a history for (an older snapshot or a full replay would drop it without a word)
            _check_kept(config, *_with_history(body.engine), f"the snapshot at seq {body.seq} holds")
            try:
                engine = Engine.restore(config, body.engine)
            except LeftOutError as exc:
                raise LeftOutConfigError(f"{exc} (seq {body.seq}). {_KEEP_THEM}") from exc
            except unusable as exc:
                log.warning("snapshot at seq %d is unusable (%s); trying an older one", body.seq, exc)
                continue
            start = body
            break
        if start is not None:
            self.engine = engine
            for member, (seqs, positions) in start.index.items():
                a = array("q")
                a.frombytes(seqs)
                b = array("Q")  # written as int64 before: the same bytes for positions below 2^63
                b.frombytes(positions)
                self._idx_seq[member] = a
                self._idx_pos[member] = b
            records = journal.payload_spans(start.position, KIND_ENTRY)
            records = _skip_first(records)  # the snapshot's own entry
            replay_from = start.position
            self._snap_seq = start.seq
            log.info("restored snapshot at seq %d; replaying %d records", start.seq, journal.last_seq - start.seq)
        else:
            records = journal.payload_spans(first.position, KIND_ENTRY)
            replay_from = first.position
            self.engine = Engine(config, head.trading_day)
            self._snap_seq = 0
        try:
            count = self._replay(records)
        finally:
            journal.drop_scanned()
        journal.index_missing()
        if count:
            # index the replayed entries on first need (reports, snapshot), not on the restart path
            self._unindexed = (replay_from, journal.last_seq)

    def _snapshots(self) -> Iterator[SnapshotBody]:
        last = self.journal.last_seq
        for seq in list_snapshots(self.directory):
            if seq > last:
                # Another journal's future (a copy that took the segments before the original wrote
                # this snapshot): once this journal's own records reach that seq, its seq and
                # position could pass for theirs and restore the other state, and it would count
                # among the newest two snapshots kept. Set it aside under a name nothing reads.
                name = snapshot_name(seq)
                try:
                    os.replace(self.directory / name, self.directory / (name + BEYOND_END))
                    what = f"set aside as {name + BEYOND_END}"
                except OSError as exc:
                    raise JournalError(f"cannot set aside {name}, beyond the journal's end ({last}): {exc}") from exc
                # A snapshot is written only once the journal is durable through its seq, so in
                # the exchange's own directory this means records last+1..seq, once confirmed, are
                # gone (a lost newest segment, a storage fault at the end of the journal); in a
                # copy taken while the exchange ran it is expected (docs/operations.md, Back up).
                # The files cannot tell the two apart: say both, loudly.
                log.error("snapshot at seq %d is beyond the journal's end (%d); %s. In a copy taken while the "
                          "exchange ran this is expected; in the exchange's own data directory records %d to %d, "
                          "confirmed before the snapshot was written, are missing: stop and restore them from "
                          "the backup (docs/operations.md, Recover)", seq, last, what, last + 1, seq)
                continue
            body = read_snapshot(self.directory / snapshot_name(seq))
            if body is not None:
                yield body

    def _replay(self, batches: Iterator[tuple[mmap.mmap | bytes, list[int]]]) -> int:
        """Run the journaled commands (ENTRY payloads, per segment) through the engine; returns
        how many.

        The engine builds no order events meanwhile (``Engine.events``): the reports are in
        the journal as they were sent, and only the state is wanted here."""
        engine = self.engine
        config = self.config
        types = _replay_types(tuple(ins.symbol for ins in config.instruments),
                              ("", *(m.id for m in config.members)))
        count = 0
        engine.events = False
        try:
            for data, spans in batches:
                count += run_entries(engine, data, spans, types.decode, types.fallback, types.classes,
                                     types.new_order)
        except LeftOutError as exc:
            raise LeftOutConfigError(f"{exc}; their orders, trades and balances would vanish from the state. "
                               f"{_KEEP_THEM}") from exc
        except KeyError as exc:  # a journal from before Restarted named the configuration's members
            raise LeftOutConfigError(f"a journaled command names {exc}, which the configuration leaves out; its "
                               f"orders, trades and balances would vanish from the state. {_KEEP_THEM}") from exc
        finally:
            engine.events = True
        return count

    def _ensure_index(self) -> None:
        """Index the entries replayed at open (once): they go between the snapshot's index
        and whatever ``execute`` has indexed since."""
        if self._unindexed is None:
            return
        start, through = self._unindexed
        live_seq, live_pos = self._idx_seq, self._idx_pos
        self._idx_seq = {m: a[:0] for m, a in live_seq.items()}
        self._idx_pos = {m: a[:0] for m, a in live_pos.items()}
        # the snapshot's part, then the replayed range, then the live part
        for m in live_seq:
            seqs, positions = live_seq[m], live_pos[m]
            cut = bisect_right(positions, start)
            self._idx_seq[m].extend(seqs[:cut])
            self._idx_pos[m].extend(positions[:cut])
        for rec in self.journal.read_at(start):
            if rec.seq > through:
                break
            if rec.position > start:  # the snapshot's own entry is indexed already
                rows = _report_rows(rec)
                if rows:
                    self._index(rows, rec.position)
        for m in live_seq:
            seqs, positions = live_seq[m], live_pos[m]
            cut = bisect_right(positions, start)
            self._idx_seq.setdefault(m, array("q")).extend(seqs[cut:])
            self._idx_pos.setdefault(m, array("Q")).extend(positions[cut:])
        self._unindexed = None

    # ------------------------------------------------------------------------------------------
    # The order path

    @property
    def last_seq(self) -> int:
        return self.journal.last_seq

    @property
    def durable_seq(self) -> int:
        return self.journal.durable_seq

    @property
    def stats(self) -> JournalStats:
        return self.journal.stats

    def execute(self, command, member: str, ts: int, session: int = 0,
                throttled: bool = False) -> tuple[int, list, list[tuple[str, bytes]]]:
        """Run the command through the engine and append it to the journal. Returns (journal
        seq of the entry, events, [(member, report body)]); QueryBalances and commands with no
        events at all are not journaled and return seq = last_seq, except ``Restarted``, which
        always is: it records the configuration's names for later replays."""
        failed = self.journal.failed
        if failed is not None:  # the engine may be ahead of its journal: run nothing more
            raise JournalFailedError(f"journal failed: {failed!r}") from failed
        engine = self.engine
        day = engine.trading_day  # before the command: an EndOfDay has no fills
        events = engine.execute(command, member, ts, session, throttled)
        if (not events and type(command) is not Restarted) or type(command) is QueryBalances:
            return self.journal.last_seq, events, []
        try:
            seq, reports, end_of_day = self._journal_events(command, member, ts, session, throttled, day, events)
        except BaseException as exc:
            self._fail(exc)
            raise
        if end_of_day or seq - self._snap_seq >= self.snapshot_every:
            self.snapshot()
        return seq, events, reports

    def last_sent_ts(self, window: int = 1_000) -> int | None:
        """The ``ts`` of the newest journaled command a member or an operator sent, among the
        last ``window`` records: the trading schedule counts the edges it missed from there.
        The gateway's own commands (``Restarted``, the schedule's) have no member and are
        skipped, so a crash between a restart's ``Restarted`` and the schedule's catching up
        loses nothing; re-running an edge the schedule had carried out changes nothing. None
        if there is none (a new journal's set-up has no member either)."""
        journal = self.journal
        ts = None
        for record in journal.records(max(1, journal.last_seq - window + 1), kind=KIND_ENTRY):
            origin = _entry_origin_decoder.decode(record.payload)
            if origin.member:
                ts = origin.ts
        return ts

    def _fail(self, exc: BaseException) -> None:
        """The engine has run a command that is not (wholly) journaled: stop, as on a failed
        write. Nothing more runs or is reported durable, ``on_error`` tells the gateway, and a
        restart recovers the state from what the journal holds."""
        if self.journal.failed is None:
            self.journal._fail(exc)

    def _journal_events(self, command, member: str, ts: int, session: int, throttled: bool, day: str,
                        events: list) -> tuple[int, list[tuple[str, bytes]], bool]:
        """Append the command's entry, its fills' settlement records and its reports; index
        them. Returns (seq of the entry, [(member, report body)], whether the day ended)."""
        encode = self._encode
        rows: list[tuple[str, int, bytes]] = []
        records: list[tuple[int, bytes]] = []
        taker = None
        end_of_day = False
        report_types = _REPORT_TYPES
        for ev in events:
            t = type(ev)
            if t in report_types:
                rows.append((ev.member, ev.seq, encode(ev)))
                if t is Fill:
                    if taker is None:
                        taker = ev
                    else:
                        buy, sell = (taker, ev) if taker.side == "buy" else (ev, taker)
                        # a FillRecord's fields in order (array_like): no Struct to build
                        records.append((KIND_FILL, encode((
                            day, ev.trade_id, ev.instrument, self._currency[ev.instrument], ev.price, ev.qty,
                            buy.member, sell.member, buy.fee, sell.fee, buy.order_id, sell.order_id,
                            taker.side, ts))))
                        taker = None
            elif t is DayEnded:
                end_of_day = True
        reports = [(m, body) for m, _, body in rows]
        journal = self.journal
        chunked = len(rows) > REPORTS_PER_RECORD
        if chunked:  # the rest of the reports go before the entry, in order
            last = (len(rows) - 1) // REPORTS_PER_RECORD * REPORTS_PER_RECORD
            for i in range(0, last, REPORTS_PER_RECORD):
                records.append((KIND_REPORTS, encode(rows[i:i + REPORTS_PER_RECORD])))
            entry_rows = rows[last:]
        else:
            entry_rows = rows
        # an EntryRecord's fields in order (array_like)
        entry = encode((ts, member, session, throttled, command, entry_rows))
        if records:
            records.append((KIND_ENTRY, entry))
            seq = journal.append_group(records)
        else:
            seq = journal.append(KIND_ENTRY, entry)  # no fills: a group of one, the fast path
        if chunked:  # reports reads on from the group's first record
            self._index(rows, journal.last_group_position)
        elif rows:
            member0, seq0, _ = rows[0]
            seqs = self._idx_seq.get(member0)
            position = journal.last_position
            # the common case: one member's reports, not yet a new index entry (see _index)
            if not (seqs and seq0 - seqs[-1] < INDEX_STEP and position - self._idx_pos[member0][-1] < INDEX_GAP
                    and (len(rows) == 1 or all(r[0] == member0 for r in rows))):
                self._index(rows, position)
        return seq, reports, end_of_day

    def _index(self, rows, position: int) -> None:
        """Note the entry's position for each member whose reports reach a new index step, or
        that comes ``INDEX_GAP`` bytes (or a segment) after the member's last index entry.

        A position is ``segment << 32 | offset``: the difference of two positions is never
        less than the bytes between them (across segments, 4 GiB minus the first one's offset)."""
        seen = None
        for member, seq, _ in rows:
            if seen is not None and member in seen:
                continue
            seqs = self._idx_seq.get(member)
            if seqs is None:
                seqs = self._idx_seq[member] = array("q")
                positions = self._idx_pos[member] = array("Q")  # positions: up to 2^64 (see docs/journal.md)
            else:
                positions = self._idx_pos[member]
            if not seqs or seq - seqs[-1] >= INDEX_STEP or position - positions[-1] >= INDEX_GAP:
                seqs.append(seq)
                positions.append(position)
            if seen is None:
                seen = {member}
            else:
                seen.add(member)

    def reports(self, member: str, after_seq: int, through_seq: int) -> Iterator[bytes]:
        """Bodies of the member's reports with after_seq < seq <= through_seq, in order, read
        from the journal through the sparse per-member index (durable entries only)."""
        return self._scan(member, after_seq, through_seq, None, None, None)

    def report_step(self, member: str, after_seq: int, through_seq: int, max_bytes: int,
                    resume: tuple[str, int, int] | None = None,
                    scan_bytes: int = SCAN_BYTES) -> tuple[list[bytes], tuple[str, int, int] | None]:
        """One bounded step of a paced read of the member's reports (a resume replay): the
        bodies after ``after_seq`` in order, through ``through_seq`` at most, stopping once they
        total ``max_bytes`` or once about ``scan_bytes`` of the journal have been read, even if
        that found none (a gap between two of its reports that the index does not cover: one
        older than ``INDEX_GAP``). Returns (bodies, resume): pass ``resume`` to the step after
        ``after_seq + len(bodies)``, which then reads on where this one stopped (a ``resume``
        for another member or seq is ignored)."""
        if scan_bytes <= 0:
            raise ValueError("scan_bytes must be positive")
        start = None
        if resume is not None and resume[0] == member and resume[1] == after_seq:
            start = resume[2]
        where = [start]
        bodies: list[bytes] = []
        size = 0
        scan = self._scan(member, after_seq, through_seq, start, scan_bytes, where)
        try:
            for body in scan:
                bodies.append(body)
                size += len(body)
                if size >= max_bytes:
                    break
        finally:
            scan.close()  # its file now, not when it is collected
        if where[0] is None:
            return bodies, None
        return bodies, (member, after_seq + len(bodies), where[0])

    def _scan(self, member: str, after_seq: int, through_seq: int, start: int | None, budget: int | None,
              where: list | None) -> Iterator[bytes]:
        """The member's report bodies after ``after_seq`` through ``through_seq``, read from
        the index entry at or before the first one wanted (or from ``start``, a record's
        position after which they are, if that is later). Whenever the next wanted seq has an
        index entry further on, the read jumps there rather than walk the records in between.
        With ``budget``: stops before a record once about that many bytes were read. ``where``
        [0] is kept at the position of the record being looked at (read on from there)."""
        self._ensure_index()
        seqs = self._idx_seq.get(member)
        if not seqs or through_seq <= after_seq:
            return
        positions = self._idx_pos[member]
        n = len(seqs)
        want = after_seq + 1
        key = self._encode(member)  # an entry without these bytes holds none of its reports
        k = max(0, bisect_right(seqs, want) - 1)
        pos = positions[k] if start is None or start < positions[k] else start
        nxt = k + 1  # the next index entry not yet passed
        scanned = 0
        journal = self.journal
        report_kinds = (KIND_ENTRY, KIND_REPORTS)
        while True:
            jump = -1
            for rec in journal.read_at(pos, chunk=_SCAN_CHUNK):
                p = rec.position
                while nxt < n and positions[nxt] <= p:
                    nxt += 1
                if nxt < n and seqs[nxt] <= want:
                    # the next wanted report is at an index entry ahead: skip to it
                    k = bisect_right(seqs, want) - 1
                    jump = positions[k]
                    nxt = k + 1
                    scanned += _JUMP_BYTES
                    break
                if where is not None:
                    where[0] = p
                payload = rec.payload
                if budget is not None:
                    if scanned >= budget:
                        return
                    scanned += len(payload) + FRAME_SIZE
                if rec.kind not in report_kinds or key not in payload:
                    continue
                if p == self._rows_at[0]:
                    rows = self._rows_at[1]
                else:
                    rows = _report_rows(rec)
                    if len(rows) >= _KEEP_ROWS:  # a burst's record: the paced replay's next steps read it again
                        self._rows_at = (p, rows)
                for m, seq, body in rows:
                    if m == member and seq >= want:
                        if seq > through_seq:
                            return
                        yield body
                        if seq == through_seq:
                            return
                        want = seq + 1
            if jump < 0:
                return
            pos = jump

    # ------------------------------------------------------------------------------------------
    # Snapshots

    def snapshot(self) -> None:
        """Write a snapshot of the state after the last appended entry.

        The state is captured now; a background thread writes the file once the journal is
        durable through that entry, so a snapshot never gets ahead of the journal on disk.
        """
        journal = self.journal
        seq = journal.last_seq
        if seq == self._snap_seq or seq <= 1:
            return  # nothing new; or only the START record, and a snapshot stands on an ENTRY
        body = self._snapshot_body()
        self._snap_seq = seq
        self._snap_queue.put(body)

    def _snapshot_body(self) -> SnapshotBody:
        self._ensure_index()
        journal = self.journal
        index = {m: (self._idx_seq[m].tobytes(), self._idx_pos[m].tobytes()) for m in self._idx_seq}
        return SnapshotBody(journal.last_seq, journal.last_position, self.engine.trading_day,
                            self.engine.snapshot(), INDEX_STEP, index)

    def _snapshot_worker(self) -> None:
        q = self._snap_queue
        while True:
            body = q.get()
            try:
                # snapshots asked for faster than they are written: only the newest matters
                while body is not None:
                    try:
                        newer = q.get_nowait()
                    except queue.Empty:
                        break
                    q.task_done()
                    if newer is None:
                        q.put(None)  # stop after writing this one
                        break
                    body = newer
                if body is None:
                    return
                if not self.journal.wait_durable(body.seq):
                    log.warning("snapshot at seq %d dropped: the journal did not make it durable", body.seq)
                    continue
                at = next(iter(self.journal.read_at(body.position)), None)
                if at is None or at.seq != body.seq:  # cannot happen: the entry was just made durable
                    log.warning("snapshot at seq %d dropped: its entry is not at its position", body.seq)
                    continue
                body.entry_crc = crc32c(at.payload)
                try:
                    write_snapshot(self.directory, body, self._sync)
                    prune_snapshots(self.directory)
                except Exception:  # noqa: BLE001 - the thread must live on: later snapshots, wait_snapshots
                    log.exception("writing the snapshot at seq %d failed", body.seq)
            finally:
                self._snap_queue.task_done()

    def wait_snapshots(self) -> None:
        """Block until every snapshot asked for so far is written (or dropped)."""
        self._snap_queue.join()

    def close(self) -> None:
        """Snapshot if anything changed, flush and sync, stop the writer and snapshot threads."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.journal.failed is None:
                self.snapshot()
        finally:
            self._snap_queue.put(None)
            if self._snap_thread is not None:
                self._snap_thread.join()
            self.journal.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
