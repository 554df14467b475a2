"""What the suite shows at the end of a run (tests/conftest.py's terminal summary reads it)."""

from __future__ import annotations

import pytest

FAULT_LOAD_COUNTS = pytest.StashKey[list[str]]()
"""Lines of the fault and load suite's table (tests/e2e/test_fault_load.py), shown at the end of the run."""
