"""The README stays true: every setting and metric is documented, and CI runs the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

from worker.metrics import Metrics
from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented():
    """Each Settings field appears in the README's settings table as its FRAUD_ variable."""
    missing = [f"FRAUD_{name.upper()}" for name in Settings.model_fields if f"`FRAUD_{name.upper()}`" not in README]
    assert missing == []


def test_every_metric_is_documented():
    """Each metric the worker exports appears in the README's metrics table."""
    names = {m.name for m in Metrics().registry.collect()}
    assert names, "no metrics registered"
    missing = [n for n in names if not re.search(rf"`{re.escape(n)}(_total|_info)?[`{{]", README)]
    assert missing == []


def test_ci_runs_the_readme_test_command():
    """.ci/run calls `make test`, the test command the README gives."""
    assert "make test   #" in README
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), re.M)
