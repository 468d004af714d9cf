"""ParameterDelta as plain tensors: stored and read back bit-exact through the session store with
its scope description, and sessions stored before scopes were described in full (``{"kind",
"scale"}``, the refine-tta-delta/1 header) still load with the same meaning."""

from __future__ import annotations

import pytest
import torch

from refine_tta.engine.sessions import DELTA_PART, STATE_PART, Session, SessionStore, from_parts
from refine_tta.engine.storage import StoredPart
from refine_tta.model.loading import ModelFingerprint
from refine_tta.refine.config import RefineConfig
from refine_tta.refine.delta import scope_for, scope_from_description
from refine_tta.refine.loop import adapt
from test_refine_loop import doc, make_model

FP = ModelFingerprint(architecture="delta_net", config_hash="c", weights_hash="w", dtype="float32")


@pytest.mark.parametrize("kw", [dict(scope="lora", lora_rank=4), dict(scope="projections"),
                                dict(scope="layers", layers=(1,))], ids=["lora", "projections", "layers"])
def test_stored_and_read_back_bit_exact_with_description(tmp_path, kw):
    model = make_model()
    cfg = RefineConfig(steps=1, lr=1e-2, **kw)
    result = adapt(model, doc(80), cfg)
    delta = result.delta
    assert delta.description() == scope_for(cfg).describe()
    assert scope_from_description(delta.description()).describe() == delta.description()
    store = SessionStore.open(tmp_path, FP)
    stored = store.put(Session.create(None, {}, {"steps": [], "total": {}}, 80, result.state.detach(), delta))
    store.close()
    store = SessionStore.open(tmp_path, FP, memory_budget_bytes=0)  # read from disk, not from memory
    back = store.get(stored.id, None).delta
    store.close()
    assert back.scope == delta.scope and sorted(back.tensors) == sorted(delta.tensors)
    assert all(torch.equal(back.tensors[n], t) for n, t in delta.tensors.items())


def test_version_1_descriptions_load_with_the_same_meaning():
    state = adapt(make_model(), doc(80), RefineConfig(mode="none", steps=0)).state
    state_part = StoredPart(state.state_dict(), {"n_tokens": state.n_tokens})

    def read(description, tensors):
        parts = {STATE_PART: state_part, DELTA_PART: StoredPart(tensors, description)}
        return from_parts(parts, torch.device("cpu"))[1]

    a, b = torch.randn(2, 8), torch.randn(6, 2)
    old = read({"kind": "lora", "scale": 2.0}, {"model.layers.0.attn.q_proj.lora_A": a,
                                                 "model.layers.0.attn.q_proj.lora_B": b})
    assert old.scope == {"kind": "lora", "rank": 2, "alpha": 4.0, "targets": ["q_proj"]}
    assert old.scale == 2.0
    torch.testing.assert_close(old.weight_deltas()["model.layers.0.attn.q_proj.weight"], 2.0 * b @ a)
    layers = read({"kind": "layers", "scale": 1.0}, {"model.layers.3.mlp.up_proj.weight": torch.ones(2, 2)})
    assert layers.scope == {"kind": "layers", "layers": [3]}
    assert read({"kind": "none", "scale": 1.0}, {"__empty__": torch.zeros(0)}).tensors == {}
