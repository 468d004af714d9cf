"""ParameterDelta as plain tensors: save/load bit-exact, description round trip, and sessions
written before the fp32-master format (refine-tta-delta/1) still load with the same meaning."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from refine_tta.model.state import StateMismatchError
from refine_tta.refine.config import RefineConfig
from refine_tta.refine.delta import ParameterDelta, scope_for, scope_from_description
from refine_tta.refine.loop import adapt
from test_refine_loop import doc, make_model

FP = {"architecture": "delta_net", "config_hash": "c", "weights_hash": "w", "dtype": "float32"}


@pytest.mark.parametrize("kw", [dict(scope="lora", lora_rank=4), dict(scope="projections"),
                                dict(scope="layers", layers=(1,))], ids=["lora", "projections", "layers"])
def test_save_load_bit_exact_and_description(tmp_path, kw):
    model = make_model()
    cfg = RefineConfig(steps=1, lr=1e-2, **kw)
    delta = adapt(model, doc(80), cfg).delta
    assert delta.description() == scope_for(cfg).describe()
    assert scope_from_description(delta.description()).describe() == delta.description()
    delta.save(tmp_path / "d.safetensors", FP)
    back = ParameterDelta.load(tmp_path / "d.safetensors", FP)
    assert back.scope == delta.scope and sorted(back.tensors) == sorted(delta.tensors)
    assert all(torch.equal(back.tensors[n], t) for n, t in delta.tensors.items())
    with pytest.raises(StateMismatchError, match="another model"):
        ParameterDelta.load(tmp_path / "d.safetensors", {**FP, "weights_hash": "x"})


def test_version_1_files_load_with_the_same_meaning(tmp_path):
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    meta = {"format": "refine-tta-delta/1", "kind": "lora", "scale": repr(2.0), "fingerprint": json.dumps(FP)}
    save_file({"model.layers.0.attn.q_proj.lora_A": a, "model.layers.0.attn.q_proj.lora_B": b},
              str(tmp_path / "v1.safetensors"), metadata=meta)
    old = ParameterDelta.load(tmp_path / "v1.safetensors", FP)
    assert old.scope == {"kind": "lora", "rank": 2, "alpha": 4.0, "targets": ["q_proj"]}
    assert old.scale == 2.0
    torch.testing.assert_close(old.weight_deltas()["model.layers.0.attn.q_proj.weight"], 2.0 * b @ a)
    meta = {"format": "refine-tta-delta/1", "kind": "layers", "scale": "1.0", "fingerprint": json.dumps(FP)}
    save_file({"model.layers.3.mlp.up_proj.weight": torch.ones(2, 2)}, str(tmp_path / "v1l.safetensors"),
              metadata=meta)
    assert ParameterDelta.load(tmp_path / "v1l.safetensors", FP).scope == {"kind": "layers", "layers": [3]}
