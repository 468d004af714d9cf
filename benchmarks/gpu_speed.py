"""GPU check at DeltaNet-1.3B size: fla's Triton kernels vs ours, REFINE step cost, prefill and decode.

What is measured, on a randomly initialised DeltaNet with the configuration of
``fla-hub/delta_net-1.3B-100B`` (hidden 2048, 24 layers, 16 heads, vocab 32000, expand_k =
expand_v = 1, short convolutions of size 4, no output gate, l2 q/k norm, silu, MLP ratio 4; no
weights are needed to time it or to compare kernels):

1. **kernels** -- the same weights read the same ``--check-tokens`` (2K) random tokens with
   backend ``fla`` (Triton) and backend ``torch`` (``refine_tta.kernels``, plain PyTorch, which
   also runs on CUDA), in fp32 and in bf16. Compared: logits (relative L2 error, max absolute
   difference, top-1 agreement) and every layer's final recurrent and convolution state (worst
   relative L2 error). Pass: relative errors <= 2e-2 in fp32 (fla's Triton dots run fp32 inputs
   in TF32) and <= 1e-1 in bf16 (a sanity bound: both round every activation to 8 bits).
2. **refine step** -- one REFINE step (n_chunks 8, k 5, n 1, reward binary, ``--scope``) on
   ``--tokens`` (16K) tokens, on the ``branch`` path (read once, roll out from carried states)
   and the ``reference`` path (re-read every prefix, the paper's code), after one warm-up step;
   seconds per phase and peak memory. Both paths draw the same positions and rollouts, so their
   loss and reward must agree.
3. **prefill / decode** -- ``read_document`` of ``--tokens`` tokens (seconds, tokens/s), then
   ``generate`` of ``--decode-tokens`` tokens from the state (greedy; decode tokens/s).

Speed runs use ``--dtype`` (bf16) with the fla backend. Each part records its error instead of
stopping the others. Writes ``$OUT/gpu.json`` when ``$OUT`` is set, else
``benchmarks/results/gpu.json``. ``--tiny --device cpu`` runs the same code on a small config in
seconds (the fla comparison is skipped: Triton needs CUDA), for tests.

    bash benchmarks/gpu.sh                               # on a CUDA machine, ~4-8 min on one H200
    python benchmarks/gpu_speed.py --tiny --device cpu   # the code path, anywhere
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as bc  # noqa: E402

# fla-hub/delta_net-1.3B-100B
FULL_CONFIG = dict(hidden_size=2048, num_hidden_layers=24, num_heads=16, vocab_size=32000, expand_k=1.0, expand_v=1.0,
                   use_short_conv=True, conv_size=4, use_gate=False, qk_norm="l2", qk_activation="silu",
                   hidden_ratio=4, use_beta=True, use_output_norm=True, tie_word_embeddings=False)
TINY_CONFIG = {**FULL_CONFIG, "hidden_size": 128, "num_hidden_layers": 2, "num_heads": 2, "vocab_size": 1024}
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}
TOLERANCE = {"float32": 2e-2, "bfloat16": 1e-1}  # relative L2 error, fla vs torch kernels


def build_model(config: dict, device, dtype, seed: int):
    """A randomly initialised fla DeltaNet, created directly on ``device`` (no backend installed yet)."""
    import torch

    from refine_tta.model.loading import register_fla_models

    register_fla_models()
    from fla.models import DeltaNetConfig
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(DeltaNetConfig(**config, fuse_cross_entropy=False))
    return model.to(dtype).eval()


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in fp32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --- 1. kernels ---------------------------------------------------------------------------------

def check_kernels(config: dict, device, dtype, n_tokens: int, tolerance: float, seed: int) -> dict:
    """Backend 'fla' vs 'torch' on the same weights and tokens: logits and final states.

    Without CUDA the fla backend cannot run; 'torch' is then compared with itself, which only
    exercises this comparison (the result says so in ``skipped``)."""
    import torch

    from refine_tta.model import prepare_model, read

    base = build_model(config, device, dtype, seed)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config["vocab_size"], (1, n_tokens), generator=gen).to(device)
    reference = "fla" if device.type == "cuda" else "torch"
    outs = []
    for name in (reference, "torch"):
        model = copy.deepcopy(base) if not outs else base
        prepare_model(model, device, backend=name)
        with torch.no_grad():
            t = time.perf_counter()
            out = read(model, ids)
            sync(device)
            outs.append({"backend": name, "logits": out.logits, "state": out.state,
                         "seconds": round(time.perf_counter() - t, 4)})
        del model
    a, b = outs
    rec = max(rel_err(la.recurrent, lb.recurrent) for la, lb in zip(a["state"].layers, b["state"].layers))
    conv = max((rel_err(x, y) for la, lb in zip(a["state"].layers, b["state"].layers)
                for x, y in zip(la.conv or (), lb.conv or ())), default=0.0)
    result = {"tokens": n_tokens, "dtype": str(dtype).replace("torch.", ""), "tolerance": tolerance,
              "backends": [a["backend"], b["backend"]], "seconds": [a["seconds"], b["seconds"]],
              "logits_rel_l2": rel_err(a["logits"], b["logits"]),
              "logits_max_abs": float((a["logits"].float() - b["logits"].float()).abs().max()),
              "logits_scale": float(b["logits"].float().abs().max()),
              "top1_agreement": float((a["logits"].argmax(-1) == b["logits"].argmax(-1)).float().mean()),
              "recurrent_state_rel_l2_worst_layer": rec, "conv_state_rel_l2_worst_layer": conv}
    result["passed"] = max(result["logits_rel_l2"], rec, conv) <= tolerance
    if reference != "fla":
        result["skipped"] = "no CUDA: the fla backend cannot run; torch was compared with itself"
    return result


# --- 2. refine step -----------------------------------------------------------------------------

def refine_step_times(model, device, vocab: int, n_tokens: int, scope: str, seed: int) -> dict:
    """One REFINE step on the branch and the reference path (after a warm-up branch step)."""
    import torch

    from refine_tta.refine.config import RefineConfig
    from refine_tta.refine.loop import adapt

    ids = torch.randint(0, vocab, (1, n_tokens), generator=torch.Generator().manual_seed(seed + 1)).to(device)
    cfg = RefineConfig(mode="refine", steps=1, n_chunks=8, k=5, n=1, reward="binary", scope=scope, seed=seed)
    out = {"tokens": n_tokens, "config": cfg.to_dict()}
    t = time.perf_counter()
    adapt(model, ids, cfg, path="branch")  # warm-up: Triton compilation and autotuning
    out["warmup_s"] = round(time.perf_counter() - t, 2)
    for path in ("branch", "reference"):
        if device.type == "cuda":
            torch.cuda.empty_cache()
        res = adapt(model, ids, cfg, path=path)
        step = res.stats["steps"][0]
        out[path] = {"step_s": round(step["seconds"], 4), "phases_s": step["seconds_by_phase"],
                     "loss": step["loss"], "reward_mean": step["reward_mean"], "positions": step["positions"],
                     "tokens_processed": step["tokens_processed"], "peak_memory_mb": step["peak_memory_mb"],
                     "final_read_s": round(res.stats["total"]["seconds_final_read"], 4)}
        print(f"  refine step ({path}): {step['seconds']:.2f} s", file=sys.stderr, flush=True)
    b, r = out["branch"], out["reference"]
    out["reference_over_branch"] = round(r["step_s"] / b["step_s"], 2)
    out["same_positions"] = b["positions"] == r["positions"]
    out["loss_abs_diff"] = abs(b["loss"] - r["loss"])
    out["reward_abs_diff"] = abs(b["reward_mean"] - r["reward_mean"])
    return out


# --- 3. prefill and decode ----------------------------------------------------------------------

def prefill_decode(model, device, vocab: int, n_tokens: int, decode_tokens: int, seed: int) -> dict:
    import torch

    from refine_tta.model import read_document
    from refine_tta.model.decoding import TokenSampling, generate_tokens

    ids = torch.randint(0, vocab, (1, n_tokens), generator=torch.Generator().manual_seed(seed + 2)).to(device)
    read_document(model, ids[:, :min(n_tokens, 1024)])  # warm-up
    sync(device)
    t = time.perf_counter()
    state = read_document(model, ids)
    sync(device)
    prefill_s = time.perf_counter() - t
    generate_tokens(model, state, [1], TokenSampling(max_new_tokens=4))  # warm-up
    g = generate_tokens(model, state, [1], TokenSampling(max_new_tokens=decode_tokens))
    return {"tokens": n_tokens, "prefill_s": round(prefill_s, 4),
            "prefill_tokens_per_s": round(n_tokens / prefill_s, 1),
            "decode_tokens": len(g.tokens), "decode_tokens_per_s": round(g.tokens_per_s, 1),
            "ttft_from_state_s": round(g.ttft_s, 5), "state_mb": round(state.nbytes / 2**20, 2)}


# --- driver -------------------------------------------------------------------------------------

def guarded(name: str, fn, *args) -> dict:
    """Run one part; on failure record the error (and traceback) instead of stopping."""
    t = time.perf_counter()
    print(f"[{name}] ...", file=sys.stderr, flush=True)
    try:
        out = fn(*args)
    except Exception as exc:  # a failing part must not hide the others' numbers
        out = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        print(out["traceback"], file=sys.stderr)
    out["wall_s"] = round(time.perf_counter() - t, 2)
    print(f"[{name}] done in {out['wall_s']} s", file=sys.stderr, flush=True)
    return out


def tables(res: dict) -> list[dict]:
    r, p = res.get("refine_step", {}), res.get("prefill_decode", {})
    rows = []
    for name, k in res.get("kernels", {}).items():
        if "logits_rel_l2" in k:
            rows.append([f"{' vs '.join(k['backends'])} kernels, {k['tokens']} tokens {name}",
                         f"logits rel {k['logits_rel_l2']:.1e}, "
                         f"states rel {k['recurrent_state_rel_l2_worst_layer']:.1e}, "
                         f"top-1 {100 * k['top1_agreement']:.1f}% ({'pass' if k['passed'] else 'FAIL'} at "
                         f"{k['tolerance']:g})"])
        else:
            rows.append([f"fla vs torch kernels, {name}", (k.get("error") or k.get("skipped", ""))[:200]])
    for path in ("branch", "reference"):
        if path in r:
            rows.append([f"REFINE step, {path} path, {r['tokens']} tokens",
                         f"{r[path]['step_s']:.2f} s, peak {r[path]['peak_memory_mb'] / 1024:.1f} GiB"])
    if "reference_over_branch" in r:
        rows.append(["reference / branch step time", f"{r['reference_over_branch']:.1f}x "
                     f"(same positions: {r['same_positions']}, loss diff {r['loss_abs_diff']:.1e})"])
    elif "error" in r:
        rows.append(["REFINE step", r["error"][:200]])
    if "prefill_s" in p:
        rows.append([f"prefill {p['tokens']} tokens",
                     f"{p['prefill_s']:.3f} s ({p['prefill_tokens_per_s']:.0f} tok/s)"])
        rows.append([f"decode from the state ({p['decode_tokens']} tokens)", f"{p['decode_tokens_per_s']:.1f} tok/s, "
                     f"state {p['state_mb']:.1f} MiB"])
    elif "error" in p:
        rows.append(["prefill / decode", p["error"][:200]])
    return [bc.table(f"DeltaNet {res['config_name']} (random weights) on {res['machine'].get('gpu') or res['device']}",
                     ["measure", "result"], rows)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_speed.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="small config and lengths (a CPU test of the code path)")
    p.add_argument("--tokens", type=int, default=None, help="document length for parts 2-3 (default 16384; tiny 512)")
    p.add_argument("--check-tokens", type=int, default=None, help="length of the kernel check (default 2048; tiny 128)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="dtype of parts 2-3 (default bf16 on CUDA)")
    p.add_argument("--scope", default="full", choices=["full", "lora"])
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--skip", default="", help="parts to skip: kernels,refine,prefill")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="default $OUT/gpu.json, else benchmarks/results/gpu.json")
    args = p.parse_args(argv)
    args.command = bc.command_line("python benchmarks/gpu_speed.py", argv)
    args.tokens = args.tokens or (512 if args.tiny else 16384)
    args.check_tokens = args.check_tokens or (128 if args.tiny else 2048)
    if args.out is None:
        args.out = Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else bc.RESULTS_DIR / "gpu.json"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    bc.quiet_logs()
    t0 = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run with --tiny --device cpu to test the code path")
    dtype = getattr(torch, DTYPES[args.dtype] if args.dtype else ("bfloat16" if device.type == "cuda" else "float32"))
    config = TINY_CONFIG if args.tiny else FULL_CONFIG
    skip = set(bc.str_list(args.skip))
    res = bc.new_result("gpu", args.device, command=args.command)
    res.update(config_name="tiny" if args.tiny else "1.3B (fla-hub/delta_net-1.3B-100B config)", config=config,
               device=str(device), dtype=str(dtype).replace("torch.", ""),
               versions={"torch": torch.__version__, "cuda": torch.version.cuda,
                         "triton": _version("triton"), "fla": _version("fla-core"),
                         "transformers": _version("transformers")})
    if "kernels" not in skip:
        res["kernels"] = {name: guarded(f"kernels {name}", check_kernels, config, device, getattr(torch, name),
                                        args.check_tokens, TOLERANCE[name], args.seed)
                          for name in ("float32", "bfloat16")}
    if skip >= {"refine", "prefill"}:
        model = None
    else:
        from refine_tta.model import prepare_model

        model = build_model(config, device, dtype, args.seed)
        res["backend"] = prepare_model(model, device).name
        res["parameters"] = sum(p.numel() for p in model.parameters())
    if "refine" not in skip:
        res["refine_step"] = guarded("refine step", refine_step_times, model, device, config["vocab_size"], args.tokens,
                                     args.scope, args.seed)
    if "prefill" not in skip:
        res["prefill_decode"] = guarded("prefill/decode", prefill_decode, model, device, config["vocab_size"],
                                        args.tokens, args.decode_tokens, args.seed)
    res["tables"] = tables(res)
    parts = {f"kernels {k}": v for k, v in res.get("kernels", {}).items()}
    parts.update({k: res[k] for k in ("refine_step", "prefill_decode") if k in res})
    failed = [name for name, part in parts.items() if "error" in part]
    disagree = [name for name, part in parts.items() if part.get("passed") is False]
    if failed:
        res["notes"].append(f"parts that failed: {', '.join(failed)} (see 'error' and 'traceback' in the JSON)")
    if disagree:
        res["notes"].append(f"fla and torch kernels disagree beyond the tolerance: {', '.join(disagree)}")
    bc.print_result(res)
    bc.write_result(res, args.out, t0)
    return 1 if failed or disagree else 0


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
