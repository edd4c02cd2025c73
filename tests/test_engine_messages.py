"""The wire schema is the type: what the message Structs accept and refuse, and QueryBalances."""

from __future__ import annotations

import msgspec
import pytest

from engine import Balances, CashBalance, AllowanceBalance, Command, NewOrder, QueryBalances
from engine_support import Market

decoder = msgspec.msgpack.Decoder(Command)


def roundtrip(**fields):
    return decoder.decode(msgspec.msgpack.encode(fields))


def test_new_order_defaults():
    cmd = roundtrip(type="NewOrder", cl_ord_id="a", instrument="CEA", side="buy", qty=10, price=None)
    assert cmd == NewOrder("a", "CEA", "buy", 10, None, None, "cancel_incoming")
    # nil where the default is "none given" means just that (docs/protocol.md)
    assert roundtrip(type="NewOrder", cl_ord_id="a", instrument="CEA", side="buy", qty=10, price=None, tif=None) == cmd
    assert roundtrip(type="MassCancel", cl_ord_id="m", instrument=None, side=None) == roundtrip(type="MassCancel",
                                                                                                cl_ord_id="m")


def test_new_order_price_is_required():
    """``price`` has no default on the shared page: nil is a market order, a missing key is a
    malformed message (a client that forgot it must not send a market order by accident)."""
    with pytest.raises(msgspec.ValidationError, match="missing required field `price`"):
        roundtrip(type="NewOrder", cl_ord_id="a", instrument="CEA", side="buy", qty=10)


@pytest.mark.parametrize("fields", [
    {"side": "up"},
    {"qty": 1.5},
    {"price": 9_250.0},
    {"cl_ord_id": ""},
    {"cl_ord_id": "x" * 33},
    {"cl_ord_id": "caf\u00e9"},
    {"cl_ord_id": "tab\there"},
    {"tif": "gfd"},
    {"stp": "none"},
    {"qty": "10"},
])
def test_new_order_malformed_fields_are_refused(fields):
    base = dict(type="NewOrder", cl_ord_id="a", instrument="CEA", side="buy", qty=10, price=9_250)
    base.update(fields)
    with pytest.raises(msgspec.ValidationError):
        decoder.decode(msgspec.msgpack.encode(base))


def test_any_integer_qty_and_price_is_well_formed():
    """Their values are judged by the order checks, never by the schema."""
    cmd = roundtrip(type="NewOrder", cl_ord_id="a", instrument="CEA", side="buy", qty=-5, price=0)
    assert (cmd.qty, cmd.price) == (-5, 0)
    assert roundtrip(type="NewOrder", cl_ord_id="a" * 32, instrument="X", side="sell", qty=2**40, price=1).qty == 2**40


def test_unknown_type_and_extra_keys():
    with pytest.raises(msgspec.ValidationError):
        roundtrip(type="Nope")
    cmd = roundtrip(type="CancelOrder", cl_ord_id="c", orig_cl_ord_id="a", extra=1)
    assert cmd.orig_cl_ord_id == "a"


def test_query_balances():
    m = Market(cash=1_000, allowances=0)
    m.sell("M2", "none", 2, 9_255)  # no allowances: rejected, nothing changes
    assert m.run("M1", QueryBalances()) == [Balances(
        {"CNY": CashBalance(1_000, 0, 1_000, 1_000), "EUR": CashBalance(1_000, 0, 1_000, 1_000)},
        {"CEA": AllowanceBalance(0, 0, 0, 0), "EUA": AllowanceBalance(0, 0, 0, 0)},
    )]
    assert m.seq("M1") == 0  # an unsequenced reply
