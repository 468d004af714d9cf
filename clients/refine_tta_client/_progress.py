"""A tqdm bar driven by ``progress`` events of a streamed adaptation (``adapt(progress=True)``)."""

from __future__ import annotations

from typing import IO, Any

from tqdm import tqdm

from ._models import AdaptProgress

__all__ = ["AdaptProgressBar"]


class AdaptProgressBar:
    """Shows ``step/of`` with the latest reward and losses; created lazily on the first event.

    Writes to ``file`` (stderr by default) so that stdout stays clean for results.
    """

    def __init__(self, *, file: IO[str] | None = None, desc: str = "adapt") -> None:
        self._file = file
        self._desc = desc
        self._bar: tqdm[Any] | None = None

    def update(self, progress: AdaptProgress) -> None:
        """Move the bar to ``progress.step`` of ``progress.of``."""
        if self._bar is None:
            self._bar = tqdm(total=progress.of, desc=self._desc, unit="step", file=self._file, leave=True)
        elif self._bar.total != progress.of:
            self._bar.total = progress.of
        postfix = {
            name: f"{value:.4g}"
            for name, value in (
                ("reward", progress.reward_mean),
                ("ntp", progress.ntp_loss),
                ("pg", progress.policy_loss),
            )
            if value is not None
        }
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(max(0, progress.step - self._bar.n))

    def close(self) -> None:
        """Finish the bar (no-op when no event arrived)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
