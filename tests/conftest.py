"""Shared test settings. Heavy fixtures live next to the tests that use them."""

import os

# fla probes for Triton at import; keep the CPU-fallback warning out of every test's output.
os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning:fla.utils.hardware")
