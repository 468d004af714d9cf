"""``refine-tta serve`` with the session storage frozen at one step of a write, for kill -9 tests.

    python tests/fault_server.py STEP N MARKER serve --model ...

At the N-th time the storage reaches STEP (``staged``, ``state.safetensors``, ``delta.safetensors``,
``meta.json``, ``published``, ``unlisted``: see ``SessionStorage._reached``), the path it is working
on is written to the file MARKER and the worker thread sleeps, leaving the files exactly as they
are at that point, until the test kills the process.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def freeze_at(step: str, nth: int, marker: Path) -> None:
    from refine_tta.engine.storage import SessionStorage

    seen = 0

    def reached(self: SessionStorage, name: str, path: Path) -> None:
        nonlocal seen
        if name != step:
            return
        seen += 1
        if seen == nth:
            marker.write_text(str(path))
            while True:
                time.sleep(3600)

    SessionStorage._reached = reached


def main(argv: list[str]) -> int:
    step, nth, marker, *serve = argv
    freeze_at(step, int(nth), Path(marker))
    from server.cli import main as cli

    return cli(serve)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
