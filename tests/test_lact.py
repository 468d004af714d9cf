"""LaCT (refine_tta.kernels.lact, refine_tta.model.lact) on a tiny random config, CPU, fp32.

* kernels: the stateful fast-weight read (rows at different offsets, chunks completing mid-read)
  == the authors' whole-sequence chunk loop; window attention from a cache == a full masked pass;
  Newton-Schulz gives singular values near 1.
* model: one pass over document + continuation == read the document into a state, then the
  continuation == token-by-token from that state == the reference that recomputes the whole
  sequence (the authors' no-cache generation), at lengths that cross chunk boundaries and the window;
  greedy ``generate`` from a state == recompute-per-token decoding.
* state: clone / expand / select / stack across positions, reads never modify a state, save/load
  bit-exact, a LaCT state refuses a DeltaNet (fingerprint) and vice versa (cache adapter).
* loading: transformers' Auto classes, the authors' parameter names, their 760M config.
* REFINE: branch path == reference path (rollouts, losses, gradients); adapt() restores the model.

Tolerances: fp32; the stateful and reference forms sum in different orders (query blocks, chunked
reads vs one pass), so values agree to ~1e-5. Gradients: the per-token learning rates are fp32 (as
the authors compute them) and Muon's Newton-Schulz polynomials (coefficients up to ~7) amplify
rounding, so branch and reference gradients agree to ~2e-5 of their largest entries (~0.2): atol
2e-5. The same comparison on a float64 model still shows ~1e-7 relative, the fp32 learning-rate
path, and exactly the pattern of rounding (smallest when the cut falls on a chunk boundary).
"""

from __future__ import annotations

import pytest
import torch
from test_refine_loop import GRAD_RTOL, VALUE_TOL, assert_same_model, both_paths, doc, make_model, snapshot

from refine_tta.kernels import lact as K
from refine_tta.engine.text import SamplingConfig, TextCodec, generate_text
from refine_tta.model.decoding import TokenSampling, generate_tokens
from refine_tta.model.lact import LaCTCacheAdapter, LaCTForCausalLM, LaCTSWIGLUConfig, state_nbytes
from refine_tta.model.loading import fingerprint_model, load_model, prepare_model
from refine_tta.model.runtime import read
from refine_tta.engine.storage import SessionRecord, SessionRefused, SessionStorage, StoredPart, new_session_id
from refine_tta.model.state import DocumentState
from refine_tta.refine.config import RefineConfig
from refine_tta.refine.loop import adapt

VOCAB = 128
CHUNK, WINDOW = 16, 12
TOL = dict(rtol=2e-5, atol=2e-5)
GRAD_ATOL = 2e-5


def lact_config(**kw) -> LaCTSWIGLUConfig:
    base = dict(hidden_size=64, num_hidden_layers=2, num_attn_heads=4, num_lact_heads=2, lact_chunk_size=CHUNK,
                window_size=WINDOW, vocab_size=VOCAB, intermediate_size=96, w0_w2_low_rank=4, use_muon=True,
                use_momentum=True, muon_dtype="float32", rope_theta=10000.0, fuse_cross_entropy=False)
    return LaCTSWIGLUConfig(**{**base, **kw})


def make_lact(seed: int = 0, **kw) -> LaCTForCausalLM:
    """Random init; the per-token learning rates raised (bias 4 -> lr ~ 0.05) so the chunk updates
    move the fast weights visibly and every test below would notice a wrong update."""
    torch.manual_seed(seed)
    model = LaCTForCausalLM(lact_config(**kw)).float()
    with torch.no_grad():
        for block in model.model.layers:
            block.attn.lr_proj.bias.fill_(4.0)
    prepare_model(model, torch.device("cpu"))
    return model


VARIANTS = {
    "muon-momentum-lowrank": {},
    "plain-full-rank-qknorm": dict(use_muon=False, use_momentum=False, w0_w2_low_rank=-1, attn_qk_norm=True,
                                   inter_multi=2, learnable_ttt_scale=False),
    "nope-no-v-silu-fp32states": dict(ttt_nope=True, no_v_silu=True, fp32_states=True, lr_dim=1),
}


@pytest.fixture(scope="module")
def lact():
    return make_lact()


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def variant(request):
    return make_lact(seed=1, **VARIANTS[request.param])


def reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] of the whole sequence recomputed from scratch with the reference kernels."""
    with torch.no_grad():
        return model.lm_head(model.model.forward_reference(ids))


# ---------------------------------------------------------------------------------------------
# kernels

RULES = {"muon-momentum": K.FastWeightRule(True, True, torch.float32), "sgd": K.FastWeightRule(False, False),
         "momentum": K.FastWeightRule(False, True)}


@pytest.mark.parametrize("rule", list(RULES), ids=list(RULES))
def test_stateful_fast_weights_equal_whole_sequence_reference(rule):
    """Rows at offsets 0, 5, 16, 29 read 7 tokens, then 27 more as one batch (chunks complete at
    different offsets per row); every output equals the authors' loop over the whole sequence."""
    rule = RULES[rule]
    g = torch.Generator().manual_seed(0)
    H, d, dh, C = 2, 8, 12, 8
    w0, w2 = torch.randn(H, dh, d, generator=g) / 3, torch.randn(H, dh, d, generator=g) / 3
    w1 = torch.randn(H, d, dh, generator=g) / 3
    norms = tuple(K.row_norms(w) for w in (w0, w1, w2))
    offsets, T1, T2 = [0, 5, 16, 29], 7, 27
    L = max(offsets) + T1 + T2

    def inputs(n):
        q, k = (K.l2_normalize(torch.randn(1, H, n, d, generator=g)) for _ in range(2))
        v = torch.randn(1, H, n, d, generator=g)
        lr = torch.rand(1, H, n, 3, generator=g) * 0.5
        mom = torch.rand(1, H, n, generator=g)
        return q, k, v, lr, mom

    seqs = [inputs(L) for _ in offsets]
    states, want = [], []
    for (q, k, v, lr, mom), off in zip(seqs, offsets):
        n = off + T1
        full = K.lact_swiglu_reference(w0, w1, w2, q[:, :, :n + T2], k[:, :, :n + T2], v[:, :, :n + T2],
                                       lr[:, :, :n + T2], mom[:, :, :n + T2], C, rule)
        st = K.FastWeightState.initial(w0, w1, w2, 1, C, 3, d, rule.use_momentum, torch.float32)
        if n:
            o, st = K.lact_swiglu_step(st, norms, q[:, :, :n], k[:, :, :n], v[:, :, :n], lr[:, :, :n], mom[:, :, :n],
                                       rule)
            torch.testing.assert_close(o, full[:, :, :n], **TOL)
        states.append(st)
        want.append(full[:, :, n:n + T2])
    batch = K.FastWeightState.from_named({name: torch.cat([s.named()[name] for s in states])
                                          for name in states[0].named()})
    cont = [tuple(x[:, :, off + T1:off + T1 + T2] for x in s) for s, off in zip(seqs, offsets)]
    q, k, v, lr, mom = (torch.cat([c[i] for c in cont]) for i in range(5))
    o, after = K.lact_swiglu_step(batch, norms, q, k, v, lr, mom, rule)
    torch.testing.assert_close(o, torch.cat(want), **TOL)
    assert after.pos.tolist() == [off + T1 + T2 for off in offsets]
    for row, off in enumerate(offsets):  # the buffer holds exactly the incomplete chunk
        fill = (off + T1 + T2) % C
        assert not after.buf_k[row, :, fill:].any() and after.buf_k[row, :, :fill].abs().sum() > 0


def test_window_attention_from_cache_equals_full_pass():
    g = torch.Generator().manual_seed(1)
    B, H, D, W, L = 3, 2, 8, 6, 40
    q, k, v = (torch.randn(B, L, H, D, generator=g) for _ in range(3))
    want = K.window_attention_reference(q, k, v, W)
    cut = [0, 3, 17]  # rows read this many tokens first (0: the cache is all empty slots)
    cache_k = torch.zeros(B, W - 1, H, D)
    cache_v = torch.zeros(B, W - 1, H, D)
    for b, c in enumerate(cut):
        if c:
            o, ck, cv = K.window_attention(q[b:b + 1, :c], k[b:b + 1, :c], v[b:b + 1, :c], cache_k[b:b + 1],
                                           cache_v[b:b + 1], torch.tensor([0]), W, block=2)
            torch.testing.assert_close(o, want[b:b + 1, :c], **TOL)
            cache_k[b], cache_v[b] = ck[0], cv[0]
    T = 20
    rows = lambda x: torch.stack([x[b, c:c + T] for b, c in enumerate(cut)])  # noqa: E731
    o, _, _ = K.window_attention(rows(q), rows(k), rows(v), cache_k, cache_v, torch.tensor(cut), W, block=7)
    torch.testing.assert_close(o, rows(want), **TOL)


@pytest.mark.parametrize("shape", [(3, 16, 24), (2, 24, 16), (1, 8, 8)], ids=["wide", "tall", "square"])
def test_newton_schulz_orthogonalises(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    for dtype in (torch.float32, torch.bfloat16):
        s = torch.linalg.svdvals(K.newton_schulz5(g, dtype).float())
        assert s.min() > 0.9 and s.max() < 1.1, (dtype, s)


# ---------------------------------------------------------------------------------------------
# the model: one pass == state + continuation == token by token == recompute

@pytest.mark.parametrize("doc_len,cont_len", [(37, 30), (16, 17), (5, 3), (48, 1)],
                         ids=["cross-two-chunks", "doc-on-boundary", "inside-window", "one-token-after-chunk"])
def test_state_then_continuation_equals_one_pass_and_recompute(variant, doc_len, cont_len):
    ids = doc(doc_len + cont_len, seed=doc_len)
    want = reference_logits(variant, ids)
    with torch.no_grad():
        one = read(variant, ids)
        state = read(variant, ids[:, :doc_len]).state
        cont = read(variant, ids[:, doc_len:], state)
        torch.testing.assert_close(one.logits, want, **TOL)
        torch.testing.assert_close(cont.logits, want[:, doc_len:], **TOL)
        s = state
        for t in range(doc_len, doc_len + cont_len):
            out = read(variant, ids[:, t:t + 1], s)
            torch.testing.assert_close(out.logits[:, 0], want[:, t], **TOL)
            s = out.state
    assert s.n_tokens == doc_len + cont_len
    for a, b in zip(s.tensors(), one.state.tensors()):  # the carried state itself agrees
        torch.testing.assert_close(a, b, **TOL)


def test_authors_bf16_newton_schulz_agrees_to_bf16_rounding():
    """With the authors' bf16 Newton-Schulz, reads that sum in a different order (query blocks,
    segment cuts) can round a chunk's update differently: agreement to ~1e-4 instead of ~1e-7."""
    model = make_lact(muon_dtype="bfloat16")
    ids = doc(100, seed=1)
    want = reference_logits(model, ids)
    with torch.no_grad():
        state = read(model, ids[:, :37]).state
        torch.testing.assert_close(read(model, ids).logits, want, rtol=0, atol=1e-3)
        torch.testing.assert_close(read(model, ids[:, 37:], state).logits, want[:, 37:], rtol=0, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; the CPU tests above are its counterpart")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_state_then_continuation_equals_recompute_on_cuda(dtype):
    model = make_lact().to("cuda", dtype)
    ids = doc(70, seed=2).cuda()
    want = reference_logits(model, ids).float()
    with torch.no_grad():
        state = read(model, ids[:, :37]).state
        cont = read(model, ids[:, 37:], state).logits.float()
    torch.testing.assert_close(cont, want[:, 37:], rtol=0, atol=2e-5 if dtype == torch.float32 else 5e-2)


def test_chunk_updates_matter(lact):
    """The comparisons above can fail: without the chunk updates the logits are far off."""
    ids = doc(70, seed=4)
    frozen = make_lact(lact_chunk_size=1024)  # same weights, no chunk completes within 70 tokens
    gap = (reference_logits(lact, ids) - reference_logits(frozen, ids))[:, CHUNK:].abs().max()
    assert gap > 1e-2
    state = read(lact, ids).state
    w0 = state.layers[0].named["w0"]
    init = lact.model.layers[0].attn.initial_weights()[0]
    assert (w0[0] - init).abs().max() > 1e-2


@pytest.mark.parametrize("doc_len", [30, 64])
def test_greedy_generate_from_state_equals_recompute_per_token(lact, doc_len):
    ids = doc(doc_len, seed=7)
    with torch.no_grad():
        state = read(lact, ids).state
    prompt = [3, 14, 15]
    res = generate_tokens(lact, state, prompt, TokenSampling(max_new_tokens=25))
    seq = torch.cat([ids[0], torch.tensor(prompt)])
    want = []
    for _ in range(25):  # the authors' generation: recompute the whole sequence for every token
        nxt = int(reference_logits(lact, seq.unsqueeze(0))[0, -1].argmax())
        want.append(nxt)
        seq = torch.cat([seq, torch.tensor([nxt])])
    assert res.tokens == want
    assert len(set(want)) > 1


# ---------------------------------------------------------------------------------------------
# state: branch, stack, clone, save, load

def test_states_at_different_positions_stack_and_branch(lact):
    ids = doc(80, seed=9)
    cuts = [10, 16, 33, 47]  # inside a chunk, on a chunk boundary, past two chunks, in the window
    with torch.no_grad():
        states = [read(lact, ids[:, :c]).state for c in cuts]
        batch = DocumentState.stack(states)
        assert batch.batch_size == 4 and batch.n_tokens == -1
        cont = torch.stack([ids[0, c:c + 20] for c in cuts])
        out = read(lact, cont, batch)
        for i, c in enumerate(cuts):
            alone = read(lact, ids[:, c:c + 20], states[i])
            torch.testing.assert_close(out.logits[i], alone.logits[0], **TOL)
            torch.testing.assert_close(out.logits[i], reference_logits(lact, ids[:, :c + 20])[0, c:], **TOL)
        two = states[2].expand(3)
        again = read(lact, cont[2:3].expand(3, -1), two)
        torch.testing.assert_close(again.logits[0], again.logits[2], **TOL)
        torch.testing.assert_close(out.state.select(2).next_logits, again.state.select(1).next_logits, **TOL)


def test_read_never_changes_its_state(lact):
    ids = doc(40, seed=5)
    with torch.no_grad():
        state = read(lact, ids[:, :20]).state
        before = state.clone()
        read(lact, ids[:, 20:], state)
        generate_tokens(lact, state, [1, 2], TokenSampling(max_new_tokens=20))
    for a, b in zip(state.tensors(), before.tensors()):
        assert torch.equal(a, b)


def _store(storage: SessionStorage, state: DocumentState) -> str:
    sid = new_session_id()
    storage.write(SessionRecord(sid, {}, {"state": StoredPart(state.state_dict(), {"n_tokens": state.n_tokens})}))
    return sid


def test_save_load_round_trip_is_bit_exact(lact, tmp_path):
    """state_dict -> session storage (checksummed file) -> from_state_dict, named tensors and dtypes kept."""
    ids = doc(45, seed=6)
    storage = SessionStorage(tmp_path, fingerprint_model(lact))
    with torch.no_grad():
        state = read(lact, ids[:, :37]).state
        _, parts = storage.read(_store(storage, state))
        loaded = DocumentState.from_state_dict(parts["state"].tensors, parts["state"].description["n_tokens"])
        assert loaded.n_tokens == 37
        assert [n for n, _ in loaded.layers[0].items()] == [n for n, _ in state.layers[0].items()]
        for a, b in zip(state.tensors(), loaded.tensors(), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert torch.equal(read(lact, ids[:, 37:], loaded).logits, read(lact, ids[:, 37:], state).logits)
        assert torch.equal(loaded.clone().layers[1].named["pos"], torch.tensor([37]))
    storage.close()


def test_lact_and_deltanet_states_do_not_mix(lact, tmp_path):
    deltanet = make_model()
    with torch.no_grad():
        lact_state = read(lact, doc(20)).state
        delta_state = read(deltanet, doc(20)).state
    storage = SessionStorage(tmp_path, fingerprint_model(lact))
    sid = _store(storage, lact_state)
    storage.close()
    other = SessionStorage(tmp_path, fingerprint_model(deltanet))
    with pytest.raises(SessionRefused, match="architecture"):
        other.read(sid)
    other.close()
    with pytest.raises(ValueError, match="not produced by a LaCT model"):
        read(lact, doc(3), delta_state)


def test_state_bytes_formula_matches_a_real_state(lact):
    with torch.no_grad():
        state = read(lact, doc(20)).state
    logits_bytes = state.next_logits.numel() * 4
    assert state_nbytes(lact.config, torch.float32) == state.nbytes - logits_bytes


# ---------------------------------------------------------------------------------------------
# loading: Auto classes, the authors' names and config

AUTHORS_LAYER_NAMES = {  # LaCT's lact_llm parameter names for one block (low-rank w0/w2, momentum, ttt scale)
    "attn_norm.weight", "attn.qkv.weight", "attn.o_proj.weight", "attn.w0.w_left", "attn.w0.w_right",
    "attn.w2.w_left", "attn.w2.w_right", "attn.w1", "attn.lr_proj.weight", "attn.lr_proj.bias", "attn.qk_scale",
    "attn.qk_offset", "attn.ttt_scale_proj.weight", "attn.ttt_scale_proj.bias", "attn.ttt_norm.weight",
    "attn.momentum_proj.0.weight", "attn.momentum_proj.0.bias", "mlp_norm.weight", "mlp.gate_proj.weight",
    "mlp.up_proj.weight", "mlp.down_proj.weight",
}


def test_parameter_names_are_the_authors(lact):
    names = set(lact.state_dict())
    want = {"model.embeddings.weight", "model.norm.weight", "lm_head.weight"}
    want |= {f"model.layers.{i}.{n}" for i in range(2) for n in AUTHORS_LAYER_NAMES}
    assert names == want


def test_loads_through_auto_classes(lact, tmp_path):
    lact.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, load_tokenizer=False)
    assert loaded.fingerprint == fingerprint_model(lact) and loaded.backend.name == "torch"
    ids = doc(30)
    assert torch.equal(read(loaded.model, ids).logits, read(lact, ids).logits)


def test_authors_760m_config():
    """The fields of the authors' configs/760M_lact_swiglu_nh4_fwlow_rank_momentum_muon.json."""
    fields = dict(attention_bias=False, bos_token_id=1, eos_token_id=2, fuse_cross_entropy=True, fuse_norm=True,
                  hidden_act="swish", hidden_size=1536, num_attn_heads=24, num_hidden_layers=24,
                  initializer_range=0.02, max_position_embeddings=32768, num_lact_heads=4, inter_multi=1,
                  qkv_bias=False, attn_qk_norm=False, qkv_silu=True, lact_chunk_size=2048, window_size=2048,
                  use_muon=True, lr_dim=1, lr_parameterization="mamba", learnable_ttt_scale=True,
                  w0_w2_low_rank=32, fw_init_gain=0.5, use_momentum=True, rope_theta=1000000, norm_eps=1e-06,
                  tie_word_embeddings=False, use_cache=True, vocab_size=32000)
    cfg = LaCTSWIGLUConfig(**fields)
    with torch.device("meta"):
        model = LaCTForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 0.7e9 < n < 0.9e9, n
    # bf16 state: fast weights + momentum, one chunk buffer, the attention window; ~0.5 GB in all
    assert 0.3e9 < state_nbytes(cfg, torch.bfloat16) < 1.0e9


def test_unsupported_config_is_refused():
    with pytest.raises(ValueError, match="ttt_prenorm"):
        LaCTForCausalLM(lact_config(ttt_prenorm=True))


# ---------------------------------------------------------------------------------------------
# the engine and its session store, unchanged

def test_engine_sessions_with_lact(tmp_path):
    """Adapt through the engine, answer from the session, and again from a fresh store that loads
    the session from disk: the same tokens as the library from the session's delta and state."""
    from server_fixtures import TOKENIZER_DIR, TOKENIZER_FILES, document
    from transformers import AutoTokenizer

    from refine_tta.engine import Engine, EngineLimits, SessionStore

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    torch.manual_seed(0)
    LaCTForCausalLM(lact_config(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path / "model")
    for name in TOKENIZER_FILES:
        (tmp_path / "model" / name).write_bytes((TOKENIZER_DIR / name).read_bytes())
    loaded = load_model(tmp_path / "model", device="cpu")
    text = document(loaded.tokenizer, 120)
    cfg = RefineConfig(steps=1, n_chunks=4, k=4, edge_margin=8, seed=3)
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.8, seed=5, stop_at_eos=False)
    limits = EngineLimits(max_document_tokens=400, max_prompt_tokens=32, max_new_tokens=64, max_steps=4)
    with Engine(loaded, SessionStore.open(tmp_path / "state", loaded.fingerprint), limits) as engine:
        session = engine.submit_adapt(text, cfg, owner=None).result(300)
        first = engine.submit_generate(session.id, " The keeper", sampling, None).result(120)
        full = engine.sessions.get(session.id, None)
    prompt = loaded.tokenizer(" The keeper", add_special_tokens=False)["input_ids"]
    with full.delta.applied(loaded.model):
        expected = generate_text(loaded.model, full.state, prompt, sampling, TextCodec(loaded.tokenizer))
    assert first.tokens == expected.tokens and len(first.tokens) == 10
    with Engine(loaded, SessionStore.open(tmp_path / "state", loaded.fingerprint), limits) as engine:  # from disk
        again = engine.submit_generate(session.id, " The keeper", sampling, None).result(120)
    assert again.tokens == first.tokens


# ---------------------------------------------------------------------------------------------
# REFINE on LaCT

REFINE_CASES = {
    "n1-full-cosine-L90": (90, dict(n=1, reward="cosine")),
    "n2-full-hybrid-L77": (77, dict(n=2, reward="hybrid", n_chunks=4)),
    "n2-lora-qkv-hybrid-L90": (90, dict(n=2, reward="hybrid", scope="lora", lora_rank=4,
                                        lora_targets=("qkv", "o_proj", "lr_proj"))),
    "n1-layers1-binary-L64": (64, dict(n=1, reward="binary", scope="layers", layers=(1,), n_chunks=4)),
}


@pytest.mark.parametrize("case", list(REFINE_CASES), ids=list(REFINE_CASES))
def test_branch_equals_reference_on_lact(lact, case):
    L, kw = REFINE_CASES[case]
    kw = dict(kw)
    cfg = RefineConfig(k=5, n_chunks=kw.pop("n_chunks", 6), edge_margin=10, **kw)
    sb, sr, gb, gr, x = both_paths(lact, doc(L, seed=L), cfg)
    assert sb["rollout_tokens"] == sr["rollout_tokens"]
    for key in ("rollout_logp_mean", "ntp_loss", "policy_loss", "reward_mean", "reward_std", "binary_mean",
                "exact_match_rate", "advantage_abs_mean", "clip_fraction", "approx_kl"):
        assert sb[key] == pytest.approx(sr[key], rel=VALUE_TOL, abs=VALUE_TOL), key
    assert float(sb["_loss"]) == pytest.approx(float(sr["_loss"]), rel=VALUE_TOL, abs=VALUE_TOL)
    assert len(gb) == len(gr) > 0
    for i, (a, b) in enumerate(zip(gb, gr)):
        assert (a is None) == (b is None), i
        if a is not None:
            torch.testing.assert_close(a, b, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=lambda m: f"param {i}: {m}")
    assert max(float(g.abs().max()) for g in gb if g is not None) > 1e-3
    if cfg.scope == "full":  # the fast-weight parameters get gradient through the carried states
        names = [n for n, p in lact.named_parameters()]
        w1 = names.index("model.layers.0.attn.w1")
        assert gb[w1].abs().max() > 0


def test_adapt_restores_base_and_returns_state_read_with_delta(lact):
    ids = doc(70, seed=8)
    snap = snapshot(lact)
    cfg = RefineConfig(steps=2, lr=1e-2, n_chunks=4, edge_margin=10, reward="hybrid", n=2)
    res = adapt(lact, ids, cfg)
    assert_same_model(lact, snap)
    assert res.state.n_tokens == 70 and res.stats["total"]["steps"] == 2
    with torch.no_grad(), res.delta.applied(lact):
        want = read(lact, ids).state
    for a, b in zip(res.state.tensors(), want.tensors()):
        torch.testing.assert_close(a, b, **TOL)
    base = read(lact, ids).state
    assert not torch.equal(base.layers[0].named["w1"], res.state.layers[0].named["w1"])
    assert isinstance(LaCTCacheAdapter().to_cache(res.state).layers[0]["pos"], torch.Tensor)
