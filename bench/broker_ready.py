"""Time the local broker from nothing to answering metadata, with a cold and a warm Maven cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

CODE = """
import time, sys
from worker.tools.localbroker import LocalBroker, fetch_jars
from pathlib import Path
t0 = time.monotonic(); fetch_jars(); t1 = time.monotonic()
b = LocalBroker(port=int(sys.argv[1]), home=Path(sys.argv[2]))
b.start(); t2 = time.monotonic(); b.stop()
print(f"{t1 - t0:.2f} {t2 - t1:.2f}")
"""


def run(cache: str, m2: str | None, port: int, home: str) -> tuple[float, float]:
    """One start from the given caches: (fetch seconds, format+start+ready seconds)."""
    env = {**os.environ, "FRAUD_CACHE_DIR": cache}
    if m2:
        env["MAVEN_OPTS"] = f"-Dmaven.repo.local={m2}"
    out = subprocess.run([sys.executable, "-c", CODE, str(port), home], env=env, capture_output=True, text=True, check=True)
    fetch, ready = map(float, out.stdout.split())
    return fetch, ready


def main() -> None:
    """Cold: empty Maven repository and jar cache. Warm Maven: jars re-copied from ~/.m2. Warm: everything cached."""
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        cold = run(f"{tmp}/cache-cold", f"{tmp}/m2", 49192, f"{tmp}/b1")
        results["cold_maven_cache"] = cold
        results["warm_maven_cache"] = run(f"{tmp}/cache-warm", None, 49194, f"{tmp}/b2")
        results["warm_jar_cache_restart"] = run(f"{tmp}/cache-warm", None, 49194, f"{tmp}/b2")
    print(json.dumps({k: {"fetch_s": f, "start_to_ready_s": r, "total_s": round(f + r, 2)} for k, (f, r) in results.items()}, indent=1))


if __name__ == "__main__":
    main()
