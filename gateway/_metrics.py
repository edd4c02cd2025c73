"""Plain counters on the order path, exported to Prometheus at scrape time.

The order path only adds to dicts and ints in ``Stats`` (and can skip even that with
``enabled=False``, to measure what it costs). ``KaboniCollector`` reads ``Stats``, the engine
and the journal's ``stats`` when Prometheus scrapes, so the client library is never called per
order. Metric names are the contract of issue 5 (see docs/operations.md).
"""

from __future__ import annotations

import platform
import time
from bisect import bisect_left
from collections import defaultdict

from engine._histogram import FixedHistogram
from engine.journal._log import FSYNC_BOUNDS

from ._version import installed_version

__all__ = ["Stats", "KaboniCollector", "start_metrics_server", "VERSION", "ORDER_LATENCY_BOUNDS"]

VERSION = installed_version()  # one version for kaboni_build_info and kaboni --version
# The journal's fsync buckets (fine between 0.1 and 10 ms, where an order's report lands: one or
# two fsyncs), so the order-to-report p99 and the fsync p99 are read off the same bounds.
ORDER_LATENCY_BOUNDS = FSYNC_BOUNDS
STATES = ("open", "halted", "closed")


class Stats:
    """What the gateway counts; plain Python numbers, read by the collector.

    Keyed for the order path's convenience (message classes, instrument symbols); the collector
    turns keys into labels. ``received[type] - rejected[type]`` is accepted; malformed requests
    never reach ``received`` (they are counted in ``invalid``, by type name).
    """

    def __init__(self, enabled: bool = True) -> None:
        from engine import ORDER_COMMANDS

        self.enabled = enabled
        self.received = {cls: 0 for cls in ORDER_COMMANDS}   # well-formed requests run
        self.rejected = {cls: 0 for cls in ORDER_COMMANDS}
        self.invalid: defaultdict[str, int] = defaultdict(int)  # by type name (never decoded)
        self.rejects: defaultdict[str, int] = defaultdict(int)
        # The engine counts trades, tonnes and value per instrument itself, once per matching
        # order; these are its figures when this process started serving (after recovery's
        # replay), so the exported counters count this process's trades only.
        self.traded_base: dict[str, tuple[int, int, int]] = {}
        self.latencies: list[float] = []   # folded in by order_to_report() at scrape time
        self._order_to_report = FixedHistogram(ORDER_LATENCY_BOUNDS)
        self.throttled = 0
        # kaboni_outbound_held_total{kind}: also logged as md_resync and reports_overflow
        self.md_resyncs = 0        # a subscriber's instrument went stale near the outbound bound
        self.report_overflows = 0  # a session's live reports went to a paced replay at the bound
        self.disconnects: defaultdict[str, int] = defaultdict(int)
        self.start_time = time.time()

    def order_to_report(self) -> FixedHistogram:
        """The order-to-report histogram, after folding in the latencies noted since the last call
        (the order path only appends to a list)."""
        pending, self.latencies = self.latencies, []
        hist = self._order_to_report
        bounds, counts = hist.bounds, hist.counts
        for v in pending:
            counts[bisect_left(bounds, v)] += 1
        hist.sum += sum(pending)
        hist.count += len(pending)
        return hist

    def orders(self) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for cls, n in self.received.items():
            name = cls.__name__
            rejected = self.rejected[cls]
            out[(name, "accepted")] = n - rejected
            out[(name, "rejected")] = rejected
            out[(name, "invalid")] = self.invalid.get(name, 0)
        return out


def _histogram(name: str, doc: str, hist: FixedHistogram):
    from prometheus_client.core import HistogramMetricFamily

    return HistogramMetricFamily(name, doc, buckets=hist.cumulative(), sum_value=hist.sum)


class KaboniCollector:
    """A custom collector: everything is computed from plain state at scrape time."""

    def __init__(self, exchange=None, runner=None) -> None:
        self.exchange = exchange  # None while the journal is still being recovered at start-up
        # The engine and the counters belong to the event loop's thread; the HTTP server's
        # thread asks the loop to build the families (``runner``) instead of racing it.
        self.runner = runner or (lambda fn: fn())

    def describe(self):
        return []

    def collect(self):
        if self.exchange is None:
            return iter(())  # starting: only the process collector's figures
        return iter(self.runner(lambda: list(self._families())))

    def _families(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        ex = self.exchange
        st: Stats = ex.stats
        engine = ex.ledger.engine
        config = ex.config
        currency = {i.symbol: i.currency for i in config.instruments}

        m = CounterMetricFamily("kaboni_orders_received", "Order-entry messages received, by type and outcome.",
                                labels=["type", "outcome"])
        for (typ, outcome), n in st.orders().items():
            m.add_metric([typ, outcome], n)
        yield m
        m = CounterMetricFamily("kaboni_rejects", "Rejected order-entry requests, by reason.", labels=["reason"])
        for reason, n in list(st.rejects.items()):
            m.add_metric([reason], n)
        yield m
        trades = CounterMetricFamily("kaboni_trades", "Trades, per instrument.", labels=["instrument"])
        qty = CounterMetricFamily("kaboni_traded_quantity_tonnes", "Traded quantity in tonnes.", labels=["instrument"])
        value = CounterMetricFamily("kaboni_traded_value_minor_units", "Traded value in minor currency units.",
                                    labels=["instrument", "currency"])
        for sym in engine.instruments:
            n, q, v = engine.traded(sym)
            n0, q0, v0 = st.traded_base.get(sym, (0, 0, 0))
            n, q, v = n - n0, q - q0, v - v0
            trades.add_metric([sym], n)
            qty.add_metric([sym], q)
            value.add_metric([sym, currency[sym]], v)
        yield trades
        yield qty
        yield value
        yield _histogram("kaboni_order_to_report_latency_seconds",
                         "From an order's bytes arriving to its first report leaving (after the journal made it durable).",
                         st.order_to_report())
        js = ex.ledger.stats
        yield _histogram("kaboni_journal_append_to_durable_seconds", "From a journal append to its fsync completing.",
                         js.append_to_durable_seconds)
        yield _histogram("kaboni_journal_batch_records", "Records per journal group commit.", js.batch_records)
        yield _histogram("kaboni_journal_fsync_seconds", "Duration of one journal fsync.", js.fsync_seconds)
        yield CounterMetricFamily("kaboni_journal_bytes_written", "Bytes appended to the journal.", value=js.bytes)
        yield GaugeMetricFamily("kaboni_journal_records_pending", "Records appended but not yet durable.",
                                value=js.pending)
        g = GaugeMetricFamily("kaboni_sessions", "Sessions logged on, by role.", labels=["role"])
        roles = ex.session_counts()
        for role in ("member", "operator"):
            g.add_metric([role], roles.get(role, 0))
        yield g
        yield CounterMetricFamily("kaboni_throttled_messages", "Order-entry messages refused by the throttle.",
                                  value=st.throttled)
        m = CounterMetricFamily("kaboni_disconnects", "Connections ended, by cause.", labels=["cause"])
        for cause in ("client_close", "heartbeat_timeout", "slow_consumer", "framing_error", "logout",
                      "logon_timeout", "logon_rejected", "shutdown", "tls_handshake_failed", "replay_failed",
                      "throttle_abuse", "peer_blocked", "peer_pending_limit", "too_many_pending_logons",
                      "too_many_connections"):
            m.add_metric([cause], st.disconnects.get(cause, 0))
        yield m
        m = CounterMetricFamily("kaboni_outbound_held", "Bursts held back at half a session's outbound bound, "
                                "by kind (md_resync, reports_overflow).", labels=["kind"])
        m.add_metric(["md_resync"], st.md_resyncs)
        m.add_metric(["reports_overflow"], st.report_overflows)
        yield m
        bid = GaugeMetricFamily("kaboni_best_bid_price_minor_units", "Best bid price.", labels=["instrument"])
        ask = GaugeMetricFamily("kaboni_best_ask_price_minor_units", "Best ask price.", labels=["instrument"])
        resting = GaugeMetricFamily("kaboni_resting_orders", "Orders resting in the book.", labels=["instrument"])
        rqty = GaugeMetricFamily("kaboni_resting_quantity_tonnes", "Open quantity resting in the book.",
                                 labels=["instrument"])
        state = GaugeMetricFamily("kaboni_instrument_state", "1 for the instrument's current state.",
                                  labels=["instrument", "state"])
        for sym in engine.instruments:
            b, a = engine.best_prices(sym)
            if b is not None:
                bid.add_metric([sym], b)
            if a is not None:
                ask.add_metric([sym], a)
            n, q = engine.resting(sym)
            resting.add_metric([sym], n)
            rqty.add_metric([sym], q)
            current = engine.status(sym)
            for s in STATES:
                state.add_metric([sym, s], 1 if s == current else 0)
        yield bid
        yield ask
        yield resting
        yield rqty
        yield state
        g = GaugeMetricFamily("kaboni_trading_day_info", "The current trading day.", labels=["trading_day"])
        g.add_metric([engine.trading_day], 1)
        yield g
        g = GaugeMetricFamily("kaboni_build_info", "Kaboni version and Python.", labels=["version", "python"])
        g.add_metric([VERSION, platform.python_version()], 1)
        yield g
        yield GaugeMetricFamily("kaboni_start_time_seconds", "Start time of the server (Unix seconds).",
                                value=st.start_time)


def start_metrics_server(collector: KaboniCollector, port: int, host: str = "127.0.0.1"):
    """Serve /metrics on its own registry: our collector plus the process collector."""
    from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return start_http_server(port, addr=host, registry=registry)
