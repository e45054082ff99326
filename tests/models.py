"""Small ONNX models built for tests: a scikit-learn export, and graphs whose outputs are not probabilities."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

FEATURES = 7


def zipmap_model(zipmap: bool) -> bytes:
    """A logistic regression on 7 features exported by skl2onnx, with its default ZipMap output or without it."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, FEATURES)).astype(np.float32)
    clf = LogisticRegression().fit(x, (x[:, 2] + 0.3 * rng.standard_normal(400) > 1.0).astype(int))
    options = None if zipmap else {"zipmap": False}
    return to_onnx(clf, x[:1], options=options, target_opset={"": 15, "ai.onnx.ml": 3}).SerializeToString()


def linear_model(columns: int, last: str | None = None) -> bytes:
    """`features` [N, 7] float -> `out` [N, columns]: a linear layer, then `last` (Sigmoid, Softmax or nothing)."""
    weights = numpy_helper.from_array(np.linspace(-2, 2, FEATURES * columns, dtype=np.float32)
                                      .reshape(FEATURES, columns), "w")
    nodes = [helper.make_node("MatMul", ["features", "w"], ["z" if last else "out"])]
    if last:
        nodes.append(helper.make_node(last, ["z"], ["out"]))
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("features", TensorProto.FLOAT,
                                                                               ["N", FEATURES])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", columns])], [weights])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
