"""Tests for load_settings: FRAUD_* variables, one-line errors that never show a secret, librdkafka security config."""

from __future__ import annotations

import os
import subprocess
import sys
from fnmatch import fnmatchcase

import pytest

from worker.settings import GUARDED_KEYS, ROOT, Settings, SettingsError, load_settings

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


WEAKENING = [  # (setting, key, JSON value): unsafe values of every value-guarded key, in librdkafka's spellings
    ("consumer_config", "enable.auto.commit", '"true"'),
    ("consumer_config", "enable.auto.commit", "true"),
    ("consumer_config", "enable.auto.commit", '"T"'),
    ("consumer_config", "auto.commit.enable", '"1"'),
    ("consumer_config", "topic.enable.auto.commit", '"true"'),
    ("consumer_config", "enable.auto.offset.store", '"TRUE"'),
    ("consumer_config", "auto.offset.reset", '"latest"'),
    ("consumer_config", "auto.offset.reset", '"largest"'),
    ("consumer_config", "auto.offset.reset", '"END"'),
    ("consumer_config", "auto.offset.reset", '"error"'),
    ("consumer_config", "auto.offset.reset", '"none"'),
    ("consumer_config", "topic.auto.offset.reset", '"latest"'),
    ("producer_config", "acks", '"1"'),
    ("producer_config", "acks", "0"),
    ("producer_config", "request.required.acks", '"1"'),
    ("producer_config", "topic.acks", '"0"'),
    ("producer_config", "enable.idempotence", '"false"'),
    ("producer_config", "enable.idempotence", "false"),
    ("producer_config", "enable.idempotence", '"0"'),
    ("consumer_config", "isolation.level", '"read_uncommitted"'),
]
OWNED = [  # (key, the FRAUD_ setting the error points to, or None when there is none)
    ("bootstrap.servers", "FRAUD_BOOTSTRAP_SERVERS"),
    ("metadata.broker.list", "FRAUD_BOOTSTRAP_SERVERS"),
    ("group.id", "FRAUD_GROUP_ID"),
    ("client.id", "FRAUD_WORKER_ID"),
    ("group.protocol", "FRAUD_GROUP_PROTOCOL"),
    ("group.instance.id", "FRAUD_GROUP_INSTANCE_ID"),
    ("partition.assignment.strategy", "FRAUD_GROUP_PROTOCOL"),
    ("security.protocol", "FRAUD_SECURITY_PROTOCOL"),
    ("sasl.mechanism", "FRAUD_SASL_MECHANISM"),
    ("sasl.mechanisms", "FRAUD_SASL_MECHANISM"),
    ("sasl.username", "FRAUD_SASL_USERNAME"),
    ("ssl.ca.location", "FRAUD_SSL_CA_LOCATION"),
    ("ssl.certificate.location", "FRAUD_SSL_CERTIFICATE_LOCATION"),
    ("ssl.key.location", "FRAUD_SSL_KEY_LOCATION"),
    ("transactional.id", "FRAUD_DELIVERY"),
    ("on_commit", None),
    ("on_delivery", None),
    ("error_cb", None),
    ("throttle_cb", None),
    ("stats_cb", None),
    ("oauth_cb", None),
    ("logger", None),
    ("dr_cb", None),
    ("dr_msg_cb", None),
]
# Secret-looking owned keys (sasl.password, ssl.key.password) are refused earlier, by the secret check.
SECRET_OWNED = ["sasl.password", "ssl.key.password"]


def test_every_guarded_key_is_tested():
    """Each entry of the guard table is exercised by the refusal tests below."""
    tested = {k.removeprefix("topic.") for _, k, _ in WEAKENING} | {k for k, _ in OWNED} | set(SECRET_OWNED)
    assert [p for p in GUARDED_KEYS if not any(fnmatchcase(k, p) for k in tested)] == []


@pytest.mark.parametrize("name, key, value", WEAKENING)
def test_pass_through_config_refuses_weakening_values(monkeypatch, name, key, value):
    """A pass-through value that weakens at-least-once is refused in one line naming the key, the value and why."""
    message = settings_error(monkeypatch, **{name: f'{{"{key}": {value}}}'})
    written = value.strip('"')
    assert f"FRAUD_{name.upper()}: {key}={written} would " in message


@pytest.mark.parametrize("key, setting", OWNED)
@pytest.mark.parametrize("name", ["consumer_config", "producer_config"])
def test_pass_through_config_refuses_owned_keys(monkeypatch, name, key, setting):
    """A key the worker sets itself is refused naming the key and the FRAUD_ setting to use, never the value."""
    message = settings_error(monkeypatch, **{name: f'{{"{key}": "{SECRET}"}}'})
    assert f"FRAUD_{name.upper()}: {key} " in message
    assert setting is None or f"use {setting}" in message


def test_guarded_key_with_an_unrecognised_value_does_not_echo_it(monkeypatch):
    """An unsafe value that is not a librdkafka spelling (it might be a secret) is not shown."""
    message = settings_error(monkeypatch, consumer_config=f'{{"auto.offset.reset": "{SECRET}"}}')
    assert "auto.offset.reset=<value not shown>" in message


@pytest.mark.parametrize(
    "name, key, value, loaded",
    [
        ("consumer_config", "enable.auto.commit", '"false"', "false"),
        ("consumer_config", "enable.auto.commit", "false", "false"),
        ("consumer_config", "enable.auto.offset.store", '"F"', "F"),
        ("consumer_config", "enable.auto.offset.store", "0", "0"),
        ("consumer_config", "auto.offset.reset", '"earliest"', "earliest"),
        ("consumer_config", "auto.offset.reset", '"Smallest"', "Smallest"),
        ("consumer_config", "auto.offset.reset", '"beginning"', "beginning"),
        ("producer_config", "acks", '"all"', "all"),
        ("producer_config", "acks", '"ALL"', "ALL"),
        ("producer_config", "acks", "-1", "-1"),
        ("producer_config", "request.required.acks", '"-1"', "-1"),
        ("producer_config", "enable.idempotence", "true", "true"),
        ("producer_config", "enable.idempotence", '"1"', "1"),
        ("consumer_config", "ssl.endpoint.identification.algorithm", '"https"', "https"),
        ("consumer_config", "sasl.kerberos.service.name", '"kafka"', "kafka"),
    ],
)
def test_pass_through_config_accepts_safe_values(monkeypatch, name, key, value, loaded):
    """A guarded key set to its safe value, in any librdkafka spelling, is accepted."""
    monkeypatch.setenv(f"FRAUD_{name.upper()}", f'{{"{key}": {value}}}')
    assert getattr(load_settings(), name) == {key: loaded}


def test_pass_through_config_converts_json_numbers_and_booleans(monkeypatch):
    """JSON numbers and booleans become the strings librdkafka expects."""
    monkeypatch.setenv("FRAUD_PRODUCER_CONFIG", '{"batch.num.messages": 10, "enable.idempotence": true, '
                                                '"batch.size": 1e6, "linger.ms": 0.5, "enable.gapless.guarantee": false}')
    assert load_settings().producer_config == {"batch.num.messages": "10", "enable.idempotence": "true",
                                               "batch.size": "1000000", "linger.ms": "0.5",
                                               "enable.gapless.guarantee": "false"}


@pytest.mark.parametrize("value, kind", [("null", "null"), ('{"acks": "1"}', "an object"), ('["1"]', "a list"),
                                         ("NaN", "a non-finite number")])
def test_pass_through_config_refuses_null_and_nested_values(monkeypatch, value, kind):
    """A null, object, list or non-finite value is refused naming the key and the kind of value."""
    message = settings_error(monkeypatch, producer_config=f'{{"default.topic.config": {value}}}')
    assert f"FRAUD_PRODUCER_CONFIG: default.topic.config must be a string, number or boolean, not {kind}" in message


def test_dotenv_typo_is_named_as_written(monkeypatch, tmp_path):
    """An unknown key in .env is reported under the name written there, without its value."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(f"FRAUD_BATCH_MAX_SIZ=5\nFRAUD_SASL_PASWORD={SECRET}\n")
    message = settings_error(monkeypatch)
    assert "FRAUD_BATCH_MAX_SIZ: unknown setting in .env" in message and "FRAUD_SASL_PASWORD" in message
    assert "FRAUD_FRAUD_" not in message


def test_cli_reports_a_refused_key_in_one_line_and_exits_2(tmp_path):
    """`fraud-worker check` turns a refused pass-through key into one stderr line and exit status 2."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FRAUD_CONSUMER_CONFIG": '{"enable.auto.commit": "true"}'}
    run = subprocess.run([sys.executable, "-m", "worker.cli", "check"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert (run.returncode, run.stdout, run.stderr.count("\n")) == (2, "", 1)
    assert run.stderr.startswith("fraud-worker: invalid configuration: FRAUD_CONSUMER_CONFIG: enable.auto.commit=true ")


def test_exactly_once_commit_interval_must_fit_the_transaction_timeout(monkeypatch):
    """A transaction longer than a third of transaction.timeout.ms is refused at start-up, in one line."""
    message = settings_error(monkeypatch, delivery="exactly_once", commit_interval_ms="4000")
    assert message == ("invalid configuration: FRAUD_COMMIT_INTERVAL_MS: 4000 is over a third of transaction.timeout.ms "
                       "(10000) with FRAUD_DELIVERY=exactly_once")
    monkeypatch.setenv("FRAUD_PRODUCER_CONFIG", '{"transaction.timeout.ms": 60000}')
    assert load_settings().commit_interval_ms == 4000
    monkeypatch.setenv("FRAUD_DELIVERY", "at_least_once")
    monkeypatch.delenv("FRAUD_PRODUCER_CONFIG")
    assert load_settings().commit_interval_ms == 4000


@pytest.mark.parametrize("env, needle", [
    ({"FRAUD_CHALLENGER_MANIFEST": "models/reference-fraud-mlp.json", "FRAUD_SHADOW_TOPIC": "fraud-verdicts"},
     "already FRAUD_VERDICT_TOPIC"),
    ({"FRAUD_CHALLENGER_MANIFEST": "models/reference-fraud-mlp.json", "FRAUD_SHADOW_TOPIC": "transactions"},
     "already FRAUD_INPUT_TOPIC"),
    ({"FRAUD_SHADOW_TOPIC": "shadow"}, "set FRAUD_CHALLENGER_MANIFEST too"),
], ids=["verdict-topic", "input-topic", "no-challenger"])
def test_shadow_topic_must_be_a_topic_of_its_own(monkeypatch, env, needle):
    """Challenger verdicts can never be sent to the live verdict, input or dead-letter topic."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert needle in str(info.value)


def test_an_empty_variable_means_unset(monkeypatch):
    """FRAUD_CHALLENGER_MANIFEST= (as Compose and Kubernetes write an unset value) is no challenger, not the path "."."""
    monkeypatch.setenv("FRAUD_CHALLENGER_MANIFEST", "")
    monkeypatch.setenv("FRAUD_MODEL_FILE", "")
    s = load_settings()
    assert s.challenger_manifest is None and s.model_file is None


@pytest.mark.parametrize("url, shown", [
    ("http://reguser:RegSecretPW2@127.0.0.1:8081/apis", "http://***@127.0.0.1:8081/apis"),
    ("https://a@b@registry:8081", "https://***@registry:8081"),
    ("http://127.0.0.1:8081", "http://127.0.0.1:8081"),
])
def test_registry_url_is_shown_without_its_credentials(url, shown):
    """A Schema Registry URL that carries user:password is printed without them."""
    assert Settings(_env_file=None, schema_registry_url=url).registry_url_shown() == shown
