"""The gateway over real sockets: orders, reports after durability, replay, market data."""

import asyncio

import pytest

from engine import CancelOrder, NewOrder, QueryBalances
from gateway.client import Client, LogonError

from _fakes import ThreadServer, make_config


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.fixture
def server(tmp_path):
    with ThreadServer(make_config(), tmp_path / "data") as s:
        yield s


async def logon(port, member, **kw):
    c = await Client.connect("127.0.0.1", port)
    await c.logon(member, kw.pop("token", f"{member}-token"), **kw)
    return c


def test_two_members_cross(server):
    async def main():
        a = await logon(server.port, "M01")
        b = await logon(server.port, "M02")
        md = await logon(server.port, "M03")
        await md.subscribe(["CEA25"])
        snap = await md.next_market()
        assert snap["type"] == "BookSnapshot" and snap["bids"] == [] and snap["status"] == "open"
        await a.send(NewOrder("s1", "CEA25", "sell", 100, 9300))
        acc = await a.next_report()
        assert acc["type"] == "OrderAccepted" and acc["seq"] == a.logon_reply["next_seq"]
        await b.send(NewOrder("b1", "CEA25", "buy", 60, 9400))
        r = [await b.next_report(), await b.next_report()]
        assert [x["type"] for x in r] == ["OrderAccepted", "Fill"]
        assert r[1]["liquidity"] == "taker" and r[1]["price"] == 9300 and r[1]["qty"] == 60 and r[1]["leaves_qty"] == 0
        fa = await a.next_report()
        assert fa["type"] == "Fill" and fa["liquidity"] == "maker" and fa["price"] == 9300 and fa["leaves_qty"] == 40
        assert fa["trade_id"] == r[1]["trade_id"]
        types = [(await md.next_market())["type"] for _ in range(2)]
        assert types[0] == "BookUpdate"  # the resting sell
        assert types[1] == "Trade"
        book = await md.next_market()
        assert book["type"] == "BookUpdate" and book["qty"] == 40 and book["price"] == 9300
        bal_b = await b.request(QueryBalances())
        assert bal_b["allowances"]["CEA25"]["unsettled"] == 60
        assert bal_b["cash"]["CNY"]["total"] == 1_000_000_000 - 60 * 9300
        bal_a = await a.request(QueryBalances())
        assert bal_a["allowances"]["CEA25"]["reserved"] == 40
        assert bal_a["cash"]["CNY"]["available"] == 1_000_000_000 + 60 * 9300
        for c in (a, b, md):
            await c.logout()
    run(main())
