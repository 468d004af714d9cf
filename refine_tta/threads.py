"""How many CPU threads torch uses and how its OpenMP threads wait: chosen once, at start, with a reason.

OpenMP threads that finish a parallel region *spin* by default (``OMP_WAIT_POLICY=ACTIVE``-like
behaviour) waiting for the next one. On a machine where anything else runs, those spinning
threads take the CPU from the threads doing the work: adaptation on a busy 2-core machine ran
10x slower (176 s vs 15.6 s for the demo's 4 steps). So the program picks, before torch starts its
thread pool:

- the wait policy: ``PASSIVE`` (idle threads sleep) unless ``OMP_WAIT_POLICY`` is set;
- the number of intra-op threads: ``--threads`` if given, else ``OMP_NUM_THREADS`` if set, else
  the CPUs this process may use minus the ones other processes keep busy (1-minute load average),
  at least 1.

libgomp reads ``OMP_WAIT_POLICY`` once, when torch loads it, so :func:`configure_threads` must run
before ``import torch``; the command line does that first thing (nothing it imports before pulls
in torch). Nothing here runs at import.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

WAIT_POLICIES = ("PASSIVE", "ACTIVE")


@dataclass(frozen=True)
class ThreadPolicy:
    """threads: torch intra-op threads; wait_policy: OpenMP's ``OMP_WAIT_POLICY``; reason: why."""

    threads: int
    wait_policy: str
    reason: str

    def describe(self) -> str:
        return f"{self.threads} thread{'s' if self.threads != 1 else ''}, OMP_WAIT_POLICY={self.wait_policy} ({self.reason})"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def load_average() -> float:
    """The 1-minute load average (0.0 where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) >= 1 else None


def choose_thread_policy(requested: int | None, environ: Mapping[str, str], cpus: int, load: float) -> ThreadPolicy:
    """The policy for ``requested`` threads (None: choose), the environment, ``cpus`` usable CPUs and
    the 1-minute ``load`` average of the machine (measured before this process does any work)."""
    if requested is not None and requested < 1:
        raise ValueError(f"--threads must be >= 1, got {requested}")
    reasons = []
    from_env = _env_int(environ, "OMP_NUM_THREADS")
    if requested is not None:
        threads = requested
        reasons.append("--threads")
    elif from_env is not None:
        threads = from_env
        reasons.append("OMP_NUM_THREADS")
    else:
        idle = int(cpus - load + 0.5)
        threads = max(1, min(cpus, idle))
        reasons.append(f"{cpus} usable CPU{'s' if cpus != 1 else ''}, load average {load:.1f}: "
                       f"{threads} not busy with other work")
    wait = environ.get("OMP_WAIT_POLICY", "").strip().upper()
    if wait in WAIT_POLICIES:
        reasons.append("wait policy from OMP_WAIT_POLICY")
    else:
        wait = "PASSIVE"
        reasons.append("idle threads sleep instead of spinning, so they take no CPU from other work")
    return ThreadPolicy(threads, wait, "; ".join(reasons))


def apply_thread_policy(policy: ThreadPolicy, environ: MutableMapping[str, str] | None = None) -> None:
    """Export the policy to OpenMP/MKL (before torch loads) and set torch's intra-op threads.

    If torch was imported before this call, its OpenMP runtime has already read the wait policy:
    that is logged as a warning (the thread count still applies)."""
    environ = os.environ if environ is None else environ
    late = "torch" in sys.modules
    environ["OMP_WAIT_POLICY"] = policy.wait_policy
    environ["OMP_NUM_THREADS"] = str(policy.threads)
    environ["MKL_NUM_THREADS"] = str(policy.threads)
    if late:
        log.warning("torch was imported before the thread policy was set: OMP_WAIT_POLICY=%s may not apply",
                    policy.wait_policy)
    import torch

    torch.set_num_threads(policy.threads)


def configure_threads(requested: int | None = None) -> ThreadPolicy:
    """Choose the policy for this machine now, apply it, log it; returns it."""
    policy = choose_thread_policy(requested, os.environ, usable_cpus(), load_average())
    apply_thread_policy(policy)
    log.info("threads: %s", policy.describe())
    return policy
