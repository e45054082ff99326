"""Model lifecycle on a real broker: hot swap while traffic flows, a refused new version, a challenger in shadow."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.fakes import CODEC, FakeScorer, make_manifest, txn_message
from tests.kafkatools import WorkerThread, produce_transactions, read_topic, wait_until
from worker.cli import main
from worker.kafka import create_topics
from worker.metrics import Metrics
from worker.model.lifecycle import LoadedModel, Models
from worker.scoring import score_batch
from worker.settings import Settings
from worker.tools import traffic

ROOT = Path(__file__).resolve().parent.parent
GBT = ROOT / "models" / "fraud-gbt.json"
MLP = ROOT / "models" / "reference-fraud-mlp.json"


def manifest_copy(source: Path, target: Path, **changes) -> Path:
    """`source` written at `target` (atomically, as a ConfigMap update is), its model file by absolute path."""
    data = json.loads(source.read_text())
    data["model_file"] = str((source.parent / data["model_file"]).resolve())
    data.update(changes)
    staged = target.with_suffix(".tmp")
    staged.write_text(json.dumps(data))
    staged.replace(target)
    return target


def unscaled(source: Path, target: Path) -> Path:
    """`source` with its scaler left out: its test vectors then fail."""
    features = [{**f, "mean": 0.0, "scale": 1.0} for f in json.loads(source.read_text())["features"]]
    return manifest_copy(source, target, features=features, version="broken")


def sample(metrics: Metrics, metric: str, **labels) -> float:
    """A metric's current value in the worker's own registry (0 when never set)."""
    return metrics.registry.get_sample_value(metric, labels) or 0.0


def verdicts_by_id(s: Settings, topic: str, expected: int) -> dict[str, list[dict]]:
    """Every verdict of a topic, grouped by transaction id."""
    out: dict[str, list[dict]] = {}
    for record in read_topic(s, topic, expected):
        v = CODEC.decode_verdict(record.value)
        out.setdefault(v["transaction_id"], []).append(v)
    return out


@pytest.mark.kafka
@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
def test_hot_swap_while_traffic_flows(delivery, settings_for, tmp_path):
    """A new manifest is swapped in at a batch boundary: one verdict per transaction, the old version before the switch
    and the new after; a broken next version is refused and scoring goes on with the one that is live."""
    live = manifest_copy(GBT, tmp_path / "live.json")
    s = settings_for(partitions=1, model_manifest=live, model_watch_s=0.2, delivery=delivery)
    count = 9_000
    sender = threading.Thread(target=produce_transactions,
                              args=(s, traffic.generated(count, prefix="swap"), 1_500.0))
    with WorkerThread(s) as w:
        sender.start()
        metrics = w.worker.metrics
        wait_until(lambda: sample(metrics, "fraud_worker_verdicts_total", decision="APPROVE") > 1_000, 60,
                   "verdicts from the first model")
        manifest_copy(MLP, live)
        wait_until(lambda: sample(metrics, "fraud_worker_model_loads_total", role="live", result="swapped") == 1, 30,
                   "the swap to the reference model")
        unscaled(MLP, live)
        wait_until(lambda: sample(metrics, "fraud_worker_model_loads_total", role="live", result="refused") == 1, 30,
                   "the broken version to be refused")
        sender.join()
        verdicts = verdicts_by_id(s, s.verdict_topic, count)
        assert sample(metrics, "fraud_worker_model_info", name="fraud-mlp", version="c2ced1f",
                      sha256=json.loads(MLP.read_text())["sha256"]) == 1
    assert len(verdicts) == count and all(len(v) == 1 for v in verdicts.values())
    # One input partition: input order is the order the ids were produced in.
    models = [(verdicts[f"swap-0-{i}"][0]["model_name"], verdicts[f"swap-0-{i}"][0]["model_version"])
              for i in range(count)]
    switch = models.index(("fraud-mlp", "c2ced1f"))
    assert 1_000 < switch < count - 1_000
    assert set(models[:switch]) == {("fraud-gbt", "1.0.0")} and set(models[switch:]) == {("fraud-mlp", "c2ced1f")}
    assert w.exit_code == 0


@pytest.mark.kafka
def test_challenger_in_shadow_leaves_live_verdicts_unchanged(settings_for, kafka_bootstrap, unique, tmp_path):
    """A challenger beside the live model for 20,000 transactions: live verdicts are the ones a run without it gives,
    every transaction gets one shadow verdict, and the agreement metric is the share of equal decisions."""
    count = 20_000
    plain = settings_for(partitions=3)
    shadow = Settings(**{**plain.model_dump(), "group_id": f"{plain.group_id}-b", "verdict_topic": f"b-{unique}",
                         "challenger_manifest": MLP, "shadow_topic": f"shadow-{unique}"})
    create_topics({"bootstrap.servers": kafka_bootstrap}, {shadow.verdict_topic: 3, shadow.shadow_topic: 3})
    produce_transactions(plain, traffic.generated(count, prefix="shadow"))
    with WorkerThread(plain), WorkerThread(shadow) as w:
        without = verdicts_by_id(plain, plain.verdict_topic, count)
        beside = verdicts_by_id(shadow, shadow.verdict_topic, count)
        challenger = verdicts_by_id(shadow, shadow.shadow_topic, count)
        metrics = w.worker.metrics
        wait_until(lambda: sum(pair(metrics, a, b) for a in DECISIONS for b in DECISIONS) == count, 30,
                   "every comparison counted")
        agreement = sample(metrics, "fraud_worker_challenger_agreement")
    strip = lambda vs: [{k: v for k, v in x.items() if k != "scored_at"} for x in vs]  # noqa: E731
    assert len(without) == count and {i: strip(v) for i, v in without.items()} == {i: strip(v) for i, v in beside.items()}
    assert len(challenger) == count and all(len(v) == 1 and v[0]["model_name"] == "fraud-mlp"
                                            for v in challenger.values())
    same = sum(beside[i][0]["decision"] == challenger[i][0]["decision"] for i in beside)
    assert agreement == pytest.approx(same / count, abs=1e-12)
    assert 0.0 < agreement < 1.0  # two different models: a comparison that could show either
    for a in DECISIONS:
        for b in DECISIONS:
            pairs = sum(beside[i][0]["decision"] == a and challenger[i][0]["decision"] == b for i in beside)
            assert pair(metrics, a, b) == pairs


DECISIONS = ("APPROVE", "REVIEW", "DECLINE")


def pair(metrics: Metrics, live: str, challenger: str) -> float:
    """Transactions the live model and the reference challenger decided as `live` and `challenger`."""
    return sample(metrics, "fraud_worker_challenger_decisions_total", live=live, challenger=challenger,
                  version="c2ced1f")


@pytest.mark.kafka
def test_broken_challenger_is_counted_and_never_stops_the_worker(settings_for, tmp_path):
    """A challenger that fails its test vectors is not scored; the worker scores every transaction and stays ready."""
    s = settings_for(partitions=1, challenger_manifest=unscaled(MLP, tmp_path / "challenger.json"))
    produce_transactions(s, traffic.generated(500, prefix="broken"))
    with WorkerThread(s) as w:
        assert len(read_topic(s, s.verdict_topic, 500)) == 500
        assert sample(w.worker.metrics, "fraud_worker_challenger_failures_total", stage="load") == 1
        assert w.worker.health.ready()[0]
    assert w.exit_code == 0


def test_challenger_that_raises_is_counted_not_fatal():
    """A challenger whose model raises on a batch leaves the live outcome as it was and counts one failure."""
    class Raising(FakeScorer):
        def predict(self, matrix):
            raise RuntimeError("onnxruntime: out of memory")

    metrics = Metrics()
    models = Models(Settings(model_watch_s=0), metrics, threading.Event())
    models.challenger = LoadedModel(Raising(manifest=make_manifest(name="c")), CODEC)
    outcome = score_batch([txn_message(i) for i in range(5)], FakeScorer(), CODEC, 0)
    before = (list(outcome.encoded), np.copy(outcome.decisions))
    models.shadow(outcome, CODEC, 0)
    assert sample(metrics, "fraud_worker_challenger_failures_total", stage="score") == 1
    assert outcome.encoded == before[0] and np.array_equal(outcome.decisions, before[1])


def test_promote_makes_the_challenger_the_live_manifest(tmp_path, monkeypatch, capsys):
    """`promote` checks the challenger, then atomically replaces the live manifest with it, model path rewritten."""
    (tmp_path / "live").mkdir()
    live = manifest_copy(GBT, tmp_path / "live" / "manifest.json")
    monkeypatch.setenv("FRAUD_MODEL_MANIFEST", str(live))
    monkeypatch.setenv("FRAUD_CHALLENGER_MANIFEST", str(unscaled(MLP, tmp_path / "broken.json")))
    assert main(["promote"]) == 2
    assert "challenger:" in capsys.readouterr().err and json.loads(live.read_text())["name"] == "fraud-gbt"
    monkeypatch.setenv("FRAUD_CHALLENGER_MANIFEST", str(MLP))
    assert main(["promote"]) == 0
    assert json.loads(capsys.readouterr().out)["promoted"]["model"] == "fraud-mlp"
    from worker.model.lifecycle import load_model
    assert load_model(Settings(model_manifest=live)).scorer.manifest.version == "c2ced1f"
    assert Counter(p.name for p in live.parent.iterdir()) == Counter(["manifest.json"])


def test_swap_keeps_the_verdict_wire_format_header():
    """A swapped-in model writes verdicts with the Schema Registry header the running worker registered."""
    from worker.app import Worker
    from worker.model.lifecycle import load_model

    s = Settings(model_manifest=GBT)
    w = Worker(s, load_model(s).scorer)
    w.codec.verdict_prefix = b"\x00\x00\x00\x00\x07"
    w._swap(load_model(Settings(model_manifest=MLP)))
    assert w.scorer.manifest.name == "fraud-mlp" and w.codec.verdict_prefix == b"\x00\x00\x00\x00\x07"
    outcome = score_batch([txn_message(0)], w.scorer, w.codec, 0)
    assert outcome.encoded[0].startswith(b"\x00\x00\x00\x00\x07")


def test_a_model_file_that_arrives_after_its_manifest_is_loaded_then(tmp_path):
    """A manifest refused because its model file is not there yet is loaded once the file arrives, with the manifest
    unchanged (a volume that fills after its ConfigMap)."""
    from worker.model.lifecycle import LIVE

    live = manifest_copy(GBT, tmp_path / "live.json")
    metrics = Metrics()
    models = Models(Settings(_env_file=None, model_manifest=live, model_watch_s=0), metrics, threading.Event())
    manifest_copy(MLP, live, model_file="late.onnx")
    models._reload(LIVE, live)
    assert sample(metrics, "fraud_worker_model_loads_total", role="live", result="refused") == 1
    models._reload(LIVE, live)  # nothing changed: not tried again
    assert sample(metrics, "fraud_worker_model_loads_total", role="live", result="refused") == 1
    (tmp_path / "late.onnx").write_bytes((ROOT.parent / "shared" / "reference-model" / "fraud-mlp.onnx").read_bytes())
    models._reload(LIVE, live)
    assert models.swapped().scorer.manifest.name == "fraud-mlp"


def test_promote_replaces_a_symlinked_manifest_itself_and_keeps_an_absolute_model_path(tmp_path, monkeypatch,
                                                                                         capsys):
    """A live manifest that is a symlink to a versioned file is replaced, the versioned file left as it was; an
    absolute model_file stays absolute."""
    (tmp_path / "versions").mkdir()
    v1 = manifest_copy(GBT, tmp_path / "versions" / "v1.json")
    before = v1.read_text()
    (tmp_path / "live.json").symlink_to(v1)
    challenger = manifest_copy(MLP, tmp_path / "challenger.json")
    monkeypatch.setenv("FRAUD_MODEL_MANIFEST", str(tmp_path / "live.json"))
    monkeypatch.setenv("FRAUD_CHALLENGER_MANIFEST", str(challenger))
    assert main(["promote"]) == 0, capsys.readouterr().err
    live = tmp_path / "live.json"
    assert not live.is_symlink() and v1.read_text() == before
    assert json.loads(live.read_text())["model_file"] == json.loads(challenger.read_text())["model_file"]
