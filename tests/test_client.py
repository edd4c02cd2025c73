"""The client library and the CLI against a live server; TLS with a throwaway certificate; metrics."""

import asyncio
import json
import logging
import ssl
import subprocess
import urllib.request

import msgspec
import pytest

from engine import NewOrder
from gateway.cli import main
from gateway.client import Client

from _fakes import ThreadServer, make_config


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ThreadServer(make_config(), tmp_path_factory.mktemp("cli"), metrics=True) as s:
        yield s


def cli(server, capsys, *argv):
    code = main([argv[0], "--port", str(server.port), *argv[1:]])
    out = capsys.readouterr().out
    return code, [json.loads(line) for line in out.splitlines() if line.strip()]


def test_cli_order_cancel_book_balances_admin_tail(server, capsys):
    code, out = cli(server, capsys, "order", "--member", "M01", "--cl-ord-id", "cli1", "CEA24", "sell", "10", "9300",
                    "--tif", "gtc")
    assert code == 0 and out[0]["type"] == "OrderAccepted" and out[0]["tif"] == "gtc"
    code, out = cli(server, capsys, "order", "--member", "M02", "CEA24", "buy", "4", "market")
    assert code == 0 and [m["type"] for m in out] == ["OrderAccepted", "Fill"]
    assert out[0]["tif"] == "ioc" and out[0]["price"] is None and out[1]["price"] == 9300
    code, out = cli(server, capsys, "book", "--member", "M03", "CEA24")
    assert out[0]["type"] == "BookSnapshot" and out[0]["asks"] == [[9300, 6, 1]] and out[0]["last_price"] == 9300
    code, out = cli(server, capsys, "order", "--member", "M01", "CEA24", "sell", "10", "1")
    assert code == 1 and out[0]["reason"] == "price_out_of_band"
    code, out = cli(server, capsys, "cancel", "--member", "M01", "cli1")
    assert code == 0 and out[0]["type"] == "OrderCancelled" and out[0]["cancelled_qty"] == 6
    code, out = cli(server, capsys, "balances", "--member", "M02")
    assert code == 0 and out[0]["allowances"]["CEA24"]["unsettled"] == 4
    code, out = cli(server, capsys, "admin", "--member", "ops", "Halt", "instrument=CEA24", "cancel_orders=true")
    assert code == 0 and out[0] == {"type": "AdminAck", "request": "Halt", "instrument": "CEA24", "cancel_orders": True}
    code, out = cli(server, capsys, "admin", "--member", "ops", "Resume", "instrument=CEA19")
    assert code == 1 and out[0]["reason"] == "unknown_instrument"
    code, out = cli(server, capsys, "tail", "--member", "M01", "--resume-from", "0", "--idle", "0.3")
    assert code == 0 and [m["seq"] for m in out] == list(range(1, len(out) + 1)) and out[-1]["reason"] == "requested"
    assert main(["balances", "--port", str(server.port), "--member", "M01", "--token", "wrong"]) == 1


def test_metrics_endpoint(server):
    async def trade():
        a = await Client.connect("127.0.0.1", server.port)
        await a.logon("M04", "M04-token")
        await a.send(NewOrder("m1", "CEA22", "sell", 3, 9000))
        await a.send(NewOrder("m1", "CEA22", "sell", 3, 9000))
        b = await Client.connect("127.0.0.1", server.port)
        await b.logon("M05", "M05-token")
        await b.send(NewOrder("m2", "CEA22", "buy", 2, 9000))
        for _ in range(3):
            await a.next_report()
        for _ in range(2):
            await b.next_report()
        await a.logout()
        await b.logout()
    run(trade())
    port = server.server.metrics_port_bound
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    assert 'kaboni_orders_received_total{outcome="accepted",type="NewOrder"}' in text
    assert 'kaboni_rejects_total{reason="duplicate_cl_ord_id"} 1.0' in text
    assert 'kaboni_trades_total{instrument="CEA22"} 1.0' in text
    assert 'kaboni_traded_value_minor_units_total{currency="CNY",instrument="CEA22"} 18000.0' in text
    assert 'kaboni_best_ask_price_minor_units{instrument="CEA22"} 9000.0' in text
    assert 'kaboni_best_bid_price_minor_units{instrument="CEA22"}' not in text
    assert 'kaboni_instrument_state{instrument="CEA22",state="open"} 1.0' in text
    assert 'kaboni_trading_day_info{trading_day="2026-11-24"} 1.0' in text
    assert 'kaboni_disconnects_total{cause="logout"}' in text
    for name in ("kaboni_order_to_report_latency_seconds_bucket", "kaboni_journal_fsync_seconds_count",
                 "kaboni_journal_batch_records_bucket", "kaboni_journal_bytes_written_total",
                 "kaboni_journal_records_pending", 'kaboni_sessions{role="member"}', "kaboni_throttled_messages_total",
                 "kaboni_resting_orders", "kaboni_build_info", "kaboni_start_time_seconds", "process_cpu_seconds_total",
                 "kaboni_journal_append_to_durable_seconds_bucket"):
        assert name in text, name


def test_tls(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    with ThreadServer(make_config(tls_cert=str(cert), tls_key=str(key)), tmp_path / "d") as server:
        async def main_():
            ctx = ssl.create_default_context(cafile=str(cert))
            c = await Client.connect("127.0.0.1", server.port, ssl=ctx, server_hostname="localhost")
            reply = await c.logon("M01", "M01-token")
            assert reply["type"] == "LogonAccepted"
            await c.send(NewOrder("tls1", "CEA25", "buy", 1, 9250))
            assert (await c.next_report())["type"] == "OrderAccepted"
            await c.logout()
            # a plain-TCP client cannot speak to the TLS port
            plain = await Client.connect("127.0.0.1", server.port)
            with pytest.raises(Exception):
                await plain.logon("M01", "M01-token", timeout=2)
            await plain.close()
        run(main_())


@pytest.mark.parametrize("which", ["port", "metrics_port"])
def test_a_port_in_use_fails_the_start_before_the_journal_is_opened(tmp_path, which):
    import socket

    from gateway._server import Server

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    opened = []

    def factory(*args, **kwargs):
        opened.append(args)
        raise AssertionError("the journal was opened")

    ports = {"port": 0, "metrics_port": 0, which: busy.getsockname()[1]}
    server = Server(make_config(), tmp_path / "d", ledger_factory=factory, **ports)
    try:
        assert asyncio.run(server.run()) == 1
    finally:
        busy.close()
    assert opened == [] and not (tmp_path / "d").exists()  # nothing recovered, nothing created
    if which == "metrics_port":  # the order port bound first was let go again
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=2).close()


def test_a_journal_that_cannot_be_opened_lets_go_of_both_ports(tmp_path):
    import socket

    from gateway._server import Server

    def factory(*args, **kwargs):
        raise OSError("disk on fire")

    server = Server(make_config(), tmp_path / "d", port=0, metrics_port=0, ledger_factory=factory)
    assert asyncio.run(server.run()) == 1
    for port in (server.port, server.metrics_port_bound):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_cli_serve_on_a_port_in_use_says_so_in_one_line(tmp_path):
    import socket
    import sys

    from _fakes import REPO

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        proc = subprocess.run([sys.executable, "-m", "gateway", "serve", "--demo", "--data-dir", str(tmp_path / "d"),
                               "--port", str(busy.getsockname()[1]), "--no-metrics"],
                              cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, timeout=60)
    finally:
        busy.close()
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "level=ERROR" in line]
    assert len(errors) == 1 and "event=start_failed" in errors[0] and "address already in use" in errors[0], proc.stderr


def test_cli_serve_refuses_a_port_out_of_range(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--demo", "--port", "70000"])
    assert exc.value.code == 2 and "70000" in capsys.readouterr().err


class ScriptedExchange:
    """A stand-in exchange on a real socket that answers each request with a fixed list of
    frames: here, reports of the member's other orders arriving before and between the ones
    answering the CLI's request (which a real exchange does when they happen at that moment)."""

    def __init__(self, answers):
        self.answers = answers  # request type -> list of server messages (plain dicts)
        self.requests = []

    async def _handle(self, reader, writer):
        try:
            while True:
                n = int.from_bytes(await reader.readexactly(4), "big")
                msg = msgspec.msgpack.decode(await reader.readexactly(n))
                self.requests.append(msg)
                if msg["type"] == "Logon":
                    out = [{"type": "LogonAccepted", "member": msg["member"], "role": "member", "next_seq": 1,
                            "heartbeat_s": 10, "trading_day": "2026-11-24"}]
                elif msg["type"] == "Logout":
                    out = [{"type": "LogoutAccepted"}]
                else:
                    out = [dict(m, cl_ord_id=msg["cl_ord_id"]) if m.get("cl_ord_id") == "$req" else m
                           for m in self.answers[msg["type"]]]
                for m in out:
                    body = msgspec.msgpack.encode(m)
                    writer.write(len(body).to_bytes(4, "big") + body)
                await writer.drain()
                if msg["type"] == "Logout":
                    break
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    def cli(self, capsys, *argv):
        async def go():
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            try:
                return await asyncio.to_thread(main, [argv[0], "--port", str(port), *argv[1:]])
            finally:
                server.close()
        code = run(go())
        out = capsys.readouterr().out
        return code, [json.loads(line) for line in out.splitlines() if line.strip()]


def _report(type_, cl, seq, **fields):
    return {"type": type_, "seq": seq, "ts": 1, "member": "M01", "cl_ord_id": cl, **fields}


def test_cli_order_and_cancel_follow_only_their_own_cl_ord_id(capsys):
    other_rejected = _report("OrderRejected", "other", 1, reason="price_out_of_band", text="x")
    other_fill = _report("Fill", "resting", 3, order_id=7, trade_id=1, instrument="CEA25", side="sell", price=9300,
                         qty=1, leaves_qty=4, liquidity="maker", fee=0)
    ex = ScriptedExchange({"NewOrder": [other_rejected, _report("OrderAccepted", "$req", 2, order_id=9),
                                        other_fill, _report("Fill", "$req", 4, leaves_qty=0)]})
    code, out = ex.cli(capsys, "order", "--member", "M01", "--cl-ord-id", "mine", "CEA25", "buy", "1", "9300")
    assert code == 0 and [(m["type"], m["seq"]) for m in out] == [("OrderAccepted", 2), ("Fill", 4)]

    ex = ScriptedExchange({"NewOrder": [_report("OrderAccepted", "other", 1), other_fill,
                                        _report("OrderRejected", "$req", 5, reason="price_out_of_band", text="x")]})
    code, out = ex.cli(capsys, "order", "--member", "M01", "--cl-ord-id", "mine", "CEA25", "buy", "1", "1")
    assert code == 1 and [(m["type"], m["seq"]) for m in out] == [("OrderRejected", 5)]

    ex = ScriptedExchange({"CancelOrder": [_report("OrderCancelled", "other", 1, reason="ioc"),
                                           _report("CancelRejected", "$req", 2, reason="unknown_order", text="x")]})
    code, out = ex.cli(capsys, "cancel", "--member", "M01", "--cl-ord-id", "c1", "nope")
    assert code == 1 and [(m["type"], m["seq"]) for m in out] == [("CancelRejected", 2)]

    ex = ScriptedExchange({"MassCancel": [_report("OrderCancelled", "$req", 1, reason="mass_cancel"), other_fill,
                                          _report("MassCancelDone", "$req", 2, cancelled=1)]})
    code, out = ex.cli(capsys, "cancel", "--member", "M01", "--all", "--cl-ord-id", "mc")
    assert code == 0 and [(m["type"], m["seq"]) for m in out] == [("OrderCancelled", 1), ("MassCancelDone", 2)]

    ex = ScriptedExchange({"NewOrder": [{"type": "Error", "reason": "invalid_message", "text": "qty: ..."}]})
    code, out = ex.cli(capsys, "order", "--member", "M01", "CEA25", "buy", "1", "9300")
    assert code == 1 and out == [{"type": "Error", "reason": "invalid_message", "text": "qty: ..."}]


def _self_signed(directory):
    directory.mkdir()
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return cert, key


def test_failed_tls_handshakes_are_logged_and_counted_and_harm_no_one(tmp_path, caplog):
    cert, key = _self_signed(tmp_path / "server")
    other, _ = _self_signed(tmp_path / "other")  # what a misconfigured client trusts instead
    caplog.set_level(logging.INFO, logger="kaboni")
    config = make_config(tls_cert=str(cert), tls_key=str(key), logon_timeout_s=0.5)
    with ThreadServer(config, tmp_path / "d") as server:
        async def main_():
            ctx = ssl.create_default_context(cafile=str(cert))
            member = await Client.connect("127.0.0.1", server.port, ssl=ctx, server_hostname="localhost")
            await member.logon("M01", "M01-token")
            # plain bytes where a ClientHello belongs
            r, w = await asyncio.open_connection("127.0.0.1", server.port)
            w.write(b"\x00\x00\x00\x10not a tls hello!")
            assert await asyncio.wait_for(r.read(), 5) == b""  # cut off
            w.close()
            # a client that does not trust the server's certificate (and says so, as OpenSSL's does)
            proc = await asyncio.create_subprocess_exec(
                "openssl", "s_client", "-connect", f"127.0.0.1:{server.port}", "-verify_return_error",
                "-CAfile", str(other), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            assert await asyncio.wait_for(proc.wait(), 10) != 0
            # a peer that never says anything is cut off after logon_timeout_s (not an SSL error)
            r2, w2 = await asyncio.open_connection("127.0.0.1", server.port)
            assert await asyncio.wait_for(r2.read(), 5) == b""
            w2.close()
            # the logged-on member never noticed
            await member.send(NewOrder("t1", "CEA25", "buy", 1, 9250))
            assert (await member.next_report())["type"] == "OrderAccepted"
            await member.logout()
        run(main_())
        counted = server.exchange.stats.disconnects["tls_handshake_failed"]
    lines = [r.getMessage() for r in caplog.records if "event=tls_handshake_failed" in r.getMessage()]
    assert counted == 2 and len(lines) == 2, lines
    assert "WRONG_VERSION_NUMBER" in lines[0] and "ALERT" in lines[1], lines
