"""Time to move a session between replicas: one replica adapts and stores it, another loads it from
the shared store (what ``refine-tta serve --replicas N`` does when a request for a session reaches
a replica that does not hold it; docs/ray.md).

What is measured, per document length (default 1K and 8K tokens of held-out prose): replica A (an
engine on a shared state directory) adapts to the document (``--mode``, ``--steps``: the session's
size depends on the model and the scope, not on the steps) and stores the session; replica B (a
second session store on the same directory, shared lock, as a second replica process has) then
calls ``SessionStore.preload``: read every file, check its SHA-256, parse, move to the device.
"first load" includes finding the unknown session on disk (reading and checking ``meta.json``);
"reload" is the median of ``--reps`` loads after dropping the tensors from memory (files already
indexed). The files were just written, so they come from the page cache: on a network volume
(NFS, EFS) add the volume's read time for the bytes shown.

    python -m benchmarks.session_move                  # ~1-2 min on 2 CPU cores with the default model
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as bc  # noqa: E402


def shared_store(directory: Path, loaded):
    """A session store on ``directory`` under a shared lock, as each replica opens it."""
    from refine_tta.engine import LockMode, SessionStorage, SessionStore, StateDirLock

    lock = StateDirLock.acquire(directory, LockMode.SHARED)
    return SessionStore(SessionStorage(directory, loaded.fingerprint, lock), device=loaded.device), lock


def measure(engine, other, text: str, config, reps: int) -> dict:
    """Adapt on ``engine`` (replica A), then load the session into ``other`` (replica B)."""
    t = time.perf_counter()
    session = engine.submit_adapt(text, config, None).future.result()
    adapt_s = time.perf_counter() - t
    t = time.perf_counter()
    assert other.preload(session.id) is True
    first_s = time.perf_counter() - t
    reloads = []
    for _ in range(reps):
        other.release(session.id)
        t = time.perf_counter()
        assert other.preload(session.id) is True
        reloads.append(time.perf_counter() - t)
    return {"session_id": session.id, "document_tokens": session.document_tokens, "adapt_s": adapt_s,
            "disk_bytes": session.disk_bytes, "state_bytes": session.state_bytes, "delta_bytes": session.delta_bytes,
            "first_load_s": first_s, "reload_s": bc.median(reloads), "reload_all_s": reloads}


def parse_args(argv=None) -> argparse.Namespace:
    p = bc.arg_parser("python -m benchmarks.session_move", __doc__)
    p.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--lengths", default="1024,8192", help="document lengths in tokens")
    p.add_argument("--mode", default="sft", choices=["refine", "sft"])
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=bc.RESULTS_DIR / "session_move.json")
    args = p.parse_args(argv)
    args.command = bc.command_line("python -m benchmarks.session_move", argv)
    return args


def main(argv=None) -> int:
    from refine_tta.engine import Engine, EngineLimits
    from refine_tta.refine.config import RefineConfig, preset

    args = parse_args(argv)
    bc.quiet_logs()
    t0 = time.perf_counter()
    loaded = bc.load(args.model, args.device)
    config = RefineConfig.from_dict({**preset("embedded"), "mode": args.mode, "steps": args.steps})
    texts = bc.heldout_texts()
    rows, runs = [], []
    with tempfile.TemporaryDirectory(prefix="refine-move-") as tmp:
        store_a, lock_a = shared_store(Path(tmp), loaded)
        store_b, lock_b = shared_store(Path(tmp), loaded)
        engine = Engine(loaded, store_a, EngineLimits()).start()
        try:
            for n in bc.int_list(args.lengths):
                ids = bc.prose_ids(loaded.tokenizer, texts, n, seed=f"move:{n}")
                run = measure(engine, store_b, loaded.tokenizer.decode(ids[1:]), config, args.reps)
                runs.append(run)
                mb = run["disk_bytes"] / 2**20
                rows.append([str(run["document_tokens"]), f"{mb:.1f}", f"{run['first_load_s'] * 1000:.0f}",
                             f"{run['reload_s'] * 1000:.0f}", f"{mb / run['reload_s']:.0f}",
                             f"{run['adapt_s']:.1f}"])
                print(f"{n} tokens: {mb:.1f} MiB, first load {run['first_load_s'] * 1000:.0f} ms, "
                      f"reload {run['reload_s'] * 1000:.0f} ms", file=sys.stderr, flush=True)
        finally:
            engine.stop()
            store_b.close()
            lock_a.release()
            lock_b.release()
    result = bc.new_result("session_move", args.device, command=args.command)
    result.update(model=bc.model_info(loaded, args.model), config=config.to_dict(), runs=runs,
                  tables=[bc.table(f"Moving a session between replicas (store load; {config.scope} scope, "
                                   f"{loaded.dtype})".replace("torch.", ""),
                                   ["document tokens", "session MiB on disk", "first load ms", "reload ms (median)",
                                    "MiB/s", "adapt s (replica A)"], rows)])
    result["notes"].append("Loaded from the page cache (files just written); a network volume adds its read time.")
    bc.print_result(result)
    bc.write_result(result, args.out, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
