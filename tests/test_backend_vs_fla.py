"""The torch backend against fla's own layers, run with their Triton kernels in Triton's interpreter.

Triton has no CPU driver, but ``TRITON_INTERPRET=1`` executes fla's kernels in numpy. That makes
fla's unmodified model code (layers, caches, the fused-recurrent kernels and the in-place decode
step of its short convolution) a reference on the CPU. The interpreter must be switched on before
triton is imported, so the comparison runs in a fresh process. It covers short reads (fla picks its
fused-recurrent kernels for T <= 64 without grad; its chunked kernels need bf16 or fail in the
interpreter), which is where the layer logic lives: gates, state layouts, grouped value heads,
output norms and cache handling. The long-sequence maths is tested in test_kernels.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import copy, json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton.runtime.autotuner as autotuner
    # Autotuning benchmarks on a device; the interpreter has none, any config will do.
    autotuner.Autotuner._bench = lambda self, *args, **kwargs: [1.0, 1.0, 1.0]
except Exception as exc:
    print(json.dumps({"skip": f"triton interpreter unavailable: {exc!r}"}))
    sys.exit(0)
import torch
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM
from refine_tta.model import prepare_model, read
from refine_tta.model.loading import register_fla_models
register_fla_models()
from fla.models import DeltaNetConfig, GatedDeltaNetConfig

V = 128
CONFIGS = {  # small heads: the interpreter's cost grows with the number of [head, V-block] programs
    "delta_net": DeltaNetConfig(hidden_size=32, num_heads=2, num_hidden_layers=2, vocab_size=V),
    "delta_net-gate-elu-negeig-convbias": DeltaNetConfig(
        hidden_size=32, num_heads=2, num_hidden_layers=2, vocab_size=V, use_gate=True, qk_activation="elu",
        allow_neg_eigval=True, conv_bias=True),
    "gated_deltanet": GatedDeltaNetConfig(hidden_size=32, num_heads=2, head_dim=16, num_hidden_layers=2, vocab_size=V),
    "gated_deltanet-gqa-nogate": GatedDeltaNetConfig(
        hidden_size=32, num_heads=2, num_v_heads=4, head_dim=16, expand_v=1, num_hidden_layers=2, vocab_size=V,
        use_gate=False),
}

def maxdiff(xs, ys):
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(xs, ys, strict=True))

results = {}
for name, config in CONFIGS.items():
    torch.manual_seed(0)
    fla_model = AutoModelForCausalLM.from_config(config).eval()
    if hasattr(fla_model.model.layers[0].attn, "dt_bias"):
        for layer in fla_model.model.layers:  # decays strong enough to matter over 16 tokens
            layer.attn.A_log.data.uniform_(-1.0, 1.0)
    ours = copy.deepcopy(fla_model)
    prepare_model(ours, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    ids, steps = torch.randint(0, V, (2, 16), generator=gen), torch.randint(0, V, (2, 2), generator=gen)
    r = {"logits": [], "state": [], "input_state_changed": False, "fla_updates_conv_in_place": False}
    with torch.no_grad():
        a, b = read(fla_model, ids), read(ours, ids)
        r["logits"].append(maxdiff([a.logits], [b.logits]))
        r["state"].append(maxdiff(a.state.tensors(), b.state.tensors()))
        state_a, state_b = a.state, b.state
        for t in range(steps.shape[1]):
            before = [x.clone() for x in state_a.tensors()]
            a = read(fla_model, steps[:, t:t + 1], state_a)
            r["input_state_changed"] |= maxdiff(state_a.tensors(), before) != 0.0
            b = read(ours, steps[:, t:t + 1], state_b)
            r["logits"].append(maxdiff([a.logits], [b.logits]))
            r["state"].append(maxdiff(a.state.tensors(), b.state.tensors()))
            state_a, state_b = a.state, b.state
        # Is the hazard real? fla's single-token step writes into the cache it is given.
        cache = state_a.to_cache()
        conv = cache[0]["conv_state"][0]
        snapshot = conv.clone()
        fla_model.model(input_ids=steps[:, :1], past_key_values=cache, use_cache=True)
        r["fla_updates_conv_in_place"] = not torch.equal(conv, snapshot)
    results[name] = r
print(json.dumps(results))
'''


@pytest.fixture(scope="module")
def fla_comparison():
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip(out["skip"])
    return out


CASES = ["delta_net", "delta_net-gate-elu-negeig-convbias", "gated_deltanet", "gated_deltanet-gqa-nogate"]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_torch_backend_matches_fla_layers(fla_comparison, case):
    """Prefill 16 tokens (batch 2), then 2 single-token steps: logits and every state tensor agree."""
    r = fla_comparison[case]
    assert max(r["logits"]) < 1e-5, r["logits"]
    assert max(r["state"]) < 1e-5, r["state"]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_fla_in_place_decode_never_touches_a_state(fla_comparison, case):
    r = fla_comparison[case]
    assert r["fla_updates_conv_in_place"], "fla's decode step no longer updates in place: recheck this test"
    assert not r["input_state_changed"]
