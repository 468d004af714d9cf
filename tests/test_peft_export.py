"""A LoRA session exported as a PEFT adapter, loaded with ``peft`` over the base model, gives the
logits our generation gives from that session (the PEFT model re-reads the document), fp32."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from refine_tta.model.runtime import read
from refine_tta.refine.config import RefineConfig
from refine_tta.refine.delta import ParameterDelta, export_peft
from refine_tta.refine.loop import adapt
from test_refine_loop import doc, make_model


def test_lora_session_as_peft_adapter_gives_our_logits(tmp_path):
    model = make_model()
    cfg = RefineConfig(steps=3, lr=1e-2, n=2, reward="hybrid", scope="lora", lora_rank=4, lora_alpha=8.0)
    ids, prompt = doc(120, seed=1), doc(24, seed=9)
    res = adapt(model, ids, cfg)
    assert all(float(t.abs().max()) > 0 for n, t in res.delta.tensors.items() if n.endswith("lora_B"))
    with torch.no_grad():
        with res.delta.applied(model):
            ours = read(model, prompt, res.state).logits  # [1, 24, V]: the session continued by the prompt
        base_only = read(model, prompt, res.state).logits

    out = export_peft(res.delta, tmp_path / "adapter", base_model="tiny")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0 and config["peft_type"] == "LORA"
    peft_model = PeftModel.from_pretrained(make_model(), out)
    peft_model.eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=torch.cat([ids, prompt], 1)).logits[:, ids.shape[1]:]
    torch.testing.assert_close(theirs.float(), ours.float(), rtol=0, atol=1e-4)
    assert float((ours - base_only).abs().max()) > 1e-3  # the adapter matters at this tolerance


def test_only_lora_exports(tmp_path):
    with pytest.raises(ValueError, match="only a LoRA delta"):
        export_peft(ParameterDelta({"kind": "full"}, {"w": torch.zeros(2)}), tmp_path)
