"""Every command the engine takes and every event it returns, as msgspec Structs.

The wire schema is the type: member-facing messages are tagged by ``type`` exactly as in
``shared/spec/protocol.md``, so the gateway decodes client frames straight into these commands
and encodes these events straight into report frames. Fields are only ever added, with defaults.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union, get_args

import msgspec
from msgspec import UNSET, Meta, UnsetType

__all__ = [
    # enumerations
    "Side", "Tif", "Stp", "Liquidity", "Status", "RejectReason", "CancelReason",
    "AdminRejectReason", "ErrorReason",
    # member commands
    "NewOrder", "CancelOrder", "ReplaceOrder", "MassCancel", "QueryBalances",
    # operator commands
    "Halt", "Resume", "OpenMarket", "CloseMarket", "EndOfDay", "SuspendMember",
    "ReinstateMember", "Deposit", "Withdraw",
    # gateway-originated commands
    "SessionEnded", "Restarted",
    # reports
    "OrderAccepted", "OrderRejected", "Fill", "OrderCancelled", "OrderReplaced",
    "CancelRejected", "MassCancelDone",
    # replies
    "AdminAck", "AdminRejected", "Balances", "CashBalance", "AllowanceBalance",
    # market data
    "BookSnapshot", "BookUpdate", "Trade", "InstrumentStatus",
    # end of day
    "DayEnded", "SettlementLine",
    # unions
    "Command", "MemberCommand", "OperatorCommand", "Report", "MarketData", "Event",
    "MEMBER_COMMANDS", "OPERATOR_COMMANDS", "ORDER_COMMANDS", "REPORTS",
]

Side = Literal["buy", "sell"]
Tif = Literal["day", "gtc", "ioc", "fok"]
Stp = Literal["cancel_incoming", "cancel_resting", "cancel_both"]
Liquidity = Literal["maker", "taker"]
Status = Literal["open", "halted", "closed"]
RejectReason = Literal[
    "unknown_instrument", "invalid_qty", "invalid_price", "price_out_of_band",
    "qty_out_of_range", "insufficient_allowances", "insufficient_funds", "holding_limit",
    "duplicate_cl_ord_id", "unknown_order", "market_closed", "instrument_halted", "throttled",
    "member_suspended",
]
CancelReason = Literal[
    "requested", "ioc", "fok", "self_trade", "disconnect", "expired", "mass_cancel", "halt",
    "suspended",
]
AdminRejectReason = Literal[
    "invalid_state", "unknown_member", "unknown_instrument", "insufficient_funds",
    "insufficient_allowances",
]
ErrorReason = Literal["bad_frame", "invalid_message", "not_logged_on", "not_authorized"]

ClOrdId = Annotated[str, Meta(min_length=1, max_length=32, pattern="^[\x20-\x7e]+$")]


class _Message(msgspec.Struct, tag_field="type", tag=True, gc=False):
    """Base of every tagged message; the tag is the class name."""


# ---------------------------------------------------------------------------------------------
# Member commands (C->S order entry)


class NewOrder(_Message):
    cl_ord_id: ClOrdId
    instrument: str
    side: Side
    qty: int
    price: int | None
    tif: Tif | None = None
    stp: Stp = "cancel_incoming"


class CancelOrder(_Message):
    cl_ord_id: ClOrdId
    orig_cl_ord_id: str


class ReplaceOrder(_Message):
    cl_ord_id: ClOrdId
    orig_cl_ord_id: str
    qty: int
    price: int


class MassCancel(_Message):
    cl_ord_id: ClOrdId
    instrument: str | None = None
    side: Side | None = None


class QueryBalances(_Message):
    pass


# ---------------------------------------------------------------------------------------------
# Operator commands


class Halt(_Message):
    instrument: str
    cancel_orders: bool = False


class Resume(_Message):
    instrument: str


class OpenMarket(_Message):
    pass


class CloseMarket(_Message):
    pass


class EndOfDay(_Message):
    pass


class SuspendMember(_Message):
    member: str


class ReinstateMember(_Message):
    member: str


class Deposit(_Message):
    ref: Annotated[str, Meta(min_length=1, max_length=64)]
    member: str
    asset: str
    amount: Annotated[int, Meta(gt=0)]


class Withdraw(_Message):
    ref: Annotated[str, Meta(min_length=1, max_length=64)]
    member: str
    asset: str
    amount: Annotated[int, Meta(gt=0)]


# ---------------------------------------------------------------------------------------------
# Commands the gateway itself issues (never sent by clients)


class SessionEnded(_Message):
    """A connection ended: cancel the resting orders it entered with cancel_on_disconnect."""

    session: int


class Restarted(_Message):
    """The server restarted: every connection ended, so cancel every cancel_on_disconnect order.

    ``instruments`` and ``members`` are the configuration's at that start: a later replay under
    a configuration without one of them is refused (``LeftOutError``), because the records after
    this one may use it (None in journals from before they were recorded)."""

    instruments: list[str] | None = None
    members: list[str] | None = None


# ---------------------------------------------------------------------------------------------
# Reports: sequenced per member, journaled, replayed identically on resume.
# ``member`` is an addition to the protocol (documented in docs/protocol.md): it names the
# member the report belongs to, so that a report is self-describing in the journal.


class OrderAccepted(_Message):
    seq: int
    ts: int
    member: str
    cl_ord_id: str
    order_id: int
    instrument: str
    side: Side
    qty: int
    price: int | None
    tif: Tif


class OrderRejected(_Message):
    seq: int
    ts: int
    member: str
    cl_ord_id: str
    reason: RejectReason
    text: str


class Fill(_Message):
    seq: int
    ts: int
    member: str
    cl_ord_id: str
    order_id: int
    trade_id: int
    instrument: str
    side: Side
    price: int
    qty: int
    leaves_qty: int
    liquidity: Liquidity
    fee: int


class OrderCancelled(_Message):
    seq: int
    ts: int
    member: str
    cl_ord_id: str
    order_id: int
    orig_cl_ord_id: str
    cancelled_qty: int
    leaves_qty: int
    reason: CancelReason


class OrderReplaced(_Message):
    seq: int
    ts: int
    member: str
    cl_ord_id: str
    order_id: int
    orig_cl_ord_id: str
    qty: int
    price: int
    leaves_qty: int


class CancelRejected(_Message):
    seq: int
    ts: int
    member: str
    cl_ord_id: str
    orig_cl_ord_id: str | None
    reason: RejectReason
    text: str


class MassCancelDone(_Message):
    seq: int
    ts: int
    member: str
    cl_ord_id: str
    cancelled: int


# ---------------------------------------------------------------------------------------------
# Unsequenced replies to the requesting session


class AdminAck(_Message, omit_defaults=True):
    """Echoes the request's type and fields; UNSET fields are left off the wire."""

    request: str
    instrument: str | UnsetType = UNSET
    cancel_orders: bool | UnsetType = UNSET
    member: str | UnsetType = UNSET
    ref: str | UnsetType = UNSET
    asset: str | UnsetType = UNSET
    amount: int | UnsetType = UNSET
    duplicate: bool | UnsetType = UNSET
    trading_day: str | UnsetType = UNSET


class AdminRejected(_Message):
    request: str
    reason: AdminRejectReason
    text: str


class CashBalance(msgspec.Struct, gc=False):
    total: int
    reserved: int
    available: int
    withdrawable: int


class AllowanceBalance(msgspec.Struct, gc=False):
    settled: int
    unsettled: int
    reserved: int
    available: int


class Balances(_Message):
    cash: dict[str, CashBalance]
    allowances: dict[str, AllowanceBalance]


# ---------------------------------------------------------------------------------------------
# Market data: anonymous, gap-free md_seq per instrument


class BookSnapshot(_Message):
    instrument: str
    md_seq: int
    bids: list[tuple[int, int, int]]
    asks: list[tuple[int, int, int]]
    last_price: int | None
    reference_price: int
    status: Status


class BookUpdate(_Message):
    instrument: str
    md_seq: int
    side: Side
    price: int
    qty: int
    orders: int


class Trade(_Message):
    instrument: str
    md_seq: int
    trade_id: int
    price: int
    qty: int
    aggressor: Side
    ts: int


class InstrumentStatus(_Message):
    instrument: str
    md_seq: int
    status: Status
    reference_price: int


# ---------------------------------------------------------------------------------------------
# End of day


class SettlementLine(msgspec.Struct, array_like=True, gc=False):
    """One member's (or the fee account's) settlement for one instrument and trading day."""

    member: str
    instrument: str
    currency: str
    bought: int
    sold: int
    paid: int
    received: int
    fees: int
    net_qty: int
    net_cash: int


class DayEnded(_Message):
    """Internal event of ``EndOfDay``: the closed day's prices and settlement report."""

    trading_day: str
    next_trading_day: str
    closing_prices: dict[str, int]
    settlement: list[SettlementLine]


MemberCommand = Union[NewOrder, CancelOrder, ReplaceOrder, MassCancel, QueryBalances]
OperatorCommand = Union[
    Halt, Resume, OpenMarket, CloseMarket, EndOfDay, SuspendMember, ReinstateMember, Deposit,
    Withdraw,
]
Command = Union[MemberCommand, OperatorCommand, SessionEnded, Restarted]
Report = Union[
    OrderAccepted, OrderRejected, Fill, OrderCancelled, OrderReplaced, CancelRejected,
    MassCancelDone,
]
MarketData = Union[BookUpdate, Trade, InstrumentStatus]
Event = Union[Report, MarketData, AdminAck, AdminRejected, Balances, DayEnded]

REPORTS = get_args(Report)  # the sequenced messages, for isinstance and membership tests
MEMBER_COMMANDS = (NewOrder, CancelOrder, ReplaceOrder, MassCancel, QueryBalances)
ORDER_COMMANDS = (NewOrder, CancelOrder, ReplaceOrder, MassCancel)
OPERATOR_COMMANDS = (
    Halt, Resume, OpenMarket, CloseMarket, EndOfDay, SuspendMember, ReinstateMember, Deposit,
    Withdraw,
)
