"""Settings, read once at start-up from FRAUD_* environment variables and a .env file."""

from __future__ import annotations

import json
import math
import os
import re
import socket
from collections.abc import Callable
from fnmatch import fnmatchcase
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit
from typing import Any, Literal

from pydantic import model_validator, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError

ROOT = Path(__file__).resolve().parent.parent
# The exactly-once producer's transaction.timeout.ms unless FRAUD_PRODUCER_CONFIG sets it (Kafka's default: 60 s).
TRANSACTION_TIMEOUT_MS = 10_000
# Read by the local-broker tooling, not by the worker.
TOOL_VARIABLES = {"FRAUD_CACHE_DIR", "FRAUD_KAFKA_VERSION", "FRAUD_TEST_BROKER_PORT"}
_SECRET_WORDS = ("password", "secret", "token", "key.pem", "keystore", "credentials")


def _one_of(*spellings: str) -> Callable[[str], bool]:
    """A check that a value is one of these spellings, ignoring case as librdkafka does."""
    return lambda value: value.lower() in spellings


_FALSE, _TRUE, _NEVER = _one_of("false", "f", "0"), _one_of("true", "t", "1"), _one_of()


def _owned(setting: str) -> tuple[Callable[[str], bool], str]:
    """The guard of a key the worker sets from one of its own settings."""
    return _NEVER, f"belongs to the worker's own settings (use {setting} instead)"


_AUTO_COMMIT = (_FALSE, "would commit offsets before their verdicts are acknowledged, breaking at-least-once "
                        "(the worker commits itself)")
_ACKS = (_one_of("all", "-1"), "would count a verdict as delivered, and commit its input, before every in-sync "
                               "replica has it, breaking at-least-once (the worker uses all)")
# Pass-through keys that could break "every record ends in exactly one place": key (or fnmatch pattern) ->
# (is this value safe?, what any other value would do). Keys match case-insensitively, with or without
# librdkafka's "topic." prefix; aliases are listed too. Owned keys have no safe value and never show it.
GUARDED_KEYS: dict[str, tuple[Callable[[str], bool], str]] = {
    "enable.auto.commit": _AUTO_COMMIT,
    "auto.commit.enable": _AUTO_COMMIT,
    "enable.auto.offset.store": (_FALSE, "would store offsets of records whose verdicts are not yet acknowledged, "
                                         "breaking at-least-once (the worker commits only acknowledged offsets)"),
    "auto.offset.reset": (_one_of("earliest", "smallest", "beginning"),
                          "would skip, or stall on, the records of a partition without a committed offset "
                          "(the worker starts from the earliest)"),
    "acks": _ACKS,
    "request.required.acks": _ACKS,
    "enable.idempotence": (_TRUE, "would let producer retries duplicate or reorder verdicts "
                                  "(the worker's producer is idempotent)"),
    "transactional.id": _owned("FRAUD_DELIVERY=exactly_once; the id is <FRAUD_GROUP_ID>.<FRAUD_GROUP_INSTANCE_ID, "
                               "else FRAUD_WORKER_ID>"),
    "isolation.level": (_one_of("read_committed"), "would score records of aborted upstream transactions "
                                                   "(the worker reads read_committed)"),
    "bootstrap.servers": _owned("FRAUD_BOOTSTRAP_SERVERS"),
    "metadata.broker.list": _owned("FRAUD_BOOTSTRAP_SERVERS"),
    "group.id": _owned("FRAUD_GROUP_ID"),
    "client.id": _owned("FRAUD_WORKER_ID"),
    "group.protocol": _owned("FRAUD_GROUP_PROTOCOL"),
    "group.instance.id": _owned("FRAUD_GROUP_INSTANCE_ID"),
    "partition.assignment.strategy": _owned("FRAUD_GROUP_PROTOCOL (cooperative-sticky with classic)"),
    "security.protocol": _owned("FRAUD_SECURITY_PROTOCOL"),
    "sasl.mechanism": _owned("FRAUD_SASL_MECHANISM"),
    "sasl.mechanisms": _owned("FRAUD_SASL_MECHANISM"),
    "sasl.username": _owned("FRAUD_SASL_USERNAME"),
    "sasl.password": _owned("FRAUD_SASL_PASSWORD"),
    "ssl.ca.location": _owned("FRAUD_SSL_CA_LOCATION"),
    "ssl.certificate.location": _owned("FRAUD_SSL_CERTIFICATE_LOCATION"),
    "ssl.key.location": _owned("FRAUD_SSL_KEY_LOCATION"),
    "ssl.key.password": _owned("FRAUD_SSL_KEY_PASSWORD"),
    **dict.fromkeys(["on_commit", "on_delivery", "error_cb", "throttle_cb", "stats_cb", "oauth_cb", "logger",
                     "dr_cb", "dr_msg_cb"], (_NEVER, "is a Python callback the worker sets itself")),
}
# Values of guarded keys that errors show; anything else might be a secret pasted into the wrong place.
_SHOWN = {"read_committed", "read_uncommitted", "true", "false", "t", "f", "all", "earliest", "smallest", "beginning", "latest", "largest", "end",
          "error", "none"}
_JSON_KINDS = {type(None): "null", dict: "an object", list: "a list", float: "a non-finite number"}


def _guard_problem(key: str, value: str) -> str | None:
    """Why this pass-through key and value are refused, or None when they are allowed."""
    name = key.lower().removeprefix("topic.")
    safe, reason = next((g for pattern, g in GUARDED_KEYS.items() if fnmatchcase(name, pattern)), (None, ""))
    if safe is None or safe(value):
        return None
    if safe is _NEVER:
        return f"{key} {reason}"
    shown = value if value.lower() in _SHOWN or re.fullmatch(r"-?\d{1,4}", value) else "<value not shown>"
    return f"{key}={shown} {reason}"


def _librdkafka_string(value: Any) -> str | None:
    """A JSON scalar as the string librdkafka expects, or None for null, objects, lists and non-finite numbers."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value) if isinstance(value, (int, str)) else None


class SettingsError(ValueError):
    """The configuration is invalid."""


class Settings(BaseSettings):
    """Everything the worker reads from its environment; each field is FRAUD_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="FRAUD_", env_file=".env", extra="forbid", frozen=True)

    bootstrap_servers: str = Field("127.0.0.1:9092", min_length=1, description="Kafka bootstrap servers.")
    group_id: str = Field("fraud-worker", min_length=1, description="Consumer group shared by all replicas.")
    input_topic: str = Field("transactions", min_length=1, description="Topic of Avro transactions.")
    verdict_topic: str = Field("fraud-verdicts", min_length=1, description="Topic the verdicts go to.")
    dead_letter_topic: str = Field("transactions-dlq", min_length=1, description="Topic of unscorable messages.")
    delivery: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once", description="at_least_once, or exactly_once: verdicts, dead letters and offsets in one "
                                     "Kafka transaction (readers use isolation.level=read_committed).")
    group_protocol: Literal["classic", "consumer"] = Field(
        "classic", description="Consumer group protocol: classic, or consumer (KIP-848, Kafka 4.0+).")
    group_instance_id: str | None = Field(
        None, min_length=1, description="Static membership id (the pod name); with the classic protocol a restart within the session "
                    "timeout keeps its partitions.")
    worker_id: str = Field(f"{socket.gethostname()}-{os.getpid()}", min_length=1, description="This replica's id.")

    input_schema: Path | None = Field(
        None, description="Avro schema (.avsc) of the input records; default schemas/transaction.avsc.")
    model_manifest: Path = Field(ROOT / "models" / "fraud-gbt.json", description="Model manifest (JSON).")
    model_file: Path | None = Field(None, description="Override of the manifest's model_file path.")
    onnx_threads: int = Field(1, ge=1, le=64, description="onnxruntime intra-op threads; scale with replicas.")
    model_watch_s: float = Field(
        5.0, ge=0, le=3600, description="Seconds between reads of the manifests: a changed one is loaded, checked and "
                                        "swapped in at a batch boundary (0: never).")
    challenger_manifest: Path | None = Field(
        None, description="A second model scored in shadow on every batch; it never changes a live verdict.")
    shadow_topic: str | None = Field(
        None, min_length=1, description="Topic of the challenger's verdicts (unset: metrics only).")

    batch_max_size: int = Field(1000, ge=1, le=100_000, description="Most messages scored in one model call.")
    batch_max_wait_ms: int = Field(5, ge=0, le=10_000, description="After the first message, wait this long to fill a batch.")
    latency_budget_ms: int = Field(
        0, ge=0, le=60_000, description="Cut that wait so the first message's age (from its timestamp) plus the batch's "
                                        "scoring time stays within this (0: no budget).")
    commit_interval_ms: int = Field(
        200, ge=0, le=60_000,
        description="Least time between offset commits; with exactly-once, the length of a transaction (0: one per batch).")
    max_message_bytes: int = Field(65_536, ge=64, le=10_485_760, description="Larger input values are dead-lettered.")
    shutdown_timeout_s: float = Field(30.0, gt=0, description="Time to flush outputs and commit on stop.")
    startup_timeout_s: float = Field(15.0, gt=0, description="Time to reach the broker at start-up.")

    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol.")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(None, description="SASL mechanism.")
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(None, description="SASL password (secret: never logged).")
    ssl_ca_location: str | None = Field(None, description="CA bundle that signs the brokers' certificates.")
    ssl_certificate_location: str | None = Field(None, description="Client certificate (mutual TLS).")
    ssl_key_location: str | None = Field(None, description="Client private key (mutual TLS).")
    ssl_key_password: SecretStr | None = Field(None, description="Password of the client key (secret).")
    schema_registry_url: str | None = Field(
        None, description="Confluent-compatible Schema Registry; input and verdicts then use its wire format.")
    schema_registry_username: str | None = Field(None, description="Schema Registry basic-auth user.")
    schema_registry_password: SecretStr | None = Field(None, description="Schema Registry basic-auth password (secret).")
    consumer_config: dict[str, str] = Field(default_factory=dict, description="Extra librdkafka consumer settings (JSON).")
    producer_config: dict[str, str] = Field(default_factory=dict, description="Extra librdkafka producer settings (JSON).")

    metrics_host: str = Field("127.0.0.1", description="Address of the metrics and health server.")
    metrics_port: int = Field(9108, ge=0, le=65535, description="Port of the metrics and health server; 0 disables it.")
    health_timeout_s: float = Field(60.0, gt=0, description="/healthz fails when the loop has not turned for this long.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Least level logged.")

    @field_validator("consumer_config", "producer_config", mode="before")
    @classmethod
    def _scalars_as_strings(cls, v: Any) -> Any:
        """JSON numbers and booleans become librdkafka strings; null, objects and lists are refused by key."""
        if not isinstance(v, dict):
            return v  # the dict type check names the setting
        converted = {k: _librdkafka_string(x) for k, x in v.items()}
        bad = [f"{k} must be a string, number or boolean, not {_JSON_KINDS.get(type(x), type(x).__name__)}"
               for k, x in v.items() if converted[k] is None]
        if bad:
            raise ValueError("; ".join(bad))
        return converted

    @field_validator("consumer_config", "producer_config")
    @classmethod
    def _no_plain_secrets(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if any(w in k.lower() for w in _SECRET_WORDS)]
        if bad:
            raise ValueError(f"put secrets in the dedicated SecretStr settings, not in pass-through keys {bad}")
        return v

    @field_validator("consumer_config", "producer_config")
    @classmethod
    def _no_guarded_keys(cls, v: dict[str, str]) -> dict[str, str]:
        """Refuse keys that weaken at-least-once delivery or that the worker sets from its own settings."""
        bad = [p for p in (_guard_problem(k, x) for k, x in v.items()) if p]
        if bad:
            raise ValueError("; ".join(bad))
        return v

    @model_validator(mode="after")
    def _transactions_commit_in_time(self) -> Settings:
        """With exactly-once, a transaction must commit well before the coordinator aborts it and fences the producer."""
        if self.delivery == "exactly_once" and self.commit_interval_ms * 3 > self.transaction_timeout_ms():
            raise ValueError(f"FRAUD_COMMIT_INTERVAL_MS: {self.commit_interval_ms} is over a third of "
                             f"transaction.timeout.ms ({self.transaction_timeout_ms()}) with FRAUD_DELIVERY=exactly_once")
        return self

    @model_validator(mode="before")
    @classmethod
    def _empty_optional_is_unset(cls, data):
        """An empty value of a setting that is off by default means off (FRAUD_CHALLENGER_MANIFEST= in Compose or
        Kubernetes), not the path "."; an empty value of any other setting is still refused."""
        if isinstance(data, dict):
            return {k: None if v == "" and k in cls.model_fields and cls.model_fields[k].default is None else v
                    for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _shadow_topic_of_its_own(self) -> Settings:
        """The challenger's verdicts must never land among live verdicts, inputs or dead letters."""
        if self.shadow_topic and not self.challenger_manifest:
            raise ValueError("FRAUD_SHADOW_TOPIC: set FRAUD_CHALLENGER_MANIFEST too, or unset it")
        taken = {self.input_topic: "FRAUD_INPUT_TOPIC", self.verdict_topic: "FRAUD_VERDICT_TOPIC",
                 self.dead_letter_topic: "FRAUD_DEAD_LETTER_TOPIC"}
        if self.shadow_topic in taken:
            raise ValueError(f"FRAUD_SHADOW_TOPIC: {self.shadow_topic} is already {taken[self.shadow_topic]}; the "
                             "challenger's verdicts need a topic of their own")
        return self

    def registry_url_shown(self) -> str | None:
        """The Schema Registry URL without any user:password it carries, for messages and output."""
        url = self.schema_registry_url
        parts = urlsplit(url or "")
        if "@" not in parts.netloc:
            return url
        return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))

    def transaction_timeout_ms(self) -> int:
        """The exactly-once producer's transaction.timeout.ms."""
        value = self.producer_config.get("transaction.timeout.ms", TRANSACTION_TIMEOUT_MS)
        try:
            return int(value)
        except ValueError:
            return TRANSACTION_TIMEOUT_MS  # librdkafka names a malformed value at start-up

    def to_env(self) -> dict[str, str]:
        """The FRAUD_* environment that reproduces these settings in a child process (secrets included)."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            env[f"FRAUD_{name.upper()}"] = json.dumps(value) if isinstance(value, dict) else str(value)
        return env

    def registry_config(self) -> dict[str, str] | None:
        """confluent-kafka SchemaRegistryClient settings, secrets included (never log them); None without a registry."""
        if not self.schema_registry_url:
            return None
        # One 5 s attempt per call: the worker retries with its own backoff while it holds the batch. The client's
        # own retries (confluent-kafka 2.16: 3, with backoff, on timeouts too) would block the loop for about 27 s,
        # past an exactly-once transaction's timeout.
        conf = {"url": self.schema_registry_url, "timeout": 5, "max.retries": 0}
        if self.schema_registry_username:
            password = self.schema_registry_password.get_secret_value() if self.schema_registry_password else ""
            conf["basic.auth.user.info"] = f"{self.schema_registry_username}:{password}"
        return conf

    def security_config(self) -> dict[str, str]:
        """librdkafka security settings, secrets included; never log the result."""
        conf = {"security.protocol": self.security_protocol}
        optional = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password.get_secret_value() if self.sasl_password else None,
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
            "ssl.key.password": self.ssl_key_password.get_secret_value() if self.ssl_key_password else None,
        }
        conf.update({k: v for k, v in optional.items() if v is not None})
        return conf


def load_settings(**overrides) -> Settings:
    """Read the settings; raise SettingsError with one line naming every bad field, never its value."""
    unknown = sorted(k for k in os.environ if k.startswith("FRAUD_") and k[6:].lower() not in Settings.model_fields and k not in TOOL_VARIABLES)
    if unknown:
        raise SettingsError(f"invalid configuration: unknown setting(s) {', '.join(unknown)}")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(_problem(e, overrides) for e in exc.errors(include_input=False))
        raise SettingsError(f"invalid configuration: {problems}") from None
    except SourceError as exc:  # malformed JSON in a dict field; the message names the field, never the value
        raise SettingsError(f"invalid configuration: {exc}") from None


def _problem(error: dict, overrides: dict) -> str:
    """One validation error as `NAME: why`, NAME being what the user wrote."""
    if error["type"] == "extra_forbidden":
        # An unknown key reaches pydantic only from .env (or an override), under the exact name written there.
        name = str(error["loc"][0])
        return f"{name.upper()}: unknown setting{'' if name in overrides else ' in .env'}"
    message = error["msg"].removeprefix("Value error, ")
    return f"FRAUD_{'_'.join(map(str, error['loc'])).upper()}: {message}" if error["loc"] else message
