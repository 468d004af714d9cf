"""bf16 vs fp32 adaptation: do the fp32 masters keep the update, and what survives a bf16 read?

What is measured, for each scope and learning rate, on the model cast to bf16 and on the same
weights widened to fp32 (so both start from identical values), same document, same seed:

* ``changed``: fraction of the bf16 run's fp32 master entries that moved from their start;
* ``masters vs fp32``: relative L2 distance between the logit change (adapted - base, on a probe
  text) that the bf16 run's masters make and the one the fp32 run's delta makes, both read in fp32:
  how faithful bf16 *training* with fp32 masters is;
* ``bf16 read vs fp32``: the same, but the bf16 run's change read by the bf16 model (terms beside
  the weights, activations in bf16): what a bf16 server actually shows;
* ``lost if folded``: fraction of the delta's norm lost if it were added into the bf16 weights;
* ``|change|``: norm of the fp32 logit change relative to the logits' norm (bf16's resolution
  is 2^-8 = 3.9e-3).

    python -m benchmarks.mixed_precision                     # embedded model, L=512, lr 1e-6 and 1e-4
    python -m benchmarks.mixed_precision --lrs 1e-6 --scopes lora --tokens 1024
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as bc  # noqa: E402

SCOPES = {
    "full": dict(scope="full"),
    "projections": dict(scope="projections"),
    "lora": dict(scope="lora", lora_rank=8, lora_alpha=16.0),
    "layers": None,  # the last two blocks, set from the model
}


def probe_change(model, probe, delta, base):
    """Logits (fp32) of ``probe`` read with ``delta``, minus ``base``."""
    import torch

    from refine_tta.model.runtime import read

    with torch.no_grad(), delta.applied(model):
        return read(model, probe).logits.float() - base


def measure(bf16, fp32, ids, probe, cfg) -> list:
    import torch

    from refine_tta.model.runtime import read
    from refine_tta.refine.delta import scope_for
    from refine_tta.refine.loop import adapt

    low = adapt(bf16, ids, cfg)
    high = adapt(fp32, ids, cfg)
    start = scope_for(cfg).new_delta(bf16, torch.Generator().manual_seed(cfg.seed))
    changed = sum(int((low.delta.tensors[n] != t).sum()) for n, t in start.tensors.items())
    total = sum(t.numel() for t in start.tensors.values())
    with torch.no_grad():
        base32 = read(fp32, probe).logits.float()
        base16 = read(bf16, probe).logits.float()
    want = probe_change(fp32, probe, high.delta, base32)
    masters = probe_change(fp32, probe, low.delta, base32)
    read16 = probe_change(bf16, probe, low.delta, base16)
    rel = lambda x: float((x - want).norm() / want.norm())  # noqa: E731
    return [changed / total, rel(masters), rel(read16), low.delta.folded_loss(bf16),
            float(want.norm() / base32.norm())]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    p.add_argument("--tokens", type=int, default=512, help="document length")
    p.add_argument("--lrs", default="1e-6,1e-4")
    p.add_argument("--scopes", default=",".join(SCOPES))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--modes", default="refine,sft", help="refine samples rollouts (which may differ between bf16 and "
                                                          "fp32); sft (NTP only) isolates the numerics")
    p.add_argument("--out", type=Path, default=bc.REPO_ROOT / "benchmarks" / "results" / "mixed_precision.json")
    args = p.parse_args(argv)
    bc.quiet_logs()
    t0 = time.perf_counter()
    import torch

    from refine_tta.refine.config import RefineConfig

    loaded = bc.load(args.model, "cpu")
    bf16 = copy.deepcopy(loaded.model).to(torch.bfloat16)
    fp32 = copy.deepcopy(bf16).float()
    texts = bc.heldout_texts()
    ids = torch.tensor([bc.prose_ids(loaded.tokenizer, texts, args.tokens, "mixed-precision-doc")])
    probe = torch.tensor([bc.prose_ids(loaded.tokenizer, texts, 256, "mixed-precision-probe")])
    n = loaded.config.num_hidden_layers
    rows = []
    for mode in bc.str_list(args.modes):
        for lr in bc.float_list(args.lrs):
            for name in bc.str_list(args.scopes):
                kw = SCOPES[name] or dict(scope="layers", layers=(n - 2, n - 1))
                cfg = RefineConfig(mode=mode, steps=args.steps, lr=lr, reward="hybrid", seed=0, **kw)
                vals = measure(bf16, fp32, ids, probe, cfg)
                rows.append([mode, f"{lr:g}", name, f"{vals[0]:.4f}", f"{vals[1]:.3f}", f"{vals[2]:.3f}",
                             f"{vals[3]:.3f}", f"{vals[4]:.2e}"])
                print(rows[-1], file=sys.stderr)
    result = bc.new_result("mixed_precision")
    result["model"] = bc.model_info(loaded, args.model)
    result["settings"] = {"tokens": args.tokens, "steps": args.steps, "reward": "hybrid", "probe_tokens": 256}
    result["tables"] = [bc.table(
        f"bf16 vs fp32 adaptation, {loaded.name}, L={args.tokens}, {args.steps} steps",
        ["mode", "lr", "scope", "changed", "masters vs fp32", "bf16 read vs fp32", "lost if folded", "|change|"], rows)]
    result["notes"] = ["relative L2 distances of the probe-text logit change (adapted - base) from the fp32 run's"]
    bc.print_result(result)
    bc.write_result(result, args.out, t0)


if __name__ == "__main__":
    main()
