"""Builds deploy/grafana/kaboni.json: python deploy/grafana/build_dashboard.py > deploy/grafana/kaboni.json

Panels are written as code so the PromQL stays consistent across panels (one selector, one
quantile helper); tests/test_alerts.py checks the JSON is what this script prints.
"""
import json

DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'job="kaboni", instance=~"$instance"'
ISEL = SEL + ', instrument=~"$instrument"'
panels = []
pid = 0
y = 0


def nid():
    global pid
    pid += 1
    return pid


def row(title):
    global y
    panels.append({"type": "row", "title": title, "id": nid(), "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
    y += 1


def ts(title, targets, x, w, h=8, unit="short", desc="", stack=False, extra=None):
    p = {
        "type": "timeseries", "title": title, "id": nid(), "datasource": DS, "description": desc,
        "gridPos": {"h": h, "w": w, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit, "custom": {
            "drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if not stack else 40,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
            "showPoints": "never", "spanNulls": False}}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull", "max"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [{"datasource": DS, "expr": e, "legendFormat": l, "refId": chr(65 + i)}
                    for i, (e, l) in enumerate(targets)],
    }
    if extra:
        p.update(extra)
    panels.append(p)


def stat(title, expr, x, w, unit="short", legend="", desc="", h=4, mappings=None, thresholds=None, text=None):
    p = {
        "type": "stat", "title": title, "id": nid(), "datasource": DS, "description": desc,
        "gridPos": {"h": h, "w": w, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit, "mappings": mappings or [],
                                     "thresholds": thresholds or {"mode": "absolute", "steps": [{"color": "green", "value": None}]}},
                        "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": f"/^{text}$/" if text else "", "values": False},
                    "colorMode": "value", "graphMode": "none" if text else "area", "textMode": "auto",
                    "justifyMode": "auto", "orientation": "auto"},
        "targets": [{"datasource": DS, "expr": expr, "legendFormat": legend, "refId": "A",
                     **({"format": "table", "instant": True} if text else {})}],
    }
    panels.append(p)


def nexty(h):
    global y
    y += h


# ---------------------------------------------------------------- overview
row("Overview")
stat("Exchange up", f'up{{{SEL}}}', 0, 2, desc="1 when Prometheus can scrape the exchange.",
     mappings=[{"type": "value", "options": {"0": {"text": "DOWN", "color": "red"}, "1": {"text": "UP", "color": "green"}}}],
     thresholds={"mode": "absolute", "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}]})
stat("Trading day", f'kaboni_trading_day_info{{{SEL}}}', 2, 3, text="trading_day",
     desc="The exchange's current trading day; end of day advances it.")
stat("Version", f'kaboni_build_info{{{SEL}}}', 5, 3, text="version", desc="Kaboni version (kaboni_build_info).")
stat("Uptime", f'time() - kaboni_start_time_seconds{{{SEL}}}', 8, 2, unit="s", desc="Time since the process started.")
stat("Member sessions", f'sum(kaboni_sessions{{{SEL}, role="member"}})', 10, 2, desc="Member sessions logged on now.")
stat("Orders / s", f'sum(rate(kaboni_orders_received_total{{{SEL}}}[$__rate_interval]))', 12, 3, unit="reqps",
     desc="Order-entry requests received (all types and outcomes).")
stat("Trades / s", f'sum(rate(kaboni_trades_total{{{ISEL}}}[$__rate_interval]))', 15, 3, unit="ops")
stat("Order-to-report p99",
     f'histogram_quantile(0.99, sum by (le) (rate(kaboni_order_to_report_latency_seconds_bucket{{{SEL}}}[$__rate_interval])))',
     18, 3, unit="s", thresholds={"mode": "absolute", "steps": [{"color": "green", "value": None}, {"color": "orange", "value": 0.01}, {"color": "red", "value": 0.025}]})
stat("Journal records pending", f'sum(kaboni_journal_records_pending{{{SEL}}})', 21, 3,
     thresholds={"mode": "absolute", "steps": [{"color": "green", "value": None}, {"color": "orange", "value": 1000}, {"color": "red", "value": 10000}]})
nexty(4)

# ---------------------------------------------------------------- trading activity
row("Trading activity")
ts("Orders received by type and outcome", [
    (f'sum by (type, outcome) (rate(kaboni_orders_received_total{{{SEL}}}[$__rate_interval]))', "{{type}} {{outcome}}")],
    0, 12, unit="reqps", stack=True, desc="NewOrder, CancelOrder, ReplaceOrder, MassCancel by outcome (accepted, rejected, invalid).")
ts("Rejects by reason", [
    (f'sum by (reason) (rate(kaboni_rejects_total{{{SEL}}}[$__rate_interval]))', "{{reason}}"),
    (f'sum(rate(kaboni_throttled_messages_total{{{SEL}}}[$__rate_interval]))', "throttled messages")],
    12, 12, unit="reqps", desc="OrderRejected and CancelRejected reasons; throttled messages separately.")
nexty(8)
ts("Trades per instrument", [
    (f'sum by (instrument) (rate(kaboni_trades_total{{{ISEL}}}[$__rate_interval]))', "{{instrument}}")],
    0, 8, unit="ops", stack=True)
ts("Traded quantity per instrument", [
    (f'sum by (instrument) (rate(kaboni_traded_quantity_tonnes_total{{{ISEL}}}[$__rate_interval]))', "{{instrument}}")],
    8, 8, unit="t/s", stack=True, desc="Tonnes of CO2e per second.")
ts("Traded value per instrument", [
    (f'sum by (instrument, currency) (increase(kaboni_traded_value_minor_units_total{{{ISEL}}}[$__rate_interval])) / 100', "{{instrument}} ({{currency}})")],
    8 * 2, 8, unit="short", stack=True, desc="Cash traded per interval in major currency units (minor units / 100).")
nexty(8)

# ---------------------------------------------------------------- market
row("Market")
ts("Best bid and ask", [
    (f'kaboni_best_bid_price_minor_units{{{ISEL}}} / 100', "{{instrument}} bid"),
    (f'kaboni_best_ask_price_minor_units{{{ISEL}}} / 100', "{{instrument}} ask")],
    0, 12, unit="short", desc="Top of book in major currency units per tonne; a gap means that side of the book is empty.")
ts("Resting orders", [
    (f'kaboni_resting_orders{{{ISEL}}}', "{{instrument}}")], 12, 6)
ts("Resting quantity", [
    (f'kaboni_resting_quantity_tonnes{{{ISEL}}}', "{{instrument}}")], 18, 6, unit="t")
nexty(8)
panels.append({
    "type": "state-timeline", "title": "Instrument state", "id": nid(), "datasource": DS,
    "description": "open / halted / closed per instrument.",
    "gridPos": {"h": 6, "w": 24, "x": 0, "y": y},
    "fieldConfig": {"defaults": {"mappings": [{"type": "value", "options": {
        "0": {"text": "closed", "color": "text"}, "1": {"text": "open", "color": "green"}, "2": {"text": "halted", "color": "red"}}}],
        "thresholds": {"mode": "absolute", "steps": [{"color": "green", "value": None}]}}, "overrides": []},
    "options": {"showValue": "auto", "mergeValues": True, "rowHeight": 0.8, "legend": {"showLegend": False}},
    "targets": [{"datasource": DS, "refId": "A", "legendFormat": "{{instrument}}",
                 "expr": f'max by (instrument) (kaboni_instrument_state{{{ISEL}, state="open"}} * 1 or kaboni_instrument_state{{{ISEL}, state="halted"}} * 2 or kaboni_instrument_state{{{ISEL}, state="closed"}} * 0)'}],
})
nexty(6)

# ---------------------------------------------------------------- latency
row("Latency")
q = lambda m, qq: f'histogram_quantile({qq}, sum by (le) (rate({m}_bucket{{{SEL}}}[$__rate_interval])))'
ts("Order-to-report latency", [
    (q("kaboni_order_to_report_latency_seconds", 0.5), "p50"),
    (q("kaboni_order_to_report_latency_seconds", 0.99), "p99"),
    (q("kaboni_order_to_report_latency_seconds", 0.999), "p99.9")],
    0, 12, unit="s", desc="From a request's arrival to its first report leaving (after the journal made it durable). Bucketed: values are interpolated within buckets.")
ts("Journal append-to-durable latency", [
    (q("kaboni_journal_append_to_durable_seconds", 0.5), "p50"),
    (q("kaboni_journal_append_to_durable_seconds", 0.99), "p99"),
    (q("kaboni_journal_append_to_durable_seconds", 0.999), "p99.9")],
    12, 12, unit="s", desc="From a record's append to the fsync that made it durable.")
nexty(8)

# ---------------------------------------------------------------- journal
row("Journal health")
ts("fsync duration", [
    (q("kaboni_journal_fsync_seconds", 0.5), "p50"),
    (q("kaboni_journal_fsync_seconds", 0.99), "p99"),
    (f'sum(rate(kaboni_journal_fsync_seconds_count{{{SEL}}}[$__rate_interval]))', "fsyncs/s")],
    0, 8, unit="s", extra={"fieldConfig": {"defaults": {"unit": "s", "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}},
                                           "overrides": [{"matcher": {"id": "byName", "options": "fsyncs/s"},
                                                          "properties": [{"id": "unit", "value": "ops"}, {"id": "custom.axisPlacement", "value": "right"}]}]}})
ts("Records per batch", [
    (q("kaboni_journal_batch_records", 0.5), "p50"),
    (q("kaboni_journal_batch_records", 0.99), "p99"),
    (f'sum(rate(kaboni_journal_batch_records_sum{{{SEL}}}[$__rate_interval]))', "records/s")],
    8, 8, desc="Group commit: how many records each fsync covered.")
ts("Bytes written and records pending", [
    (f'sum(rate(kaboni_journal_bytes_written_total{{{SEL}}}[$__rate_interval]))', "bytes/s"),
    (f'sum(kaboni_journal_records_pending{{{SEL}}})', "records pending")],
    16, 8, unit="Bps", extra={"fieldConfig": {"defaults": {"unit": "Bps", "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}},
                                               "overrides": [{"matcher": {"id": "byName", "options": "records pending"},
                                                              "properties": [{"id": "unit", "value": "short"}, {"id": "custom.axisPlacement", "value": "right"}]}]}})
nexty(8)

# ---------------------------------------------------------------- sessions & process
row("Sessions and process")
ts("Sessions by role", [
    (f'sum by (role) (kaboni_sessions{{{SEL}}})', "{{role}}")], 0, 8)
ts("Disconnects by cause", [
    (f'sum by (cause) (increase(kaboni_disconnects_total{{{SEL}}}[$__rate_interval]))', "{{cause}}")],
    8, 8, stack=True, desc="slow_consumer and heartbeat_timeout point at a member's client or network; framing_error at a broken client.")
ts("Process CPU and memory", [
    (f'rate(process_cpu_seconds_total{{{SEL}}}[$__rate_interval])', "CPU (cores)"),
    (f'process_resident_memory_bytes{{{SEL}}}', "resident memory")],
    16, 8, extra={"fieldConfig": {"defaults": {"unit": "short", "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}},
                                  "overrides": [{"matcher": {"id": "byName", "options": "resident memory"},
                                                 "properties": [{"id": "unit", "value": "bytes"}, {"id": "custom.axisPlacement", "value": "right"}]}]}})
nexty(8)
ts("Outbound held back at the bound", [
    (f'sum by (kind) (increase(kaboni_outbound_held_total{{{SEL}}}[$__rate_interval]))', "{{kind}}")],
    0, 8, stack=True, desc="A burst (a big mass cancel) reached half a session's outbound bound: md_resync, its market "
                           "data resumes with a fresh BookSnapshot; reports_overflow, its reports go on by the paced "
                           "replay. Steady rates point at a member reading too slowly.")
nexty(8)

dash = {
    "__inputs": [],
    "title": "Kaboni exchange",
    "uid": "kaboni-exchange",
    "description": "Kaboni carbon allowance exchange: trading activity, latency, journal health, sessions.",
    "tags": ["kaboni", "exchange"],
    "timezone": "utc",
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "graphTooltip": 1,
    "refresh": "5s",
    "time": {"from": "now-30m", "to": "now"},
    "annotations": {"list": []},
    "links": [],
    "templating": {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []},
        {"name": "instance", "label": "Exchange", "type": "query", "datasource": DS,
         "query": {"query": 'label_values(up{job="kaboni"}, instance)', "refId": "instance"},
         "definition": 'label_values(up{job="kaboni"}, instance)',
         "refresh": 2, "includeAll": False, "multi": False, "current": {}, "options": [], "sort": 1, "hide": 0},
        {"name": "instrument", "label": "Instrument", "type": "query", "datasource": DS,
         "query": {"query": 'label_values(kaboni_instrument_state{job="kaboni", instance=~"$instance"}, instrument)', "refId": "instrument"},
         "definition": 'label_values(kaboni_instrument_state{job="kaboni", instance=~"$instance"}, instrument)',
         "refresh": 2, "includeAll": True, "allValue": ".*", "multi": True, "current": {}, "options": [], "sort": 1, "hide": 0},
    ]},
    "panels": panels,
}
print(json.dumps(dash, indent=2))
