"""``kaboni``: run the exchange and talk to it from a shell.

    kaboni serve --demo                       # demo market on 7001, metrics on 9101
    kaboni serve --config ex.toml --data-dir /var/lib/kaboni --port 7001 --metrics-port 9101
    kaboni order --member M01 --token M01-token CEA25 buy 100 9250
    kaboni cancel --member M01 --token M01-token o-123
    kaboni book CEA25              kaboni balances --member M01 --token M01-token
    kaboni tail --member M01 --token M01-token --resume-from 0
    kaboni admin --member ops --token ops-token Halt instrument=CEA25
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
import time

__all__ = ["main"]


def _port(text: str) -> int:
    """A TCP port for argparse: 0..65535 (0: any free port)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0..65535: {port}")
    return port


def _connection_args(p: argparse.ArgumentParser, *, member: str = "M01") -> None:
    """The connection options; ``member`` is the fallback when $KABONI_MEMBER is not set."""
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=7001)
    p.add_argument("--member", default=os.environ.get("KABONI_MEMBER", member))
    p.add_argument("--token", default=os.environ.get("KABONI_TOKEN"),
                   help="logon token (default: $KABONI_TOKEN, else '<member>-token' as in the demo)")
    p.add_argument("--tls", action="store_true", help="connect with TLS")
    p.add_argument("--cafile", help="CA certificate to trust (TLS)")
    p.add_argument("--timeout", type=float, default=10.0)


def _print(msg: dict) -> None:
    print(json.dumps(msg, separators=(",", ":")), flush=True)


async def _client(args, **logon):
    from .client import Client

    ssl = None
    if args.tls:
        import ssl as _ssl

        ssl = _ssl.create_default_context(cafile=args.cafile)
        ssl.check_hostname = False
    client = await Client.connect(args.host, args.port, ssl=ssl)
    token = args.token or f"{args.member}-token"
    await client.logon(args.member, token, **logon)
    return client


async def _order(args) -> int:
    from engine import NewOrder

    client = await _client(args)
    cl = args.cl_ord_id or f"cli-{time.time_ns()}"
    price = None if args.price in ("market", "mkt") else int(args.price)
    kwargs = {"tif": args.tif} if args.tif else {}
    await client.send(NewOrder(cl, args.instrument, args.side, args.qty, price, stp=args.stp, **kwargs))
    code = await _follow_order(client, cl, args.timeout)
    await client.logout()
    return code


async def _follow_order(client, cl: str, timeout: float) -> int:
    """Print the reports of one request until it is done; 0 if accepted, 1 if rejected.

    Only reports carrying the request's ``cl_ord_id`` count (the session also gets the member's
    other orders' reports, e.g. fills of resting orders): the first decides, the rest are
    printed until ``MassCancelDone`` or 0.3 s without more. An ``Error`` reply is a rejection.
    """
    from .client import ConnectionClosed

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    code = None
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            if code is None:
                raise asyncio.TimeoutError(f"no report for {cl} within {timeout:g} s")
            return code
        try:
            msgs = await _next_report_or_error(client, remaining)
        except ConnectionClosed:
            if code is None:
                raise
            return code
        for msg in msgs:
            if msg["type"] == "Error":
                _print(msg)
                return 1
            if msg.get("cl_ord_id") != cl:
                continue
            _print(msg)
            if code is None:
                code = 1 if msg["type"] in ("OrderRejected", "CancelRejected") else 0
                if code:
                    return code
            if msg["type"] == "MassCancelDone":
                return code
            deadline = loop.time() + 0.3


async def _next_report_or_error(client, timeout: float) -> list[dict]:
    """The next report and/or Error reply (other replies are dropped); [] on timeout."""
    from .client import ConnectionClosed

    report = asyncio.ensure_future(client.reports.get())
    reply = asyncio.ensure_future(client.replies.get())
    closed = asyncio.ensure_future(client.closed.wait())
    done, pending = await asyncio.wait({report, reply, closed}, timeout=timeout,
                                       return_when=asyncio.FIRST_COMPLETED)
    for f in pending:
        f.cancel()  # a Queue.get cancelled before it completed takes nothing off the queue
    out = []
    if reply in done and reply.result()["type"] == "Error":
        out.append(reply.result())
    if report in done:
        out.append(report.result())
    if not done - {closed} and closed in done:
        raise ConnectionClosed("the server closed the connection")
    return out


async def _cancel(args) -> int:
    from engine import CancelOrder, MassCancel

    client = await _client(args)
    cl = args.cl_ord_id or f"cli-{time.time_ns()}"
    if args.all:
        await client.send(MassCancel(cl, args.instrument, args.side))
    else:
        await client.send(CancelOrder(cl, args.orig_cl_ord_id))
    code = await _follow_order(client, cl, args.timeout)
    await client.logout()
    return code


async def _book(args) -> int:
    client = await _client(args)
    await client.subscribe([args.instrument], args.depth)
    while True:
        try:
            msg = await client.next_market(args.timeout)
        except asyncio.TimeoutError:
            break
        _print(msg)
        if not args.follow:
            break
    await client.logout()
    return 0


async def _balances(args) -> int:
    from engine import QueryBalances

    client = await _client(args)
    reply = await client.request(QueryBalances(), args.timeout)
    _print(reply)
    await client.logout()
    return 0 if reply["type"] == "Balances" else 1


async def _tail(args) -> int:
    client = await _client(args, resume_from=args.resume_from)
    print(f"# logged on as {args.member}: next_seq={client.logon_reply['next_seq']}", file=sys.stderr)
    try:
        while True:
            try:
                _print(await client.next_report(args.idle if args.idle else 3600))
            except asyncio.TimeoutError:
                if args.idle:
                    break
    finally:
        await client.close()
    return 0


def _parse_value(v: str):
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    try:
        return int(v)
    except ValueError:
        return v


async def _admin(args) -> int:
    client = await _client(args)
    msg = {"type": args.request}
    for kv in args.fields:
        k, _, v = kv.partition("=")
        msg[k] = _parse_value(v)
    reply = await client.request(msg, args.timeout)
    _print(reply)
    await client.logout()
    return 0 if reply["type"] == "AdminAck" else 1


def _serve(args) -> int:
    from engine import ConfigError, demo_config, load_config

    from ._server import run

    if args.demo == bool(args.config):
        print("kaboni serve: give exactly one of --demo or --config FILE", file=sys.stderr)
        return 2
    try:
        config = demo_config() if args.demo else load_config(args.config)
    except ConfigError as exc:
        print(f"kaboni serve: {exc}", file=sys.stderr)
        return 2
    return run(config, args.data_dir, host=args.host, port=args.port, metrics_port=args.metrics_port,
               metrics=not args.no_metrics, stats_enabled=not args.no_stats)


def _build() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kaboni", description="Kaboni carbon allowance exchange")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the exchange (gateway, engine and journal)")
    p.add_argument("--config", help="exchange configuration (TOML)")
    p.add_argument("--demo", action="store_true", help="run the embedded demo market")
    p.add_argument("--data-dir", help="journal and snapshots (default: the config's gateway.data_dir)")
    p.add_argument("--host")
    p.add_argument("--port", type=_port)
    p.add_argument("--metrics-port", type=_port)
    p.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    p.add_argument("--no-stats", action="store_true", help="skip the order-path counters (benchmarking)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("order", help="enter one order and print its reports",
                       description="Enter one order and print its reports (those with its cl_ord_id). "
                                   "Exit status 0 if it is accepted, 1 if it is rejected.")
    _connection_args(p)
    p.add_argument("instrument")
    p.add_argument("side", choices=["buy", "sell"])
    p.add_argument("qty", type=int)
    p.add_argument("price", help="integer minor units, or 'market'")
    p.add_argument("--tif", choices=["day", "gtc", "ioc", "fok"])
    p.add_argument("--stp", default="cancel_incoming", choices=["cancel_incoming", "cancel_resting", "cancel_both"])
    p.add_argument("--cl-ord-id")
    p.set_defaults(func=lambda a: asyncio.run(_order(a)))

    p = sub.add_parser("cancel", help="cancel an order (or --all: mass cancel)",
                       description="Cancel an order (or --all: mass cancel) and print the reports "
                                   "answering it. Exit status 0 if it is done, 1 if it is rejected.")
    _connection_args(p)
    p.add_argument("orig_cl_ord_id", nargs="?")
    p.add_argument("--all", action="store_true")
    p.add_argument("--instrument")
    p.add_argument("--side", choices=["buy", "sell"])
    p.add_argument("--cl-ord-id")
    p.set_defaults(func=lambda a: asyncio.run(_cancel(a)))

    p = sub.add_parser("book", help="print an instrument's book snapshot (--follow: and updates)")
    _connection_args(p)
    p.add_argument("instrument")
    p.add_argument("--depth", type=int, default=10)
    p.add_argument("--follow", action="store_true")
    p.set_defaults(func=lambda a: asyncio.run(_book(a)))

    p = sub.add_parser("balances", help="print a member's balances")
    _connection_args(p)
    p.set_defaults(func=lambda a: asyncio.run(_balances(a)))

    p = sub.add_parser("tail", help="follow a member's reports")
    _connection_args(p)
    p.add_argument("--resume-from", type=int, default=None)
    p.add_argument("--idle", type=float, default=0, help="stop after this many idle seconds (0: never)")
    p.set_defaults(func=lambda a: asyncio.run(_tail(a)))

    p = sub.add_parser("admin", help="send an operator message: REQUEST [key=value ...]")
    _connection_args(p, member="ops")
    p.add_argument("request", help="Halt, Resume, OpenMarket, CloseMarket, EndOfDay, SuspendMember, "
                                   "ReinstateMember, Deposit, Withdraw")
    p.add_argument("fields", nargs="*", help="key=value (ints and true/false are converted)")
    p.set_defaults(func=lambda a: asyncio.run(_admin(a)))

    for module, hook in (("gateway._journal_cli", "add_journal_commands"), ("gateway._demo", "add_demo_command")):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        getattr(mod, hook)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ConnectionError, OSError, asyncio.TimeoutError) as exc:
        print(f"kaboni {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - LogonError etc. become a message, not a trace
        from .client import ConnectionClosed, LogonError

        if isinstance(exc, LogonError):
            print(f"kaboni {args.command}: logon rejected: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, ConnectionClosed):
            print(f"kaboni {args.command}: {exc}", file=sys.stderr)
            return 1
        raise
