"""``python -m server serve ...`` (same as ``refine-tta serve ...``)."""

from server.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
