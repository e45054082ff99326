"""Model lifecycle: load a model with every check, swap it while running, and score a challenger in shadow."""

from __future__ import annotations

import contextvars
import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..avro.codec import Codec, decision_codes, decision_of
from ..avro.recordcodec import RecordCodec, input_codec, load_input_schema
from ..logs import FirstSeen, get_logger
from ..records import BatchOutcome
from ..settings import Settings
from .manifest import ManifestError
from .scorer import OnnxScorer
from .vectors import check_test_vectors

if TYPE_CHECKING:
    from ..metrics import Metrics

log = get_logger("lifecycle")


@dataclass(frozen=True)
class LoadedModel:
    """A model that passed every check, with the input codec built for its manifest."""

    scorer: OnnxScorer
    codec: Codec | RecordCodec


def load_model(settings: Settings, manifest_path: Path | None = None) -> LoadedModel:
    """Load a manifest (default: FRAUD_MODEL_MANIFEST) and its model: schema fit, sha256, signature, output
    semantics, test vectors through the live path. Raises ManifestError with one line."""
    path = Path(manifest_path or settings.model_manifest)
    model_file = settings.model_file if manifest_path is None else None
    scorer = OnnxScorer.load(path, model_file, threads=settings.onnx_threads,
                             schema=load_input_schema(settings.input_schema))
    codec = input_codec(settings.input_schema, scorer.manifest, settings.max_message_bytes)
    check_test_vectors(scorer, codec)
    return LoadedModel(scorer, codec)


def fingerprint(path: Path) -> str:
    """What a watch compares: the manifest's sha256 and its model file's size and mtime ("" when unreadable), so a
    model file that arrives after its manifest is loaded then."""
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return ""
    digest = hashlib.sha256(raw).hexdigest()
    try:
        stat = (Path(path).parent / json.loads(raw)["model_file"]).stat()
        return f"{digest}:{stat.st_size}:{stat.st_mtime_ns}"
    except (OSError, ValueError, KeyError, TypeError):
        return digest  # the load says what is wrong


def manifest_digest(path: Path) -> str:
    """The sha256 of a manifest file's bytes, or "" when it cannot be read (the load then says why)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return ""


class Output(Protocol):
    """Where a challenger's verdicts go."""

    def send(self, keys: list[bytes | None], values: list[bytes]) -> None: ...
    def close(self, timeout: float) -> None: ...


class Models:
    """The live model and an optional challenger, each reloaded off the loop when its manifest file changes.

    A watch thread re-reads both manifests every FRAUD_MODEL_WATCH_S seconds and loads a changed one with every
    check of `load_model`. A live model that passes waits in `swapped()` for the loop's next batch boundary; one that
    fails is logged and counted, and the running model stays. The challenger is scored by `shadow()`; nothing it does
    changes a live verdict, an offset or the worker's health.
    """

    def __init__(self, settings: Settings, metrics: Metrics, stop: threading.Event):
        self.settings, self.metrics, self.stop = settings, metrics, stop
        self.challenger: LoadedModel | None = None
        self._ready: LoadedModel | None = None
        self._seen = {LIVE: fingerprint(settings.model_manifest), CHALLENGER: ""}
        self._output: Output | None = None
        self._thread: threading.Thread | None = None
        self._errors = FirstSeen(_QUIET_S)
        self._compared = self._agreed = 0

    def start(self, output: Callable[[Callable[[str], None]], Output] | None = None) -> None:
        """Load the challenger (a failure is logged, counted and retried when its file changes); start the watch.

        `output(failed)` opens where the challenger's verdicts go (kafka.ShadowOutput); None: metrics only.
        """
        s = self.settings
        if s.challenger_manifest:
            self._load(CHALLENGER, s.challenger_manifest)
            if output is not None:
                self._output = output(lambda error: self._failed("shadow", error))
        if s.model_watch_s > 0:
            # In the caller's context, so its log lines carry the worker_id and group bound there.
            self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._watch,),
                                            name="model-watch", daemon=True)
            self._thread.start()

    def swapped(self) -> LoadedModel | None:
        """The live model loaded since the last call, if one passed its checks; None otherwise."""
        ready, self._ready = self._ready, None
        return ready

    def shadow(self, outcome: BatchOutcome, codec: Codec | RecordCodec, now_ms: int) -> None:
        """Score the batch's decoded records with the challenger; count agreement; send its verdicts if configured."""
        challenger = self.challenger
        if challenger is None or not outcome.scored:
            return
        t0 = time.perf_counter()
        try:
            self._shadow(challenger, outcome, codec, now_ms)
        except Exception as exc:  # the challenger is an experiment: whatever it raises is counted, never fatal
            self._failed("score", f"{type(exc).__name__}: {exc}")
        self.metrics.challenger_seconds.observe(time.perf_counter() - t0)

    def _shadow(self, challenger: LoadedModel, outcome: BatchOutcome, codec: Codec | RecordCodec, now_ms: int) -> None:
        m = challenger.scorer.manifest
        matrix, invalid = codec.features(outcome.batch, m)
        if invalid:
            self.metrics.challenger_failures.labels("validate").inc(len(invalid))
        keep = np.array([i for i in range(len(outcome.scored)) if i not in invalid], dtype=np.intp)
        probs = np.asarray(challenger.scorer.predict(matrix[keep]), dtype=np.float64)
        if probs.shape != keep.shape or not np.all((probs >= 0.0) & (probs <= 1.0)):
            raise ValueError(f"challenger {m.name} {m.version} returned {probs.shape} values, not "
                             f"{len(keep)} probabilities")
        t = m.thresholds
        decisions = decision_codes(probs, t.review, t.decline)
        live = np.asarray(outcome.decisions)[keep]
        confusion = np.bincount(live * 3 + decisions, minlength=9)
        for code in np.flatnonzero(confusion):
            self.metrics.challenger_decisions.labels(decision_of(code // 3).value, decision_of(code % 3).value,
                                                     m.version).inc(int(confusion[code]))
        self._compared += len(keep)
        self._agreed += int(np.trace(confusion.reshape(3, 3)))
        if self._compared:
            self.metrics.challenger_agreement.set(self._agreed / self._compared)
        if self._output is not None:
            values = codec.encode_verdicts(outcome.batch.take(keep.tolist()), probs, decisions, (t.review, t.decline),
                                           (m.name, m.version), now_ms)
            self._output.send([outcome.scored[i].key() for i in keep.tolist()], values)

    def close(self, timeout: float) -> None:
        """Stop the watch; deliver queued shadow verdicts within `timeout` seconds."""
        if self._thread is not None:
            self._thread.join(timeout)
        if self._output is not None:
            self._output.close(timeout)

    def _watch(self) -> None:
        s = self.settings
        while not self.stop.wait(s.model_watch_s):
            self._reload(LIVE, s.model_manifest)
            if s.challenger_manifest:
                self._reload(CHALLENGER, s.challenger_manifest)

    def _reload(self, role: str, path: Path) -> None:
        seen = fingerprint(path)
        if seen == self._seen[role]:
            return
        if not seen:
            if self._seen[role]:
                log.warning("model_manifest_unreadable", role=role, manifest=str(path),
                            detail="the running model stays until the manifest is back")
            self._seen[role] = seen
            return
        if self._load(role, path):
            self.metrics.model_loads.labels(role, "swapped").inc()
        else:
            self.metrics.model_loads.labels(role, "refused").inc()

    def _load(self, role: str, path: Path) -> bool:
        self._seen[role] = fingerprint(path)
        try:
            model = load_model(self.settings, path if role == CHALLENGER else None)
        except ManifestError as exc:
            stays = "the running model stays" if role == LIVE else (
                "the previous challenger stays" if self.challenger else "no challenger is scored")
            log.error("model_refused", role=role, manifest=str(path), error=str(exc), detail=stays)
            if role == CHALLENGER:
                self.metrics.challenger_failures.labels("load").inc()
            return False
        m = model.scorer.manifest
        log.info("model_loaded", role=role, model=m.name, version=m.version, sha256=m.sha256)
        if role == LIVE:
            self._ready = model
        else:
            self.challenger = model
            self.metrics.challenger.info({"name": m.name, "version": m.version, "sha256": m.sha256})
            self._compared = self._agreed = 0
        return True

    def _failed(self, stage: str, error: str) -> None:
        self.metrics.challenger_failures.labels(stage).inc()
        if self._errors.first(f"{stage}: {error}"):
            log.warning("challenger_failed", stage=stage, error=error)


LIVE, CHALLENGER = "live", "challenger"
_QUIET_S = 30.0
