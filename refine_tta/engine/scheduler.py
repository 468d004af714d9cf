"""What the worker does next: the waiting jobs, fair across clients, and how long a refused one should wait.

:class:`JobQueue` holds the jobs that wait for the worker, in two lanes: *generations* (they join
the decoding batch as soon as it has room, even between two steps of a running adaptation) and
*exclusive* jobs (adaptations and any other job that needs the worker to itself, one at a time).
Within a lane, clients (owners) take turns: the next job is the oldest of the owner served least
recently, so one client's burst cannot starve another client. Its queue-like surface
(``put_nowait``, ``get_nowait``, ``qsize``, ``put(None)`` to stop) bounds the waiting jobs as a
``queue.Queue`` would.

:class:`Timings` keeps running averages of an adaptation step and of a decoding step, and
:func:`retry_after_s` turns them and the queue's contents into the ``Retry-After`` of a 429.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any


class _FairLane:
    """FIFO per owner; owners served in turn (least recently served first)."""

    def __init__(self) -> None:
        self._by_owner: OrderedDict[Hashable, deque[Any]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(q) for q in self._by_owner.values())

    def push(self, owner: Hashable, item: Any) -> None:
        self._by_owner.setdefault(owner, deque()).append(item)

    def pop(self) -> Any:
        """The oldest item of the owner whose turn it is; that owner goes to the back."""
        owner, items = next(iter(self._by_owner.items()))
        item = items.popleft()
        del self._by_owner[owner]
        if items:
            self._by_owner[owner] = items
        return item

    def remove_if(self, predicate: Callable[[Any], bool]) -> list[Any]:
        removed = []
        for owner in list(self._by_owner):
            items = self._by_owner[owner]
            keep = deque(x for x in items if not predicate(x))
            removed += [x for x in items if predicate(x)]
            if keep:
                self._by_owner[owner] = keep
            else:
                del self._by_owner[owner]
        return removed


class JobQueue:
    """Bounded waiting room of the worker (thread-safe). ``lane_of(item)`` is "generate" or
    "exclusive"; ``owner_of(item)`` who submitted it."""

    def __init__(self, maxsize: int, lane_of: Callable[[Any], str], owner_of: Callable[[Any], Hashable]):
        self.maxsize = maxsize
        self._lane_of, self._owner_of = lane_of, owner_of
        self._lanes = {"generate": _FairLane(), "exclusive": _FairLane()}
        self._cond = threading.Condition()
        self.closed = False

    # --- queue.Queue's surface -------------------------------------------------------------------
    def qsize(self) -> int:
        with self._cond:
            return sum(len(lane) for lane in self._lanes.values())

    def put_nowait(self, item: Any) -> None:
        """Queue a job (queue.Full when maxsize jobs wait); ``None`` closes the queue instead."""
        with self._cond:
            if item is None:
                self.closed = True
            else:
                if sum(len(lane) for lane in self._lanes.values()) >= self.maxsize:
                    raise queue.Full
                lane = self._lane_of(item)
                if lane not in self._lanes:
                    raise ValueError(f"unknown lane {lane!r}")
                self._lanes[lane].push(self._owner_of(item), item)
            self._cond.notify_all()

    def put(self, item: Any) -> None:
        self.put_nowait(item)

    def get_nowait(self) -> Any:
        """Any waiting job (exclusive ones first); queue.Empty if none."""
        with self._cond:
            for lane in ("exclusive", "generate"):
                if len(self._lanes[lane]):
                    return self._lanes[lane].pop()
        raise queue.Empty

    # --- the worker's side -------------------------------------------------------------------------
    def take(self, lane: str, n: int = 1) -> list[Any]:
        """Up to n jobs of a lane, owners in turn."""
        with self._cond:
            out = []
            while len(out) < n and len(self._lanes[lane]):
                out.append(self._lanes[lane].pop())
            return out

    def waiting(self, lane: str) -> int:
        with self._cond:
            return len(self._lanes[lane])

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a job waits or the queue is closed; False once closed."""
        with self._cond:
            self._cond.wait_for(lambda: self.closed or any(len(lane) for lane in self._lanes.values()), timeout)
            return not self.closed

    def remove_if(self, predicate: Callable[[Any], bool]) -> list[Any]:
        with self._cond:
            return [x for lane in self._lanes.values() for x in lane.remove_if(predicate)]


@dataclass
class Timings:
    """Running averages (exponential, weight ``alpha`` on the newest) of how long work takes, seeded
    with rough guesses until the first measurement."""

    adapt_step_s: float = 1.0
    decode_step_s: float = 0.05
    alpha: float = 0.3

    def observe_adapt_step(self, seconds: float) -> None:
        self.adapt_step_s += self.alpha * (seconds - self.adapt_step_s)

    def observe_decode_step(self, seconds: float) -> None:
        self.decode_step_s += self.alpha * (seconds - self.decode_step_s)


class Stopwatch:
    """Seconds since the last ``lap`` (None before the first)."""

    def __init__(self) -> None:
        self._t: float | None = None

    def lap(self) -> float | None:
        now = time.perf_counter()
        last, self._t = self._t, now
        return None if last is None else now - last


def retry_after_s(
    *,
    timings: Timings,
    waiting_exclusive: int,
    waiting_generate: int,
    adapt_steps_left: int | None,
    decoding: int,
    batch_room: int,
    min_tokens_left: int | None,
    floor: float = 1.0,
) -> float:
    """Seconds until the full queue has room again: the earliest moment the worker takes one of the
    waiting jobs (which frees its slot), estimated from what runs now.

    * a waiting generation is taken at the next step boundary if the batch has room (one adaptation
      step if one runs, one decoding step if not), else when the first decoding sequence ends;
    * a waiting exclusive job is taken when the running adaptation ends (its remaining steps, plus
      its final read, about one step; generations between steps take as long again while any decode).
    """
    candidates = []
    sharing = 2.0 if decoding else 1.0  # generations between steps get about as much time as the steps
    if waiting_generate:
        if batch_room > 0:
            candidates.append(timings.adapt_step_s if adapt_steps_left is not None else timings.decode_step_s)
        elif min_tokens_left is not None:
            per_token = timings.decode_step_s * (2.0 if adapt_steps_left is not None else 1.0)
            candidates.append(min_tokens_left * per_token)
    if waiting_exclusive:
        if adapt_steps_left is not None:
            candidates.append((adapt_steps_left + 1) * timings.adapt_step_s * sharing)
        else:  # another kind of exclusive job runs (or none yet): about one step
            candidates.append(timings.adapt_step_s)
    estimate = min(candidates) if candidates else floor
    return float(max(floor, math.ceil(estimate)))
