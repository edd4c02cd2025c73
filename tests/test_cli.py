"""The ``kaboni`` command line against a live server: environment, errors, --follow, --help."""

import json

import pytest

from gateway.cli import main

from _fakes import ThreadServer, make_config


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ThreadServer(make_config(), tmp_path_factory.mktemp("cli")) as s:
        yield s


def cli(server, capsys, *argv):
    code = main([argv[0], "--port", str(server.port), *argv[1:]])
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines() if line.strip()], captured.err


def test_admin_reads_kaboni_member_and_token_from_the_environment(server, capsys, monkeypatch):
    code, out, _ = cli(server, capsys, "admin", "Halt", "instrument=CEA23")
    assert code == 0 and out[0]["type"] == "AdminAck"          # default: ops / ops-token
    monkeypatch.setenv("KABONI_MEMBER", "M01")
    code, out, _ = cli(server, capsys, "admin", "Resume", "instrument=CEA23")
    assert code == 1 and out[0]["type"] == "Error" and out[0]["reason"] == "not_authorized"
    monkeypatch.setenv("KABONI_MEMBER", "ops")
    monkeypatch.setenv("KABONI_TOKEN", "wrong")
    code, out, err = cli(server, capsys, "admin", "Resume", "instrument=CEA23")
    assert code == 1 and "logon rejected" in err
    monkeypatch.setenv("KABONI_TOKEN", "ops-token")
    code, out, _ = cli(server, capsys, "admin", "Resume", "instrument=CEA23")
    assert code == 0 and out[0]["type"] == "AdminAck"


def _kaboni(*argv, **kwargs):
    import os
    import subprocess
    import sys

    from _fakes import REPO

    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("KABONI_MEMBER", None)
    env.pop("KABONI_TOKEN", None)
    return subprocess.Popen([sys.executable, "-m", "gateway", *argv], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_book_follow_runs_until_interrupted_and_then_exits_0(server, capsys, sig):
    import signal
    import time

    proc = _kaboni("book", "CEA21", "--follow", "--timeout", "0.5", "--port", str(server.port))
    try:
        assert json.loads(proc.stdout.readline())["type"] == "BookSnapshot"
        time.sleep(1.5)                                       # three times --timeout without a message
        assert proc.poll() is None
        code, out, _ = cli(server, capsys, "order", "--member", "M07", "CEA21", "buy", "3", "9000")
        assert code == 0
        time.sleep(0.3)
        proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=5)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert err == ""
    assert [json.loads(line)["type"] for line in out.splitlines()] == ["BookUpdate"]


def test_book_of_an_unknown_instrument_fails_at_once_with_the_reason(server, capsys):
    import time

    t0 = time.monotonic()
    code, out, err = cli(server, capsys, "book", "NOPE")
    assert code == 1 and time.monotonic() - t0 < 2
    assert out == [{"type": "Error", "reason": "invalid_message", "text": "instruments: unknown instrument 'NOPE'"}]
    assert err.strip() == "kaboni book: error invalid_message: instruments: unknown instrument 'NOPE'"
    code, out, err = cli(server, capsys, "balances", "--member", "ops")     # operators have no accounts
    assert code == 1 and out[0]["reason"] == "not_authorized" and "not_authorized" in err


@pytest.mark.parametrize("argv, message", [
    (["order", "CEA25", "buy", "10", "92.50"], "price must be an integer in minor units (9250 = 92.50) or 'market'"),
    (["order", "CEA25", "buy", "1.5", "9250"], "qty must be a whole number of tonnes"),
    (["cancel"], "give the cl_ord_id of the order to cancel, or --all"),
    (["cancel", "o1", "--all"], "not both"),
    (["cancel", "o1", "--instrument", "CEA25"], "--instrument and --side only go with --all"),
    (["book", "CEA25", "--timeout", "0"], "not a positive number of seconds"),
])
def test_bad_arguments_are_usage_errors_not_tracebacks(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err


def test_a_market_order_is_still_spelled_market(server, capsys):
    code, out, _ = cli(server, capsys, "order", "--member", "M08", "CEA21", "sell", "1", "market")
    assert code == 0 and out[0]["type"] == "OrderAccepted" and out[0]["price"] is None


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_failures_are_one_line_with_status_1(server, capsys):
    import socket

    code = main(["balances", "--port", str(_free_port())])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "connection refused (is the server running?)" in err

    silent = socket.socket()                                  # accepts (backlog) but never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        code = main(["balances", "--port", str(silent.getsockname()[1]), "--timeout", "0.3"])
    finally:
        silent.close()
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "no logon reply from" in err and "within 0.3 s" in err

    code = main(["balances", "--port", str(server.port), "--member", "M01", "--token", "wrong"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("kaboni balances: logon rejected: ") and err.count("\n") == 1


def test_tls_mismatches_are_one_line_with_a_hint(tmp_path, server, capsys):
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"],
                   check=True, capture_output=True)
    with ThreadServer(make_config(tls_cert=str(cert), tls_key=str(key)), tmp_path / "d") as tls_server:
        port = str(tls_server.port)
        code = main(["balances", "--port", port, "--timeout", "3"])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1 and "(is the server using TLS? then add --tls)" in err, err
        code = main(["balances", "--port", port, "--tls", "--cafile", str(cert)])
        assert code == 0 and json.loads(capsys.readouterr().out)["type"] == "Balances"
    code = main(["balances", "--port", str(server.port), "--tls", "--timeout", "3"])   # TLS to a plain server
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "TLS handshake with" in err and "drop --tls" in err, err


def test_version_prints_the_package_version(capsys):
    import tomllib

    from _fakes import REPO

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"kaboni {version}"


def test_every_subcommand_has_help_for_every_option(capsys, monkeypatch):
    import argparse

    from gateway.cli import _build, _subparsers

    monkeypatch.delenv("KABONI_MEMBER", raising=False)
    commands = dict(_subparsers(_build()))
    assert {("serve",), ("order",), ("cancel",), ("book",), ("balances",), ("tail",), ("admin",)} <= commands.keys()
    for path, parser in commands.items():
        with pytest.raises(SystemExit) as exc:
            main([*path, "--help"])
        text = capsys.readouterr().out
        assert exc.value.code == 0 and text.startswith(f"usage: kaboni {' '.join(path)}"), path
        for action in parser._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, (path, action.dest)
    for name, member in (("book", "M01"), ("admin", "ops")):
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"(default: $KABONI_MEMBER, else {member})" in text and "(default: $KABONI_TOKEN, else" in text
    with pytest.raises(SystemExit):
        main(["settle", "--help"])
    assert "(default: csv)" in capsys.readouterr().out


def test_tail_ends_on_sigterm_with_0_and_in_process_leaves_the_signal_handlers_as_they_were(server, capsys):
    import signal
    import time

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    code, out, _ = cli(server, capsys, "tail", "--member", "M09", "--resume-from", "0", "--idle", "0.2")
    assert code == 0 and (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before

    proc = _kaboni("tail", "--member", "M09", "--timeout", "0.5", "--port", str(server.port))
    try:
        assert proc.stderr.readline().startswith("# logged on as M09")
        time.sleep(1.0)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=5)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out == "" and err == ""


def test_book_follow_into_a_closed_pipe_stops_quietly(server, capsys):
    import subprocess

    reader = _kaboni("book", "CEA21", "--follow", "--port", str(server.port))
    reader.stdout.readline()
    reader.stdout.close()                                     # like `| head -1` exiting
    code, _, _ = cli(server, capsys, "order", "--member", "M07", "CEA21", "buy", "1", "9000")
    try:
        err = reader.stderr.read()
        reader.wait(timeout=5)
    except subprocess.TimeoutExpired:
        reader.kill()
        raise
    assert reader.returncode == 1 and err == ""


@pytest.mark.parametrize("argv, needle", [
    (["Halt", "instrument"], "'instrument' is not key=value"),
    (["Halt", "instrument=CEA23", "cancel_order=true"], "Halt has no field 'cancel_order'"),
    (["Hlat", "instrument=CEA23"], "no operator message 'Hlat'"),
])
def test_admin_refuses_an_unknown_message_or_field_before_sending_it(server, capsys, argv, needle):
    """The server ignores unknown keys: a mistyped field was dropped and the Halt acknowledged
    without it (exit 0); an unknown message exited 1 instead of the usage status."""
    with pytest.raises(SystemExit) as exit_:
        main(["admin", "--port", str(server.port), *argv])
    assert exit_.value.code == 2
    assert needle in capsys.readouterr().err
    assert server.call(lambda: server.exchange.engine.status("CEA23")) == "open"  # nothing was sent


@pytest.mark.parametrize("argv, needle", [
    (["demo", "--firms", "0"], "--firms"), (["demo", "--firms", "21"], "--firms"),
    (["demo", "--port", "99999"], "port out of range"), (["book", "CEA25", "--depth", "-3"], "--depth"),
])
def test_out_of_range_arguments_are_usage_errors(capsys, argv, needle):
    """Clamped without a word (--firms), or sent on and answered with a server error (--depth)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and needle in capsys.readouterr().err
