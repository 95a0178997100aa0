"""Tensor parallelism (hybrid_r1/parallel.py): N ranks over gloo on the CPU == one device.

The ranks are real processes started as torchrun starts them (tests/tp_worker.py), each bounded in
time. With the block scheme every rank's int8 weights and activation scales are the single device's
(quantized whole, then sliced on 128 boundaries; activations quantized per 128-group, and no group
straddles two ranks): only the order of the additions differs (a rank's partial sums, then the
all-reduce). In fp32 that is ~1e-7 relative, which now and then moves an activation across an int8
rounding boundary: one element changes by a whole step (1/127 of its group's largest), and through the
cache every later position with it (measured: 5e-3 on the logits from one such flip). That is W8A8's
own discontinuity, not a sharding error, so the parity runs in float64: the INT8 operators then sum in
float64 (int8 x fp32-scale products are exact there) and quantize from fp32 as the kernels do, the
reorder noise is ~1e-16 and cannot reach an fp32 rounding boundary in practice: any sharding mistake
(a wrong slice, head count, scale tile or missing reduction) shows as O(1), a correct split as ~1e-13.
The issue's bound (1e-3) is asserted, with the fp32 behaviour measured on the GPU run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hybrid_r1
from hybrid_r1 import parallel
from hybrid_r1.loading import build
from hybrid_r1.placement import apply, rules_from
from hybrid_r1.synth import SyntheticWeights, preset_config, write_checkpoint

from conftest import SMALL_VOCAB, needs_cuda, rel_err

RULES = str(Path(__file__).parent.parent / "rules" / "multi-gpu-int8.yaml")
WORKER = str(Path(__file__).parent / "tp_worker.py")
TIME_LIMIT_S = 240  # per run of N processes; a hang fails the test instead of CI
# Every split falls on 128 boundaries for 2 and 4 ranks: heads 8 (kv_b: 192 rows a head, 2 heads a
# rank at least), intermediate sizes 512.
TP_MODEL = dict(vocab_size=SMALL_VOCAB, hidden_size=256, intermediate_size=512, moe_intermediate_size=512,
                num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=8, num_key_value_heads=8,
                q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=128,
                n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1)


@pytest.fixture(scope="module")
def tp_dir(tmp_path_factory):
    cfg = preset_config("tiny", **TP_MODEL)
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tp", SyntheticWeights(cfg, seed=5), tokenizer=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world: int, path: Path, out: Path, mode: str = "parity", device: str = "cpu",
              dtype: str = "float64") -> list[subprocess.CompletedProcess]:
    port = _free_port()
    procs = []
    for rank in range(world):
        local = 0 if mode == "one-gpu" else rank
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(local), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   HYBRID_R1_TP_TIMEOUT="60", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, WORKER, str(path), RULES, str(out), device, dtype, mode],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=TIME_LIMIT_S)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            p.kill()
    return done


@pytest.fixture(scope="module")
def single(tp_dir):
    rt = hybrid_r1.load(tp_dir, rules=RULES, device="cpu", dtype=torch.float64)
    assert rt.world is None
    ids = torch.randint(0, SMALL_VOCAB, (24,), generator=torch.Generator().manual_seed(7)).tolist()
    return {"logits": rt.logits(ids), "tokens": list(rt.generate(ids[:6], max_new_tokens=32, temperature=0.0, stop=[]))}


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_matches_one_device(tp_dir, single, tmp_path, world):
    out = tmp_path / "rank0.pt"
    results = run_ranks(world, tp_dir, out)
    for rank, r in enumerate(results):
        assert r.returncode == 0, f"rank {rank} exited {r.returncode}:\n{r.stderr[-3000:]}"
    got = torch.load(out)
    assert got["world"] == world
    heads = TP_MODEL["num_attention_heads"]
    assert got["held"] == {"o_proj_in": heads // world * TP_MODEL["v_head_dim"], "heads": heads // world,
                           "expert_inter": TP_MODEL["moe_intermediate_size"] // world}
    assert torch.isfinite(got["logits"]).all()
    assert rel_err(got["logits"], single["logits"]) <= 1e-3
    assert got["tokens"] == single["tokens"] and len(got["tokens"]) == 32


@needs_cuda
def test_tensor_parallel_on_a_gpu(tp_dir, tmp_path):
    """The CUDA kernels under tensor parallelism (two ranks on one GPU over gloo; NCCL needs a GPU
    each: the multi-GPU run is its own issue), bf16, against one GPU. Bound: a bf16 activation that
    rounds one ulp apart (2**-8 relative) or an int8 rounding moved one step by the fp32 reordering
    changes the logits by a few 1e-3 (5e-3 measured for one flip on the CPU in fp32); 2e-2 allows a
    few such events, a wrong split is O(1)."""
    rt = hybrid_r1.load(tp_dir, rules=RULES, device="cuda")
    ids = torch.randint(0, SMALL_VOCAB, (24,), generator=torch.Generator().manual_seed(7)).tolist()
    ref = rt.logits(ids).cpu()
    ref_tokens = list(rt.generate(ids[:6], max_new_tokens=32, temperature=0.0, stop=[], cuda_graphs=False))
    del rt
    out = tmp_path / "rank0.pt"
    results = run_ranks(2, tp_dir, out, mode="one-gpu", device="cuda", dtype="bfloat16")
    for rank, r in enumerate(results):
        assert r.returncode == 0, f"rank {rank} exited {r.returncode}:\n{r.stderr[-3000:]}"
    got = torch.load(out)
    err = rel_err(got["logits"], ref)
    same = next((i for i, (a, b) in enumerate(zip(got["tokens"], ref_tokens)) if a != b), len(ref_tokens))
    print(f"bf16 TP(2) vs one GPU: logits rel L2 {err:.2e}, greedy tokens identical for {same} of 32")
    assert err <= 2e-2


def test_generate_command_under_torchrun(tmp_path_factory):
    """`torchrun ... -m hybrid_r1.cli generate`: rank 0 prints the answer, the other rank nothing."""
    import json

    cfg = preset_config("tiny", **{**TP_MODEL, "vocab_size": 129280})  # the real tokenizer's vocabulary
    path = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tp_tok", SyntheticWeights(cfg, seed=6))
    port = _free_port()
    cmd = [sys.executable, "-m", "hybrid_r1.cli", "generate", "--model", str(path), "--rules", RULES,
           "--device", "cpu", "--prompt", "Hi", "--max-new-tokens", "4", "--temperature", "0", "--json"]
    procs = [subprocess.Popen(cmd, env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                                            HYBRID_R1_TP_TIMEOUT="60"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        outs = [p.communicate(timeout=TIME_LIMIT_S) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    answer = json.loads(outs[0][0])
    assert len(answer["tokens"]) == 4 and "tensor-parallel over 2 ranks" in outs[0][1]
    assert outs[1][0] == "" and outs[1][1] == ""  # the follower prints nothing


def test_a_dead_rank_0_ends_the_others(tp_dir, tmp_path):
    results = run_ranks(2, tp_dir, tmp_path / "none.pt", mode="die")
    assert results[0].returncode == 3
    assert results[1].returncode == 1
    assert "rank 0 stopped" in results[1].stderr


def test_a_step_that_fails_on_rank_0_stops_every_rank(tp_dir, tmp_path):
    results = run_ranks(2, tp_dir, tmp_path / "none.pt", mode="fail-step")
    assert results[0].returncode != 0 and "ParallelError: rank 0 failed in a tensor-parallel step" in results[0].stderr
    assert "injected failure" in results[0].stderr
    assert results[1].returncode == 1 and "a tensor-parallel step failed" in results[1].stderr


def test_ranks_that_open_different_checkpoints_are_refused(tp_dir):
    other = Path(f"{tp_dir}-other")
    if not other.exists():
        cfg = preset_config("tiny", **{**TP_MODEL, "num_hidden_layers": 4})
        write_checkpoint(other, SyntheticWeights(cfg, seed=5), tokenizer=False)
    results = run_ranks(2, tp_dir, other / "none.pt", mode="mismatch")
    for r in results:
        assert r.returncode != 0
        assert "ranks 1 opened a checkpoint that differs from rank 0's" in r.stderr


def test_world_sizes_that_do_not_divide_are_refused():
    cfg = preset_config("tiny", **TP_MODEL)
    with pytest.raises(parallel.ParallelError, match="world size 3 does not divide the model's 8 attention heads"):
        parallel.check(cfg, 3)


def test_operators_that_cannot_split_are_refused():
    cfg = preset_config("tiny", **TP_MODEL)
    model = build(cfg)
    rules = rules_from([{"name": r"mlp\.experts$", "op": "experts.ggml_cpu", "device": "cpu"}])
    apply(model, rules, torch.device("cpu"), torch.float32)
    with pytest.raises(parallel.ParallelError, match=r"model\.layers\.1\.mlp\.experts: operator experts.ggml_cpu cannot"):
        parallel.shard(model, parallel.World(0, 2))


def test_rules_naming_one_gpu_are_refused():
    cfg = preset_config("tiny", **TP_MODEL)
    rules = rules_from([{"name": r"^model\.layers\.0\.", "device": "cuda:1"}])
    placed = apply(build(cfg), rules, torch.device("cpu"), torch.float32)
    with pytest.raises(parallel.ParallelError, match="rules rule 1: device cuda:1 under tensor parallelism"):
        parallel.check_devices(placed, parallel.World(0, 2))


def test_shard_marks_the_splits_and_local_heads():
    cfg = preset_config("tiny", **TP_MODEL)
    model = build(cfg)
    apply(model, rules_from(RULES), torch.device("cpu"), torch.float32)
    parallel.shard(model, parallel.World(1, 4))
    attn = model.model.layers[1].self_attn
    assert attn.n_heads == 2
    assert parallel.shard_of(attn.q_b_proj) == parallel.Shard(1, 4, 0)
    assert parallel.shard_of(attn.o_proj) == parallel.Shard(1, 4, 1)
    assert parallel.shard_of(attn.kv_a_proj_with_mqa) is None  # replicated: the latent cache is whole
    assert parallel.shard_of(model.model.layers[1].mlp.experts) == parallel.Shard(1, 4, 0)
    assert parallel.shard_of(model.model.layers[0].mlp.down_proj) == parallel.Shard(1, 4, 1)
    assert parallel.shard_of(model.model.layers[1].mlp.gate) is None


def test_plan_shows_one_rank(capsys):
    from hybrid_r1.cli import main

    per_rank = {}
    for tp in (1, 8):
        assert main(["plan", "--rules", RULES, "--tp", str(tp), "--device", "cuda", "--context", "4096",
                     "--gpu-memory", "80"]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("  cuda"))
        per_rank[tp] = float(line.split()[1])
        assert ("does NOT fit" in line) == (tp == 8) or tp == 1
    # 671B: ~656 GB of experts and attention split 8 ways, embeddings, router and lm_head replicated
    assert 80 < per_rank[8] < 86 and per_rank[1] > 600
