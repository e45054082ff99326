"""Kafka scoring worker: Avro card transactions in, ONNX fraud verdicts out."""

__version__ = "0.1.0"
