"""Tier 1: load_model on local checkpoints, offline; fingerprints; every failure is a ModelLoadError."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refine_tta.model import SUPPORTED_MODEL_TYPES, ModelLoadError, fingerprint_model, load_model, prepare_model
from refine_tta.model.loading import register_fla_models

REPO = Path(__file__).resolve().parents[1]
VOCAB = 128


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Offline, as on a host without network. huggingface_hub reads HF_HUB_OFFLINE once, at import,
    so the constant is patched too (the variable alone would retry a dead network for ~30 s)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


def tiny_delta_net(seed: int = 0):
    register_fla_models()
    from fla.models import DeltaNetConfig
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(
        DeltaNetConfig(hidden_size=64, num_heads=2, num_hidden_layers=2, vocab_size=VOCAB))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny DeltaNet + tokenizer saved with save_pretrained; returns (dir, the in-memory model)."""
    path = tmp_path_factory.mktemp("tiny-deltanet")
    model = tiny_delta_net()
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    prepare_model(model, torch.device("cpu"))
    return path, model


def test_load_local_checkpoint_offline(checkpoint):
    path, model = checkpoint
    loaded = load_model(path)
    assert loaded.config.model_type == "delta_net"
    assert loaded.backend.name == "torch" and loaded.model.refine_tta_backend == "torch"
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert not loaded.model.training
    assert loaded.name == path.name
    assert loaded.tokenizer is not None
    assert loaded.tokenizer("w5 w7 w9")["input_ids"] == [5, 7, 9]
    ids = torch.tensor([[5, 7, 9, 11, 3, 4]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, model(ids).logits)


def test_fingerprint_stable_and_weight_sensitive(checkpoint):
    path, model = checkpoint
    first, second = load_model(path, load_tokenizer=False), load_model(path, load_tokenizer=False)
    assert first.fingerprint == second.fingerprint
    assert first.fingerprint == fingerprint_model(model), "the saved model and its reload are the same model"
    with torch.no_grad():
        second.model.model.layers[1].attn.o_proj.weight[3, 5] += 1e-3
    changed = fingerprint_model(second.model)
    assert changed.weights_hash != first.fingerprint.weights_hash
    assert first.fingerprint.mismatch(changed.to_dict()) == ["weights_hash"]
    assert changed.config_hash == first.fingerprint.config_hash


def test_fingerprint_sees_dtype_and_config(checkpoint):
    path, _ = checkpoint
    fp32 = load_model(path, load_tokenizer=False).fingerprint
    bf16 = load_model(path, dtype="bf16", load_tokenizer=False)
    assert bf16.dtype == torch.bfloat16
    assert {"dtype", "weights_hash"} <= set(fp32.mismatch(bf16.fingerprint.to_dict()))
    other = tiny_delta_net()
    other.config.norm_eps = 1e-5
    assert fingerprint_model(other).config_hash != fp32.config_hash


def test_unsupported_model_type_names_supported_types(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=VOCAB)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="'llama' is not supported") as info:
        load_model(tmp_path)
    for name in SUPPORTED_MODEL_TYPES:
        assert name in str(info.value)


def test_unsupported_model_in_prepare_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=VOCAB))
    with pytest.raises(ModelLoadError, match="delta_net"):
        prepare_model(llama, torch.device("cpu"))


def test_missing_path(tmp_path):
    for missing in (tmp_path / "nope", "./nope", "a/b/c"):
        with pytest.raises(ModelLoadError, match="does not exist"):
            load_model(missing)


def test_directory_without_config_and_file_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not a valid model config"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(tmp_path / "config.json")


@pytest.mark.parametrize("damage", ["truncate", "missing"])
def test_corrupt_checkpoint(checkpoint, tmp_path, damage):
    src, _ = checkpoint
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    weights = tmp_path / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        weights.unlink()
    with pytest.raises(ModelLoadError, match="could not load weights"):
        load_model(tmp_path)


def test_hub_id_offline_fails_with_the_id(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # An empty cache, so that a machine that did download this model still exercises the failure.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="fla-hub/delta_net-1.3B-100B"):
        load_model("fla-hub/delta_net-1.3B-100B")


def test_hub_id_from_cache_in_a_fresh_process(checkpoint, tmp_path):
    """A hub id resolves through AutoConfig, which knows fla's model types only after fla.models is
    imported; a fresh process (nothing imported yet) must still load it. Offline, from a hub cache."""
    src, model = checkpoint
    revision = "0" * 40
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in src.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text(revision)
    script = ("import json; from refine_tta.model import load_model; m = load_model('org/tiny'); "
              "print(json.dumps(m.fingerprint.to_dict()))")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == fingerprint_model(model).to_dict()
