"""Checks that need no model and no torch: can ``--model`` be loaded at all? Answered in well under
2 s, so that a command with a typo in its model path stops at once with one clear line.

A local directory must hold ``config.json``. Anything shaped like ``org/name`` that is not a local
path is a hub id: it must be in the Hugging Face cache, or the hub must have it (asked with a
bounded wait). ``models/nope`` next to a local ``models/`` folder is a typo, not a hub id.
"""

from __future__ import annotations

from pathlib import Path

HUB_CHECK_SECONDS = 1.5


def _hub_problem(repo_id: str) -> str | None:
    """Why the hub id ``repo_id`` cannot be loaded (None: cached, or the hub has it). Bounded in time."""
    import os
    import threading

    try:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    except ImportError:
        return None  # transformers will say
    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return f"model {repo_id!r} is not a local directory, and not in the Hugging Face cache (HF_HUB_OFFLINE is set)"
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=HUB_CHECK_SECONDS)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001  (classified below)
            outcome.append(exc)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_CHECK_SECONDS + 0.2)
    if not outcome:
        return (f"model {repo_id!r} is not a local directory, and the Hugging Face hub did not answer within "
                f"{HUB_CHECK_SECONDS} s (it is not in the local cache either)")
    error = outcome[0]
    if error is None:
        return None
    kind = type(error).__name__
    if kind in ("RepositoryNotFoundError", "GatedRepoError"):
        return f"model {repo_id!r} is not a local directory, and the Hugging Face hub has no such model (or it is private: set HF_TOKEN)"
    if kind in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
        return f"hub model {repo_id!r} has no config.json; is it a Hugging Face model?"
    first_line = str(error).splitlines()[0] if str(error) else kind
    return (f"model {repo_id!r} is not a local directory, and the Hugging Face hub cannot be reached to fetch it "
            f"({first_line}; it is not in the local cache either)")


def model_problem(model: str) -> str | None:
    """Why ``model`` cannot be loaded, when that can be told without loading it (else None)."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            return f"model {model} is a file; pass the model directory (config.json, *.safetensors, tokenizer)"
        return None if (path / "config.json").is_file() else f"model {model} is not a model directory (no config.json)"
    if model.startswith((".", "/", "~")) or model.count("/") != 1 or not all(model.split("/")):
        return f"model {model} does not exist (and is not a hub id like 'org/name')"
    if path.parent.is_dir():  # "models/nope" next to a local models/ folder: a typo, not a hub id
        return f"model {model} does not exist: {path.parent}/ is a local folder with no {path.name!r} in it"
    return _hub_problem(model)
