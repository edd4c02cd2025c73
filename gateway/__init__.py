"""Kaboni's gateway: the member protocol over TCP (asyncio + uvloop), market data, metrics, CLI.

Member firms use ``gateway.client.Client``; operators run ``kaboni serve`` (``gateway.cli``).
"""

from .client import Client, ConnectionClosed, LogonError

__all__ = ["Client", "ConnectionClosed", "LogonError"]
