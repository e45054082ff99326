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
        try:
            self.predict(np.zeros((2, len(m.features)), dtype=np.float32))
        except Exception as exc:
            raise ManifestError(f"model {m.name} fails a trial prediction: {_first_line(exc)}") from None

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        """Run the model once on an [N, F] float32 matrix; return N probabilities as float64."""
        out = np.asarray(self._session.run(self._outputs, {self.manifest.input: matrix})[0])
        if out.ndim == 1:
            out = out[:, None]
        if out.shape[0] != matrix.shape[0] or out.shape[1] <= self.manifest.output_column:
            raise ManifestError(
                f"model output {self.manifest.output!r} has shape {out.shape}; "
                f"expected [{matrix.shape[0]}, >{self.manifest.output_column}]"
            )
        return out[:, self.manifest.output_column].astype(np.float64)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
