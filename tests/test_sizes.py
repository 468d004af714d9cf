"""Session bytes computed from configs (refine_tta.refine.sizes) == the nbytes of real sessions,
and the table in docs/adaptation.md is the one the code computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from refine_tta.refine.config import RefineConfig, preset
from refine_tta.refine.delta import scope_for
from refine_tta.refine.loop import adapt
from refine_tta.refine.sizes import (
    DELTANET_1_3B,
    MIB,
    delta_bytes,
    meta_model,
    session_table,
    state_bytes,
)
from test_refine_loop import doc, make_model

ROOT = Path(__file__).resolve().parents[1]
TABLE_SCOPES = {  # the table's scopes, for a 2-block model
    "full": dict(scope="full"),
    "layers-last-2": dict(scope="layers", layers=(0, 1)),
    "projections": dict(scope="projections"),
    "lora-r8": dict(scope="lora", lora_rank=8, lora_alpha=16.0),
    "lora-r32": dict(scope="lora", lora_rank=32, lora_alpha=64.0),
}


@pytest.mark.parametrize("kind", ["delta_net", "gated_deltanet"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_computed_bytes_equal_measured_session_bytes(kind, dtype):
    model = make_model(kind).to(dtype)
    meta = meta_model({**model.config.to_dict(), "model_type": kind})
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in model.parameters())
    for name, kw in TABLE_SCOPES.items():
        cfg = RefineConfig(mode="sft", steps=1, lr=1e-3, **kw)
        res = adapt(model, doc(60), cfg)
        assert res.delta.nbytes == delta_bytes(meta, scope_for(cfg)), name
        assert res.state.nbytes == state_bytes(meta, dtype), name


def test_docs_table_is_the_computed_one():
    embedded = json.loads((ROOT / "models" / "refine-tiny-deltanet" / "config.json").read_text())
    docs = (ROOT / "docs" / "adaptation.md").read_text()
    assert session_table(embedded) in docs


@pytest.mark.parametrize("config", [DELTANET_1_3B], ids=["deltanet-1.3B"])
def test_large_model_default_keeps_a_session_under_64_mib(config):
    meta = meta_model(config)
    cfg = RefineConfig.from_dict(preset("safe"))
    total = delta_bytes(meta, scope_for(cfg)) + state_bytes(meta, torch.bfloat16)
    assert total <= 64 * MIB, total / MIB
