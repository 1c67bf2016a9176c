"""fleet.toml and the CLI's globals: good values load, every bad one is refused naming
the key, the value and what is allowed (console.config)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from agent.protocol.topics import console_reply
from fleet.config import FleetConfig
from fleet.errors import FleetCode, FleetError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    return path


def refused(tmp_path: Path, text: str, **overrides: object) -> FleetError:
    with pytest.raises(FleetError) as info:
        FleetConfig.load(write(tmp_path, text), **overrides)
    assert info.value.code is FleetCode.CONFIG
    return info.value


def test_a_full_file_loads_and_globals_override_it(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'broker = "mqtts://broker.example.net"\nprotocol = "3.1.1"\nusername = "ops"\n'
        'password_file = "credential:mqtt-password"\nca_file = "/etc/ca.pem"\n'
        'key = "/etc/console.key"\noperator = "alice"\nconsole_id = "ops-1"\n'
        'db = "postgresql://db/fleet"\ntimeout_s = 2.5\ncommand_lifetime_s = 120\n'
        'shared_group = "workers"\n[rollout]\ncanary = "1%"\n',
    )
    config = FleetConfig.load(path)
    assert (config.broker.host, config.broker.port, config.broker.tls) == (
        "broker.example.net",
        8883,
        True,
    )
    assert config.protocol == "3.1.1" and config.username == "ops"
    assert config.password_file == "credential:mqtt-password" and config.tls_ca == "/etc/ca.pem"
    assert (config.key_path, config.operator, config.console_id) == (
        "/etc/console.key",
        "alice",
        "ops-1",
    )
    assert config.db == "postgresql://db/fleet" and config.timeout_s == 2.5
    assert config.command_lifetime_s == 120 and config.shared_group == "workers"
    assert config.sections["rollout"] == {"canary": "1%"}
    over = FleetConfig.load(path, broker="mqtt://127.0.0.1:1999", db="x.db", operator=None)
    assert str(over.broker) == "127.0.0.1:1999" and not over.broker.tls
    assert over.db == "x.db" and over.operator == "alice"  # None: not given on the CLI


def test_defaults_give_a_valid_reply_topic_per_console(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./fleet.toml here
    monkeypatch.setenv("USER", "bob")
    a, b = FleetConfig.load(None), FleetConfig.load(None)
    assert a.broker.url == "mqtt://127.0.0.1:1883" and a.protocol == "5"
    assert a.operator == "bob" and a.db == "fleet.db"
    assert a.console_id != b.console_id  # two consoles on one host never share replies
    console_reply(a.console_id)  # valid as a topic level
    write(tmp_path, 'operator = "carol"\n')
    assert FleetConfig.load(None).operator == "carol"  # ./fleet.toml is read by default


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ('broker = "http://x:1"\n', "broker", "mqtt://host[:port]"),
        ('broker = "mqtt://x:0"\n', "broker", "port 1-65535"),
        ('broker = "mqtt://x:99999"\n', "broker", "port"),
        ('broker = "mqtt://x:1/path"\n', "broker", "no path"),
        ("broker = 5\n", "broker", "mqtt://"),
        ('protocol = "4"\n', "protocol", '"5" or "3.1.1"'),
        ('console_id = "a/b"\n', "console_id", "A-Za-z0-9._-"),
        ("timeout_s = 0\n", "timeout_s", "from 0.05 to 3600"),
        ('timeout_s = "10"\n', "timeout_s", "number of seconds"),
        ("command_lifetime_s = 7200\n", "command_lifetime_s", "from 1 to 3600"),
        ("operator = 3\n", "operator", "non-empty string"),
        ('key = "credential:a/b"\n', "key", "credential:NAME"),
        ('shared_group = "a+b"\n', "shared_group", "$share group"),
        ('cert_file = "/c.pem"\n', "key_file", "set both or neither"),
        ('password_file = "/p"\n', "username", "username is not"),
    ],
)
def test_bad_values_are_refused_by_key(tmp_path: Path, text: str, key: str, words: str) -> None:
    error = refused(tmp_path, text)
    assert error.details["key"] == key
    assert words in error.message, error.message


def test_unknown_keys_bad_toml_and_missing_files_are_refused(tmp_path: Path) -> None:
    error = refused(tmp_path, 'brokr = "mqtt://x"\n')
    assert "unknown key 'brokr'" in error.message and "broker" in error.message
    assert "not valid TOML" in refused(tmp_path, "broker = \n").message
    with pytest.raises(FleetError, match="cannot read the console config") as info:
        FleetConfig.load(tmp_path / "missing.toml")
    assert info.value.code is FleetCode.CONFIG
    # A global option is checked like the file's value.
    error = refused(tmp_path, "", broker="mqtt//nohost")
    assert error.details["key"] == "broker"


def test_secrets_are_read_when_needed_with_the_key_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "pw").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    config = FleetConfig.load(
        write(tmp_path, 'username = "u"\npassword_file = "credential:pw"\nkey = "/nope.key"\n')
    )
    assert config.password() == "s3cret"
    with pytest.raises(FleetError, match=r"key = '/nope.key' is not allowed: a readable file"):
        config.signing_key()
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(FleetError, match="CREDENTIALS_DIRECTORY is not set"):
        config.password()
    with pytest.raises(FleetError, match="no signing key") as info:
        FleetConfig.load(write(tmp_path, "")).signing_key()
    assert info.value.details["key"] == "key"
    # An EC key is a PEM private key, but not the ed25519 one commands are signed with.
    ec = tmp_path / "ec.key"
    ec.write_bytes(
        generate_private_key(SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(FleetError, match="an ed25519 private key"):
        FleetConfig.load(write(tmp_path, f'key = "{ec}"\n')).signing_key()
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key")
    with pytest.raises(FleetError, match="unencrypted ed25519 PEM private key"):
        FleetConfig.load(write(tmp_path, f'key = "{garbage}"\n')).signing_key()
