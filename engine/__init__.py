"""Kaboni's deterministic core: order books, accounts and risk, and the settlement journal.

No sockets, no asyncio, no wall clock: commands go in with their time, events come out.
"""

from ._config import (
    DEMO_TOML, MAX_AMOUNT, MAX_PRICE, ConfigError, ExchangeConfig, GatewayConfig, InstrumentConfig, MarketConfig, MemberConfig,
    ScheduleConfig, demo_config, hash_token, load_config, parse_config, price_band,
)
from ._engine import SNAPSHOT_VERSION, Engine, InvariantError, LeftOutError
from ._messages import *  # noqa: F403
from ._messages import __all__ as _message_names

__all__ = [
    "Engine", "InvariantError", "LeftOutError", "SNAPSHOT_VERSION",
    "ConfigError", "ExchangeConfig", "GatewayConfig", "InstrumentConfig", "MarketConfig", "MemberConfig",
    "ScheduleConfig", "demo_config", "hash_token", "load_config", "parse_config", "price_band", "DEMO_TOML",
    "MAX_AMOUNT", "MAX_PRICE", *_message_names,
]
