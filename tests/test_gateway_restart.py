"""A real server process: SIGTERM drains, SIGKILL under load loses nothing acknowledged."""

import asyncio
import signal

from engine import NewOrder
from gateway.client import Client, ConnectionClosed

from _fakes import ProcessServer, free_port, write_config_toml


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 90))


async def logon(port, member, **kw):
    c = await Client.connect("127.0.0.1", port)
    await c.logon(member, f"{member}-token", **kw)
    return c


async def drain_reports(c, timeout=0.5):
    out = []
    while True:
        try:
            out.append(await c.next_report(timeout))
        except (asyncio.TimeoutError, ConnectionClosed):
            return out


async def replay_all(port, member):
    c = await logon(port, member, resume_from=0)
    n = c.logon_reply["next_seq"] - 1
    got = [await c.next_report() for _ in range(n)]
    assert [r["seq"] for r in got] == list(range(1, n + 1))
    return c, got


async def book(c, sym):
    await c.subscribe([sym], depth=50)
    return await c.next_market()


def test_sigterm_drains_and_restart_replays_identically(tmp_path):
    port = free_port()
    cfg = write_config_toml(tmp_path / "ex.toml")
    data = tmp_path / "data"
    srv = ProcessServer(cfg, data, port).start()
    try:
        async def before():
            a = await logon(port, "M01")
            b = await logon(port, "M02", cancel_on_disconnect=True)
            for i in range(10):
                await a.send(NewOrder(f"a{i}", "CEA25", "sell", 10, 9250 + i))
            await b.send(NewOrder("b0", "CEA25", "buy", 35, 9260))
            await b.send(NewOrder("b1", "CEA25", "buy", 5, 9000))  # rests, cancel-on-disconnect
            await asyncio.sleep(0.3)
            srv.signal(signal.SIGTERM)
            ra = await drain_reports(a, 2)
            rb = await drain_reports(b, 2)
            bye = [await b.next_reply(), await a.next_reply()]
            assert [m["type"] for m in bye] == ["LogoutAccepted", "LogoutAccepted"]
            return ra, rb
        ra, rb = run(before())
        assert srv.wait() == 0
        assert "event=stopped" in srv.output
        assert rb[-1]["type"] == "OrderCancelled" and rb[-1]["reason"] == "disconnect" and rb[-1]["cl_ord_id"] == "b1"
        srv = ProcessServer(cfg, data, port).start()

        async def after():
            a, got_a = await replay_all(port, "M01")
            b, got_b = await replay_all(port, "M02")
            assert got_a[-len(ra):] == ra and got_b[-len(rb):] == rb
            snap = await book(a, "CEA25")
            assert snap["bids"] == [] and snap["asks"][0] == [9253, 5, 1]
            await a.logout()
            await b.logout()
        run(after())
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
    finally:
        srv.kill()


def test_sigkill_under_load_loses_nothing_acknowledged(tmp_path):
    port = free_port()
    cfg = write_config_toml(tmp_path / "ex.toml", max_msgs_per_s=100_000)
    data = tmp_path / "data"
    srv = ProcessServer(cfg, data, port).start()
    members = ["M01", "M02", "M03", "M04"]
    try:
        async def load():
            clients = {m: await logon(port, m) for m in members}
            cod = await logon(port, "M05", cancel_on_disconnect=True)
            await cod.send(NewOrder("keep-or-cancel", "CEA21", "buy", 9, 8000))
            assert (await cod.next_report())["type"] == "OrderAccepted"
            received = {m: [] for m in members + ["M05"]}
            received["M05"].append(None)
            stop = asyncio.Event()

            async def trade(m, side):
                c = clients[m]
                i = 0
                while not stop.is_set():
                    try:
                        for _ in range(20):
                            c.send_nowait(NewOrder(f"{m}-{i}", "CEA23", side, 1 + i % 3, 9100 + (i % 5) * (1 if side == "buy" else -1)))
                            i += 1
                        await c.writer.drain()
                    except (ConnectionError, RuntimeError):
                        return
                    await asyncio.sleep(0.002)

            async def collect(m):
                c = clients[m]
                while True:
                    try:
                        received[m].append(await c.next_report(5))
                    except (asyncio.TimeoutError, ConnectionClosed):
                        return

            tasks = [asyncio.ensure_future(trade(m, "buy" if k % 2 else "sell")) for k, m in enumerate(members)]
            collectors = [asyncio.ensure_future(collect(m)) for m in members]
            await asyncio.sleep(1.5)
            srv.signal(signal.SIGKILL)
            await asyncio.gather(*collectors)
            stop.set()
            await asyncio.gather(*tasks)
            return received
        received = run(load())
        srv.wait()
        assert all(len(received[m]) > 50 for m in members), {m: len(v) for m, v in received.items()}
        srv = ProcessServer(cfg, data, port).start()

        async def after():
            for m in members:
                c, got = await replay_all(port, m)
                seen = received[m]
                assert [r["seq"] for r in seen] == list(range(1, len(seen) + 1))
                assert got[:len(seen)] == seen, m  # every received report replays identically
                await c.close()
            c, got = await replay_all(port, "M05")
            assert got[-1]["type"] == "OrderCancelled" and got[-1]["reason"] == "disconnect"
            snap = await book(c, "CEA21")
            assert snap["bids"] == []
            await c.close()
        run(after())
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
    finally:
        srv.kill()


def test_serve_demo_and_resume(tmp_path):
    import os
    import subprocess
    import sys

    from _fakes import REPO

    port, mport = free_port(), free_port()
    cmd = [sys.executable, "-m", "gateway", "serve", "--demo", "--data-dir", str(tmp_path / "demo"),
           "--port", str(port), "--metrics-port", str(mport)]
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def start():
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        srv = ProcessServer("-", "-", port)
        srv.proc = p
        srv._wait_listening()
        return srv

    srv = start()
    try:
        async def first():
            c = await logon(port, "M20")
            bal = await c.request({"type": "QueryBalances"})
            assert bal["cash"]["CNY"]["total"] == 1_000_000_000 and bal["allowances"]["CEA19-20"]["settled"] == 1_000_000
            await c.send(NewOrder("d1", "CEA19-20", "sell", 5, 8600))
            assert (await c.next_report())["seq"] == 1
            await c.logout()
        run(first())
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
        for line in ("event=start", "event=logon member=M20", "event=logoff member=M20", "event=stopped exit_code=0"):
            assert line in srv.output, srv.output
        srv = start()

        async def second():
            c = await logon(port, "M20")
            assert c.logon_reply["next_seq"] == 2
            snap = await book(c, "CEA19-20")
            assert snap["asks"] == [[8600, 5, 1]] and snap["status"] == "open"
            await c.logout()
        run(second())
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
        assert "event=journal_recovered" in srv.output
    finally:
        srv.kill()
