"""A tqdm bar driven by a streamed adaptation's events (``adapt(progress=True)``).

It appears with the ``started`` event, before step 1 (which can take many seconds), and its
elapsed time keeps moving while a step runs (refreshed once a second by a small thread).
"""

from __future__ import annotations

import threading
from typing import IO, Any

from tqdm import tqdm

from ._models import AdaptProgress, AdaptStarted

__all__ = ["AdaptProgressBar"]

REFRESH_SECONDS = 1.0


class AdaptProgressBar:
    """Shows ``step/of`` with the latest reward and losses, from the ``started`` event on (or from
    the first ``progress`` event, for a server that sends no ``started``).

    Writes to ``file`` (stderr by default) so that stdout stays clean for results.
    """

    def __init__(self, *, file: IO[str] | None = None, desc: str = "adapt") -> None:
        self._file = file
        self._desc = desc
        self._bar: tqdm[Any] | None = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def _open(self, total: int) -> tqdm[Any]:
        if self._bar is None:
            self._bar = tqdm(total=total, desc=self._desc, unit="step", file=self._file, leave=True)
            self._ticker = threading.Thread(target=self._tick, name="adapt-progress", daemon=True)
            self._ticker.start()
        elif self._bar.total != total:
            self._bar.total = total
        return self._bar

    def _tick(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            bar = self._bar
            if bar is not None:
                bar.refresh()

    def start(self, started: AdaptStarted) -> None:
        """Show the bar at 0 of ``started.of`` steps."""
        bar = self._open(started.of)
        if started.mode:
            bar.set_postfix({"mode": started.mode, "tokens": started.document_tokens}, refresh=True)

    def update(self, progress: AdaptProgress) -> None:
        """Move the bar to ``progress.step`` of ``progress.of``."""
        bar = self._open(progress.of)
        postfix = {
            name: f"{value:.4g}"
            for name, value in (
                ("reward", progress.reward_mean),
                ("ntp", progress.ntp_loss),
                ("pg", progress.policy_loss),
            )
            if value is not None
        }
        bar.set_postfix(postfix, refresh=False)
        bar.update(max(0, progress.step - bar.n))

    def close(self) -> None:
        """Finish the bar (no-op when no event arrived)."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
