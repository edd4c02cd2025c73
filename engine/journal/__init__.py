"""The settlement journal: a durable, checksummed, group-committed log of every command and
fill, snapshots of the engine, and the ``Ledger`` that puts the engine and its journal together.
"""

from ._format import (
    FORMAT_VERSION, KIND_ENTRY, KIND_FILL, KIND_REPORTS, KIND_START, EntryRecord, FillRecord, Record, StartRecord,
)
from ._ledger import INDEX_GAP, INDEX_STEP, SCAN_BYTES, Ledger, LeftOutConfigError, config_digest
from ._settle import settlement_report
from ._log import (
    DURABILITY_MODES, CorruptJournalError, FileOps, Journal, JournalError, JournalFailedError, JournalLockedError,
    JournalStats,
    ScanResult, list_segments, read_records, scan_journal,
)

__all__ = [
    "Ledger", "LeftOutConfigError", "INDEX_STEP", "INDEX_GAP", "SCAN_BYTES", "config_digest", "settlement_report",
    "Journal", "JournalStats", "JournalError", "CorruptJournalError", "JournalFailedError",
    "JournalLockedError", "FileOps",
    "DURABILITY_MODES", "Record", "ScanResult", "list_segments", "read_records", "scan_journal",
    "FORMAT_VERSION", "KIND_START", "KIND_FILL", "KIND_ENTRY", "KIND_REPORTS", "StartRecord", "FillRecord", "EntryRecord",
]
