"""One rank of a tensor-parallel run, as torchrun starts it (RANK, WORLD_SIZE, MASTER_ADDR/PORT in
the environment): tests/test_parallel.py spawns N of these. Rank 0 writes what it computed."""

import os
import sys

import torch

import hybrid_r1


def main(path: str, rules: str, out: str, device: str, dtype: str, mode: str) -> int:
    if mode == "mismatch" and os.environ["RANK"] == "1":
        path = path + "-other"  # another model: the load must refuse it on every rank
    if mode == "one-gpu":  # every rank on the one GPU there is: NCCL refuses that, gloo does not
        torch.distributed.init_process_group("gloo")
    rt = hybrid_r1.load(path, rules=rules, device=device, dtype=getattr(torch, dtype))
    if not rt.world.leader:
        return rt.follow()
    if mode == "die":  # rank 0 vanishes without a word: the followers must not hang
        os._exit(3)
    if mode == "fail-step":  # rank 0 fails inside a step the followers began: all must stop
        def fail(mod, args):
            raise RuntimeError("injected failure")

        rt.module.model.layers[1].mlp.register_forward_pre_hook(fail)
    ids = torch.randint(0, rt.config.vocab_size, (24,), generator=torch.Generator().manual_seed(7)).tolist()
    logits = rt.logits(ids)  # teacher-forced: every position
    gen = rt.generate(ids[:6], max_new_tokens=32, temperature=0.0, stop=[])
    layer = rt.module.model.layers[1]
    held = {"o_proj_in": layer.self_attn.o_proj.in_features, "heads": layer.self_attn.n_heads,
            "expert_inter": layer.mlp.experts.intermediate_size}  # what this rank really holds
    torch.save({"logits": logits.cpu(), "tokens": list(gen), "world": rt.world.size, "held": held}, out)
    rt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
