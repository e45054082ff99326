"""The model: manifest, ONNX scorer, test vectors, and the live/challenger lifecycle."""
