from engine import Deposit, Engine, NewOrder, OpenMarket, OrderAccepted, demo_config


def test_demo_config_loads_and_trades():
    engine = Engine(demo_config(), "2026-11-24")
    engine.execute(Deposit("c1", "M01", "CNY", 10_000_000), "ops", 1)
    engine.execute(OpenMarket(), "ops", 2)
    events = engine.execute(NewOrder("a", "CEA25", "buy", 10, 9250), "M01", 3)
    assert isinstance(events[0], OrderAccepted)
    engine.check()
