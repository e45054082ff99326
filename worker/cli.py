"""`fraud-worker`: run the worker, and the tools around it (broker, topics, traffic, verdicts, demo)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading

from . import logs
from .settings import SettingsError, load_settings


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = argparse.ArgumentParser(prog="fraud-worker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the scoring worker (configured by FRAUD_* variables)")
    p = sub.add_parser("check", help="run the start-up path (settings, model, clients, broker, topics), then exit")
    p.add_argument("--offline", action="store_true", help="check settings, model and client configuration only")
    p = sub.add_parser("topics", help="create the input, verdict and dead-letter topics")
    p.add_argument("--partitions", type=int, default=6, help="input topic partitions (default 6)")
    p.add_argument("--output-partitions", type=int, default=6, help="verdict and dead-letter topic partitions")
    p.add_argument("--replication-factor", type=int, default=-1,
                   help="replicas per partition (default -1: the cluster's default.replication.factor); "
                        "1 only makes sense for a local single broker")
    p.add_argument("--min-insync-replicas", type=int, default=None,
                   help="set the topics' min.insync.replicas, the replicas an acks=all write needs "
                        "(default: the cluster's); at most the replication factor")
    p = sub.add_parser("produce", help="produce sample transactions to the input topic")
    p.add_argument("--count", type=int, default=10_000)
    p.add_argument("--rate", type=float, default=0.0, help="messages per second (0 = as fast as possible)")
    p.add_argument("--csv", help="read rows from a card_transdata CSV instead of the generator")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("verdicts", help="print verdicts as JSON lines")
    p.add_argument("--max", type=int, default=0, help="stop after this many (0 = until idle)")
    p.add_argument("--idle", type=float, default=5.0, help="stop after this many idle seconds")
    p = sub.add_parser("broker", help="manage the local Kafka broker (no Docker needed)")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--port", type=int, default=9092,
                   help="the broker's port (default 9092); its pid file, data and log are this checkout's "
                        "var/broker-PORT, so stop and status only see the broker this checkout started")
    p = sub.add_parser("registry", help="manage the local Schema Registry (Apicurio, Confluent API; no Docker)")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--port", type=int, default=8081,
                   help="the registry's port (default 8081); its pid file and log are this checkout's "
                        "var/registry-PORT; schemas are kept in memory and lost when it stops")
    p = sub.add_parser("demo", help="end to end on a broker: topics, worker, traffic, verdicts, summary")
    p.add_argument("--count", type=int, default=50_000)
    p.add_argument("--rate", type=float, default=5_000.0, help="transactions per second")
    p = sub.add_parser("chaos", help="fault-injection run on a broker of its own, then an audit of every message")
    p.add_argument("--transactions", type=int, default=20_000)
    p.add_argument("--rate", type=float, default=800.0, help="transactions per second")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--kills", type=int, default=3, help="SIGKILLs of a replica mid-batch (each restarted)")
    p.add_argument("--kill-interval", type=float, default=0.0,
                   help="seconds between kills, from a tenth into the traffic (default 0: spread over the run)")
    p.add_argument("--terms", type=int, default=0, help="SIGTERMs of a replica (each restarted)")
    p.add_argument("--broker-restarts", type=int, default=1)
    p.add_argument("--storm", action="store_true", help="scale 1 -> 3 -> 1 replicas while traffic flows")
    p.add_argument("--unwritable", action="store_true", help="deny writes to the verdict topic for a while")
    p.add_argument("--poison-per-kind", type=int, default=2, help="poison pills of each of the 10 kinds")
    p.add_argument("--delivery", choices=["at_least_once", "exactly_once"], default="at_least_once")
    p.add_argument("--group-protocol", choices=["classic", "consumer"], default="classic")
    p.add_argument("--static", action=argparse.BooleanOptionalAction, default=True,
                   help="restart a replica with its slot's identity (group.instance.id, transactional.id), as a "
                        "StatefulSet pod; --no-static replaces it with a new identity (default: static)")
    p.add_argument("--port", type=int, default=0, help="port of the harness's own broker (0: a free one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="var/chaos", help="where logs and report.json go")
    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (SettingsError, StartupFailure) as exc:
        print(f"fraud-worker: {exc}", file=sys.stderr)
        return 2


class StartupFailure(RuntimeError):
    """A clean, one-line start-up failure."""


def _run(args) -> int:
    from .app import StartupError, Worker
    from .lifecycle import load_model
    from .manifest import ManifestError
    from .metrics import serve

    settings = load_settings()
    logs.configure(settings.log_level)
    logs.bind(worker_id=settings.worker_id, group=settings.group_id)
    log = logs.get_logger("worker")
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("stop_requested", signal=signal.Signals(signum).name)
        stop.set()

    # Installed first, so a stop during a slow start-up is still a clean exit 0.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        model = load_model(settings)
        worker = Worker(settings, model.scorer, model.codec, stop=stop)
        # Bound before start(): a start-up that fails after registering the transactional.id would fence a live
        # replica with the same id.
        if settings.metrics_port:
            try:
                serve(worker.metrics, worker.health, settings.metrics_host, settings.metrics_port)
            except OSError as exc:
                raise StartupError(f"metrics server cannot bind {settings.metrics_host}:{settings.metrics_port}: "
                                   f"{exc.strerror}") from None
        worker.start()
    except (ManifestError, StartupError) as exc:
        log.error("startup_failed", error=str(exc))
        raise StartupFailure(str(exc)) from None
    return worker.run()


def _check(args) -> int:
    """The real start-up path (settings, model, clients, broker, authentication, topics), then exit; 0 when all pass."""
    from .app import StartupError, Worker
    from .kafka import transactional_id
    from .lifecycle import load_model
    from .manifest import ManifestError

    settings = load_settings()
    logs.configure("ERROR")
    try:
        model = load_model(settings)
        worker = Worker(settings, model.scorer, model.codec)
        worker.start(offline=args.offline, fence=False)
    except (ManifestError, StartupError) as exc:
        raise StartupFailure(str(exc)) from None
    worker.kafka.close()
    m = worker.scorer.manifest
    print(json.dumps({"model": m.name, "version": m.version, "sha256": m.sha256, "features": len(m.features),
                      "test_vectors": len(m.test_vectors),
                      "thresholds": m.thresholds.model_dump(), "bootstrap_servers": settings.bootstrap_servers,
                      "topics": [settings.input_topic, settings.verdict_topic, settings.dead_letter_topic],
                      "input_schema": str(settings.input_schema or "schemas/transaction.avsc"),
                      "schema_registry_url": settings.schema_registry_url, "delivery": settings.delivery,
                      "transactional_id": transactional_id(settings) if worker.exactly_once else None}))
    return 0


def _topics(args) -> int:
    from confluent_kafka import KafkaException

    from .kafka import client_config, create_topics

    s = load_settings()
    try:
        created = create_topics(
            client_config(s),
            {s.input_topic: args.partitions, s.verdict_topic: args.output_partitions,
             s.dead_letter_topic: args.output_partitions},
            replication=args.replication_factor, min_insync_replicas=args.min_insync_replicas,
        )
    except ValueError as exc:
        raise StartupFailure(str(exc)) from None
    except KafkaException as exc:
        raise StartupFailure(f"cannot create topics on {s.bootstrap_servers}: {exc.args[0].str()}") from None
    print(json.dumps({"created": created}))
    return 0


def _produce(args) -> int:
    from . import traffic
    from .kafka import client_config, plain_producer

    s = load_settings()
    if args.csv:
        txns = (t for t, _ in traffic.from_csv(args.csv))
        txns = (t for i, t in zip(range(args.count), txns))
    else:
        txns = traffic.generated(args.count, seed=args.seed)
    producer = plain_producer(client_config(s))
    sent = traffic.produce(producer, s.input_topic, txns, rate=args.rate, prefix=_input_prefix(s))
    print(json.dumps({"produced": sent, "topic": s.input_topic}))
    return 0


def _input_prefix(s) -> bytes:
    from .codec import Codec
    from .registry import RegistryUnavailable, input_prefix

    try:
        schema = json.loads(s.input_schema.read_text()) if s.input_schema else Codec().transaction_avsc
        return input_prefix(s.registry_config(), s.input_topic, schema)
    except RegistryUnavailable as exc:
        raise StartupFailure(f"Schema Registry at {s.schema_registry_url} did not answer: {exc}") from None


def _verdicts(args) -> int:
    from .demo import read_verdicts

    s = load_settings()
    for n, (verdict, _arrival) in enumerate(read_verdicts(s, idle_s=args.idle), start=1):
        print(json.dumps(verdict), flush=True)
        if args.max and n >= args.max:
            break
    return 0


def _broker(args) -> int:
    from .localbroker import LocalBroker, broker_home

    return LocalBroker(port=args.port, home=broker_home(args.port)).cli(args.action, StartupFailure)


def _registry(args) -> int:
    from .localregistry import LocalRegistry, registry_home

    return LocalRegistry(port=args.port, home=registry_home(args.port)).cli(args.action, StartupFailure)


def _demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.count, args.rate)


def _chaos(args) -> int:
    from pathlib import Path

    from .chaos import Plan, run

    plan = Plan(transactions=args.transactions, rate=args.rate, replicas=args.replicas, kills=args.kills,
                kill_interval_s=args.kill_interval, terms=args.terms, broker_restarts=args.broker_restarts,
                storm=args.storm, unwritable=args.unwritable, delivery=args.delivery,
                group_protocol=args.group_protocol, static=args.static, poison_per_kind=args.poison_per_kind,
                port=args.port, seed=args.seed,
                out=Path(args.out))
    return 0 if run(plan).ok() else 1


_COMMANDS = {
    "chaos": _chaos,
    "run": _run,
    "check": _check,
    "topics": _topics,
    "produce": _produce,
    "verdicts": _verdicts,
    "broker": _broker,
    "registry": _registry,
    "demo": _demo,
}

if __name__ == "__main__":
    sys.exit(main())
