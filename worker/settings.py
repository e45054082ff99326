"""Settings, read once at start-up from FRAUD_* environment variables and a .env file."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError

ROOT = Path(__file__).resolve().parent.parent
# Read by the local-broker tooling, not by the worker.
TOOL_VARIABLES = {"FRAUD_CACHE_DIR", "FRAUD_KAFKA_VERSION", "FRAUD_TEST_BROKER_PORT"}
_SECRET_WORDS = ("password", "secret", "token", "key.pem", "keystore", "credentials")


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
    worker_id: str = Field(f"{socket.gethostname()}-{os.getpid()}", min_length=1, description="This replica's id.")

    model_manifest: Path = Field(ROOT / "models" / "fraud-gbt.json", description="Model manifest (JSON).")
    model_file: Path | None = Field(None, description="Override of the manifest's model_file path.")
    onnx_threads: int = Field(1, ge=1, le=64, description="onnxruntime intra-op threads; scale with replicas.")

    batch_max_size: int = Field(1000, ge=1, le=100_000, description="Most messages scored in one model call.")
    batch_max_wait_ms: int = Field(5, ge=0, le=10_000, description="After the first message, wait this long to fill a batch.")
    commit_interval_ms: int = Field(200, ge=0, le=60_000, description="Least time between offset commits.")
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
    consumer_config: dict[str, str] = Field(default_factory=dict, description="Extra librdkafka consumer settings (JSON).")
    producer_config: dict[str, str] = Field(default_factory=dict, description="Extra librdkafka producer settings (JSON).")

    metrics_host: str = Field("127.0.0.1", description="Address of the metrics and health server.")
    metrics_port: int = Field(9108, ge=0, le=65535, description="Port of the metrics and health server; 0 disables it.")
    health_timeout_s: float = Field(60.0, gt=0, description="/healthz fails when the loop has not turned for this long.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Least level logged.")

    @field_validator("consumer_config", "producer_config")
    @classmethod
    def _no_plain_secrets(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if any(w in k.lower() for w in _SECRET_WORDS)]
        if bad:
            raise ValueError(f"put secrets in the dedicated SecretStr settings, not in pass-through keys {bad}")
        return v

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
        problems = "; ".join(
            f"FRAUD_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors(include_input=False)
        )
        raise SettingsError(f"invalid configuration: {problems}") from None
    except SourceError as exc:  # malformed JSON in a dict field; the message names the field, never the value
        raise SettingsError(f"invalid configuration: {exc}") from None
