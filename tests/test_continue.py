"""Continuing from a session (``base_session``) and model-aware defaults, through the engine.

* chain: adapting A, then B from A's session (read back from disk by a fresh store), equals one
  process that adapts A then B from A's delta, bit for bit (CPU, seeds).
* ownership: another owner's session cannot be a base (NotFound, as for any other use); a base of
  another scope is refused (InvalidSettings); a deleted base is NotFound.
* every adaptation reports drift on the fixed probe text, base vs adapted.
* the preset comes from the model: ``embedded`` only for the embedded model.
"""

from __future__ import annotations

import torch
from server_fixtures import document, make_tiny_model

import pytest
from refine_tta.engine import Engine, EngineLimits, InvalidSettings, NotFound, SessionStore
from refine_tta.engine.engine import DRIFT_PROBE
from refine_tta.model import load_model
from refine_tta.model.loading import fingerprint_model, weights_hash
from refine_tta.refine.config import EMBEDDED_CONFIG_HASH, RefineConfig, preset_for_model
from refine_tta.refine.loop import adapt, score_document

CONFIG = RefineConfig(steps=2, n_chunks=4, k=4, edge_margin=8, seed=3, lr=1e-2, scope="projections")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    torch.set_num_threads(1)
    return load_model(make_tiny_model(tmp_path_factory.mktemp("tiny")), device="cpu")


def engine_for(loaded, directory) -> Engine:
    store = SessionStore.open(directory, loaded.fingerprint)
    return Engine(loaded, store, EngineLimits(max_document_tokens=400, max_steps=8))


def ids_of(loaded, text: str) -> torch.Tensor:
    return torch.tensor([loaded.tokenizer(text)["input_ids"]])


def test_chain_equals_one_process(loaded, tmp_path):
    doc_a = document(loaded.tokenizer, 150)
    doc_b = " ".join(reversed(document(loaded.tokenizer, 170).split(" ")))  # other text
    with engine_for(loaded, tmp_path / "s") as eng:
        a = eng.submit_adapt(doc_a, CONFIG, owner="alice").result(120)
    with engine_for(loaded, tmp_path / "s") as eng:  # a new store: A comes back from disk
        assert eng.sessions.loaded_count == 0
        b = eng.submit_adapt(doc_b, CONFIG, owner="alice", base_session=a.id).result(120)
        assert b.stats["total"]["base_session"] == a.id and b.stats["total"]["continued"] is True
        got = eng.sessions.get(b.id, "alice")
    base = weights_hash(loaded.model)
    one = adapt(loaded.model, ids_of(loaded, doc_a), CONFIG)
    two = adapt(loaded.model, ids_of(loaded, doc_b), CONFIG, start=one.delta)
    assert weights_hash(loaded.model) == base
    assert sorted(got.delta.tensors) == sorted(two.delta.tensors)
    for name, t in two.delta.tensors.items():
        assert torch.equal(got.delta.tensors[name], t), name
    for x, y in zip(got.state.tensors(), two.state.tensors()):
        assert torch.equal(x, y)
    # and continuing is not the same as starting afresh
    fresh = adapt(loaded.model, ids_of(loaded, doc_b), CONFIG)
    assert any(not torch.equal(fresh.delta.tensors[n], t) for n, t in two.delta.tensors.items())


def test_base_session_ownership_scope_and_deletion(loaded, tmp_path):
    doc_a = document(loaded.tokenizer, 150)
    with engine_for(loaded, tmp_path / "s") as eng:
        a = eng.submit_adapt(doc_a, CONFIG, owner="alice").result(120)
        with pytest.raises(NotFound):
            eng.submit_adapt(doc_a, CONFIG, owner="mallory", base_session=a.id)
        with pytest.raises(NotFound):
            eng.submit_adapt(doc_a, CONFIG, owner=None, base_session=a.id)
        with pytest.raises(NotFound):
            eng.submit_adapt(doc_a, CONFIG, owner="alice", base_session="sess_" + "0" * 32)
        lora = RefineConfig(**{**CONFIG.to_dict(), "scope": "lora", "lora_targets": ("q_proj", "v_proj")})
        with pytest.raises(InvalidSettings, match="scope"):
            eng.submit_adapt(doc_a, lora, owner="alice", base_session=a.id)
        handle_ok = eng.submit_adapt(doc_a, CONFIG, owner="alice", base_session=a.id)
        assert handle_ok.result(120).stats["total"]["base_session"] == a.id
        eng.sessions.delete(a.id, "alice")
        with pytest.raises(NotFound):
            eng.submit_adapt(doc_a, CONFIG, owner="alice", base_session=a.id)


def test_drift_is_reported_on_the_probe_text(loaded, tmp_path):
    with engine_for(loaded, tmp_path / "s") as eng:
        s = eng.submit_adapt(document(loaded.tokenizer, 150), CONFIG, owner=None).result(120)
    drift = s.stats["total"]["drift"]
    probe = ids_of(loaded, DRIFT_PROBE.read_text(encoding="utf-8"))
    assert drift["probe_tokens"] == probe.shape[1] > 100
    base, _ = score_document(loaded.model, probe)
    assert drift["ntp_base"] == pytest.approx(base.ntp, abs=1e-6)
    assert drift["ntp_adapted"] != drift["ntp_base"]  # lr 1e-2 on every projection moves it
    assert drift["change"] == pytest.approx(drift["ntp_adapted"] - drift["ntp_base"], abs=1e-9)
    none = adapt(loaded.model, ids_of(loaded, document(loaded.tokenizer, 150)), RefineConfig(mode="none"),
                 probe_ids=probe)
    assert none.stats["total"]["drift"]["change"] == 0.0


def test_preset_is_chosen_from_the_model(loaded, tmp_path):
    assert preset_for_model(loaded.fingerprint.architecture, loaded.fingerprint.config_hash) == "safe"
    with engine_for(loaded, tmp_path / "s") as eng:
        assert eng.default_preset == "safe"


def test_embedded_model_is_recognised(tmp_path):
    from refine_tta.defaults import EMBEDDED_MODEL_DIR

    for dtype in ("float32", "bfloat16"):
        model = load_model(EMBEDDED_MODEL_DIR, dtype=dtype, load_tokenizer=False).model
        assert fingerprint_model(model).config_hash == EMBEDDED_CONFIG_HASH
    assert preset_for_model("delta_net", EMBEDDED_CONFIG_HASH) == "embedded"
