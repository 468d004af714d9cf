"""Server settings: pydantic-settings with the ``REFINE_TTA_`` environment prefix.

Built by the app factory (or the ``serve`` command), never at import. Every field can be set by
environment variable (``REFINE_TTA_PORT=9000``, ``REFINE_TTA_API_KEYS=key1,key2``,
``REFINE_TTA_REFINE_DEFAULTS='{"steps": 2, "scope": "lora"}'``) or by keyword argument, which wins.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from refine_tta.defaults import EMBEDDED_MODEL_DIR
from refine_tta.refine.config import PRESETS, RefineConfig, preset

AUTO_PRESET = "auto"


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/refine-tta/sessions`` (``~/.local/state/...`` when unset)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "refine-tta" / "sessions"


class ServerSettings(BaseSettings):
    """Everything the server needs to start. Limits count tokens including BOS."""

    model_config = SettingsConfigDict(env_prefix="REFINE_TTA_", extra="ignore", validate_default=True)

    model: str = Field(str(EMBEDDED_MODEL_DIR), description="model directory (HF format) or hub id")
    model_name: str | None = Field(None, description="name reported by /health and /v1/models (default: "
                                                     "the model directory's name)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    state_dir: Path = Field(default_factory=default_state_dir, description="where sessions are kept")
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                     description="comma-separated; empty = no auth")
    metrics_key: str | None = Field(None, description="operator key for /metrics; with api_keys set and no "
                                                      "metrics_key, /metrics answers no one")
    docs: bool = Field(False, description="serve Swagger UI at /docs and ReDoc at /redoc (their scripts load "
                                          "from a CDN); /openapi.json is always served")
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'")
    dtype: str | None = Field(None, description="float32 / bfloat16 / float16; default per device")
    backend: str | None = Field(None, description="kernel backend 'fla' or 'torch'; default per device")

    max_body_bytes: int = Field(4 * 2**20, ge=1024)
    max_document_tokens: int = Field(16384, ge=1)
    max_prompt_tokens: int = Field(2048, ge=1)
    max_new_tokens: int = Field(512, ge=1)
    max_steps: int = Field(64, ge=1)
    queue_size: int = Field(16, ge=1)
    max_rollout_tokens: int = Field(8192, ge=1, description="n_chunks * n * k of one REFINE step")
    max_lora_rank: int = Field(256, ge=1)
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with 429")

    session_memory_bytes: int | None = Field(2 * 2**30, ge=0, description="tensors kept in memory; None = no limit")
    session_disk_bytes: int | None = Field(50 * 2**30, ge=0, description="session files on disk; None = no limit")
    prune_sessions_at_start: bool = Field(False, description="delete least recently used sessions when the disk "
                                                             "budget is exceeded at start (default: keep them and "
                                                             "refuse new sessions)")
    shutdown_grace_s: float = Field(10.0, ge=0, le=3600, description="at SIGTERM, how long a running job may "
                                                                    "finish before it is cancelled (503)")

    refine_preset: str = Field("auto", description="named RefineConfig overrides (refine_tta.refine.config.PRESETS); "
                                                   "'auto': chosen from the model (embedded for the embedded "
                                                   "model, safe for any other)")
    refine_defaults: dict[str, Any] = Field(default_factory=dict,
                                            description="RefineConfig fields applied after the preset, before a "
                                                        "request's settings")
    log_level: str = "info"
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: chosen at start from the "
                                                         "CPUs not busy with other work (refine_tta.threads)")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, (list, tuple)):
            return [key.strip() for key in value if isinstance(key, str) and key.strip()]
        return value

    @field_validator("refine_defaults")
    @classmethod
    def _check_defaults(cls, value: dict[str, Any]) -> dict[str, Any]:
        RefineConfig.from_dict(value)  # unknown keys or impossible values fail at start-up
        return value

    @field_validator("refine_preset")
    @classmethod
    def _check_preset(cls, value: str) -> str:
        if value != AUTO_PRESET:
            preset(value)
        return value

    def adapt_defaults(self, model_preset: str) -> dict[str, Any]:
        """What a request's settings are laid over: the preset (``model_preset``, the one chosen
        from the model, when ``refine_preset`` is 'auto'), then ``refine_defaults``."""
        name = model_preset if self.refine_preset == AUTO_PRESET else self.refine_preset
        return {**preset(name), **self.refine_defaults}

    @model_validator(mode="after")
    def _check_default_steps(self) -> ServerSettings:
        candidates = PRESETS if self.refine_preset == AUTO_PRESET else [self.refine_preset]
        for name in candidates:
            steps = RefineConfig.from_dict(self.adapt_defaults(name)).steps
            if steps > self.max_steps:
                source = "refine_defaults" if "steps" in self.refine_defaults else f"the preset {name!r}"
                raise ValueError(f"max_steps={self.max_steps} is below the default steps={steps} of {source}: "
                                 f"raise max_steps, or lower the default with refine_defaults "
                                 f"{{\"steps\": {self.max_steps}}}")
        return self
