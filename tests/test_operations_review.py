"""Second operations review: what an operator relies on in docs/operations.md, checked for real.

Subprocess tests run ``python -m gateway`` from this checkout (PYTHONPATH = the repo root)."""

from __future__ import annotations

import pytest

from engine import ConfigError, parse_config

BASE = """
[[instruments]]
symbol = "CEA25"
currency = "CNY"
reference_price = 9250
"""


@pytest.mark.parametrize("line, key", [
    ('first_trading_day = "20261124"', "market.first_trading_day"),
    ('first_trading_day = "2026-W48-2"', "market.first_trading_day"),
    ('holidays = ["20261225"]', "market.holidays[0]"),
])
def test_market_dates_must_be_written_yyyy_mm_dd(line, key):
    # Python 3.11's date.fromisoformat also takes 20261124 and 2026-W48-2. The engine compares
    # days as YYYY-MM-DD strings: such a holiday was never skipped, and such a first trading day
    # was written into every FILL record, where `kaboni settle --day` cannot name it.
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        parse_config("[market]\n" + line + "\n" + BASE)
