"""The benchmark scripts still run end to end: smallest scale, a random micro model, JSON + PNG written.

Not a timing test: it asserts the result files' shape (the keys BENCHMARKS.md and the report rely
on), that the tables have a row per measured item, and that ``benchmarks.report`` renders them.
The micro model (2 layers, hidden 64) uses the shipped tokenizer, so documents and prompts are
built exactly as in a real run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from benchmarks import adapt_step, decode_batch, latency, quality, report

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "models" / "refine-tiny-deltanet"
COMMON_KEYS = {"benchmark", "command", "machine", "started", "seconds", "tables", "notes", "plot"}


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory) -> Path:
    """A random DeltaNet saved like the embedded model (config, safetensors, tokenizer files)."""
    from refine_tta.model.loading import register_fla_models

    register_fla_models()
    from fla.models import DeltaNetConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("micro-model")
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = DeltaNetConfig(hidden_size=64, num_heads=2, num_hidden_layers=2, vocab_size=len(tok),
                            tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, fuse_cross_entropy=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TOKENIZER_DIR / name, out / name)
    return out


@pytest.fixture(scope="module")
def quality_out(micro_model, tmp_path_factory) -> Path:
    """quality.py at its smallest: one 128-token document, one step, all three arms."""
    out = tmp_path_factory.mktemp("quality") / "quality.json"
    assert quality.main(["--model", str(micro_model), "--lengths", "128", "--docs-per-length", "1", "--steps", "1",
                         "--out", str(out)]) == 0
    return out


def read_result(path: Path) -> dict:
    result = json.loads(path.read_text())
    assert COMMON_KEYS <= set(result), COMMON_KEYS - set(result)
    assert (path.parent / result["plot"]).stat().st_size > 0
    for t in result["tables"]:
        assert t["rows"] and all(len(row) == len(t["columns"]) for row in t["rows"])
    return result


def test_quality_smoke(quality_out):
    result = read_result(quality_out)
    assert result["arms"] == ["none", "sft", "refine"]
    assert {"summary", "documents", "configs", "docs_planned", "docs_done", "budget_exhausted"} <= set(result)
    assert result["budget_exhausted"] is False
    (doc,) = result["documents"]
    assert set(doc["arms"]) == {"none", "sft", "refine"}
    expected = {"correct", "completion", "answer_nll", "seconds_adapt", "ntp_before", "ntp_after"}
    assert expected <= set(doc["arms"]["sft"])
    assert result["summary"]["all"]["paired"]["refine-sft"]["n"] == 1
    # the arms share everything but the mode
    configs = result["configs"]
    assert {k: v for k, v in configs["sft"].items() if k != "mode"} == \
        {k: v for k, v in configs["refine"].items() if k != "mode"}


def test_quality_sweep_and_budget_smoke(micro_model, tmp_path):
    out = tmp_path / "sweep.json"
    assert quality.main(["--sweep", "--model", str(micro_model), "--lengths", "128", "--docs-per-length", "1",
                         "--sweep-lrs", "1e-3", "--sweep-steps", "1", "--out", str(out)]) == 0
    result = read_result(out)
    assert set(result["recommended"]) == {"sft", "refine"}
    assert set(result["summary"]) == {"none", "sft lr=0.001 steps=1", "refine/binary lr=0.001 steps=1"}
    # a spent budget runs no document and says so
    out2 = tmp_path / "budget.json"
    assert quality.main(["--model", str(micro_model), "--lengths", "128", "--docs-per-length", "2",
                         "--time-budget-min", "1e-9", "--out", str(out2)]) == 0
    spent = json.loads(out2.read_text())
    assert spent["budget_exhausted"] is True and spent["documents"] == []
    assert any("time budget" in note for note in spent["notes"])


def test_latency_smoke(micro_model, tmp_path):
    out = tmp_path / "latency.json"
    assert latency.main(["--model", str(micro_model), "--lengths", "64,128", "--reps", "1", "--max-new-tokens", "4",
                         "--out", str(out)]) == 0
    result = read_result(out)
    assert [r["length"] for r in result["rows"]] == [64, 128]
    row = result["rows"][0]
    assert {"read_s", "ttft_s", "tokens_per_s", "state_bytes"} <= set(row["state"])
    assert {"ttft_s", "tokens_per_s"} <= set(row["reread"])
    assert row["state"]["state_bytes"] == result["rows"][1]["state"]["state_bytes"]  # state size is length-free


LACT_CONFIG = REPO / "benchmarks" / "configs" / "lact-small"


def test_latency_and_adapt_step_accept_the_lact_config(tmp_path):
    """The small LaCT configuration (config.json only: random weights) with the shipped tokenizer."""
    out = tmp_path / "latency.json"
    assert latency.main(["--model", str(LACT_CONFIG), "--tokenizer", str(TOKENIZER_DIR), "--lengths", "64",
                         "--reps", "1", "--max-new-tokens", "3", "--out", str(out)]) == 0
    result = read_result(out)
    assert result["model"]["model_type"] == "lact_swiglu" and result["model"]["weights"] != "trained"
    assert result["rows"][0]["state"]["state_bytes"] > 0
    out = tmp_path / "adapt_step.json"
    assert adapt_step.main(["--model", str(LACT_CONFIG), "--tokenizer", str(TOKENIZER_DIR), "--lengths", "96",
                            "--ns", "1", "--n-chunks", "2", "--repeats", "1", "--out", str(out)]) == 0
    result = read_result(out)
    assert result["model"]["model_type"] == "lact_swiglu"
    (row,) = result["rows"]
    assert row["ratio"] > 0 and row["refine_over_ntp"] > 0 and row["same_rollouts"] is True


def test_decode_batch_smoke(micro_model, tmp_path):
    out = tmp_path / "decode_batch.json"
    assert decode_batch.main(["--model", str(micro_model), "--sessions", "1,3", "--doc-tokens", "64", "--reps", "1",
                              "--max-new-tokens", "4", "--out", str(out)]) == 0
    result = read_result(out)
    assert [r["sessions"] for r in result["rows"]] == [1, 3]
    assert all(r["same_tokens"] for r in result["rows"])
    assert result["rows"][1]["generated_tokens"] == 3 * 4 and result["rows"][1]["batched_steps"] == 4


def test_adapt_step_smoke(micro_model, tmp_path):
    from benchmarks import adapt_step

    out = tmp_path / "adapt_step.json"
    assert adapt_step.main(["--model", str(micro_model), "--lengths", "96", "--ns", "1", "--repeats", "1",
                            "--threads", "1", "--out", str(out)]) == 0
    result = read_result(out)
    (row,) = result["rows"]
    assert {"ntp", "branch", "reference"} <= set(row)
    assert row["same_positions"] is True and row["same_rollouts"] is True  # the paths differ in cost only
    for key in ("ratio", "refine_over_ntp", "ratio_cpu", "refine_over_ntp_cpu"):
        assert row[key] > 0, key
    assert row["branch"]["tokens_processed"] < row["reference"]["tokens_processed"]
    assert "score" not in row["branch"]["phases_s"] and "score" in row["reference"]["phases_s"]
    assert result["tables"][0]["columns"][-2:] == ["reference / branch (CPU s)", "branch / NTP (CPU s)"]


def test_report_renders_results(quality_out, tmp_path):
    shutil.copy(quality_out, tmp_path / "quality.json")
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# B\n<!-- results:quality -->\nold\n<!-- /results:quality -->\n"
                   "<!-- results:latency -->\nold\n<!-- /results:latency -->\n")
    assert report.main(["--doc", str(doc), "--results", str(tmp_path)]) == 0
    text = doc.read_text()
    assert "python -m benchmarks.quality" in text and "| none % [95% CI] |" in text
    assert "_Not run yet._ Run `python -m benchmarks.latency`" in text
    assert report.main(["--doc", str(doc), "--results", str(tmp_path), "--check"]) == 0


def test_gpu_speed_code_path_on_cpu(tmp_path):
    """gpu_speed.py runs only where a GPU is lent; its code path must keep working on the CPU."""
    from benchmarks import gpu_speed

    out = tmp_path / "gpu.json"
    assert gpu_speed.main(["--tiny", "--device", "cpu", "--tokens", "128", "--check-tokens", "32",
                           "--decode-tokens", "8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["kernels"]) == {"float32", "bfloat16"}
    assert result["kernels"]["float32"]["passed"] is True
    step = result["refine_step"]
    assert step["same_positions"] is True and step["loss_abs_diff"] < 1e-4  # branch == reference
    assert {"prefill_s", "decode_tokens_per_s", "state_mb"} <= set(result["prefill_decode"])


def test_benchmarks_md_is_generated_from_the_results():
    """BENCHMARKS.md shows exactly what benchmarks/results/*.json hold (python -m benchmarks.report)."""
    assert report.main(["--check"]) == 0
