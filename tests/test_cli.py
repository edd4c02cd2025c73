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
