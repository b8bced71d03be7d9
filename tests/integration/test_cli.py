"""The `serversync` command: declarative apply, one-line errors, nothing half-written, secrets.

These run the real command in-process (Typer's runner) on a temporary SQLite database.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from serversync.cli import app
from serversync.store import crypto

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "local-test-servers.yaml"
PASSWORDS = {"SVC_PASSWORD": "svc-pw", "BOB_PASSWORD": "bob-pw",
             "SUPPORT_PASSWORD": "support-pw", "ERIN_PASSWORD": "erin-pw"}


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("SERVERSYNC_DATABASE_URL", f"sqlite:///{tmp_path}/cli.db")
    monkeypatch.setenv("SERVERSYNC_KEY_FILE", str(tmp_path / "cli.key"))
    monkeypatch.delenv("SERVERSYNC_SECRET_KEY", raising=False)
    for name, value in PASSWORDS.items():
        monkeypatch.setenv(name, value)
    return CliRunner()


def invoke(cli: CliRunner, *args: str, input: str | None = None) -> tuple[int, str, str]:
    result = cli.invoke(app, list(args), input=input)
    return result.exit_code, result.stdout, result.stderr


def write(tmp_path: Path, data: object) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_apply_is_idempotent(cli: CliRunner) -> None:
    code, out, err = invoke(cli, "apply", "-f", str(EXAMPLE), "--json")
    assert code == 0, err
    first = json.loads(out)
    assert "profile corp-impersonation" in first["created"]
    code, out, _ = invoke(cli, "apply", "-f", str(EXAMPLE), "--json")
    second = json.loads(out)
    assert code == 0 and second["created"] == [] and second["updated"] == []
    assert len(second["unchanged"]) == len(first["created"]) + len(first["unchanged"])


def test_secrets_never_appear_in_output(cli: CliRunner) -> None:
    invoke(cli, "apply", "-f", str(EXAMPLE))
    outputs = [invoke(cli, *cmd) for cmd in (
        ("profile", "show", "corp-impersonation"), ("profile", "show", "corp-impersonation",
                                                    "--json"),
        ("profile", "list", "--json"), ("mailbox", "show", "bob@example.test", "--json"),
        ("mailbox", "list", "--json"))]
    for code, out, err in outputs:
        assert code == 0, err
        for secret in PASSWORDS.values():
            assert secret not in out and secret not in err
    shown = json.loads(outputs[1][1])
    assert shown["service_secret"] == "set"


BASE_PROFILE = {"name": "p", "kind": "imap", "incoming": {"host": "127.0.0.1", "port": 993},
                "credential_source": "mailbox"}


@pytest.mark.parametrize(("config", "expected"), [
    ({"profiles": [{**BASE_PROFILE, "colour": "red"}]}, "profiles[0].colour: unknown field"),
    ({"profiles": [{**BASE_PROFILE, "incoming": {"host": "h", "port": 70000}}]},
     "profiles[0].incoming.port: Input should be less than or equal to 65535"),
    ({"profiles": [{**BASE_PROFILE, "incoming": {"host": "h", "port": "abc"}}]},
     "profiles[0].incoming.port: Input should be a valid integer"),
    ({"profiles": [{**BASE_PROFILE, "credential_source": "profile",
                    "service_user": "svc@example.test",
                    "service_secret": {"env": "NOT_SET_ANYWHERE"}}]},
     "profiles[0].service_secret: environment variable NOT_SET_ANYWHERE is not set"),
    ({"profiles": [{**BASE_PROFILE, "credential_source": "profile",
                    "service_user": "svc@example.test"}]},
     "profiles[0].service_secret: is required when credentials are in the profile"),
    ({"profiles": [BASE_PROFILE], "mailboxes": [{"address": "not-an-address", "profile": "p",
                                                 "owner": "x"}]},
     "mailboxes[0].address: 'not-an-address' is not an email address"),
    ({"profiles": [{**BASE_PROFILE, "max_concurrent_connections": 500}]},
     "profiles[0].max_concurrent_connections: Input should be less than or equal to 300"),
    ({"profile": []}, "profile: unknown field"),
])
def test_bad_config_is_one_line_naming_the_field_and_writes_nothing(
        cli: CliRunner, tmp_path: Path, config: dict[str, object], expected: str) -> None:
    good = {"directory": [{"kind": "user", "key": "u", "emails": ["u@example.test"]}]}
    code, out, err = invoke(cli, "apply", "-f", write(tmp_path, {**good, **config}))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err
    code, out, _ = invoke(cli, "directory", "list", "--json")
    assert code == 0 and json.loads(out) == []  # the good part was not written either


def test_rule_violation_late_in_the_file_leaves_nothing_half_written(
        cli: CliRunner, tmp_path: Path) -> None:
    config = yaml.safe_load(EXAMPLE.read_text())
    config["mailboxes"].append({"address": "erin@other.test", "owner": "erin",
                                "profile": "corp-impersonation", "incoming": "server-side"})
    code, _, err = invoke(cli, "apply", "-f", write(tmp_path, config))
    assert code == 1 and "mailboxes[4]: mailbox erin@other.test is outside the impersonation " \
                          "scope" in err
    assert json.loads(invoke(cli, "profile", "list", "--json")[1]) == []


def test_cli_crud_and_errors(cli: CliRunner) -> None:
    assert invoke(cli, "directory", "add", "user", "ivan", "--email", "ivan@example.test")[0] == 0
    code, _, err = invoke(cli, "profile", "create", "own", "--kind", "imap", "--incoming-host",
                          "127.0.0.1", "--incoming-port", "10993", "--credential-source", "mailbox")
    assert code == 0, err
    code, _, err = invoke(cli, "profile", "create", "own", "--kind", "imap", "--incoming-host",
                          "h", "--incoming-port", "1")
    assert code == 1 and "already exists" in err
    code, _, err = invoke(cli, "mailbox", "create", "ivan@example.test", "--profile", "own",
                          "--owner", "ivan", "--incoming", "server-side",
                          "--allow-credentials", "--secret-stdin", input="ivan-pw\n")
    assert code == 0, err
    code, _, err = invoke(cli, "profile", "update", "own", "--incoming-port", "99999")
    assert code == 2 and "incoming.port" in err
    code, out, _ = invoke(cli, "profile", "update", "own", "--incoming-port", "10994", "--json")
    assert code == 0 and json.loads(out)["incoming"]["port"] == 10994
    assert json.loads(out)["incoming"]["host"] == "127.0.0.1"  # partial update kept the host
    code, _, err = invoke(cli, "profile", "delete", "own")
    assert code == 1 and "still has mailboxes: ivan@example.test" in err
    code, _, err = invoke(cli, "mailbox", "update", "ivan@example.test", "--set", "colour=red")
    assert code == 2 and err.strip() == "error: colour: unknown field"
    assert invoke(cli, "mailbox", "approve", "ivan@example.test")[0] == 0
    mailbox = json.loads(invoke(cli, "mailbox", "show", "ivan@example.test", "--json")[1])
    assert mailbox["approval"] == "approved" and mailbox["secret"] == "set"
    assert invoke(cli, "mailbox", "delete", "ivan@example.test")[0] == 0
    code, _, err = invoke(cli, "mailbox", "show", "ivan@example.test")
    assert code == 1 and "no mailbox 'ivan@example.test'" in err


def test_rotate_key_reencrypts_and_a_wrong_key_is_reported(
        cli: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    invoke(cli, "apply", "-f", str(EXAMPLE))
    key_file = tmp_path / "cli.key"
    before = key_file.read_text()
    code, out, err = invoke(cli, "rotate-key")
    assert code == 0 and "re-encrypted 4 secrets" in out, err
    assert key_file.read_text() != before and len(key_file.read_text().split()) == 1
    assert invoke(cli, "profile", "show", "corp-impersonation")[0] == 0
    monkeypatch.setenv("SERVERSYNC_SECRET_KEY", crypto.encode_key(crypto.new_key()))
    code, _, err = invoke(cli, "profile", "show", "corp-impersonation")
    assert code == 1 and "was encrypted with key" in err and len(err.strip().splitlines()) == 1
    assert os.stat(key_file).st_mode & 0o077 == 0
