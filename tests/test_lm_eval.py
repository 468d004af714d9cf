"""lm-evaluation-harness against a live server: ``lm_eval --model local-completions`` on two tiny
local tasks (tests/data/lm_eval: one ``loglikelihood``, one ``generate_until``), with ``model`` =
the base model and = an adapted session. Its loglikelihood scores must equal a plain forward pass
of the model (the session's state and weight delta loaded from the server's state directory)
within 1e-4."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from server_fixtures import REPO, ServerProcess, document, make_tiny_model

DATA = REPO / "tests" / "data" / "lm_eval"
DEFAULTS = {"steps": 1, "n_chunks": 4, "k": 4, "edge_margin": 8}
TASKS = {
    "refine_tta_loglikelihood": f"""task: refine_tta_loglikelihood
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA / 'loglikelihood.jsonl'}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "refine_tta_generate": f"""task: refine_tta_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {DATA / 'generate.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def lm_eval_command(url: str, model: str, tokenizer: Path | None, add_bos: bool, include: Path, out: Path) -> list[str]:
    """``tokenizer`` None: lm-eval finds the server's own (``/tokenizer_info``, ``/tokenize``)."""
    local = f"tokenizer={tokenizer},tokenizer_backend=huggingface," if tokenizer is not None else ""
    args = (f"model={model},base_url={url}/v1/completions,{local}tokenized_requests=True,add_bos_token={add_bos},"
            f"num_concurrent=1,max_retries=1")
    return [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
            "--tasks", ",".join(TASKS), "--include_path", str(include), "--output_path", str(out), "--log_samples",
            "--batch_size", "4", "--seed", "0"]


def samples(out: Path, task: str) -> list[dict]:
    files = sorted(out.rglob(f"samples_{task}_*.jsonl"))
    assert files, list(out.rglob("*"))
    return [json.loads(line) for line in files[-1].read_text().splitlines()]


@torch.no_grad()
def direct_loglikelihood(model, tok, state, delta, context: str, continuation: str, add_bos: bool) -> float:
    """lm-eval's request (the context's ids, then what encoding context + continuation adds after
    as many ids), scored by one plain forward pass from ``state`` (None: nothing read) with
    ``delta`` applied."""
    context_ids = tok(context, add_special_tokens=add_bos)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=add_bos)["input_ids"]
    ids = context_ids + whole[len(context_ids):]
    if state is None:
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    else:
        with delta.applied(model):
            logits = model(input_ids=torch.tensor([ids]), past_key_values=state.to_cache(), use_cache=True
                           ).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return sum(lp[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids)))


def test_lm_eval_local_completions(tiny, tmp_path):
    pytest.importorskip("lm_eval")
    from transformers import AutoTokenizer

    from refine_tta.engine import SessionStore
    from refine_tta.model import load_model

    include = tmp_path / "tasks"
    include.mkdir()
    for name, text in TASKS.items():
        (include / f"{name}.yaml").write_text(text)
    tok = AutoTokenizer.from_pretrained(tiny)
    state_dir = tmp_path / "state"
    server = ServerProcess(tiny, state_dir, "--max-prompt-tokens", "4096", "--max-new-tokens", "64",
                           env={"REFINE_TTA_REFINE_DEFAULTS": json.dumps(DEFAULTS)})
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "OPENAI_API_KEY": "unused"}
    runs = {}
    try:
        server.wait_healthy()
        base = httpx.get(server.url + "/health").json()["model"]
        r = httpx.post(server.url + "/v1/adapt", json={"document": document(tok, 200), "settings": {"seed": 1}},
                       timeout=300)
        assert r.status_code == 200, r.text
        session = r.json()["session_id"]
        # The base model with a local copy of the tokenizer (BOS first); the session with the server's.
        for model, add_bos, tokenizer in ((base, True, tiny), (session, False, None)):
            out = tmp_path / f"out-{model}"
            cmd = lm_eval_command(server.url, model, tokenizer, add_bos, include, out)
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
            table = done.stdout[done.stdout.find("|Tasks"):] if "|Tasks" in done.stdout else done.stdout[-3000:]
            print(f"\n$ {' '.join(cmd[2:])}\n{table}")
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
            assert (tokenizer is None) == ("remote tokenizer support" in done.stdout + done.stderr)
            runs[model] = (out, add_bos)
    finally:
        server.stop()

    loaded = load_model(tiny, device="cpu")
    store = SessionStore.open(state_dir, loaded.fingerprint)
    worst = 0.0
    for model, (out, add_bos) in runs.items():
        if model == base:
            state, delta = None, None
        else:
            stored = store.get(model, None)
            state, delta = stored.state, stored.delta
        rows = samples(out, "refine_tta_loglikelihood")
        assert len(rows) == 6
        for row in rows:
            context, continuation = row["arguments"]["gen_args_0"]["arg_0"], row["arguments"]["gen_args_0"]["arg_1"]
            theirs = float(row["resps"][0][0][0])
            ours = direct_loglikelihood(loaded.model, tok, state, delta, context, continuation, add_bos)
            assert abs(theirs - ours) < 1e-4, (model, context, theirs, ours)
            worst = max(worst, abs(theirs - ours))
        generated = samples(out, "refine_tta_generate")
        assert len(generated) == 4 and all(isinstance(row["resps"][0][0], str) for row in generated)
    store.close()
    print(f"loglikelihood: lm-eval vs a direct forward pass, largest difference {worst:.2e} over 12 requests")
