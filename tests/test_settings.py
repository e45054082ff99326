"""Tests for load_settings: FRAUD_* variables, one-line errors that never show a secret, librdkafka security config."""

from __future__ import annotations

import os

import pytest

from worker.settings import Settings, SettingsError, load_settings

SECRET = "s3cr3t-Zebra-9137"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """Each test starts with no FRAUD_* variable and no .env file in the working directory."""
    for name in [k for k in os.environ if k.upper().startswith("FRAUD_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def settings_error(monkeypatch, **env) -> str:
    """Set FRAUD_<NAME> variables (and a secret password), load, and return the one-line SettingsError text."""
    monkeypatch.setenv("FRAUD_SASL_PASSWORD", SECRET)
    for name, value in env.items():
        monkeypatch.setenv(f"FRAUD_{name.upper()}", value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert "\n" not in message and SECRET not in message
    return message


def test_defaults_without_environment():
    """With no FRAUD_* variable, the defaults apply."""
    s = load_settings()
    assert (s.bootstrap_servers, s.input_topic, s.batch_max_size, s.security_protocol) == (
        "127.0.0.1:9092", "transactions", 1000, "PLAINTEXT")


def test_reads_fraud_variables(monkeypatch):
    """FRAUD_<NAME> variables set the matching fields, parsed to their types."""
    monkeypatch.setenv("FRAUD_BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    monkeypatch.setenv("FRAUD_BATCH_MAX_SIZE", "250")
    monkeypatch.setenv("FRAUD_SHUTDOWN_TIMEOUT_S", "2.5")
    monkeypatch.setenv("FRAUD_MODEL_MANIFEST", "/models/x.json")
    s = load_settings()
    assert (s.bootstrap_servers, s.batch_max_size, s.shutdown_timeout_s, str(s.model_manifest)) == (
        "k1:9092,k2:9092", 250, 2.5, "/models/x.json")


def test_dotenv_file_is_read(tmp_path):
    """A .env file in the working directory supplies FRAUD_* settings."""
    (tmp_path / ".env").write_text("FRAUD_GROUP_ID=from-dotenv\n")
    assert load_settings().group_id == "from-dotenv"


@pytest.mark.parametrize(
    "name, value",
    [
        ("batch_max_size", "0"),
        ("batch_max_size", "lots"),
        ("onnx_threads", "65"),
        ("metrics_port", "70000"),
        ("security_protocol", "TLS"),
        ("sasl_mechanism", "GSSAPI"),
        ("input_topic", ""),
        ("log_level", "CHATTY"),
    ],
)
def test_rejects_bad_values(monkeypatch, name, value):
    """A bad value is a one-line SettingsError naming the variable but not its value or any secret."""
    message = settings_error(monkeypatch, **{name: value})
    assert f"FRAUD_{name.upper()}" in message


def test_bad_value_that_is_a_secret_is_not_echoed(monkeypatch):
    """A secret pasted into the wrong variable is not echoed in the error."""
    message = settings_error(monkeypatch, onnx_threads=SECRET, security_protocol=SECRET)
    assert "FRAUD_ONNX_THREADS" in message and "FRAUD_SECURITY_PROTOCOL" in message


def test_rejects_unknown_fraud_variables(monkeypatch):
    """Unknown FRAUD_ variables (typos) are a one-line SettingsError naming them all."""
    message = settings_error(monkeypatch, batch_size="10", sasl_passwd=SECRET)
    assert "FRAUD_BATCH_SIZE" in message and "FRAUD_SASL_PASSWD" in message


def test_secrets_not_in_repr_or_str(monkeypatch):
    """The SASL and SSL key passwords are masked in repr() and str() but available to security_config()."""
    monkeypatch.setenv("FRAUD_SASL_PASSWORD", SECRET)
    monkeypatch.setenv("FRAUD_SSL_KEY_PASSWORD", SECRET + "-key")
    s = load_settings()
    assert SECRET not in repr(s) and SECRET not in str(s)
    assert s.security_config()["ssl.key.password"] == SECRET + "-key"


def test_pass_through_config_parses_from_json(monkeypatch):
    """FRAUD_CONSUMER_CONFIG and FRAUD_PRODUCER_CONFIG are JSON objects of librdkafka settings."""
    monkeypatch.setenv("FRAUD_CONSUMER_CONFIG", '{"fetch.min.bytes": "1024", "session.timeout.ms": "6000"}')
    monkeypatch.setenv("FRAUD_PRODUCER_CONFIG", '{"linger.ms": "5"}')
    s = load_settings()
    assert s.consumer_config == {"fetch.min.bytes": "1024", "session.timeout.ms": "6000"}
    assert s.producer_config == {"linger.ms": "5"}


@pytest.mark.parametrize("key", ["sasl.password", "ssl.key.password", "sasl.oauthbearer.client.secret",
                                 "ssl.keystore.location", "SASL.PASSWORD"])
@pytest.mark.parametrize("name", ["consumer_config", "producer_config"])
def test_pass_through_config_refuses_secret_keys(monkeypatch, name, key):
    """A pass-through key that looks like a secret is refused, naming the key but not its value."""
    message = settings_error(monkeypatch, **{name: f'{{"{key}": "{SECRET}"}}'})
    assert f"FRAUD_{name.upper()}" in message and key in message


@pytest.mark.parametrize("value", ['{"sasl.password": ' + SECRET + "}", '["a"]', "not json"],
                         ids=["malformed-with-secret", "list", "not-json"])
def test_pass_through_config_that_is_not_a_json_object(monkeypatch, value):
    """A pass-through config that is not a JSON object is a one-line SettingsError naming the variable, never the value."""
    assert "consumer_config" in settings_error(monkeypatch, consumer_config=value).lower()


def test_security_config_includes_sasl(monkeypatch):
    """security_config() gives librdkafka the protocol, mechanism, username and password."""
    monkeypatch.setenv("FRAUD_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("FRAUD_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("FRAUD_SASL_USERNAME", "fraud-svc")
    monkeypatch.setenv("FRAUD_SASL_PASSWORD", SECRET)
    monkeypatch.setenv("FRAUD_SSL_CA_LOCATION", "/etc/ssl/ca.pem")
    assert load_settings().security_config() == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "fraud-svc",
        "sasl.password": SECRET,
        "ssl.ca.location": "/etc/ssl/ca.pem",
    }


def test_security_config_plaintext_has_no_sasl():
    """With the defaults, security_config() is only the PLAINTEXT protocol."""
    assert Settings().security_config() == {"security.protocol": "PLAINTEXT"}
