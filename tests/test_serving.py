"""The HTTP tier's shape: the settings schema is RefineConfig's, and server/ uses the engine's public surface.

(The routes' behaviour is tested end to end in test_server.py.)
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from pydantic import ValidationError

from refine_tta.engine import RefineConfig
from server.schemas import AdaptRequest, AdaptSettings

SERVER = Path(__file__).resolve().parents[1] / "server"
# What server/ may import from the library besides refine_tta.engine, and where:
ALLOWED = {
    "refine_tta.defaults": {"settings.py"},  # where the embedded model lives (no torch)
    "refine_tta.refine.config": {"settings.py"},  # checks settings at start-up without importing torch
    "refine_tta.cli": {"cli.py"},  # the library's own subcommands (ask, demo)
    "refine_tta.preflight": {"cli.py"},  # start-up checks before torch loads
    "refine_tta.threads": {"cli.py", "runtime.py", "ray_app.py"},  # the thread policy, set before torch loads
}


def test_settings_schema_is_refine_configs_fields():
    assert list(AdaptSettings.model_fields) == [f.name for f in dataclasses.fields(RefineConfig)]
    given = AdaptSettings(steps=2, lr=0.5, scope="layers", layers=[0, 1], seed=3).given()
    assert RefineConfig.from_dict(given) == RefineConfig(steps=2, lr=0.5, scope="layers", layers=(0, 1), seed=3)
    assert AdaptSettings(lora_targets=["q_proj"]).given() == {"lora_targets": ["q_proj"]}
    assert AdaptSettings().given() == {}


@pytest.mark.parametrize("settings", [{"steps": "2"}, {"bogus": 1}, {"seed": -1}, {"layers": "0"}, {"lr": 1e30},
                                      {"mode": "bogus"}, {"lora_targets": []}],
                         ids=["string-int", "unknown", "negative-seed", "string-list", "lr-over-range", "unknown-mode",
                              "empty-targets"])
def test_settings_schema_is_strict(settings):
    with pytest.raises(ValidationError):
        AdaptRequest.model_validate({"document": "text", "settings": settings})


def test_server_uses_only_the_engines_public_surface():
    for path in sorted(SERVER.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("refine_tta"):
                module = node.module
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("refine_tta")]
                if not names:
                    continue
                module = names[0]
            else:
                continue
            assert module == "refine_tta.engine" or path.name in ALLOWED.get(module, ()), \
                f"server/{path.name} imports {module}"
