"""The trade counters come from the engine and count this process's trades only."""

from engine import NewOrder, demo_config
from engine.journal import Ledger
from gateway._exchange import Exchange
from gateway._metrics import KaboniCollector


def _samples(exchange, family):
    for fam in KaboniCollector(exchange).collect():
        if fam.name == family:
            return {s.labels.get("instrument"): s.value for s in fam.samples if s.name == family + "_total"}
    raise AssertionError(f"no family {family}")


def _cross(ledger, n, ts):
    ledger.execute(NewOrder(f"s{n}", "CEA25", "sell", 10, 9250), "M01", ts)
    ledger.execute(NewOrder(f"b{n}", "CEA25", "buy", 10, 9250), "M02", ts + 1)


def test_trades_before_the_server_started_serving_are_not_counted(tmp_path):
    config = demo_config()
    ledger = Ledger.open(config, tmp_path, durability="none", today="2026-11-24")
    try:
        _cross(ledger, 1, 10)  # as if replayed by recovery before the gateway starts
        assert ledger.engine.traded("CEA25") == (1, 10, 92_500)
        exchange = Exchange(config, ledger, clock_ns=lambda: 42)
        assert _samples(exchange, "kaboni_trades")["CEA25"] == 0
        _cross(ledger, 2, 20)
        _cross(ledger, 3, 30)
        assert _samples(exchange, "kaboni_trades")["CEA25"] == 2
        assert _samples(exchange, "kaboni_traded_quantity_tonnes")["CEA25"] == 20
        assert _samples(exchange, "kaboni_traded_value_minor_units")["CEA25"] == 185_000
        assert _samples(exchange, "kaboni_trades")["CEA24"] == 0
    finally:
        ledger.close()


def test_engine_trade_counters_are_not_part_of_the_state(tmp_path):
    config = demo_config()
    ledger = Ledger.open(config, tmp_path, durability="none", today="2026-11-24")
    try:
        before = ledger.engine.state_hash()
        ledger.engine._instruments["CEA25"].trades += 5  # statistics only
        assert ledger.engine.state_hash() == before
    finally:
        ledger.close()
