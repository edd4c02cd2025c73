"""The exchange core without sockets or threads: durability is in the test's hands."""

import logging

from gateway._exchange import TICK_PARTS, Exchange

from _fakes import ManualLedger, decode_frames, enc, logged_lines, make_config


class Sink:
    def __init__(self):
        self.data = b""
        self.closed = False
        self.replays_pending = 0

    def write(self, b):
        assert not self.closed
        self.data += b

    def close(self):
        self.closed = True

    abort = close

    def replay_later(self):
        self.replays_pending += 1

    def frames(self):
        out = decode_frames(self.data)
        self.data = b""
        return out


def setup():
    config = make_config()
    ledger = ManualLedger(config)
    ex = Exchange(config, ledger, clock_ns=lambda: 42)
    return ex, ledger


def connect(ex, member, **logon):
    sink = Sink()
    s = ex.connect(sink, 0.0)
    ex.data_received(s, enc({"type": "Logon", "member": member, "token": f"{member}-token", **logon}), 0.0)
    return s, sink


def test_nothing_leaves_before_it_is_durable_and_replies_keep_their_place():
    ex, ledger = setup()
    a, sa = connect(ex, "M01")
    b, sb = connect(ex, "M02")
    assert [f["type"] for f in sa.frames()] == ["LogonAccepted"]
    sb.frames()
    ex.data_received(b, enc({"type": "Subscribe", "instruments": ["CEA25"]}), 0.0)
    assert [f["type"] for f in sb.frames()] == ["BookSnapshot"]  # nothing pending: at once
    order = {"type": "NewOrder", "cl_ord_id": "o1", "instrument": "CEA25", "side": "sell", "qty": 5, "price": 9300}
    ex.data_received(a, enc(order) + enc({"type": "QueryBalances"}), 0.0)
    ex.data_received(b, enc({"type": "Subscribe", "instruments": ["CEA25"]}), 0.0)
    assert sa.frames() == [] and sb.frames() == []        # the order is not durable yet
    ex.on_durable(ledger.last_seq - 1)
    assert sa.frames() == [] and sb.frames() == []
    ledger.durable_seq = ledger.last_seq
    ex.on_durable(ledger.last_seq)
    fa = sa.frames()
    assert [f["type"] for f in fa] == ["OrderAccepted", "Balances"]
    assert fa[1]["allowances"]["CEA25"]["reserved"] == 5  # the figure shows the durable order
    fb = sb.frames()
    assert [f["type"] for f in fb] == ["BookUpdate", "BookSnapshot"]
    assert fb[1]["md_seq"] == fb[0]["md_seq"] and fb[1]["asks"] == [[9300, 5, 1]]


def test_resume_while_reports_wait_for_the_journal_has_no_gap_or_duplicate():
    ex, ledger = setup()
    a, sa = connect(ex, "M01")
    for i in range(3):
        ex.data_received(a, enc({"type": "NewOrder", "cl_ord_id": f"o{i}", "instrument": "CEA25", "side": "sell",
                                 "qty": 1, "price": 9300 + i}), 0.0)
    ledger.durable_seq = ledger.last_seq
    ex.on_durable(ledger.last_seq)
    ex.data_received(a, enc({"type": "NewOrder", "cl_ord_id": "o9", "instrument": "CEA25", "side": "sell",
                             "qty": 1, "price": 9310}), 0.0)      # seq 4, not durable yet
    late, sl = connect(ex, "M01", resume_from=1)
    fl = sl.frames()
    assert fl[0]["type"] == "LogonAccepted" and fl[0]["next_seq"] == 4   # 4 is not durable: not promised
    assert [f["seq"] for f in fl[1:]] == [2, 3]                   # replayed from the journal
    fresh, sf = connect(ex, "M01")                                 # no resume: from next_seq on
    assert [(f["type"], f["next_seq"]) for f in sf.frames()] == [("LogonAccepted", 4)]
    ledger.durable_seq = ledger.last_seq
    ex.on_durable(ledger.last_seq)
    assert [f["seq"] for f in sl.frames()] == [4]                  # then live, once
    assert [f["seq"] for f in sf.frames()] == [4]                  # its next_seq: live, once
    assert [f.get("seq") for f in sa.frames()] == [None, 1, 2, 3, 4]


def test_logon_promises_only_durable_reports_and_resume_is_bounded_by_them():
    ex, ledger = setup()
    a, sa = connect(ex, "M01")
    ex.data_received(a, enc({"type": "NewOrder", "cl_ord_id": "o1", "instrument": "CEA25", "side": "sell",
                             "qty": 1, "price": 9300}), 0.0)
    ledger.durable_seq = ledger.last_seq
    ex.on_durable(ledger.last_seq)
    ex.data_received(a, enc({"type": "NewOrder", "cl_ord_id": "o2", "instrument": "CEA25", "side": "sell",
                             "qty": 1, "price": 9301}), 0.0)      # report seq 2, durability stalled
    assert ledger.engine.last_seq("M01") == 2
    _, sr = connect(ex, "M01", resume_from=2)                      # 2 may never exist after a crash
    assert [(f["type"], f["reason"]) for f in sr.frames()] == [("LogonRejected", "invalid_resume")]
    b, sb = connect(ex, "M01", resume_from=1)                      # the last durable seq is valid
    assert [(f["type"], f["next_seq"]) for f in sb.frames()] == [("LogonAccepted", 2)]
    c, sc = connect(ex, "M02")                                     # another member: unaffected
    assert sc.frames()[0]["next_seq"] == 1
    ledger.durable_seq = ledger.last_seq
    ex.on_durable(ledger.last_seq)
    assert [(f["type"], f["seq"]) for f in sb.frames()] == [("OrderAccepted", 2)]   # once, live
    ex.on_durable(ledger.last_seq)
    assert sb.frames() == [] and sc.frames() == []


def test_cancel_on_disconnect_and_logout_goodbye_order():
    ex, ledger = setup()
    a, sa = connect(ex, "M01", cancel_on_disconnect=True)
    w, sw = connect(ex, "M01")
    ex.data_received(a, enc({"type": "NewOrder", "cl_ord_id": "c1", "instrument": "CEA25", "side": "buy",
                             "qty": 1, "price": 9000}) + enc({"type": "Logout"}), 0.0)
    ledger.durable_seq = ledger.last_seq
    ex.on_durable(ledger.last_seq)
    assert [(f["type"], f.get("reason")) for f in sa.frames()] == [
        ("LogonAccepted", None), ("OrderAccepted", None), ("OrderCancelled", "disconnect"), ("LogoutAccepted", None)]
    assert sa.closed and not sw.closed
    ex.connection_lost(a, "client_close", 0.0)
    assert a.cause == "logout" and ex.stats.disconnects["logout"] == 1
    assert [f["type"] for f in sw.frames()] == ["LogonAccepted", "OrderAccepted", "OrderCancelled"]
    assert ledger.engine.resting("CEA25") == (0, 0)


def test_a_long_resume_goes_out_in_steps_paced_by_the_peer_and_live_reports_wait_behind_it():
    from gateway._exchange import REPLAY_CHUNK

    ex, ledger = setup()
    a, sa = connect(ex, "M01")
    n = 2 * REPLAY_CHUNK + 100
    orders = b"".join(enc({"type": "NewOrder", "cl_ord_id": f"o{i}", "instrument": "CEA25", "side": "sell",
                           "qty": 1, "price": 9300}) for i in range(n))
    more = ex.data_received(a, orders, 0.0)
    while more:  # FRAMES_PER_TURN at a time, as the connection would run them
        more = ex.data_received(a, b"", 0.0)
    ledger.durable_seq = ledger.last_seq
    ex.on_durable(ledger.last_seq)
    assert len(sa.frames()) == n + 1  # LogonAccepted and a report per order
    late, sl = connect(ex, "M01", resume_from=0)
    got = [f["seq"] for f in sl.frames()[1:]]
    assert got == list(range(1, REPLAY_CHUNK + 1)) and sl.replays_pending == 1   # one step, then wait
    # a live report released meanwhile waits behind the replay
    ex.data_received(a, enc({"type": "CancelOrder", "cl_ord_id": "x1", "orig_cl_ord_id": "o0"}), 0.0)
    ledger.durable_seq = ledger.last_seq
    ex.on_durable(ledger.last_seq)
    assert [f["seq"] for f in sa.frames()] == [n + 1]
    assert sl.frames() == []
    while sl.replays_pending:
        sl.replays_pending -= 1
        ex.replay_more(late)
        got += [f["seq"] for f in sl.frames()]
    assert got == list(range(1, n + 2))                     # all of it, once, in order, the live one last
    assert late.replay_after is None
    ex.data_received(a, enc({"type": "CancelOrder", "cl_ord_id": "x2", "orig_cl_ord_id": "o1"}), 0.0)
    ledger.durable_seq = ledger.last_seq
    ex.on_durable(ledger.last_seq)
    assert [f["seq"] for f in sl.frames()] == [n + 2]       # then live


def test_a_logon_cannot_forge_log_lines_or_fields():
    with logged_lines() as lines:
        ex, _ = setup()
        forged = 'x" role=operator\nts=2026-11-24T00:00:00.000Z level=INFO event=logon member=ops role=operator'
        _, sink = connect(ex, forged)
        assert [(f["type"], f["reason"]) for f in sink.frames()] == [("LogonRejected", "bad_credentials")]
        _, sink = connect(ex, "M" * 1_000)
        _, sink = connect(ex, "M01")
    assert len(lines) == 3 and all("\n" not in line and "\r" not in line for line in lines)
    assert lines[0] == ('event=logon_rejected member="x\\" role=operator\\nts=2026-11-24T00:00:00.000Z level=INFO '
                        'event=logon member=ops role=operator" reason=bad_credentials')
    assert lines[1] == f"event=logon_rejected member={'M' * 128}... reason=bad_credentials"
    assert lines[2].startswith("event=logon member=M01 role=member ")


def test_a_subscribe_naming_an_instrument_many_times_gets_one_snapshot():
    ex, _ = setup()
    m, sm = connect(ex, "M01")
    sm.frames()
    ex.data_received(m, enc({"type": "Subscribe", "instruments": ["CEA25"] * 5_000 + ["CEA24", "CEA25"]}), 0.0)
    assert [(f["type"], f["instrument"]) for f in sm.frames()] == [("BookSnapshot", "CEA25"), ("BookSnapshot", "CEA24")]
    assert ex.subscribers["CEA25"] == (m,)
    ex.data_received(m, enc({"type": "Subscribe", "instruments": ["CEA25"] * 100 + ["NOPE"] * 100}), 0.0)
    assert [(f["type"], f["reason"]) for f in sm.frames()] == [("Error", "invalid_message")]
    ex.data_received(m, enc({"type": "Unsubscribe", "instruments": ["CEA25"] * 5_000}), 0.0)
    assert sm.frames() == [] and ex.subscribers["CEA25"] == () and m.subscriptions == {"CEA24"}


def test_every_operator_action_is_logged_with_who_did_it_and_logon_timeouts_too():
    with logged_lines() as lines:
        ex, _ = setup()
        ops, _ = connect(ex, "ops")
        for msg in [
            {"type": "Halt", "instrument": "CEA25"},
            {"type": "Deposit", "ref": "d1", "member": "M01", "asset": "CNY", "amount": 500},
            {"type": "Deposit", "ref": "d1", "member": "M01", "asset": "CNY", "amount": 500},
            {"type": "Withdraw", "ref": "w1", "member": "M01", "asset": "CNY", "amount": 10**18},
            {"type": "Resume", "instrument": "CEA25"},
        ]:
            ex.data_received(ops, enc(msg), 0.0)
        ex.connect(Sink(), 0.0)  # never logs on
        for _ in range(TICK_PARTS):
            ex.tick(60.0)
    assert lines[1:] == [
        "event=halt operator=ops instrument=CEA25 cancel_orders=False",
        "event=deposit operator=ops ref=d1 member=M01 asset=CNY amount=500",
        "event=deposit operator=ops ref=d1 member=M01 asset=CNY amount=500 duplicate=True",
        "event=admin_rejected operator=ops request=Withdraw reason=insufficient_funds ref=w1 member=M01 asset=CNY "
        "amount=1000000000000000000",
        "event=resume operator=ops instrument=CEA25",
        "event=heartbeat_timeout member=ops session=1",  # a minute of silence
        "event=logon_timeout session=2",
    ]


def test_every_log_line_is_one_line_of_key_value_fields():
    from gateway._server import KeyValueFormatter

    def line(name, level, msg, *args, exc_info=None):
        record = logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)
        return KeyValueFormatter().format(record)

    assert line("kaboni", logging.INFO, "event=logon member=M01").endswith(" level=INFO event=logon member=M01")
    torn = line("kaboni.journal", logging.WARNING, "%s: torn tail of %d bytes", "/data dir/journal.kbj", 7)
    assert torn.endswith(' level=WARNING event=journal message="/data dir/journal.kbj: torn tail of 7 bytes"')
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        import sys

        failed = line("kaboni", logging.ERROR, "event=internal_error", exc_info=sys.exc_info())
    assert "\n" not in failed and ' event=internal_error traceback="Traceback' in failed
    assert failed.startswith("ts=") and "Z level=ERROR " in failed


def test_one_connection_runs_at_most_frames_per_turn_and_says_when_frames_are_left():
    """A client pipelining thousands of frames gets them run FRAMES_PER_TURN at a time; the
    connection reads nothing more until they are done, so others get their turns between."""
    from gateway._exchange import FRAMES_PER_TURN

    ex, ledger = setup()
    a, sa = connect(ex, "M01")
    sa.frames()
    queries = enc({"type": "QueryBalances"}) * (2 * FRAMES_PER_TURN + 5)
    turns = [ex.data_received(a, queries, 0.0)]
    replies = [len(sa.frames())]
    while turns[-1]:
        turns.append(ex.data_received(a, b"", 0.0))
        replies.append(len(sa.frames()))
    assert turns == [True, True, False]
    assert replies == [FRAMES_PER_TURN, FRAMES_PER_TURN, 5]
    # a Logon's decision does not reset the budget: frames after it wait for the next turn too
    b = ex.connect(Sink(), 0.0)
    logon = enc({"type": "Logon", "member": "M02", "token": "M02-token"})
    assert ex.data_received(b, logon + queries, 0.0) is True
