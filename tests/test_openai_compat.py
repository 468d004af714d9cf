"""OpenAI compatibility deep enough for evaluation tools: /v1/completions with logprobs, echo, n,
batched and token-id prompts; /tokenize and /detokenize; the ``openai`` package's types and errors.
Log-probabilities are checked against a plain forward pass of the model (no engine code)."""

from __future__ import annotations

import math

import pytest
import torch
from server_fixtures import TOKENIZER_DIR, app_client, document, make_tiny_model

DEFAULTS = {"steps": 1, "n_chunks": 4, "k": 4, "edge_margin": 8}
LIMITS = dict(max_document_tokens=600, max_prompt_tokens=64, max_new_tokens=32, max_steps=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def client(tiny, tmp_path_factory):
    with app_client(tiny, tmp_path_factory.mktemp("state"), refine_defaults=DEFAULTS, **LIMITS) as c:
        yield c


@pytest.fixture(scope="module")
def base(client) -> str:
    return client.get("/health").json()["model"]


@pytest.fixture(scope="module")
def session_id(client, tok):
    r = client.post("/v1/adapt", json={"document": document(tok, 150), "settings": {"seed": 3}})
    assert r.status_code == 200, r.text
    return r.json()["session_id"]


@torch.no_grad()
def direct_logprobs(client, session_id: str | None, ids: list[int]) -> list[float | None]:
    """log p(ids[i] | before) from one plain forward pass (the session's state and weight delta)."""
    engine = client.app.state.runtime.engine
    model = engine.loaded.model
    if session_id is None:
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        return [None] + [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]
    session = engine.sessions.get(session_id, None)
    with session.delta.applied(model):
        out = model(input_ids=torch.tensor([ids]), past_key_values=session.state.to_cache(), use_cache=True)
    lp = torch.log_softmax(torch.cat([session.state.next_logits.float(), out.logits[0].float()]), -1)
    return [lp[i, ids[i]].item() for i in range(len(ids))]


def close(a: list[float | None], b: list[float | None], tol: float = 1e-4) -> bool:
    return len(a) == len(b) and all((x is None and y is None) or (x is not None and y is not None and
                                                                   abs(x - y) <= tol) for x, y in zip(a, b))


def test_echo_scores_the_prompt_text_base_model(client, base, tok):
    prompt = "The keeper wrote in the ledger"
    r = client.post("/v1/completions", json={"model": base, "prompt": prompt, "max_tokens": 0, "echo": True,
                                             "logprobs": 3})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    ids = tok(prompt)["input_ids"]  # BOS + prompt: BOS is context, not shown
    lp = choice["logprobs"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert lp["tokens"] == [tok.decode([t]) for t in ids[1:]] and "".join(lp["tokens"]) == prompt
    assert close(lp["token_logprobs"], direct_logprobs(client, None, ids)[1:])
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
    for actual, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 3 and max(top.values()) >= actual - 1e-6
    assert r.json()["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}


def test_token_id_prompts_after_a_session(client, session_id, tok):
    ids = tok(" The keeper counted the ships", add_special_tokens=False)["input_ids"]
    r = client.post("/v1/completions", json={"model": session_id, "prompt": [ids, ids[:3]], "max_tokens": 0,
                                             "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    first, second = r.json()["choices"]
    assert (first["index"], second["index"]) == (0, 1)
    # The document comes before the prompt: even its first token has a log-probability.
    assert close(first["logprobs"]["token_logprobs"], direct_logprobs(client, session_id, ids))
    assert close(second["logprobs"]["token_logprobs"], first["logprobs"]["token_logprobs"][:3])  # batch == alone
    assert first["text"] == tok.decode(ids)
    base_ids = client.post("/v1/completions", json={"model": client.get("/health").json()["model"],
                                                    "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert base_ids.json()["choices"][0]["logprobs"]["token_logprobs"][0] is None  # nothing before it
    assert base_ids.json()["choices"][0]["logprobs"]["top_logprobs"] is None


def test_batch_and_n_equal_single_requests(client, session_id):
    prompts = [" The keeper", " In the winter"]
    body = {"model": session_id, "prompt": prompts, "n": 2, "max_tokens": 6, "temperature": 1.0, "seed": 11}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for i, prompt in enumerate(prompts):
        for j in range(2):
            alone = client.post("/v1/generate", json={"session_id": session_id, "prompt": prompt, "max_tokens": 6,
                                                      "temperature": 1.0, "seed": 11 + j}).json()
            assert choices[i * 2 + j]["text"] == alone["text"]
    usage = r.json()["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_logprobs_of_generated_tokens(client, session_id, tok):
    prompt = " The keeper"
    r = client.post("/v1/completions", json={"model": session_id, "prompt": prompt, "max_tokens": 8,
                                             "temperature": 0, "logprobs": 2})
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"]
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    # the generated ids (re-tokenizing the text need not give them back): the same greedy generation
    generated = client.post("/v1/generate", json={"session_id": session_id, "prompt": prompt, "max_tokens": 8,
                                                  "temperature": 0}).json()
    assert generated["text"] == choice["text"]
    expected = direct_logprobs(client, session_id, prompt_ids + generated["tokens"])[len(prompt_ids):]
    assert close(lp["token_logprobs"], expected)
    # Greedy decoding picks the most likely token: it heads each top list.
    for actual, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert math.isclose(max(top.values()), actual, abs_tol=1e-5)
    echoed = client.post("/v1/completions", json={"model": session_id, "prompt": prompt, "max_tokens": 8,
                                                  "temperature": 0, "logprobs": 2, "echo": True}).json()["choices"][0]
    assert echoed["text"] == prompt + choice["text"]
    assert echoed["logprobs"]["token_logprobs"][-len(expected):] == lp["token_logprobs"]
    assert echoed["logprobs"]["text_offset"][len(prompt_ids)] == len(prompt)


def test_tokenize_and_detokenize(client, base, session_id, tok):
    text = "The lighthouse keeper"
    r = client.post("/tokenize", json={"model": base, "prompt": text}).json()
    assert r["tokens"] == tok(text)["input_ids"] and r["count"] == len(r["tokens"]) and r["max_model_len"] == 64
    bare = client.post("/tokenize", json={"model": session_id, "prompt": text, "add_special_tokens": False}).json()
    assert bare["tokens"] == r["tokens"][1:]
    assert client.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": text}
    info = client.get("/tokenizer_info").json()
    assert (info["bos_token"], info["eos_token"], info["model_max_length"]) == (tok.bos_token, tok.eos_token, 64)
    eos = client.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()
    assert eos["tokens"] == [tok.eos_token_id]  # how lm-eval's remote tokenizer finds the EOS id


def test_openai_package_types_and_errors(client, base, session_id):
    from openai import BadRequestError, NotFoundError, OpenAI

    oai = OpenAI(base_url=str(client.base_url) + "/v1", api_key="unused", max_retries=0, http_client=client)
    out = oai.completions.create(model=session_id, prompt=[" The", " A"], max_tokens=3, temperature=0, echo=True,
                                 logprobs=2)
    assert len(out.choices) == 2 and out.choices[1].index == 1
    lp = out.choices[0].logprobs
    assert lp.tokens and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(isinstance(v, float) for top in lp.top_logprobs for v in top.values())
    for kwargs, param in (({"max_tokens": 1000}, "max_tokens"), ({"presence_penalty": 1.0}, "presence_penalty"),
                          ({"temperature": 3.0}, "temperature"), ({"prompt": "x" * 2000}, "prompt")):
        with pytest.raises(BadRequestError) as info:
            oai.completions.create(**{"model": base, "prompt": "a", **kwargs})
        assert info.value.body["param"] == param, info.value.body
    with pytest.raises(NotFoundError):
        oai.completions.create(model="sess_" + "0" * 32, prompt="a")


def test_scoring_in_groups_equals_one_batch(client, session_id, tok, monkeypatch):
    from refine_tta.engine import scoring as scoring_module

    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in (" The keeper", " In the winter of the storm",
                                                                       " Birds")]
    body = {"model": session_id, "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 2}
    together = client.post("/v1/completions", json=body).json()["choices"]
    monkeypatch.setattr(scoring_module, "SCORE_LOGITS_BUDGET", 1)  # every prompt in its own forward pass
    alone = client.post("/v1/completions", json=body).json()["choices"]
    for a, b in zip(together, alone):
        assert close(a["logprobs"]["token_logprobs"], b["logprobs"]["token_logprobs"], 1e-5)
        assert a["logprobs"]["tokens"] == b["logprobs"]["tokens"]


def test_logprobs_of_a_full_length_prompt_and_its_completion(client, session_id, tok):
    ids = (tok(" The keeper wrote in the ledger every evening.", add_special_tokens=False)["input_ids"] * 20)[:64]
    r = client.post("/v1/completions", json={"model": session_id, "prompt": ids, "max_tokens": 8, "temperature": 0,
                                             "echo": True, "logprobs": 1})  # 64 = max_prompt_tokens, plus 8
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) >= 64 and close(lp["token_logprobs"][:64], direct_logprobs(client, session_id, ids))
