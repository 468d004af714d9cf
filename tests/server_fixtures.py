"""Helpers shared by the engine/session/server tests: tiny random DeltaNets saved with the shipped
tokenizer, and a real ``refine-tta serve`` process on a free port.

Kept out of conftest.py on purpose: import what you need (``from server_fixtures import ...``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = REPO / "models" / "refine-tiny-deltanet"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# A paragraph of plain prose; documents are repetitions of it (cut to a token count).
PROSE = ("The lighthouse keeper wrote every evening in a thick ledger. He noted the wind, the colour of the "
         "sea, the ships that passed and the birds that rested on the gallery rail. In the winter of the great "
         "storm the lamp burned for nine nights without pause, and the keeper counted forty-one vessels that "
         "found the harbour by its light. ")


def make_tiny_model(path: Path, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 2) -> Path:
    """Save a random DeltaNet (fp32) with the shipped tokenizer into ``path``; returns ``path``."""
    from fla.models import DeltaNetConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from refine_tta.model.loading import register_fla_models

    register_fla_models()
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = DeltaNetConfig(hidden_size=hidden, num_hidden_layers=layers, num_heads=heads, vocab_size=len(tok),
                            tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, fuse_cross_entropy=False, use_cache=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_DIR / name, path / name)
    return path


def document(tokenizer, n_tokens: int) -> str:
    """Prose of about ``n_tokens`` tokens (with BOS; a decoded token cut may re-encode a little differently)."""
    ids: list[int] = []
    while len(ids) < n_tokens:
        ids += tokenizer.encode(PROSE, add_special_tokens=False)
    return tokenizer.decode(ids[: n_tokens - 1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m server serve`` on a free port; ``url``; stop() sends SIGTERM (then SIGKILL).
    ``launcher``: what runs instead of ``-m server`` (e.g. a script that injects a fault)."""

    def __init__(self, model: Path, state_dir: Path, *extra: str, env: dict[str, str] | None = None,
                 log_path: Path | None = None, launcher: tuple[str, ...] = ("-m", "server")):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        base = {k: v for k, v in os.environ.items() if not k.startswith("REFINE_TTA_")}
        path = os.pathsep.join(p for p in (str(REPO), base.get("PYTHONPATH", "")) if p)  # this checkout first
        env = {**base, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": path, **(env or {})}
        self.log_path = log_path or state_dir.parent / f"server-{self.port}.log"
        self._log = open(self.log_path, "wb")
        cmd = [sys.executable, *launcher, "serve", "--model", str(model), "--port", str(self.port),
               "--state-dir", str(state_dir), "--device", "cpu", "--log-level", "info", *extra]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"server not healthy after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


class BlockingJob:
    """A job that holds the worker until ``release`` is set (for queue and cancellation tests)."""

    kind = "block"

    def __init__(self) -> None:
        import threading

        self.started = threading.Event()
        self.release = threading.Event()

    def run(self, engine, handle) -> str:
        self.started.set()
        while not self.release.wait(0.01):
            if handle.should_stop():
                from refine_tta.engine import Cancelled

                raise Cancelled("blocking job cancelled")
        return "released"


@contextlib.contextmanager
def app_client(model: Path, state_dir: Path, loader=None, **settings):
    """A FastAPI TestClient over ``create_app`` (lifespan run), once /health answers 200."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import ServerSettings

    app = create_app(ServerSettings(model=str(model), state_dir=state_dir, device="cpu", **settings), loader=loader)
    with TestClient(app) as client:
        if loader is None:
            deadline = time.monotonic() + 120
            while client.get("/health").status_code != 200:
                assert time.monotonic() < deadline, client.get("/health").json()
                time.sleep(0.05)
        yield client


def sse_events(lines) -> list[tuple[str, str]]:
    """(event, data) pairs of an event stream, with the client SDK's decoder."""
    from refine_tta_client._streaming import iter_sse

    return [(e.event, e.data) for e in iter_sse(lines)]
