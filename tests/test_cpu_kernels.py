"""This project's own CPU expert kernel (kernels/cpu_experts.c via cpu_kernels.py, engine `native`).

Its accuracy against the fp64 dequantized reference is held to ggml's derived bounds in
tests/test_cpu_engines.py (the same Q8_K activation rounding). Here: the mix of types a Q4_K_M
layer has, the SIMD build against the portable C build (the same integer sums per block: only the
float32 order of adding the blocks' products differs, ~n_blocks * 2^-24 relative, bound 1e-5),
results independent of the thread count (each output is computed whole by one thread, in one
order: bit-identical), grouping of tokens by expert, errors, and the build cache.
"""

from __future__ import annotations

import ctypes
import os

import pytest
import torch
from gguf import GGMLQuantizationType as QT
from test_cpu_engines import assert_releases_the_gil
from test_experts_ggml import (
    E,
    H,
    I,
    K,
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


def _weights(types, seed):
    t = expert_tensors(types, seed=seed)
    return ggml_lib.ExpertWeights(t["gate"].data, t["up"].data, t["down"].data, tuple(types), H, I)


def _call(pool, weights, x, idx, w):
    out = torch.full(x.shape, float("nan"))  # poisoned: every element must be written
    return pool.moe(weights, x.float().contiguous(), idx.to(torch.int64).contiguous(), w.float().contiguous(), out)


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


def _has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "").split()
    except OSError:
        return False
    return {"avx2", "fma", "f16c"} <= set(flags)


@pytest.mark.parametrize("variant", ["native", pytest.param("avx2", marks=pytest.mark.skipif(
    not _has_avx2(), reason="this CPU has no AVX2"))])
def test_simd_and_portable_builds_agree(variant):
    weights = _weights(MIXES[0], seed=62)
    fast, plain = cpu_kernels.Pool(2, variant=variant), cpu_kernels.Pool(2, variant="portable")
    assert cpu_kernels.simd("portable") == 0 and (variant != "avx2" or cpu_kernels.simd("avx2") == 1)
    gen = torch.Generator().manual_seed(63)
    x = torch.randn(5, H, generator=gen)
    idx, w = routing(5, K, E, gen)
    a, b = _call(fast, weights, x, idx, w), _call(plain, weights, x, idx, w)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert rel(a, b) < 1e-5


def test_threads_do_not_change_a_bit_and_repeated_experts_group():
    weights = _weights(MIXES[0], seed=64)
    gen = torch.Generator().manual_seed(65)
    x = torch.randn(7, H, generator=gen)
    idx = torch.randint(0, 3, (7, K), generator=gen)  # few experts, many tokens each (and repeats in a token)
    w = torch.rand(7, K, generator=gen)
    one = _call(cpu_kernels.Pool(1), weights, x, idx, w)
    for n in (2, 5):  # 5 threads on a 2-CPU machine: more threads than CPUs still finishes
        assert torch.equal(_call(cpu_kernels.Pool(n), weights, x, idx, w), one)
    # the same tokens one at a time: the grouping by expert changes which rows a chunk reads, not the sums
    for t in range(7):
        single = _call(cpu_kernels.Pool(2), weights, x[t:t + 1], idx[t:t + 1], w[t:t + 1])
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
    with pytest.raises(cpu_engines.EngineError, match="engine native runs Q4_K, Q6_K, not Q8_0"):
        cpu_engines.choose("native", (QT.Q8_0,) * 3)


def test_the_kernel_releases_the_gil():
    weights = _weights(MIXES[0], seed=68)
    pool = cpu_kernels.Pool(1)
    x, idx, w = torch.randn(64, H), torch.randint(0, E, (64, K)), torch.rand(64, K)
    assert_releases_the_gil(lambda: _call(pool, weights, x, idx, w), min_s=0.005)


def test_build_is_cached_by_source_and_host(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_R1_CACHE", str(tmp_path))
    lib = cpu_kernels.library.__wrapped__("portable")
    built = list(tmp_path.glob("cpu_experts-*.so"))
    assert len(built) == 1 and not list(tmp_path.glob("tmp*"))  # no staging left behind
    stamp = built[0].stat().st_mtime_ns
    again = cpu_kernels.library.__wrapped__("portable")
    assert list(tmp_path.glob("cpu_experts-*.so")) == built and built[0].stat().st_mtime_ns == stamp
    assert isinstance(lib, ctypes.CDLL) and again.hr1_simd() == 0


def test_no_compiler_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRID_R1_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-cc-hybrid-r1")
    with pytest.raises(cpu_kernels.KernelBuildError, match="no C compiler: 'no-such-cc-hybrid-r1'"):
        cpu_kernels.library.__wrapped__()
    monkeypatch.setattr(cpu_kernels, "library", cpu_kernels.library.__wrapped__)
    assert "no C compiler" in cpu_kernels.missing()
    assert "native" not in cpu_engines.installed()
