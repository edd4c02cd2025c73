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
