"""The end-of-day settlement report, computed from FILL records alone (no engine needed)."""

from __future__ import annotations

from pathlib import Path

import msgspec

from .._messages import SettlementLine
from ._format import KIND_FILL, KIND_START, FillRecord, StartRecord
from ._log import read_records

__all__ = ["settlement_report"]

_fill_decoder = msgspec.msgpack.Decoder(FillRecord)


def settlement_report(directory: str | Path, day: str) -> list[SettlementLine]:
    """Per member and instrument: bought, sold, paid, received, fees and net obligations for the
    trading day ``day``, then the fee account's line per instrument. For each instrument the
    net quantities sum to zero, and so do the net cash figures with the fee account's."""
    fee_account = "EXCHANGE"
    lines: dict[tuple[str, str], SettlementLine] = {}
    fees: dict[str, tuple[str, int]] = {}
    decode = _fill_decoder.decode

    def line(member: str, f: FillRecord) -> SettlementLine:
        key = (f.instrument, member)
        ln = lines.get(key)
        if ln is None:
            ln = lines[key] = SettlementLine(member, f.instrument, f.currency, 0, 0, 0, 0, 0, 0, 0)
        return ln

    for rec in read_records(directory):
        if rec.kind == KIND_START:
            fee_account = msgspec.msgpack.decode(rec.payload, type=StartRecord).fee_account
            continue
        if rec.kind != KIND_FILL:
            continue
        f = decode(rec.payload)
        if f.trading_day != day:
            continue
        value = f.price * f.qty
        b = line(f.buyer, f)
        b.bought += f.qty
        b.paid += value
        b.fees += f.buyer_fee
        s = line(f.seller, f)
        s.sold += f.qty
        s.received += value
        s.fees += f.seller_fee
        currency, total = fees.get(f.instrument, (f.currency, 0))
        fees[f.instrument] = (currency, total + f.buyer_fee + f.seller_fee)
    out = []
    for key in sorted(lines):
        ln = lines[key]
        ln.net_qty = ln.bought - ln.sold
        ln.net_cash = ln.received - ln.paid - ln.fees
        out.append(ln)
    for instrument in sorted(fees):
        currency, total = fees[instrument]
        if total:
            out.append(SettlementLine(fee_account, instrument, currency, 0, 0, 0, 0, 0, 0, total))
    out.sort(key=lambda ln: (ln.instrument, ln.member == fee_account, ln.member))
    return out
