# syntax=docker/dockerfile:1
# fraud-worker image: `docker build -t fraud-worker:0.1.0 .`, then `docker run fraud-worker:0.1.0` (= `fraud-worker run`).
#
# Layout: the code, the Avro schemas and the default model live in /app and run from there
# (WORKDIR /app, PYTHONPATH=/app). worker/avro/codec.py finds schemas/ and worker/settings.py finds
# models/ next to the `worker` package, so the package must not run from site-packages. The venv
# in /opt/venv holds the dependencies and the `fraud-worker` console script only.
#
# Another model: mount a directory holding its manifest and .onnx file and point the worker at it,
#   docker run -v "$PWD/my-model:/models/custom:ro" -e FRAUD_MODEL_MANIFEST=/models/custom/model.json fraud-worker:0.1.0
# (the manifest's model_file is relative to the manifest; FRAUD_MODEL_FILE overrides it).

FROM python:3.11-slim AS build
WORKDIR /src
# 1) Dependencies only, read from pyproject.toml: this layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -r requirements.txt
# 2) The package itself (a regular, non-editable install) for its console script; its site-packages
#    copy is then removed so that the only copy of the code is the one in /app (see the header).
COPY README.md ./
COPY worker/ ./worker/
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps . \
 && rm -rf /opt/venv/lib/python3.11/site-packages/worker

FROM python:3.11-slim AS runtime
LABEL org.opencontainers.image.title="fraud-worker" \
      org.opencontainers.image.description="Kafka scoring worker: Avro card transactions in, ONNX fraud verdicts out" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FRAUD_METRICS_HOST=0.0.0.0 \
    FRAUD_METRICS_PORT=9108 \
    FRAUD_MODEL_MANIFEST=/app/models/fraud-gbt.json
RUN groupadd --system --gid 10001 fraud \
 && useradd --system --uid 10001 --gid fraud --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin fraud
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY schemas/ ./schemas/
COPY models/ ./models/
COPY worker/ ./worker/
# Precompile (the root filesystem may be read-only at run time), then prove at build time that the code
# runs from /app, that both schemas load, and that the baked-in model matches its manifest's sha256.
RUN python -m compileall -q worker \
 && python -c "import pathlib, worker, worker.avro.codec as c; assert pathlib.Path(worker.__file__).parent == pathlib.Path('/app/worker'), worker.__file__; c.load_schema('transaction'); c.load_schema('verdict')" \
 && fraud-worker check --offline > /dev/null
USER 10001:10001
EXPOSE 9108
# No curl in the slim image: urllib raises (exit 1) on a refused connection or on a 503 from /healthz.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('FRAUD_METRICS_PORT', '9108') + '/healthz', timeout=4)"]
ENTRYPOINT ["fraud-worker"]
CMD ["run"]
