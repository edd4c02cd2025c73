"""An asyncio client for the Kaboni Order Protocol, for member firms and operators.

    client = await Client.connect("127.0.0.1", 7001)
    await client.logon("M01", "M01-token", resume_from=0)
    await client.send(NewOrder("o1", "CEA25", "buy", 10, 9250))
    report = await client.next_report()          # {"type": "OrderAccepted", "seq": 1, ...}

Server frames arrive as plain dicts (MessagePack maps) sorted into three queues: ``reports``
(sequenced, with ``seq``), ``market`` (BookSnapshot, BookUpdate, Trade, InstrumentStatus) and
``replies`` (everything else: Balances, AdminAck, AdminRejected, Error, LogoutAccepted). The
client answers the heartbeat rule on its own: it sends ``Heartbeat`` when it has sent nothing
for ``heartbeat_s``, and closes the connection to a server silent for 3 x ``heartbeat_s``.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl

from ._wire import HEADER, Heartbeat, Logon, Logout, Subscribe, Unsubscribe, decode_server, encode, frame

__all__ = ["Client", "LogonError", "ConnectionClosed", "REPORT_TYPES", "MARKET_TYPES"]

REPORT_TYPES = frozenset({"OrderAccepted", "OrderRejected", "Fill", "OrderCancelled", "OrderReplaced",
                          "CancelRejected", "MassCancelDone"})
MARKET_TYPES = frozenset({"BookSnapshot", "BookUpdate", "Trade", "InstrumentStatus"})


class LogonError(Exception):
    """The server refused the Logon (``reason`` is the protocol's code)."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(f"{reason}: {text}")
        self.reason = reason
        self.text = text


class ConnectionClosed(Exception):
    """The server closed the connection."""


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reports: asyncio.Queue = asyncio.Queue()
        self.market: asyncio.Queue = asyncio.Queue()
        self.replies: asyncio.Queue = asyncio.Queue()
        self.logon_reply: dict | None = None
        self.heartbeat_s = 10
        self.closed = asyncio.Event()
        self.last_sent = 0.0
        self.last_received = 0.0
        self._reader_task: asyncio.Task | None = None
        self._hb_task: asyncio.Task | None = None
        self._logon_waiter: asyncio.Future | None = None

    @classmethod
    async def connect(cls, host: str = "127.0.0.1", port: int = 7001, *, ssl: _ssl.SSLContext | None = None,
                      server_hostname: str | None = None) -> "Client":
        reader, writer = await asyncio.open_connection(host, port, ssl=ssl,
                                                       server_hostname=server_hostname if ssl else None,
                                                       limit=1 << 20)
        self = cls(reader, writer)
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())
        return self

    # sending --------------------------------------------------------------------------------
    def send_nowait(self, message) -> None:
        """Queue one message (a Struct, or a dict with ``type``) for sending."""
        body = encode(message)
        self.writer.write(frame(body))
        self.last_sent = asyncio.get_running_loop().time()

    async def send(self, message) -> None:
        self.send_nowait(message)
        await self.writer.drain()

    # session --------------------------------------------------------------------------------
    async def logon(self, member: str, token: str, *, resume_from: int | None = None,
                    cancel_on_disconnect: bool = False, heartbeat_s: int = 10, timeout: float = 10) -> dict:
        """Log on; returns the LogonAccepted map or raises ``LogonError``."""
        self._logon_waiter = asyncio.get_running_loop().create_future()
        await self.send(Logon(member, token, resume_from, cancel_on_disconnect, heartbeat_s))
        reply = await asyncio.wait_for(self._logon_waiter, timeout)
        if reply["type"] != "LogonAccepted":
            raise LogonError(reply.get("reason", "error"), reply.get("text", ""))
        self.logon_reply = reply
        self.heartbeat_s = reply["heartbeat_s"]
        self._hb_task = asyncio.get_running_loop().create_task(self._heartbeats())
        return reply

    async def logout(self, timeout: float = 10) -> None:
        await self.send(Logout())
        try:
            await asyncio.wait_for(self.closed.wait(), timeout)
        finally:
            await self.close()

    async def close(self) -> None:
        for task in (self._hb_task, self._reader_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (OSError, _ssl.SSLError):
            pass
        self.closed.set()

    # requests with replies -------------------------------------------------------------------
    async def next_report(self, timeout: float = 10) -> dict:
        return await self._get(self.reports, timeout)

    async def next_market(self, timeout: float = 10) -> dict:
        return await self._get(self.market, timeout)

    async def next_reply(self, timeout: float = 10) -> dict:
        return await self._get(self.replies, timeout)

    async def _get(self, queue: asyncio.Queue, timeout: float) -> dict:
        get = asyncio.ensure_future(queue.get())
        closed = asyncio.ensure_future(self.closed.wait())
        done, _ = await asyncio.wait({get, closed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            closed.cancel()
            return get.result()
        get.cancel()
        closed.cancel()
        if not queue.empty():
            return queue.get_nowait()
        if closed in done:
            raise ConnectionClosed("the server closed the connection")
        raise asyncio.TimeoutError(f"nothing received within {timeout} s")

    async def request(self, message, timeout: float = 10) -> dict:
        """Send an unsequenced request (QueryBalances, operator messages) and await its reply."""
        await self.send(message)
        return await self.next_reply(timeout)

    async def subscribe(self, instruments: list[str], depth: int = 10) -> None:
        await self.send(Subscribe(list(instruments), depth))

    async def unsubscribe(self, instruments: list[str]) -> None:
        await self.send(Unsubscribe(list(instruments)))

    # reading ----------------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        reader = self.reader
        try:
            while True:
                header = await reader.readexactly(HEADER)
                body = await reader.readexactly(int.from_bytes(header, "big"))
                self.last_received = asyncio.get_running_loop().time()
                try:
                    msg = decode_server(body)
                except Exception:  # not a map with a type: skip it
                    continue
                typ = msg["type"]
                if typ in REPORT_TYPES:
                    self.reports.put_nowait(msg)
                elif typ in MARKET_TYPES:
                    self.market.put_nowait(msg)
                elif typ == "Heartbeat":
                    pass
                elif typ in ("LogonAccepted", "LogonRejected") or (
                        self._logon_waiter is not None and not self._logon_waiter.done()):
                    if self._logon_waiter is not None and not self._logon_waiter.done():
                        self._logon_waiter.set_result(msg)
                    else:
                        self.replies.put_nowait(msg)
                else:
                    self.replies.put_nowait(msg)
        except (asyncio.IncompleteReadError, ConnectionError, OSError, _ssl.SSLError):
            pass
        except asyncio.CancelledError:
            raise
        finally:
            if self._logon_waiter is not None and not self._logon_waiter.done():
                self._logon_waiter.set_exception(ConnectionClosed("closed before a logon reply"))
            self.closed.set()

    async def _heartbeats(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self.closed.is_set():
                await asyncio.sleep(max(self.heartbeat_s / 4, 0.05))
                if loop.time() - self.last_received > 3 * self.heartbeat_s:
                    self.writer.transport.abort()  # the server is gone: the read loop ends, closed is set
                    return
                if loop.time() - self.last_sent >= self.heartbeat_s * 0.5:
                    self.send_nowait(Heartbeat())
        except (ConnectionError, RuntimeError):
            pass
