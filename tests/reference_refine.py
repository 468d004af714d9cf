"""An independent REFINE step, written from the paper's formulas over fla's naive delta rule.

Shares nothing with ``refine_tta.refine`` or ``refine_tta.model`` beyond the *inputs* of a step
(the rollout starts and the pre-drawn sampling uniforms): the DeltaNet forward is re-written here
from the architecture (RMSNorm, short causal convolutions with SiLU, L2-normalised q/k, sigmoid
beta, ``fla.ops.delta_rule.naive.delta_rule_recurrence``, per-head output norm, SwiGLU MLP), every
rollout re-reads its prefix token by token as the paper's code does, and rewards, GRPO advantages
and the dual-clip PPO loss are written out from their definitions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fla.ops.delta_rule.naive import delta_rule_recurrence


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def causal_conv_silu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, D], w [D, 1, W]: y[t] = silu(sum_i w[:, i] * x[t - W + 1 + i])."""
    W = w.shape[-1]
    padded = torch.cat([x.new_zeros(W - 1, x.shape[1]), x], 0)  # [T + W - 1, D]
    y = sum(padded[i:i + x.shape[0]] * w[:, 0, i] for i in range(W))
    return F.silu(y)


def forward(p: dict[str, torch.Tensor], cfg, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [T, V] and final-norm hidden states [T, D] of a DeltaNet reading ``ids`` from nothing."""
    eps, H = cfg.norm_eps, cfg.num_heads
    x = p["model.embeddings.weight"][torch.tensor(ids)]  # [T, D]
    for i in range(cfg.num_hidden_layers):
        a = f"model.layers.{i}."
        h = rms(x, p[a + "attn_norm.weight"], eps)
        q = causal_conv_silu(h @ p[a + "attn.q_proj.weight"].T, p[a + "attn.q_conv1d.weight"])
        k = causal_conv_silu(h @ p[a + "attn.k_proj.weight"].T, p[a + "attn.k_conv1d.weight"])
        v = causal_conv_silu(h @ p[a + "attn.v_proj.weight"].T, p[a + "attn.v_conv1d.weight"])
        beta = torch.sigmoid(h @ p[a + "attn.b_proj.weight"].T)  # [T, H]
        T = x.shape[0]
        q, k, v = (t.view(T, H, -1).transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, T, d]
        q, k = (t * torch.rsqrt(t.pow(2).sum(-1, keepdim=True) + 1e-6) for t in (q, k))  # fla's l2norm
        o, _ = delta_rule_recurrence(q, k, v, beta.T.unsqueeze(0))  # [1, H, T, dv]
        o = rms(o[0].transpose(0, 1), p[a + "attn.o_norm.weight"], eps).reshape(T, -1)
        x = x + o @ p[a + "attn.o_proj.weight"].T
        h = rms(x, p[a + "mlp_norm.weight"], eps)
        up = F.silu(h @ p[a + "mlp.gate_proj.weight"].T) * (h @ p[a + "mlp.up_proj.weight"].T)
        x = x + up @ p[a + "mlp.down_proj.weight"].T
    hidden = rms(x, p["model.norm.weight"], eps)
    head = p.get("lm_head.weight", p["model.embeddings.weight"])
    return hidden @ head.T, hidden


def sample(logits: torch.Tensor, u: float) -> int:
    """Inverse CDF: the first token whose cumulative probability exceeds u."""
    cdf = torch.softmax(logits, -1).cumsum(-1)
    return int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])]), right=True).clamp_max(len(cdf) - 1))


def refine_loss(p, cfg, doc: list[int], starts: list[int], uniforms: torch.Tensor, rc) -> dict:
    """The REFINE loss of one step (rc: a RefineConfig; temperature 1), from the definitions.

    Returns loss (with grad into p), tokens [N][k], old log-probs [N, k], advantages [N].
    """
    n, k = rc.n, rc.k
    logits, hidden = forward(p, cfg, doc)
    ntp = F.cross_entropy(logits[:-1], torch.tensor(doc[1:]))  # mean over the L - 1 predictions
    rows = [r for r in starts for _ in range(n)]
    tokens, old, rewards = [], [], []
    with torch.no_grad():
        for j, r in enumerate(rows):
            seq = list(doc[:r])
            for i in range(k):  # re-read the prefix (and what was sampled) for every token
                seq.append(sample(forward(p, cfg, seq)[0][-1], float(uniforms[j, i])))
            y = seq[r:]
            lg, hid = forward(p, cfg, seq)
            old.append(torch.log_softmax(lg[r - 1:r - 1 + k], -1)[torch.arange(k), torch.tensor(y)])
            true = doc[r:r + k]
            binary = sum(int(a == b) for a, b in zip(y, true)) / k
            cosine = F.cosine_similarity(hid[r:r + k], hidden[r:r + k].detach(), dim=-1, eps=1e-8).mean()
            rewards.append({"binary": binary, "cosine": float(cosine), "hybrid": binary + float(cosine)}[rc.reward])
            tokens.append(y)
    R = torch.tensor(rewards)
    adv = torch.empty(len(rows))
    for g in range(len(starts)):  # GRPO: (R - mean) / (std + 1e-6) per group of n, unbiased std
        grp = R[g * n:(g + 1) * n]
        mean, std = (grp.mean(), grp.std()) if n > 1 else (torch.tensor(0.0), torch.tensor(1.0))
        adv[g * n:(g + 1) * n] = (grp - mean) / (std + 1e-6)
    per_token = []
    for j, r in enumerate(rows):  # the update re-reads prefix + rollout with gradients
        lg, _ = forward(p, cfg, list(doc[:r]) + tokens[j])
        logp = torch.log_softmax(lg[r - 1:r - 1 + k], -1)[torch.arange(k), torch.tensor(tokens[j])]
        ratio = torch.exp(torch.clamp(logp - old[j], -20, 20))
        A = adv[j]
        pg = torch.maximum(-A * ratio, -A * torch.clamp(ratio, 1 - rc.clip_low, 1 + rc.clip_high))
        if A < 0:
            pg = torch.minimum(pg, -A * rc.dual_clip)
        per_token.append(pg)
    ppo = torch.cat(per_token).mean()  # token mean over all N * k tokens
    return {"loss": rc.sft_coef * ntp + rc.ppo_coef * ppo, "tokens": tokens, "old": torch.stack(old), "adv": adv}
