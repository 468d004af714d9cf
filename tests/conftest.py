"""Shared test settings. Heavy fixtures live next to the tests that use them."""

import os

import pytest

# fla probes for Triton at import; keep the CPU-fallback warning out of every test's output.
os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning:fla.utils.hardware")
# Tests use tiny models: one intra-op thread avoids oversubscription stalls on small CPU boxes
# (and is inherited by the server processes some tests start).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Idle OpenMP threads sleep instead of spinning (what the product's thread policy chooses too, see
# refine_tta/threads.py): set here, before any test imports torch, so `python -m pytest` is fast on a busy box.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One torch intra-op thread for the whole run (also makes CPU results reproducible)."""
    try:
        import torch
    except ImportError:  # the client's tests run without torch
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
