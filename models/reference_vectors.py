"""Write the reference model's test vectors into its manifest from ../shared/reference-model/expected.json."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a plain script from anywhere
from worker.model.vectors import write_test_vectors  # noqa: E402

EXPECTED = ROOT.parent / "shared" / "reference-model" / "expected.json"
# expected.json: "every example probability to within 1e-5".
TOLERANCE = 1e-5
FLAGS = {"used_chip", "used_pin_number", "online_order"}


def main() -> None:
    """Copy every example row of expected.json, booleans as booleans, into models/reference-fraud-mlp.json."""
    examples = json.loads(EXPECTED.read_text())["examples"]
    rows = [({k: bool(v) if k in FLAGS else v for k, v in e["features"].items()}, e["probability"]) for e in examples]
    write_test_vectors(ROOT / "models" / "reference-fraud-mlp.json", rows, TOLERANCE)
    print(f"wrote {len(rows)} test vectors into models/reference-fraud-mlp.json")


if __name__ == "__main__":
    main()
