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
import functools
import importlib
import json
import os
import signal
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


def _price(text: str) -> int | None:
    """An order price for argparse: integer minor units, or 'market' (also 'mkt') for None."""
    if text.lower() in ("market", "mkt"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"price must be an integer in minor units (9250 = 92.50) or 'market', not {text!r}") from None


def _tonnes(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"qty must be a whole number of tonnes, not {text!r}") from None


def _depth(text: str) -> int:
    """``book --depth``: a level count >= 0 (a negative one went to the server, exit 1)."""
    try:
        depth = int(text)
    except ValueError:
        depth = -1
    if depth < 0:
        raise argparse.ArgumentTypeError(f"not a number of price levels: {text!r}")
    return depth


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return value


def _idle(text: str) -> float:
    """``tail --idle``: seconds >= 0 (0: never); a negative one stopped the tail at once."""
    try:
        if float(text) == 0:
            return 0.0
    except ValueError:
        pass
    return _seconds(text)


def _check_cancel(parser: argparse.ArgumentParser, args) -> None:
    """cancel takes an order's cl_ord_id, or --all (with optional --instrument/--side)."""
    if args.all and args.orig_cl_ord_id:
        parser.error("give an order's cl_ord_id or --all, not both")
    if not args.all and not args.orig_cl_ord_id:
        parser.error("give the cl_ord_id of the order to cancel, or --all")
    if not args.all and (args.instrument or args.side):
        parser.error("--instrument and --side only go with --all")


def _connection_args(p: argparse.ArgumentParser, *, member: str = "M01") -> None:
    """The connection options; ``member`` is the fallback when $KABONI_MEMBER is not set."""
    p.add_argument("--host", default="127.0.0.1", help="exchange address (default: %(default)s)")
    p.add_argument("--port", type=_port, default=7001, help="order-entry port (default: %(default)s)")
    p.add_argument("--member", default=os.environ.get("KABONI_MEMBER", member),
                   help=f"member id to log on as (default: $KABONI_MEMBER, else {member})")
    p.add_argument("--token", default=os.environ.get("KABONI_TOKEN"),
                   help="logon token (default: $KABONI_TOKEN, else '<member>-token' as in the demo)")
    p.add_argument("--tls", action="store_true", help="connect with TLS (the server has gateway.tls_cert)")
    p.add_argument("--cafile", help="CA certificate to trust with --tls (default: the system's CAs)")
    p.add_argument("--timeout", type=_seconds, default=10.0,
                   help="seconds to wait for the connection, the logon and the first answer (default: %(default)g)")


def _print(msg: dict) -> None:
    print(json.dumps(msg, separators=(",", ":")), flush=True)


class _Failed(Exception):
    """A client-side failure, reported as one line on stderr with exit status 1."""


class _ErrorReply(Exception):
    """The server answered ``Error``: printed as JSON on stdout, its reason on stderr, exit 1."""

    def __init__(self, msg: dict) -> None:
        super().__init__(f"error {msg.get('reason')}: {msg.get('text', '')}")
        self.msg = msg


async def _client(args, **logon):
    """Connect and log on; every way this can fail becomes a ``_Failed`` with one clear line."""
    from .client import Client, ConnectionClosed

    ssl = None
    if args.tls:
        import ssl as _ssl

        ssl = _ssl.create_default_context(cafile=args.cafile)
        ssl.check_hostname = False
    where = f"{args.host}:{args.port}"
    tls_hint = "" if args.tls else " (is the server using TLS? then add --tls)"
    try:
        client = await asyncio.wait_for(Client.connect(args.host, args.port, ssl=ssl), args.timeout)
    except ConnectionRefusedError:
        raise _Failed(f"cannot connect to {where}: connection refused (is the server running?)") from None
    except TimeoutError:
        raise _Failed(f"cannot connect to {where}: no answer within {args.timeout:g} s") from None
    except OSError as exc:  # ssl.SSLError is one too
        if not args.tls:
            raise _Failed(f"cannot connect to {where}: {exc.strerror or exc}") from None
        reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or exc.strerror or exc
        hint = {"WRONG_VERSION_NUMBER": " (is the server not using TLS? then drop --tls)",
                "CERTIFICATE_VERIFY_FAILED": " (give the server's CA certificate with --cafile)"}.get(
                    getattr(exc, "reason", None), "")
        raise _Failed(f"TLS handshake with {where} failed: {reason}{hint}") from None
    token = args.token or f"{args.member}-token"
    try:
        await client.logon(args.member, token, timeout=args.timeout, **logon)
    except ConnectionClosed:
        await client.close()
        raise _Failed(f"{where} closed the connection before answering the logon{tls_hint}") from None
    except TimeoutError:
        await client.close()
        raise _Failed(f"no logon reply from {where} within {args.timeout:g} s{tls_hint}") from None
    except BaseException:
        await client.close()
        raise
    return client


async def _session(args, body, **logon) -> int:
    """Log on, run ``body(client)``, log out (briefly: the answer is already printed); close."""
    client = await _client(args, **logon)
    try:
        code = await body(client)
        try:
            await client.logout(timeout=min(args.timeout, 2))
        except (OSError, RuntimeError):  # already closed by the server, or timed out: nothing lost
            pass
        return code
    finally:
        await client.close()


def _stop_on_signals(stop: asyncio.Event) -> dict:
    """SIGINT/SIGTERM set ``stop`` (a follow ends quietly with status 0); returns the signals
    handled with the handlers they had, for ``_restore_signals``.

    Only the main thread can take signals; elsewhere (tests calling main in a thread) nothing
    is installed."""
    loop = asyncio.get_running_loop()
    installed = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(sig)
        try:
            loop.add_signal_handler(sig, stop.set)
        except (ValueError, RuntimeError, NotImplementedError):
            break
        installed[sig] = previous
    return installed


def _restore_signals(installed: dict) -> None:
    loop = asyncio.get_running_loop()
    for sig, previous in installed.items():
        loop.remove_signal_handler(sig)
        if previous is not None:
            signal.signal(sig, previous)


async def _next(client, queue: asyncio.Queue, timeout: float | None, stop: asyncio.Event | None = None) -> dict | None:
    """The next message on ``queue`` (``client.market`` or ``client.reports``).

    An ``Error`` reply raises ``_ErrorReply`` at once; other replies are dropped. Returns None
    when ``stop`` is set first; raises TimeoutError after ``timeout`` s (None: no limit) and
    ConnectionClosed when the server closes the connection."""
    from .client import ConnectionClosed

    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        if not queue.empty():
            return queue.get_nowait()
        while not client.replies.empty():
            reply = client.replies.get_nowait()
            if reply["type"] == "Error":
                raise _ErrorReply(reply)
        if client.closed.is_set():
            raise ConnectionClosed("the server closed the connection")
        if stop is not None and stop.is_set():
            return None
        remaining = None if deadline is None else deadline - loop.time()
        if remaining is not None and remaining <= 0:
            raise TimeoutError(f"nothing received within {timeout:g} s")
        # Queue.get cancelled before it completed takes nothing off its queue
        item, reply = asyncio.ensure_future(queue.get()), asyncio.ensure_future(client.replies.get())
        waits = {item, reply, asyncio.ensure_future(client.closed.wait())}
        if stop is not None:
            waits.add(asyncio.ensure_future(stop.wait()))
        done, pending = await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        for f in pending:
            f.cancel()
        if reply in done and reply.result()["type"] == "Error":
            raise _ErrorReply(reply.result())
        if item in done:
            return item.result()


async def _order(args) -> int:
    from engine import NewOrder

    cl = args.cl_ord_id or f"cli-{time.time_ns()}"
    kwargs = {"tif": args.tif} if args.tif else {}

    async def body(client) -> int:
        await client.send(NewOrder(cl, args.instrument, args.side, args.qty, args.price, stp=args.stp, **kwargs))
        return await _follow_order(client, cl, args.timeout)
    return await _session(args, body)


async def _follow_order(client, cl: str, timeout: float) -> int:
    """Print the reports of one request until it is done; 0 if accepted, 1 if rejected.

    Only reports carrying the request's ``cl_ord_id`` count (the session also gets the member's
    other orders' reports, e.g. fills of resting orders): the first decides, the rest are
    printed until ``MassCancelDone`` or 0.3 s without more. An ``Error`` reply raises
    ``_ErrorReply`` (a rejection too).
    """
    from .client import ConnectionClosed

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    code = None
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            if code is None:
                raise TimeoutError(f"no report for {cl} within {timeout:g} s")
            return code
        try:
            msg = await _next(client, client.reports, remaining)
        except TimeoutError:
            continue
        except ConnectionClosed:
            if code is None:
                raise
            return code
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


async def _cancel(args) -> int:
    from engine import CancelOrder, MassCancel

    cl = args.cl_ord_id or f"cli-{time.time_ns()}"
    request = MassCancel(cl, args.instrument, args.side) if args.all else CancelOrder(cl, args.orig_cl_ord_id)

    async def body(client) -> int:
        await client.send(request)
        return await _follow_order(client, cl, args.timeout)
    return await _session(args, body)


async def _book(args) -> int:
    """The snapshot within --timeout; with --follow, then every update until SIGINT/SIGTERM."""
    async def body(client) -> int:
        await client.subscribe([args.instrument], args.depth)
        _print(await _next(client, client.market, args.timeout))
        if args.follow:
            await _follow(client, client.market, None)
        return 0
    return await _session(args, body)


async def _follow(client, queue: asyncio.Queue, idle: float | None) -> None:
    """Print what arrives on ``queue`` until SIGINT/SIGTERM (or ``idle`` s of quiet)."""
    stop = asyncio.Event()
    installed = _stop_on_signals(stop)
    try:
        while True:
            try:
                msg = await _next(client, queue, idle, stop)
            except TimeoutError:
                return
            if msg is None:
                return
            _print(msg)
    finally:
        _restore_signals(installed)


async def _balances(args) -> int:
    from engine import QueryBalances

    async def body(client) -> int:
        reply = await client.request(QueryBalances(), args.timeout)
        if reply["type"] == "Error":
            raise _ErrorReply(reply)
        _print(reply)
        return 0 if reply["type"] == "Balances" else 1
    return await _session(args, body)


async def _tail(args) -> int:
    """The member's reports from --resume-from, until SIGINT/SIGTERM (or --idle s of quiet)."""
    async def body(client) -> int:
        print(f"# logged on as {args.member}: next_seq={client.logon_reply['next_seq']}", file=sys.stderr)
        await _follow(client, client.reports, args.idle or None)
        return 0
    return await _session(args, body, resume_from=args.resume_from)


def _parse_value(v: str):
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    try:
        return int(v)
    except ValueError:
        return v


def _operator_fields(request: str) -> dict[str, bool] | None:
    """The fields of operator message ``request``, each with whether it is a string (sent as
    written: a Deposit's ref may be all digits); None for no such message."""
    import typing

    import msgspec

    from engine import OPERATOR_COMMANDS

    for cls in OPERATOR_COMMANDS:
        if cls.__name__ == request:
            out = {}
            for f in msgspec.structs.fields(cls):
                t = typing.get_args(f.type)[0] if typing.get_origin(f.type) is typing.Annotated else f.type
                out[f.name] = t is str
            return out
    return None


def _check_admin(parser: argparse.ArgumentParser, args) -> None:
    """A usage error (exit 2) for an unknown message or field: the server ignores unknown keys,
    so a mistyped ``cancel_order=true`` went out and the Halt was acknowledged without it."""
    from engine import OPERATOR_COMMANDS

    known = _operator_fields(args.request)
    if known is None:
        parser.error(f"no operator message {args.request!r}; one of "
                     f"{', '.join(cls.__name__ for cls in OPERATOR_COMMANDS)}")
    for kv in args.fields:
        k, eq, _ = kv.partition("=")
        if not eq:
            parser.error(f"{kv!r} is not key=value")
        if k not in known:
            parser.error(f"{args.request} has no field {k!r}; its fields: {', '.join(known) or 'none'}")


async def _admin(args) -> int:
    known = _operator_fields(args.request) or {}
    msg: dict = {"type": args.request}
    for kv in args.fields:
        k, _, v = kv.partition("=")
        msg[k] = v if known.get(k) else _parse_value(v)

    async def body(client) -> int:
        reply = await client.request(msg, args.timeout)
        if reply["type"] == "Error":
            raise _ErrorReply(reply)
        _print(reply)
        return 0 if reply["type"] == "AdminAck" else 1
    return await _session(args, body)


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


_EPILOG = """\
The client commands (order, cancel, book, balances, tail, admin) read KABONI_MEMBER and
KABONI_TOKEN from the environment as defaults for --member and --token. Their exit status is 0
when the request is accepted (or the follow is interrupted), 1 when it is rejected, the server
answers Error, or the connection fails (one line on stderr), and 2 for usage errors."""

# Options registered by other modules' hooks that came without a help text.
_HELP_FALLBACK = {
    ("journal verify", "dir"): "journal directory",
    ("journal dump", "dir"): "journal directory",
    ("journal stats", "dir"): "journal directory",
    ("settle", "dir"): "journal directory",
    ("settle", "format"): "output format (default: %(default)s)",
}


def _installed_version() -> str:
    from ._version import installed_version

    return installed_version()


def _subparsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) for every subcommand, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _subparsers(sub, (*path, name))


def _build() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kaboni", description="Kaboni carbon allowance exchange",
                                     epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kaboni {_installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the exchange (gateway, engine and journal)",
                       description="Run the exchange until SIGINT/SIGTERM. Options given here override "
                                   "the configuration's [gateway] settings.")
    p.add_argument("--config", help="exchange configuration (TOML); give this or --demo")
    p.add_argument("--demo", action="store_true", help="run the embedded demo market (20 funded members M01..M20, "
                                                       "operator ops; tokens '<member>-token')")
    p.add_argument("--data-dir", help="journal and snapshots (default: the config's gateway.data_dir, "
                                      "./kaboni-data in the demo)")
    p.add_argument("--host", help="listen address (default: the config's gateway.host, 127.0.0.1 in the demo)")
    p.add_argument("--port", type=_port, help="order-entry port, 0 for any free one "
                                              "(default: the config's gateway.port, 7001 in the demo)")
    p.add_argument("--metrics-port", type=_port, help="Prometheus /metrics port (default: the config's "
                                                      "gateway.metrics_port, 9101 in the demo)")
    p.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    p.add_argument("--no-stats", action="store_true",
                   help="skip the order-path counters and latency histograms (benchmarking)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("order", help="enter one order and print its reports",
                       description="Enter one order and print its reports (those with its cl_ord_id) as JSON "
                                   "lines. Exit status 0 if it is accepted, 1 if it is rejected.")
    _connection_args(p)
    p.add_argument("instrument", help="instrument symbol, e.g. CEA25")
    p.add_argument("side", choices=["buy", "sell"], help="buy or sell")
    p.add_argument("qty", type=_tonnes, help="quantity in tonnes (an integer)")
    p.add_argument("price", type=_price,
                   help="limit price in integer minor units (9250 = 92.50), or 'market' for a market order")
    p.add_argument("--tif", choices=["day", "gtc", "ioc", "fok"],
                   help="time in force (default: the exchange's: day for limit orders, ioc for market orders)")
    p.add_argument("--stp", default="cancel_incoming", choices=["cancel_incoming", "cancel_resting", "cancel_both"],
                   help="self-trade prevention (default: %(default)s)")
    p.add_argument("--cl-ord-id", help="client order id (default: cli-<nanoseconds>)")
    p.set_defaults(func=lambda a: asyncio.run(_order(a)))

    p = sub.add_parser("cancel", help="cancel an order (or --all: mass cancel)",
                       description="Cancel an order (or --all: mass cancel) and print the reports "
                                   "answering it. Exit status 0 if it is done, 1 if it is rejected.")
    _connection_args(p)
    p.add_argument("orig_cl_ord_id", nargs="?", help="cl_ord_id of the order to cancel (or use --all)")
    p.add_argument("--all", action="store_true", help="cancel all the member's orders (mass cancel)")
    p.add_argument("--instrument", help="with --all: only this instrument's orders (default: all instruments)")
    p.add_argument("--side", choices=["buy", "sell"], help="with --all: only this side (default: both)")
    p.add_argument("--cl-ord-id", help="client id of the cancel request itself (default: cli-<nanoseconds>)")
    p.set_defaults(func=lambda a: asyncio.run(_cancel(a)), check=functools.partial(_check_cancel, p))

    p = sub.add_parser("book", help="print an instrument's book snapshot (--follow: and updates)",
                       description="Print an instrument's book snapshot as a JSON line; with --follow, then "
                                   "every market data message until interrupted (SIGINT/SIGTERM: exit 0).")
    _connection_args(p)
    p.add_argument("instrument", help="instrument symbol, e.g. CEA25")
    p.add_argument("--depth", type=_depth, default=10, help="price levels per side (default: %(default)s)")
    p.add_argument("--follow", action="store_true",
                   help="keep printing updates until interrupted (--timeout bounds only the snapshot)")
    p.set_defaults(func=lambda a: asyncio.run(_book(a)))

    p = sub.add_parser("balances", help="print a member's balances",
                       description="Print the member's cash and allowance balances as a JSON line.")
    _connection_args(p)
    p.set_defaults(func=lambda a: asyncio.run(_balances(a)))

    p = sub.add_parser("tail", help="follow a member's reports",
                       description="Print the member's execution reports as JSON lines until interrupted "
                                   "(SIGINT/SIGTERM: exit 0) or --idle seconds pass without one.")
    _connection_args(p)
    p.add_argument("--resume-from", type=int, default=None,
                   help="replay the reports after this seq first (0: every report since the first, earlier days included; default: only new ones)")
    p.add_argument("--idle", type=_idle, default=0,
                   help="stop (exit 0) after this many seconds without a report (default: 0, never)")
    p.set_defaults(func=lambda a: asyncio.run(_tail(a)))

    p = sub.add_parser("admin", help="send an operator message: REQUEST [key=value ...]",
                       description="Send one operator message and print the reply. Exit status 0 for "
                                   "AdminAck, 1 for AdminRejected or Error.")
    _connection_args(p, member="ops")
    p.add_argument("request", help="Halt, Resume, OpenMarket, CloseMarket, EndOfDay, SuspendMember, "
                                   "ReinstateMember, Deposit, Withdraw")
    p.add_argument("fields", nargs="*", help="the message's fields as key=value (integers and true/false "
                                             "are converted, except in text fields such as ref), e.g. "
                                             "instrument=CEA25")
    p.set_defaults(func=lambda a: asyncio.run(_admin(a)), check=functools.partial(_check_admin, p))

    for module, hook in (("gateway._journal_cli", "add_journal_commands"), ("gateway._demo", "add_demo_command")):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        getattr(mod, hook)(sub)
    for path, p in _subparsers(parser):
        for action in p._actions:
            if action.help is None:
                action.help = _HELP_FALLBACK.get((" ".join(path), action.dest))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build()
    args = parser.parse_args(argv)
    if getattr(args, "check", None) is not None:
        args.check(args)
    from .client import ConnectionClosed, LogonError

    def fail(text: str) -> int:
        print(f"kaboni {args.command}: {text}", file=sys.stderr)
        return 1

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except _ErrorReply as exc:
        _print(exc.msg)
        return fail(str(exc))
    except (_Failed, ConnectionClosed) as exc:
        return fail(str(exc))
    except LogonError as exc:
        return fail(f"logon rejected: {exc}")
    except BrokenPipeError:  # stdout's reader went away (kaboni book --follow | head): stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        except (OSError, ValueError, AttributeError):
            pass
        return 1
    except TimeoutError as exc:  # before OSError: it is one
        return fail(str(exc) or "timed out")
    except OSError as exc:
        return fail(f"{exc.strerror or exc}")
