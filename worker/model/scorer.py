"""OnnxScorer: loads a manifest's ONNX model and scores feature matrices; the only onnxruntime user."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from .manifest import Manifest, ManifestError


class OnnxScorer:
    """A loaded, checked model: `predict(matrix)` returns one fraud probability per row."""

    def __init__(self, manifest: Manifest, session: ort.InferenceSession):
        self.manifest = manifest
        self._session = session
        self._outputs = [manifest.output]
        self._column = manifest.output_column or 0

    @classmethod
    def load(cls, manifest_path: str | Path, model_file: str | Path | None = None, threads: int = 1,
             schema: dict | None = None) -> OnnxScorer:
        """Load and check a model by its manifest, for input records of `schema` (None: schemas/transaction.avsc);
        raise ManifestError with one clear line."""
        manifest = Manifest.load(manifest_path, schema)
        blob = manifest.read_model_bytes(model_file)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning threads burn a core while idle; we scale by processes, not threads.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.log_severity_level = 3
        try:
            # Loading from bytes means ORT has no directory to resolve external data from, so such models are refused.
            session = ort.InferenceSession(blob, sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ManifestError(f"model {manifest.model_path(model_file)} cannot be loaded by onnxruntime: {_first_line(exc)}") from None
        scorer = cls(manifest, session)
        scorer._check_signature()
        return scorer

    def _check_signature(self) -> None:
        m = self.manifest
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        if m.input not in inputs:
            raise ManifestError(f"manifest input {m.input!r} is not a model input; the model has {sorted(inputs)}")
        if len(inputs) != 1:
            raise ManifestError(f"model has {len(inputs)} inputs {sorted(inputs)}; only single-input models are supported")
        if m.output not in outputs:
            raise ManifestError(f"manifest output {m.output!r} is not a model output; the model has {sorted(outputs)}")
        spec = inputs[m.input]
        if spec.type != "tensor(float)":
            raise ManifestError(f"model input {m.input!r} is {spec.type}; only tensor(float) is supported")
        width = spec.shape[-1] if spec.shape else None
        if isinstance(width, int) and width != len(m.features):
            raise ManifestError(f"model input {m.input!r} takes {width} features, the manifest lists {len(m.features)}")
        _check_output_type(m.output, outputs)
        self._check_probabilities()

    def _check_probabilities(self) -> None:
        """A trial on zeros and standard-normal rows (the standardised feature space) must give probabilities."""
        m = self.manifest
        trial = np.vstack([np.zeros((1, len(m.features))),
                           np.random.default_rng(0).standard_normal((_TRIAL_ROWS, len(m.features)))])
        try:
            out = self._raw(trial.astype(np.float32))
        except Exception as exc:
            raise ManifestError(f"model {m.name} fails a trial prediction: {_first_line(exc)}") from None
        columns = out.shape[1]
        if columns > 1 and m.output_column is None:
            raise ManifestError(f"model output {m.output!r} has {columns} columns ([N, {columns}]); set output_column "
                                "to the fraud class's column (1 for a scikit-learn binary classifier)")
        if self._column >= columns:
            raise ManifestError(f"output_column {self._column} is outside model output {m.output!r} of {columns} columns")
        low, high = float(np.min(out)), float(np.max(out))
        if not (np.all(np.isfinite(out)) and low >= 0.0 and high <= 1.0):
            raise ManifestError(f"model output {m.output!r} is not a probability: trial rows give values in "
                                f"[{low:.4g}, {high:.4g}] (a logit or a score? end the graph with a sigmoid/softmax)")
        sums = out.sum(axis=1)
        if columns > 1 and not np.allclose(sums, 1.0, atol=_SUM_TOLERANCE):
            raise ManifestError(f"rows of model output {m.output!r} sum to [{sums.min():.4g}, {sums.max():.4g}], "
                                "not 1: its columns are not class probabilities")

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        """Run the model once on an [N, F] float32 matrix; return N probabilities as float64."""
        out = self._raw(matrix)
        if out.shape[0] != matrix.shape[0] or out.shape[1] <= self._column:
            raise ManifestError(
                f"model output {self.manifest.output!r} has shape {out.shape}; "
                f"expected [{matrix.shape[0]}, >{self._column}]"
            )
        return out[:, self._column].astype(np.float64)

    def _raw(self, matrix: np.ndarray) -> np.ndarray:
        out = np.asarray(self._session.run(self._outputs, {self.manifest.input: matrix})[0])
        return out[:, None] if out.ndim == 1 else out


_TRIAL_ROWS = 64
# Float32 softmax rows sum to 1 within about 1e-6; a looser bound only tolerates rounding, never a missing softmax.
_SUM_TOLERANCE = 1e-3
_REEXPORT_HINT = ("re-export without the ZipMap: skl2onnx.to_onnx(model, X, options={'zipmap': False}), then use "
                  "its 'probabilities' output with output_column 1")


def _check_output_type(name: str, outputs: dict) -> None:
    """Refuse an output that cannot hold probabilities: class labels, or skl2onnx's ZipMap (a sequence of maps)."""
    kind = outputs[name].type
    if kind in ("tensor(float)", "tensor(double)"):
        return
    if kind.startswith("seq(map("):
        raise ManifestError(f"model output {name!r} is {kind}, skl2onnx's ZipMap; {_REEXPORT_HINT}")
    candidates = [o for o, spec in outputs.items() if spec.type in ("tensor(float)", "tensor(double)")]
    if kind.startswith("tensor(int") or kind == "tensor(string)":
        use = (f"use the probability output {candidates[0]!r}" if len(candidates) == 1 else
               f"use one of the probability outputs {candidates}" if candidates else _REEXPORT_HINT)
        raise ManifestError(f"model output {name!r} is {kind}, class labels, not a probability; {use}")
    raise ManifestError(f"model output {name!r} is {kind}; a probability output is tensor(float) or tensor(double)")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
