"""This project's own CPU expert kernel (kernels/cpu_experts.c via cpu_kernels.py, engine `native`).

Its accuracy against the fp64 dequantized reference is held to ggml's derived bounds in
tests/test_cpu_engines.py (the same Q8_K activation rounding). Here: the mix of types a Q4_K_M
layer has, the SIMD builds against the portable C build on rows of one and of several blocks (the
same integer sums per block: only the float32 order of adding the blocks' products differs,
~n_blocks * 2^-24 relative, so most tokens agree to 1e-5; that order can flip one rounding of the
SwiGLU output to int8, ~3e-4 of a token, so each within 2e-3), and the portable build against an
fp64 reference on gguf-py's dequantized weights with ggml's activation rounding (2e-3),
results independent of the thread count (each output is computed whole by one thread, in one
order: bit-identical), grouping of tokens by expert, errors, and the build cache.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import quants
from test_cpu_engines import assert_releases_the_gil
from test_experts_ggml import (
    E,
    H,
    I,
    K,
    act_round,
    emulated,
    expert_tensors,
    load_pair,
    rel,
    routing,
)

from hybrid_r1 import cpu_engines, cpu_kernels, ggml_lib

MISSING = cpu_kernels.missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"no native kernel: {MISSING}")
MIXES = [(QT.Q4_K, QT.Q4_K, QT.Q6_K), (QT.Q4_K, QT.Q4_K, QT.Q4_K), (QT.Q6_K, QT.Q6_K, QT.Q4_K)]


def _weights(types, seed, hidden=H, inter=I, n_experts=E):
    """Random experts quantized by ggml; hidden/inter other than 256 give rows of several blocks."""
    if (hidden, inter) == (H, I):
        t = expert_tensors(types, seed=seed)
        return ggml_lib.ExpertWeights(t["gate"].data, t["up"].data, t["down"].data, tuple(types), H, I)
    rng = np.random.default_rng(seed)
    parts = []
    for (rows, ne0), ty in zip(((inter, hidden), (inter, hidden), (hidden, inter)), types):
        w = (rng.standard_normal((n_experts * rows, ne0)) / np.sqrt(ne0)).astype(np.float32)
        parts.append(ggml_lib.quantize(w, ty).reshape(n_experts, rows, -1))
    return ggml_lib.ExpertWeights(*parts, tuple(types), hidden, inter)


def _reference(weights, x, idx, w) -> torch.Tensor:
    """fp64 on gguf-py's dequantized weights, activations rounded as ggml rounds them (act_round)."""
    deq = {p: torch.from_numpy(quants.dequantize(getattr(weights, p), QT(t))).double()
           for p, t in zip(("gate", "up", "down"), weights.types)}
    xq = torch.from_numpy(act_round(x.float().numpy(), QT.Q8_K)).double()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for s in range(idx.shape[1]):
            e = int(idx[t, s])
            h = torch.nn.functional.silu(deq["gate"][e] @ xq[t]) * (deq["up"][e] @ xq[t]) * float(w[t, s])
            out[t] += deq["down"][e] @ torch.from_numpy(act_round(h.float().numpy()[None], QT.Q8_K)[0]).double()
    return out


def _call(pool, weights, x, idx, w):
    out = torch.full(x.shape, float("nan"))  # poisoned: every element must be written
    return pool.moe(weights, x.float().contiguous(), idx.to(torch.int64).contiguous(), w.float().contiguous(), out)


def _has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "").split()
    except OSError:
        return False
    return {"avx2", "fma", "f16c"} <= set(flags)


@pytest.mark.parametrize("types", MIXES, ids=lambda ts: "/".join(QT(t).name for t in ts))
def test_mixed_types_match_emulated_rounding(types):
    op, ref = load_pair(expert_tensors(types, seed=60), engine="native")
    assert op.engine_class.name == "native"
    gen = torch.Generator().manual_seed(61)
    for T in (1, 2, 9):
        x = torch.randn(T, H, generator=gen)
        idx, w = routing(T, K, E, gen)
        y = op(x, idx, w)
        assert torch.isfinite(y).all()
        assert rel(y, emulated(ref, types, x, idx, w)) < 2e-3  # tests/test_experts_ggml.py's bound


@pytest.mark.parametrize("variant", ["native", pytest.param("avx2", marks=pytest.mark.skipif(
    not _has_avx2(), reason="this CPU has no AVX2"))])
def test_simd_and_portable_builds_agree(variant):
    fast, plain = cpu_kernels.Pool(2, variant=variant), cpu_kernels.Pool(2, variant="portable")
    assert cpu_kernels.simd("portable") == 0 and (variant != "avx2" or cpu_kernels.simd("avx2") == 1)
    gen = torch.Generator().manual_seed(63)
    for hidden, inter in ((H, I), (768, 512)):  # one block a row, and rows of 3 and 2 blocks
        weights = _weights(MIXES[0], seed=62, hidden=hidden, inter=inter)
        x = torch.randn(5, hidden, generator=gen)
        x[:, 7] *= 30  # an outlier channel: one block's scale far from the others'
        idx, w = routing(5, K, E, gen)
        a, b = _call(fast, weights, x, idx, w), _call(plain, weights, x, idx, w)
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        per_token = [rel(a[t], b[t]) for t in range(5)]
        # the same integer sums; the fp32 sums of blocks in another order move h by ~1e-7, which
        # now and then flips one rounding of h to int8 (one step of 1/127 of a block's max: ~3e-4 of
        # that token's output): most tokens agree to 1e-5, every one within 2e-3
        assert sorted(per_token)[2] < 1e-5 and max(per_token) < 2e-3, per_token
        assert rel(b, _reference(weights, x, idx, w)) < 2e-3  # tests/test_experts_ggml.py's emulated bound


@pytest.mark.parametrize("variant", ["native", pytest.param("avx2", marks=pytest.mark.skipif(
    not _has_avx2(), reason="this CPU has no AVX2")), "portable"])
def test_threads_do_not_change_a_bit_and_repeated_experts_group(variant):
    weights = _weights(MIXES[0], seed=64, hidden=768, inter=512)
    gen = torch.Generator().manual_seed(65)
    x = torch.randn(7, 768, generator=gen)
    idx = torch.randint(0, 3, (7, K), generator=gen)  # few experts, many tokens each (and repeats in a token)
    w = torch.rand(7, K, generator=gen)
    one = _call(cpu_kernels.Pool(1, variant=variant), weights, x, idx, w)
    for n in (2, 5):  # 5 threads on a 2-CPU machine: more threads than CPUs still finishes
        assert torch.equal(_call(cpu_kernels.Pool(n, variant=variant), weights, x, idx, w), one)
    # the same tokens one at a time: the grouping by expert changes which rows a chunk reads, not the sums
    for t in range(7):
        single = _call(cpu_kernels.Pool(2, variant=variant), weights, x[t:t + 1], idx[t:t + 1], w[t:t + 1])
        assert torch.equal(single, one[t:t + 1])


def test_bf16_in_and_out_are_the_float32_path_rounded_once():
    """A GPU's decode buffers are bf16: read and written as they are, no conversion pass. The sums
    are the float32 path's on the same (bf16-exact) inputs, rounded to bf16 once at the end."""
    weights = _weights(MIXES[0], seed=69)
    pool = cpu_kernels.Pool(2)
    gen = torch.Generator().manual_seed(69)
    x = torch.randn(3, H, generator=gen).to(torch.bfloat16)
    idx, w = routing(3, K, E, gen)
    f32 = _call(pool, weights, x.float(), idx, w)
    out = torch.full((3, H), float("nan"), dtype=torch.bfloat16)
    pool.moe(weights, x, idx, w, out)
    assert torch.equal(out, f32.to(torch.bfloat16))
    eng = cpu_engines.NativeEngine(weights, 2, 16, K)  # the engine writes into the caller's buffer
    ex = ggml_lib.executor(2)
    hy = torch.full((3, H), float("nan"), dtype=torch.bfloat16)
    with ex.lock:
        assert eng.run_into(ex, x, idx, w, hy) is hy
    assert torch.equal(hy, out) and eng.checks_ids(3)


def test_pinned_workers_run_where_told():
    cpus = ggml_lib.core_cpus()
    pool = cpu_kernels.Pool(3, cpus)
    weights = _weights(MIXES[0], seed=66)
    x, (idx, w) = torch.randn(1, H), routing(1, K, E, torch.Generator().manual_seed(66))
    _call(pool, weights, x, idx, w)
    assert pool.threads == 3
    masks = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/status") as f:
            masks |= {ln.split(":")[1].strip() for ln in f if ln.startswith("Cpus_allowed_list")}
    assert str(cpus[1 % len(cpus)]) in masks and str(cpus[2 % len(cpus)]) in masks


def test_errors_are_clear():
    weights = _weights(MIXES[0], seed=67)
    pool = cpu_kernels.Pool(2)
    x = torch.randn(1, H)
    with pytest.raises(ValueError, match=rf"expert ids must lie in \[0, {E}\), got 0..{E}"):
        _call(pool, weights, x, torch.tensor([[0, 1, 2, E]]), torch.rand(1, K))
    with pytest.raises(TypeError, match="ids int64"):
        pool.moe(weights, x, torch.zeros(1, K, dtype=torch.int32), torch.rand(1, K), torch.empty(1, H))
    bad = ggml_lib.ExpertWeights(weights.gate, weights.up, weights.down, (QT.Q8_0, QT.Q4_K, QT.Q6_K), H, I)
    with pytest.raises(ValueError, match="type or width"):
        _call(pool, bad, x, torch.tensor([[0, 1, 2, 3]]), torch.rand(1, K))
    assert _call(pool, weights, x[:0], torch.zeros(0, K, dtype=torch.int64), torch.zeros(0, K)).shape == (0, H)
    none = _call(pool, weights, x, torch.zeros(1, 0, dtype=torch.int64), torch.zeros(1, 0))  # no experts a token
    assert torch.equal(none, torch.zeros(1, H))
    with pytest.raises(ValueError, match="must be on the CPU"):
        pool.moe(weights, x, torch.zeros(1, K, dtype=torch.int64), torch.rand(1, K), torch.empty(1, H, device="meta"))
    with pytest.raises(cpu_engines.EngineError, match="engine native runs Q4_K, Q6_K, not Q8_0"):
        cpu_engines.choose("native", (QT.Q8_0,) * 3)


def test_the_kernel_releases_the_gil():
    weights = _weights(MIXES[0], seed=68)
    pool = cpu_kernels.Pool(1)
    x, idx, w = torch.randn(64, H), torch.randint(0, E, (64, K)), torch.rand(64, K)
    assert_releases_the_gil(lambda: _call(pool, weights, x, idx, w), min_s=0.005)


def test_build_is_cached_by_source_and_host(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_R1_CACHE", str(tmp_path))
    path = cpu_kernels._build("portable")
    built = list(tmp_path.glob("cpu_experts-*.so"))
    assert built == [path] and not list(tmp_path.glob("tmp*"))  # no staging left behind
    stamp = path.stat().st_mtime_ns
    assert cpu_kernels._build("portable") == path and path.stat().st_mtime_ns == stamp  # not rebuilt
    assert cpu_kernels._load(path).hr1_simd() == 0
    (tmp_path / "file").write_text("")  # a cache path that cannot be a folder: a private one instead
    monkeypatch.setenv("HYBRID_R1_CACHE", str(tmp_path / "file" / "sub"))
    elsewhere = cpu_kernels._build("portable")
    assert elsewhere.exists() and elsewhere.parent != tmp_path


def test_no_compiler_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_R1_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-cc-hybrid-r1")
    looks = []
    compiler = cpu_kernels._compiler
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: looks.append(1) or compiler())
    monkeypatch.setattr(cpu_kernels, "_built", functools.cache(cpu_kernels._built.__wrapped__))  # a fresh memo
    with pytest.raises(cpu_kernels.KernelBuildError, match="no C compiler: 'no-such-cc-hybrid-r1'"):
        cpu_kernels.library()
    assert "no C compiler" in cpu_kernels.missing() and "no C compiler" in cpu_kernels.missing()
    assert len(looks) == 1  # the failure is kept: not retried for every layer
    assert "native" not in cpu_engines.installed()
    cls, _ = cpu_engines.choose("auto", MIXES[0])  # auto falls back, it does not raise
    assert cls.name in ("kt_llamafile", "ggml")
    with pytest.raises(cpu_engines.EngineError, match="engine native cannot run: no C compiler"):
        cpu_engines.choose("native", MIXES[0])


def test_a_failed_build_says_the_compilers_error(tmp_path, monkeypatch):
    cc = tmp_path / "fakecc"
    cc.write_text("#!/bin/sh\n[ \"$1\" = --version ] && exit 0\n"
                  "echo 'cpu_experts.c:1:1: error: no such intrinsic' >&2\necho 'compilation terminated.' >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("HYBRID_R1_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(cc))
    with pytest.raises(cpu_kernels.KernelBuildError, match="could not build kernels/cpu_experts.c: "
                                                            "cpu_experts.c:1:1: error: no such intrinsic"):
        cpu_kernels._build("native")
    assert not list((tmp_path / "cache").glob("*.so"))
