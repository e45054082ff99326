"""`fraud-worker dlq inspect|replay` and `verdicts --topic` on a real broker; a real worker makes the dead letters."""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections import Counter

import pytest
from confluent_kafka import Producer

from tests.kafkatools import WorkerThread, end_offsets, read_topic
from worker.avro.codec import Codec
from worker.cli import main
from worker.kafka import create_topics, describe_topics
from worker.settings import Settings
from worker.tools import traffic

pytestmark = pytest.mark.kafka
CODEC = Codec()
SECRET = "dlq-Hunter2-never-printed"


def _txn(prefix: str, n: int, **changes):
    txn = traffic.stamp(next(traffic.generated(1, seed=n, prefix=prefix)), int(time.time() * 1000))
    fields = {name: getattr(txn, name) for name in txn.__slots__} | changes
    return type(txn)(**fields)


def _produce(s: Settings, records: list[tuple[int, bytes | None, bytes | None, list | None]]) -> None:
    """Produce (partition, key, value, headers) records to the input topic."""
    producer = Producer({"bootstrap.servers": s.bootstrap_servers, "enable.idempotence": True})
    for partition, key, value, headers in records:
        producer.produce(s.input_topic, value, key, partition=partition, headers=headers)
    assert producer.flush(30) == 0


def _cli(monkeypatch, capsys, s: Settings, *argv: str, **env: str) -> tuple[int, list[str], str]:
    """Run `fraud-worker <argv>` in-process, settings as FRAUD_* variables: (exit code, stdout lines, stderr)."""
    for name in [n for n in os.environ if n.startswith("FRAUD_")]:
        monkeypatch.delenv(name)
    for name, value in (s.to_env() | env).items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def _summary(monkeypatch, capsys, s: Settings, *argv: str) -> dict:
    code, lines, err = _cli(monkeypatch, capsys, s, *argv)
    assert code == 0 and err == "", err
    return json.loads(lines[-1])


def _refused(monkeypatch, capsys, s: Settings, *argv: str, **env: str) -> str:
    code, lines, err = _cli(monkeypatch, capsys, s, *argv, **env)
    assert code == 2 and lines == [] and len(err.strip().splitlines()) == 1, err
    assert err.startswith("fraud-worker: ") and "Traceback" not in err
    return err


GOOD = [_txn("good", i) for i in range(40)]
POISON = [  # (partition, key, value, headers, stage, reason)
    (0, b"empty", b"", None, "deserialize", "DecodeError"),
    (0, None, None, None, "deserialize", "DecodeError"),
    (1, b"\xff\xfe\x00card", b"\xff" * 30, [("raw", bytes(range(256))), ("text", b"ok")], "deserialize", "DecodeError"),
    (1, b"truncated", CODEC.encode_transaction(GOOD[0])[:-1], None, "deserialize", "DecodeError"),
    (0, b"unstamped", CODEC.encode_transaction(_txn("bad", 1, event_time=0)), None, "validate", "ValidationError"),
    (1, b"negative", CODEC.encode_transaction(_txn("bad", 2, amount=-5.0)), None, "validate", "ValidationError"),
    (1, b"nan", CODEC.encode_transaction(_txn("bad", 3, distance_from_home=float("nan"))), None, "validate",
     "ValidationError"),
]


@pytest.fixture(scope="module")
def poisoned(kafka_bootstrap) -> Settings:
    """Topics where a real worker has scored GOOD and dead-lettered POISON (2 partitions each)."""
    u = uuid.uuid4().hex[:10]
    s = Settings(bootstrap_servers=kafka_bootstrap, group_id=f"g-{u}", input_topic=f"tx-{u}",
                 verdict_topic=f"verdicts-{u}", dead_letter_topic=f"dlq-{u}", worker_id=f"test-{u}", metrics_port=0,
                 startup_timeout_s=10, consumer_config={"session.timeout.ms": "6000", "heartbeat.interval.ms": "500"})
    create_topics({"bootstrap.servers": kafka_bootstrap}, dict.fromkeys([s.input_topic, s.verdict_topic,
                                                                        s.dead_letter_topic], 2))
    records = [(i % 2, t.card_id.encode(), CODEC.encode_transaction(t), None) for i, t in enumerate(GOOD)]
    for i, poison in enumerate(POISON):
        records.insert(5 * i + 3, poison[:4])
    _produce(s, records)
    with WorkerThread(s) as w:
        assert len(read_topic(s, s.verdict_topic, len(GOOD), timeout=60)) == len(GOOD)
        assert len(read_topic(s, s.dead_letter_topic, len(POISON), timeout=30)) == len(POISON)
        assert w.stop() == 0
    return s


def test_inspect_counts_and_prints_what_the_worker_dead_lettered(poisoned, monkeypatch, capsys):
    """Counts by stage, reason and source partition match what was produced; --records lines decode, with null and
    non-UTF-8 keys, binary headers, undecodable values as base64 with the error, and decodable ones decoded."""
    code, lines, err = _cli(monkeypatch, capsys, poisoned, "dlq", "inspect", "--records")
    assert code == 0 and err == "", err
    summary, records = json.loads(lines[-1]), [json.loads(line) for line in lines[:-1]]
    assert summary["dead_letters"] == len(records) == len(POISON)
    assert summary["time_field"] == "fraud.errors.timestamp"
    assert summary["by_stage"] == dict(Counter(p[4] for p in POISON))
    assert summary["by_reason"] == dict(Counter(p[5] for p in POISON))
    assert summary["by_source_partition"] == {f"{poisoned.input_topic}/{p}": n
                                              for p, n in sorted(Counter(p[0] for p in POISON).items())}
    by_key = {json.dumps(r["key"]): r for r in records}
    assert set(by_key) == {json.dumps(None), json.dumps({"base64": base64.b64encode(POISON[2][1]).decode()}),
                           *(json.dumps(p[1].decode()) for p in POISON if p[1] and p[1].isascii())}
    binary = by_key[json.dumps({"base64": base64.b64encode(POISON[2][1]).decode()})]
    assert binary["headers"] == [["raw", {"base64": base64.b64encode(bytes(range(256))).decode()}], ["text", "ok"]]
    assert base64.b64decode(binary["value_base64"]) == POISON[2][2] and binary["decode_error"].startswith("DecodeError")
    assert binary["source"] == {"topic": poisoned.input_topic, "partition": 1, "offset": binary["source"]["offset"]}
    assert by_key['"empty"']["value_base64"] == "" and by_key["null"]["value"] is None
    unstamped = by_key['"unstamped"']
    assert (unstamped["stage"], unstamped["reason"]) == ("validate", "ValidationError")
    assert unstamped["value"]["transaction_id"] == "bad-1-0" and "event_time" in unstamped["message"]
    after = int(time.time() * 1000) + 60_000
    assert _summary(monkeypatch, capsys, poisoned, "dlq", "inspect", "--since", str(after))["dead_letters"] == 0
    assert _summary(monkeypatch, capsys, poisoned, "dlq", "inspect", "--until", "2020-01-01T00:00:00Z",
                    )["dead_letters"] == 0
    assert _summary(monkeypatch, capsys, poisoned, "dlq", "inspect", "--since", "2020-01-01T00:00:00+02:00",
                    "--until", str(after))["dead_letters"] == len(POISON)


def test_filters_select_exactly_the_matching_dead_letters(poisoned, monkeypatch, capsys, unique):
    """--stage, --reason, --partition and offsets select exactly the matching dead letters, for inspect and replay."""
    def count(*argv):
        return _summary(monkeypatch, capsys, poisoned, "dlq", "inspect", *argv)["dead_letters"]

    assert count("--stage", "validate") == 3 and count("--reason", "DecodeError") == 4
    assert count("--stage", "validate", "--reason", "DecodeError") == 0
    assert count("--stage", "validate", "--stage", "deserialize") == len(POISON)
    assert count("--partition", "0") + count("--partition", "1") == len(POISON)
    lines = _cli(monkeypatch, capsys, poisoned, "dlq", "inspect", "--records")[1][:-1]
    offsets = [int(json.loads(line)["dead_letter"].rsplit("/", 1)[1]) for line in lines]
    assert count("--from-offset", "1", "--to-offset", "2") == sum(1 <= o <= 2 for o in offsets)
    side = f"side-{unique}"
    create_topics({"bootstrap.servers": poisoned.bootstrap_servers}, {side: 1})
    summary = _summary(monkeypatch, capsys, poisoned, "dlq", "replay", "--stage", "validate", "--to-topic", side,
                       "--ledger-topic", f"{side}.ledger", "--rate", "50")
    assert (summary["selected"], summary["replayed"], summary["skipped"]) == (3, 3, {})
    got = read_topic(poisoned, side, 3, timeout=30)
    assert sorted(r.value for r in got) == sorted(p[2] for p in POISON if p[4] == "validate")


def test_dry_run_produces_nothing_and_leaves_no_ledger(poisoned, monkeypatch, capsys):
    """A dry run counts and prints what it would replay; the input topic and the ledger stay untouched."""
    before = end_offsets(poisoned, poisoned.input_topic)
    code, lines, err = _cli(monkeypatch, capsys, poisoned, "dlq", "replay", "--dry-run", "--records")
    assert code == 0 and err == ""
    summary = json.loads(lines[-1])
    assert (summary["selected"], summary["would_replay"], summary["replayed"]) == (len(POISON), len(POISON), 0)
    assert len(lines) - 1 == len(POISON) and summary["dry_run"] is True
    assert end_offsets(poisoned, poisoned.input_topic) == before
    conf = {"bootstrap.servers": poisoned.bootstrap_servers}
    assert summary["ledger_topic"] == f"{poisoned.dead_letter_topic}.replayed"
    assert summary["ledger_topic"] not in describe_topics(conf, [summary["ledger_topic"]], 10)


def test_replay_after_the_fix_gives_each_dead_letter_one_verdict(settings_for, monkeypatch, capsys):
    """The issue's "done when". An operator set FRAUD_MAX_MESSAGE_BYTES=150, too low for a new upstream that sends
    110-character transaction ids: a running worker dead-letters those records (stage deserialize, DecodeError
    "exceeds max_message_bytes"). The fix is a worker restarted with the default limit; `dlq replay` then re-injects
    each dead letter once (a second replay injects nothing), and the restarted worker gives each exactly one verdict.
    """
    tight = settings_for(partitions=2, max_message_bytes=150, startup_timeout_s=10)
    short = [_txn("short", i) for i in range(30)]
    long = [_txn("L" * 100, i) for i in range(5)]
    _produce(tight, [(i % 2, t.card_id.encode(), CODEC.encode_transaction(t), [("trace", b"t-%d" % i)])
                     for i, t in enumerate(short + long)])
    with WorkerThread(tight) as w:
        assert len(read_topic(tight, tight.verdict_topic, len(short), timeout=60)) == len(short)
        dead = read_topic(tight, tight.dead_letter_topic, len(long), timeout=30)
        assert w.stop() == 0
    assert {d.headers["fraud.errors.exception.class.name"] for d in dead} == {b"DecodeError"}
    assert all(b"exceeds max_message_bytes=150" in d.headers["fraud.errors.exception.message"] for d in dead)
    fixed = tight.model_copy(update={"max_message_bytes": 65_536})
    with WorkerThread(fixed) as w:
        first = _summary(monkeypatch, capsys, fixed, "dlq", "replay")
        assert (first["selected"], first["replayed"], first["already_replayed"]) == (5, 5, 0)
        verdicts = read_topic(fixed, fixed.verdict_topic, len(short) + len(long), timeout=60)
        second = _summary(monkeypatch, capsys, fixed, "dlq", "replay")
        assert (second["selected"], second["replayed"], second["already_replayed"]) == (5, 0, 5)
        time.sleep(2)
        assert w.stop() == 0
    verdicts = read_topic(fixed, fixed.verdict_topic, len(short) + len(long) + 1, timeout=5)
    ids = Counter(CODEC.decode_verdict(v.value)["transaction_id"] for v in verdicts)
    assert ids == Counter(t.transaction_id for t in short + long)
    inputs = read_topic(fixed, fixed.input_topic, len(short) + 2 * len(long) + 1, timeout=5)
    replayed = [r for r in inputs if "fraud.replay.of" in r.headers]
    assert len(inputs) == len(short) + 2 * len(long) and len(replayed) == len(long)
    assert not any(name.startswith("fraud.errors.") for r in replayed for name in r.headers)
    originals = {(r.key, r.value): r for r in inputs if "fraud.replay.of" not in r.headers}
    for r in replayed:
        original = originals[(r.key, r.value)]
        assert (r.partition, r.timestamp_ms, r.headers["trace"]) == (original.partition, original.timestamp_ms,
                                                                    original.headers["trace"])
        assert r.headers["fraud.replay.of"].decode().startswith(f"{fixed.dead_letter_topic}/")
    assert sum(end_offsets(fixed, fixed.dead_letter_topic).values()) == len(long)


def test_verdicts_refuses_a_dead_letter_topic_and_garbage(poisoned, monkeypatch, capsys, unique):
    """`verdicts --topic` on a dead-letter topic, or a topic of other bytes, is one line and exit 2."""
    line = _refused(monkeypatch, capsys, poisoned, "verdicts", "--topic", poisoned.dead_letter_topic, "--idle", "10")
    assert "dead-letter topic" in line and "fraud-worker dlq inspect" in line
    junk = poisoned.model_copy(update={"input_topic": f"junk-{unique}"})
    create_topics({"bootstrap.servers": junk.bootstrap_servers}, {junk.input_topic: 1})
    _produce(junk, [(0, b"k", b"\xff\xff\xff", None)])
    line = _refused(monkeypatch, capsys, junk, "verdicts", "--topic", junk.input_topic, "--idle", "10")
    assert f"{junk.input_topic} is not a verdict topic" in line and "partition 0 offset 0" in line
    line = _refused(monkeypatch, capsys, junk, "verdicts", "--topic", f"no-such-{unique}")
    assert f"topic no-such-{unique} does not exist" in line


def test_a_replay_that_failed_again_is_skipped_unless_asked():
    """The dead letter of a record that was itself a replay is not replayed again (a fix that did not hold would
    loop) unless --again says so; --records shows what it replayed."""
    from worker.tools.dlq import Letter, to_json

    headers = [("trace", b"abc"), ("fraud.replay.of", b"dlq/1/4"), ("fraud.replay.at", b"1")]
    letter = Letter("dlq", 0, 9, b"k", b"v", headers, (1, 5), {"stage": "validate"})
    assert letter.replay_of() == "dlq/1/4"
    assert "--again" in letter.unreplayable() and letter.unreplayable(again=True) is None
    assert letter.original()[2] == [("trace", b"abc")]
    assert to_json({"x": float("nan"), "y": [float("-inf")]}) == '{"x": "NaN", "y": ["-Infinity"]}'


def test_hostile_corners_empty_missing_and_down(settings_for, monkeypatch, capsys):
    """An empty dead-letter topic gives zeros; a missing one, or a broker that is down, one line and exit 2 within
    the start-up timeout, never printing the password."""
    s = settings_for(partitions=1, startup_timeout_s=5)
    summary = _summary(monkeypatch, capsys, s, "dlq", "inspect")
    assert (summary["dead_letters"], summary["by_stage"]) == (0, {})
    replay = _summary(monkeypatch, capsys, s, "dlq", "replay", "--dry-run")
    assert (replay["selected"], replay["would_replay"], replay["skipped"]) == (0, 0, {})
    line = _refused(monkeypatch, capsys, s, "dlq", "inspect", FRAUD_DEAD_LETTER_TOPIC="no-such-dlq-x")
    assert "no-such-dlq-x does not exist" in line
    started = time.monotonic()
    down = s.model_copy(update={"bootstrap_servers": "127.0.0.1:1", "startup_timeout_s": 2})
    for action in ("inspect", "replay"):
        line = _refused(monkeypatch, capsys, down, "dlq", action, FRAUD_SECURITY_PROTOCOL="SASL_PLAINTEXT",
                        FRAUD_SASL_MECHANISM="PLAIN", FRAUD_SASL_USERNAME="u", FRAUD_SASL_PASSWORD=SECRET)
        assert "cannot reach Kafka at 127.0.0.1:1" in line and SECRET not in line
    assert time.monotonic() - started < 10
