"""Kaboni's gateway: the member protocol over TCP (asyncio + uvloop), market data, metrics, CLI."""

__all__: list[str] = []
