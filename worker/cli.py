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
    sub.add_parser("promote", help="check the challenger (FRAUD_CHALLENGER_MANIFEST), then make it the live model: "
                                   "its manifest replaces FRAUD_MODEL_MANIFEST's file, which running replicas watch")
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
    p.add_argument("--topic", help="the topic to read (default FRAUD_VERDICT_TOPIC); refused unless it holds verdicts")
    p = sub.add_parser("dlq", help="inspect dead letters, or replay them to the input topic once")
    actions = p.add_subparsers(dest="action", required=True)
    select = argparse.ArgumentParser(add_help=False)
    select.add_argument("--stage", action="append", choices=["deserialize", "validate", "score", "produce"],
                        help="only this stage (repeatable)")
    select.add_argument("--reason", action="append",
                        help="only this exception class name, e.g. DecodeError (repeatable)")
    select.add_argument("--since", help="failure time (fraud.errors.timestamp) from this, inclusive: ISO-8601 (UTC "
                                        "unless it has an offset) or epoch ms")
    select.add_argument("--until", help="failure time before this, exclusive: ISO-8601 or epoch ms")
    select.add_argument("--partition", type=int, action="append", help="only this dead-letter partition (repeatable)")
    select.add_argument("--from-offset", type=int, help="first offset to read in each dead-letter partition")
    select.add_argument("--to-offset", type=int, help="last offset to read in each dead-letter partition (inclusive)")
    select.add_argument("--records", action="store_true", help="also print each dead letter as a JSON line")
    actions.add_parser("inspect", parents=[select], help="count dead letters by stage, reason and source partition")
    p = actions.add_parser("replay", parents=[select],
                           help="re-produce dead letters to the input topic, each at most once (a ledger topic)")
    p.add_argument("--to-topic", help="where to replay (default FRAUD_INPUT_TOPIC)")
    p.add_argument("--ledger-topic", help="the compacted ledger of replayed dead letters (default <dead-letter "
                                          "topic>.replayed; created if missing)")
    p.add_argument("--dry-run", action="store_true", help="count (and with --records print) what would be replayed")
    p.add_argument("--rate", type=float, default=0.0, help="records per second (0 = unlimited)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr (none when not a TTY)")
    p.add_argument("--again", action="store_true",
                   help="also replay dead letters of records that were replays themselves (skipped by default)")
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
    from .metrics import serve
    from .model.lifecycle import load_model
    from .model.manifest import ManifestError

    settings = load_settings()
    logs.configure(settings.log_level)
    logs.bind(worker_id=settings.worker_id, group=settings.group_id)
    log = logs.get_logger("worker")
    stop = threading.Event()

    def on_signal(_signum, _frame):
        # Only set the event: logging here could deadlock on the log's write lock, held by the interrupted line.
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
    from .model.lifecycle import load_model
    from .model.manifest import ManifestError

    settings = load_settings()
    logs.configure("ERROR")
    try:
        model = load_model(settings)
        challenger = _load_challenger(settings)
        worker = Worker(settings, model.scorer, model.codec)
        worker.start(offline=args.offline, fence=False)
    except (ManifestError, StartupError) as exc:
        raise StartupFailure(str(exc)) from None
    worker.kafka.close()
    m = worker.scorer.manifest
    c = challenger.scorer.manifest if challenger else None
    print(json.dumps({"model": m.name, "version": m.version, "sha256": m.sha256, "features": len(m.features),
                      "test_vectors": len(m.test_vectors),
                      "thresholds": m.thresholds.model_dump(), "bootstrap_servers": settings.bootstrap_servers,
                      "topics": [settings.input_topic, settings.verdict_topic, settings.dead_letter_topic],
                      "input_schema": str(settings.input_schema or "schemas/transaction.avsc"),
                      "schema_registry_url": settings.registry_url_shown(), "delivery": settings.delivery,
                      "transactional_id": transactional_id(settings) if worker.exactly_once else None,
                      "challenger": {"model": c.name, "version": c.version, "sha256": c.sha256,
                                     "shadow_topic": settings.shadow_topic} if c else None}))
    return 0


def _load_challenger(settings):
    """The challenger with every check (None when none is set); a ManifestError names it as the challenger."""
    from .model.lifecycle import load_model
    from .model.manifest import ManifestError

    if not settings.challenger_manifest:
        return None
    try:
        return load_model(settings, settings.challenger_manifest)
    except ManifestError as exc:
        raise ManifestError(f"challenger: {exc}") from None


def _promote(args) -> int:
    """Check the challenger, then make it live: its manifest replaces FRAUD_MODEL_MANIFEST's file atomically."""
    import os
    from pathlib import Path

    from .model.lifecycle import manifest_digest
    from .model.manifest import ManifestError

    settings = load_settings()
    logs.configure("ERROR")
    try:
        challenger = _load_challenger(settings)
    except ManifestError as exc:
        raise StartupFailure(str(exc)) from None
    if challenger is None:
        raise StartupFailure("no challenger to promote: set FRAUD_CHALLENGER_MANIFEST")
    if settings.model_file:
        raise StartupFailure("FRAUD_MODEL_FILE overrides the live manifest's model file; unset it to promote")
    live = Path(settings.model_manifest).absolute()  # a symlink is replaced itself, not the file it points to
    data = json.loads(Path(settings.challenger_manifest).read_text())
    if not Path(data["model_file"]).is_absolute():  # relative to its manifest: rewrite it for the live one's folder
        data["model_file"] = os.path.relpath(challenger.scorer.manifest.model_path(), live.parent.resolve())
    before = manifest_digest(live)
    staged = live.with_name(f".{live.name}.promote-{os.getpid()}")
    try:
        staged.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(staged, live)  # atomic: a watching replica reads the old manifest or the new, never half of one
    except OSError as exc:
        raise StartupFailure(f"cannot replace {live}: {exc.strerror} (in Kubernetes, change the ConfigMap that "
                             "holds it instead)") from None
    m = challenger.scorer.manifest
    print(json.dumps({"promoted": {"model": m.name, "version": m.version, "sha256": m.sha256},
                      "manifest": str(live), "manifest_sha256_before": before,
                      "manifest_sha256": manifest_digest(live)}))
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
    from .kafka import client_config, plain_producer
    from .tools import traffic

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
    from .avro.codec import Codec
    from .avro.registry import RegistryUnavailable, input_prefix

    try:
        schema = json.loads(s.input_schema.read_text()) if s.input_schema else Codec().transaction_avsc
        return input_prefix(s.registry_config(), s.input_topic, schema)
    except RegistryUnavailable as exc:
        raise StartupFailure(f"Schema Registry at {s.registry_url_shown()} did not answer: {exc}") from None


def _verdicts(args) -> int:
    from .avro.codec import Codec
    from .kafka import KafkaFatal, client_config, describe_topics, iter_topic
    from .tools.dlq import ERRORS

    s = load_settings()
    topic, codec, n = args.topic or s.verdict_topic, Codec(), 0
    try:
        if topic not in describe_topics(client_config(s), [topic], s.startup_timeout_s):
            raise StartupFailure(f"topic {topic} does not exist on {s.bootstrap_servers}")
    except KafkaFatal as exc:
        raise StartupFailure(str(exc)) from None
    for record in iter_topic(client_config(s), topic, args.idle):
        if record is None:
            continue
        where = f"partition {record.partition} offset {record.offset}"
        if any(name.startswith(ERRORS) for name in record.headers):
            raise StartupFailure(f"{topic} is a dead-letter topic (fraud.errors.* headers at {where}), not a verdict "
                                 f"topic; read it with `fraud-worker dlq inspect --records`")
        try:
            verdict = codec.decode_verdict(record.value)
        except Exception:
            raise StartupFailure(f"{topic} is not a verdict topic: the record at {where} does not decode as a "
                                 f"verdict") from None
        print(json.dumps(verdict), flush=True)
        n += 1
        if args.max and n >= args.max:
            break
    return 0


def _dlq(args) -> int:
    from .tools import dlq

    s = load_settings()
    try:
        since, until = (None if t is None else dlq.parse_time(t) for t in (args.since, args.until))
    except ValueError:
        raise StartupFailure("--since and --until take ISO-8601 (2024-05-01T12:00:00Z) or epoch milliseconds") from None
    selection = dlq.Selection(
        partitions=frozenset(args.partition) if args.partition else None, from_offset=args.from_offset,
        to_offset=args.to_offset, since_ms=since, until_ms=until, stages=frozenset(args.stage or ()),
        reasons=frozenset(args.reason or ()))
    emit = (lambda record: print(dlq.to_json(record), flush=True)) if args.records else None
    try:
        if args.action == "inspect":
            summary = dlq.inspect(s, selection, emit)
        else:
            summary = dlq.replay(s, selection, to_topic=args.to_topic, ledger_topic=args.ledger_topic,
                                 dry_run=args.dry_run, rate=args.rate, progress=not args.no_progress, emit=emit,
                                 again=args.again)
    except dlq.DlqError as exc:
        raise StartupFailure(str(exc)) from None
    print(dlq.to_json(summary), flush=True)
    return 0


def _broker(args) -> int:
    from .tools.localbroker import LocalBroker, broker_home

    return LocalBroker(port=args.port, home=broker_home(args.port)).cli(args.action, StartupFailure)


def _registry(args) -> int:
    from .tools.localregistry import LocalRegistry, registry_home

    return LocalRegistry(port=args.port, home=registry_home(args.port)).cli(args.action, StartupFailure)


def _demo(args) -> int:
    from .tools.demo import run_demo

    return run_demo(args.count, args.rate)


def _chaos(args) -> int:
    from pathlib import Path

    from .tools.chaos import Plan, run

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
    "promote": _promote,
    "topics": _topics,
    "produce": _produce,
    "verdicts": _verdicts,
    "dlq": _dlq,
    "broker": _broker,
    "registry": _registry,
    "demo": _demo,
}

if __name__ == "__main__":
    sys.exit(main())
