"""Test helpers: record the fp32 model's routing, replay it in another model, compare logits."""

from __future__ import annotations

import torch

from hybrid_r1.model import Gate


def gates(model):
    return [m for m in model.module.modules() if isinstance(m, Gate)]


def record_routing(model, ids):
    """Run the fp32 model; return its logits, the chosen experts per gate and the routing margin
    per position (min over layers)."""
    chosen, margins = [], []

    def hook(mod, inp, out):
        cfg = mod.cfg
        x = inp[0].float()
        s = torch.sigmoid(x @ mod.weight.float().T) + mod.e_score_correction_bias
        per = cfg.n_routed_experts // cfg.n_group
        grp = s.view(-1, cfg.n_group, per).topk(2, -1)[0].sum(-1)
        gs = grp.sort(-1, descending=True).values
        keep = torch.zeros_like(grp, dtype=torch.bool).scatter_(1, grp.topk(cfg.topk_group, -1)[1], True)
        cs = s.masked_fill(~keep.repeat_interleave(per, 1), float("-inf")).sort(-1, descending=True).values
        k = cfg.num_experts_per_tok
        margins.append(torch.minimum(gs[:, cfg.topk_group - 1] - gs[:, cfg.topk_group], cs[:, k - 1] - cs[:, k]))
        chosen.append(out[0])

    hooks = [g.register_forward_hook(hook) for g in gates(model)]
    logits = model.logits(ids)
    for h in hooks:
        h.remove()
    return logits, chosen, torch.stack(margins).min(0).values


def replay_routing(model, chosen):
    def make(idx):
        def hook(mod, inp, out):
            s = torch.sigmoid(inp[0].float() @ mod.weight.float().T)
            w = s.gather(1, idx)
            return idx, w / w.sum(-1, keepdim=True) * mod.cfg.routed_scaling_factor
        return hook

    return [g.register_forward_hook(make(idx)) for g, idx in zip(gates(model), chosen)]


def metrics(logits, ref):
    lp, lq = ref.log_softmax(-1), logits.float().log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    rel = (logits.float() - ref).norm(dim=-1) / ref.norm(dim=-1)
    return kl, rel
