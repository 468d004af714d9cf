"""One adaptation: REFINE (or NTP-only, or nothing) on one document, from the base weights.

``adapt`` is the entry point. It trains the parameters of the config's scope for ``steps`` AdamW
steps, restores the base model bit for bit, and returns the change as a ``ParameterDelta``, the
document read with the adapted weights as a ``DocumentState``, and statistics for every step.

A REFINE step (spec: shared/refine-algorithm.md), on the **branch** path:

  1. read:    read x once with grad (``rollout.read_for_step``) -> NTP loss, entropy H_t and final
              hidden h_t per position (no grad), and the state after any prefix (with grad)
  2. select:  one rollout start per chunk from the smoothed entropy; the states at the starts
  3. rollout: sample k tokens per branch from those states (batched, no grad) -> old log-probs
  4. branch:  re-score the rollouts from the grad-carrying states -> log-probs, hidden states
  5. reward, group advantages, clipped policy loss; loss = sft * NTP + ppo * PPO; backward
  6. clip the gradient norm; skip the step if it is not finite; AdamW step

The read with gradients is the only pass over the document: an NTP-only step makes the same one.
The **reference** path (``path="reference"``) is the paper's: a scoring read with no grad
(``score_document``) for the selection, then every rollout re-reads its prefix (``_reference_losses``).
Both select the same positions and roll out the same tokens from the same generator.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass
from typing import Callable

import torch

from refine_tta.model.runtime import read
from refine_tta.model.state import DocumentState
from refine_tta.refine import objective as obj
from refine_tta.refine import rollout as ro
from refine_tta.refine.config import RefineConfig
from refine_tta.refine.delta import ParameterDelta, trainable_scope

PATHS = ("branch", "reference")
SCORE_SEGMENT_TOKENS = 4096


class AdaptCancelled(Exception):
    """should_stop() asked to stop; the base model has been restored and nothing was produced."""


@dataclass
class AdaptResult:
    """delta: the adapted parameters over the base; state: the document read with them (batch 1);
    stats: JSON-ready {"steps": [...], "total": {...}}."""

    delta: ParameterDelta
    state: DocumentState
    stats: dict


@dataclass
class ScorePass:
    """entropy [L] (nats), hidden [L, D] (last layer after the final norm), ntp: mean NTP loss."""

    entropy: torch.Tensor
    hidden: torch.Tensor
    ntp: float


class _Clock:
    """Seconds per phase (synchronising CUDA so the split is real)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.phases: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._t
        self._t = now


@torch.no_grad()
def score_document(model, ids: torch.Tensor, state: DocumentState | None = None,
                   segment_tokens: int = SCORE_SEGMENT_TOKENS) -> tuple[ScorePass, DocumentState]:
    """Read ids [1, L] without grad. Returns the per-position scores and the final state."""
    L = ids.shape[1]
    ents, hiddens, ce = [], [], 0.0
    for a in range(0, L, segment_tokens):
        b = min(a + segment_tokens, L)
        out = read(model, ids[:, a:b], state)
        state = out.state
        ents.append(obj.token_entropy(out.logits[0]))
        hiddens.append(out.hidden[0])
        n_pred = min(b, L - 1) - a
        if n_pred > 0:
            ce += float(ro.ce_sum(out.logits[0, :n_pred], ids[0, a + 1:a + 1 + n_pred]))
    ntp = ce / (L - 1) if L > 1 else float("nan")
    return ScorePass(torch.cat(ents), torch.cat(hiddens), ntp), state


@torch.no_grad()
def final_read(model, ids: torch.Tensor, segment_tokens: int = SCORE_SEGMENT_TOKENS) -> tuple[float, DocumentState]:
    """Read ids [1, L] without grad: the mean NTP loss and the final state (nothing else kept)."""
    L = ids.shape[1]
    state, ce = None, 0.0
    for a in range(0, L, segment_tokens):
        b = min(a + segment_tokens, L)
        out = read(model, ids[:, a:b], state)
        state = out.state
        n_pred = min(b, L - 1) - a
        if n_pred > 0:
            ce += float(ro.ce_sum(out.logits[0, :n_pred], ids[0, a + 1:a + 1 + n_pred]))
    return (ce / (L - 1) if L > 1 else float("nan")), state


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def _json_safe(value):
    """Stats as strict JSON: non-finite floats (a skipped step's grad norm or loss) become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _apply_update(params, opt, grad_clip: float, loss: torch.Tensor) -> tuple[float, bool]:
    """Clip, check finiteness, step. Returns (grad norm before clipping, skipped)."""
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    norm_f = float(norm)
    if not (math.isfinite(norm_f) and math.isfinite(float(loss))):
        opt.zero_grad(set_to_none=True)
        return norm_f, True
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm_f, False


def _true_continuations(ids: torch.Tensor, starts: torch.Tensor, k: int) -> torch.Tensor:
    """ids [1, L], starts [P] -> x[r:r+k] per start, [P, k]."""
    idx = starts.unsqueeze(1) + torch.arange(k, device=starts.device)
    return ids[0][idx.to(ids.device)]


def _rollout_stats(rewards: dict, tokens, true, logp_old, pl: obj.PolicyLossOut, adv) -> dict:
    out = {
        "reward_mean": float(rewards["reward"].mean()),
        "reward_std": float(rewards["reward"].std(unbiased=False)),
        "binary_mean": float(rewards["binary"].mean()),
        "exact_match_rate": float((tokens == true).all(-1).float().mean()),
        "policy_loss": float(pl.loss.detach()),
        "clip_fraction": float(pl.clip_fraction),
        "approx_kl": float(pl.approx_kl),
        "advantage_abs_mean": float(adv.abs().mean()),
        "rollout_logp_mean": float(logp_old.mean()),
    }
    if "cosine" in rewards:
        out["cosine_mean"] = float(rewards["cosine"].mean())
    return out


@dataclass
class StepInputs:
    """What both paths of one REFINE step share (spec steps 1-2, plus the rollout randomness).

    starts [P] rollout starts; uniforms [N, k] (N = P * n) the pre-drawn sampling uniforms;
    true [N, k] the true continuations; h_true [N, k, D] their hidden states from the score pass;
    groups [N] GRPO group ids.
    """

    score: ScorePass
    selection: obj.SelectedPositions
    starts: torch.Tensor
    uniforms: torch.Tensor
    true: torch.Tensor
    h_true: torch.Tensor
    groups: torch.Tensor


def step_inputs(model, ids, cfg: RefineConfig, gen: torch.Generator, clock: _Clock | None = None) -> StepInputs:
    """Score the document, select positions and draw the rollout uniforms (consumes ``gen``)."""
    score, _ = score_document(model, ids)
    if clock is not None:
        clock.lap("score")
    return _select(score, ids, cfg, gen, clock)


def branch_step_inputs(model, ids, cfg: RefineConfig, gen: torch.Generator,
                       clock: _Clock | None = None) -> tuple[StepInputs, ro.StepRead]:
    """Read the document once with grad, then select from that read's own entropy and draw the
    rollout uniforms (consumes ``gen`` as ``step_inputs`` does). Returns the inputs and the read."""
    doc = ro.read_for_step(model, ids)
    if clock is not None:
        clock.lap("read")
    score = ScorePass(doc.entropy, doc.hidden, float(doc.ntp_sum.detach()) / doc.n_targets)
    return _select(score, ids, cfg, gen, clock), doc


def _select(score: ScorePass, ids, cfg: RefineConfig, gen: torch.Generator, clock: _Clock | None) -> StepInputs:
    """Spec step 2 from a scored document, plus the rollout uniforms, true continuations and groups."""
    device = ids.device
    sel = obj.select_positions(score.entropy, cfg.n_chunks, cfg.k, cfg.selection, gen, cfg.edge_margin)
    starts = sel.starts.to(device)
    P, n, k = starts.shape[0], cfg.n, cfg.k
    N = P * n
    uniforms = torch.rand(N, k, generator=gen, device=gen.device).to(device)
    true = _true_continuations(ids, starts, k).repeat_interleave(n, 0)  # [N, k]
    h_idx = (starts.unsqueeze(1) + torch.arange(k, device=device)).repeat_interleave(n, 0)
    h_true = score.hidden[h_idx]  # [N, k, D]
    groups = obj.group_ids_for(P, n).to(device)
    if clock is not None:
        clock.lap("select")
    return StepInputs(score, sel, starts, uniforms, true, h_true, groups)


def refine_step(model, ids, cfg: RefineConfig, gen: torch.Generator, params, opt, path: str) -> dict:
    """One REFINE step (see module docstring). Returns its statistics."""
    device = ids.device
    clock = _Clock(device)
    if path == "branch":
        x, doc = branch_step_inputs(model, ids, cfg, gen, clock)
        stats = _branch_losses(model, ids, cfg, x.starts, x.uniforms, x.true, x.h_true, x.groups, clock, doc)
    else:
        x = step_inputs(model, ids, cfg, gen, clock)
        stats = _reference_losses(model, ids, cfg, x.starts, x.uniforms, x.true, x.h_true, x.groups, clock)
    loss = stats.pop("_loss")
    grad_norm, skipped = _apply_update(params, opt, cfg.grad_clip, loss)
    clock.lap("update")
    score, sel = x.score, x.selection
    stats.update(
        positions=x.starts.tolist(),
        picked_entropy_mean=float(score.entropy[sel.picked.to(device)].mean()),
        document_entropy_mean=float(score.entropy.mean()),
        ntp_loss_scored=score.ntp,
        loss=float(loss), grad_norm=grad_norm, skipped=skipped,
        seconds_by_phase={k_: round(v, 4) for k_, v in clock.phases.items()},
        seconds=sum(clock.phases.values()),
    )
    return stats


def _policy_loss(cfg, logp, logp_old, adv):
    return obj.clipped_policy_loss(logp, logp_old, adv, None, cfg.clip_low, cfg.clip_high, cfg.dual_clip)


def _branch_losses(model, ids, cfg, starts, uniforms, true, h_true, groups, clock,
                   doc: ro.StepRead | None = None) -> dict:
    """Spec steps 3-6 from shared-prefix branches; calls backward. Returns stats + '_loss'.

    doc: the step's read of the document (``branch_step_inputs``); None reads it here (inputs
    selected elsewhere, e.g. by ``step_inputs``)."""
    if doc is None:
        doc = ro.read_for_step(model, ids)
        clock.lap("read")
    ntp = doc.ntp_sum / doc.n_targets
    start_states = ro.repeat_branches(doc.prefixes.states_at(starts.tolist()), cfg.n)  # batch N, with grad
    clock.lap("states")
    tokens, logp_old = ro.sample_rollouts(model, start_states.detach(), uniforms, cfg.temperature)
    clock.lap("rollout")
    logp, h_roll = ro.branch_forward(model, start_states, tokens, cfg.temperature)
    rewards = obj.sequence_rewards(cfg.reward, tokens, true, h_roll.detach(), h_true)
    adv = obj.group_advantages(rewards["reward"], groups)
    pl = _policy_loss(cfg, logp, logp_old, adv)
    loss = obj.combined_loss(ntp, pl.loss, cfg.sft_coef, cfg.ppo_coef)
    clock.lap("branch")
    loss.backward()
    clock.lap("backward")
    N, k = tokens.shape
    L = ids.shape[1]
    stats = _rollout_stats(rewards, tokens, true, logp_old, pl, adv)
    stats.update(ntp_loss=float(ntp.detach()), _loss=loss.detach(), rollout_tokens=tokens.tolist(),
                 tokens_processed=L + doc.prefixes.tokens_read + N * (k - 1) + N * k)
    return stats


def _reference_losses(model, ids, cfg, starts, uniforms, true, h_true, groups, clock) -> dict:
    """Spec steps 3-6 the paper's way (every rollout re-reads its prefix); calls backward."""
    L, n, k = ids.shape[1], cfg.n, cfg.k
    rows = [int(r) for r in starts.tolist() for _ in range(n)]  # prefix length per rollout
    N = len(rows)
    ntp = obj.ntp_loss(read(model, ids).logits, ids)
    (cfg.sft_coef * ntp).backward()
    clock.lap("read")
    tokens = torch.stack([ro.reference_sample(model, ids, r, uniforms[i], cfg.temperature) for i, r in enumerate(rows)])
    clock.lap("rollout")
    with torch.no_grad():
        old = [ro.reference_score(model, ids, r, tokens[i], cfg.temperature) for i, r in enumerate(rows)]
    logp_old = torch.stack([o[0] for o in old])
    h_roll = torch.stack([o[1] for o in old])
    rewards = obj.sequence_rewards(cfg.reward, tokens, true, h_roll, h_true)
    adv = obj.group_advantages(rewards["reward"], groups)
    clock.lap("old_logprobs")
    logps, losses = [], []
    for i, r in enumerate(rows):  # update: re-read prefix + rollout with grad, one rollout at a time
        logp_i, _ = ro.reference_score(model, ids, r, tokens[i], cfg.temperature)
        pl_i = _policy_loss(cfg, logp_i.unsqueeze(0), logp_old[i:i + 1], adv[i:i + 1])
        (cfg.ppo_coef * pl_i.loss / N).backward()  # token-mean over all N*k tokens
        logps.append(logp_i.detach())
        losses.append(pl_i.loss.detach())
    clock.lap("backward")
    pl = _policy_loss(cfg, torch.stack(logps), logp_old, adv)  # statistics over all rollouts
    loss = cfg.sft_coef * ntp.detach() + cfg.ppo_coef * torch.stack(losses).mean()
    stats = _rollout_stats(rewards, tokens, true, logp_old, pl, adv)
    reread = sum(rows)
    stats.update(ntp_loss=float(ntp.detach()), _loss=loss, rollout_tokens=tokens.tolist(),
                 tokens_processed=2 * L + reread + N * (k - 1) + 2 * (reread + N * k))
    return stats


def sft_step(model, ids, cfg: RefineConfig, params, opt) -> dict:
    """One NTP-only step (the paper's "SFT" baseline)."""
    clock = _Clock(ids.device)
    ntp = obj.ntp_loss(read(model, ids).logits, ids)
    clock.lap("read")
    loss = cfg.sft_coef * ntp
    loss.backward()
    clock.lap("backward")
    grad_norm, skipped = _apply_update(params, opt, cfg.grad_clip, loss.detach())
    clock.lap("update")
    return {"ntp_loss": float(ntp.detach()), "loss": float(loss.detach()), "grad_norm": grad_norm, "skipped": skipped,
            "tokens_processed": ids.shape[1], "seconds_by_phase": {k: round(v, 4) for k, v in clock.phases.items()},
            "seconds": sum(clock.phases.values())}


def adapt(
    model: torch.nn.Module,
    document_ids: torch.Tensor,
    config: RefineConfig,
    *,
    path: str = "branch",
    on_step: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> AdaptResult:
    """Adapt ``model`` to document_ids [1, L] (on the model's device) from its base weights.

    The model's weights and requires_grad flags are exactly as before when this returns or raises.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if document_ids.dim() != 2 or document_ids.shape[0] != 1:
        raise ValueError(f"document_ids must be [1, L], got {tuple(document_ids.shape)}")
    L = document_ids.shape[1]
    config.validate_document(L)
    device = document_ids.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(config.seed)
    steps: list[dict] = []
    ntp_before = None
    was_training = model.training
    model.eval()
    try:
        if config.mode == "none" or config.steps == 0:
            delta = ParameterDelta("none")
        else:
            with trainable_scope(model, config, gen) as scope:
                opt = torch.optim.AdamW(scope.params, lr=config.lr, weight_decay=config.weight_decay)
                for i in range(config.steps):
                    if should_stop is not None and should_stop():
                        raise AdaptCancelled(f"cancelled before step {i + 1} of {config.steps}")
                    if config.mode == "refine":
                        s = refine_step(model, document_ids, config, gen, scope.params, opt, path)
                        first_ntp = s["ntp_loss_scored"]
                    else:
                        s = sft_step(model, document_ids, config, scope.params, opt)
                        first_ntp = s["ntp_loss"]
                    ntp_before = first_ntp if ntp_before is None else ntp_before
                    s.update(step=i + 1, of=config.steps, peak_memory_mb=round(_peak_memory_mb(device), 1))
                    s = _json_safe(s)
                    steps.append(s)
                    if on_step is not None:
                        on_step(s)
                delta = scope.delta()
        if should_stop is not None and should_stop():
            raise AdaptCancelled("cancelled before reading the document with the adapted weights")
        clock = _Clock(device)
        with delta.applied(model):
            final_ntp, state = final_read(model, document_ids)
        clock.lap("final_read")
    finally:
        model.train(was_training)
    total = {
        "mode": config.mode, "path": path, "document_tokens": L, "steps": len(steps),
        "skipped_steps": sum(int(s.get("skipped", False)) for s in steps),
        "ntp_loss_before": final_ntp if ntp_before is None else ntp_before,
        "ntp_loss_after": final_ntp,
        "tokens_processed": sum(s["tokens_processed"] for s in steps) + L,
        "seconds_adapt": sum(s["seconds"] for s in steps),
        "seconds_final_read": clock.phases["final_read"],
        "seconds": time.perf_counter() - t0,
        "peak_memory_mb": round(_peak_memory_mb(device), 1),
        "delta_bytes": delta.nbytes, "state_bytes": state.nbytes,
    }
    if steps and config.mode == "refine":
        total["reward_mean_first"] = steps[0]["reward_mean"]
        total["reward_mean_last"] = steps[-1]["reward_mean"]
    return AdaptResult(delta, state, {"steps": steps, "total": _json_safe(total)})
