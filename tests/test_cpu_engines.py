"""The CPU expert engines (cpu_engines.py) behind experts.ggml_cpu, their choice, thread pinning and
huge-page copies.

Each installed engine is held to the bounds tests/test_experts_ggml.py derives for ggml (module
docstring there): the plain fp64 reference on gguf-py's dequantized weights within the bound of the
activation type (both engines take float32 activations and round them to Q8_K / Q8_0 as ggml does),
and the emulated-rounding reference within 2e-3. kt-kernel is an optional install: its tests run
where it imports and are skipped, saying why, where it does not (CI installs only ggml).
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from test_experts_ggml import (
    ACT_BOUND,
    PREFIX,
    E,
    FakeSource,
    H,
    I,
    K,
    emulated,
    expert_tensors,
    load_pair,
    rel,
    routing,
)

from hybrid_r1 import cpu_engines, cpu_kernels, ggml_lib, hugepages
from hybrid_r1.errors import CheckpointError
from hybrid_r1.ops.base import OpArgsError
from hybrid_r1.ops.experts_ggml import GGMLArgs, GGMLExperts
from hybrid_r1.placement import RuleError, parse_rules

KT_MISSING = cpu_engines.KTLlamafileEngine.missing()
NATIVE_MISSING = cpu_engines.NativeEngine.missing()
needs_native = pytest.mark.skipif(NATIVE_MISSING is not None, reason=f"no native kernel: {NATIVE_MISSING}")
needs_kt = pytest.mark.skipif(KT_MISSING is not None, reason=f"kt-kernel absent: {KT_MISSING}")
Q4_K_M = (QT.Q4_K, QT.Q4_K, QT.Q6_K)


def _engine_types():
    # ggml's every type is covered by test_experts_ggml.py; here the types both engines run
    return [("ggml", n) for n in ("Q4_K", "Q6_K", "Q8_0")] + [
        pytest.param("kt_llamafile", QT(t).name, marks=needs_kt) for t in sorted(cpu_engines.KT_TYPES)] + [
        pytest.param("native", QT(t).name, marks=needs_native) for t in sorted(cpu_engines.NativeEngine.types)]


@pytest.mark.parametrize("engine, name", _engine_types())
def test_engine_matches_dequantized_reference(engine, name):
    t = QT[name]
    types = (t, t, t)
    op, ref = load_pair(expert_tensors(types, seed=30 + t), engine=engine)
    assert op.engine_class.name == engine
    bound = ACT_BOUND[QT(ggml_lib.vec_dot_type(t))]
    gen = torch.Generator().manual_seed(40 + t)
    for T in (1, 3, 17):  # decode (kt's one-token path below 10 tokens) and its grouped path
        x = torch.randn(T, H, generator=gen)
        idx, w = routing(T, K, E, gen)
        y = op(x, idx, w)
        assert y.shape == (T, H) and y.dtype == torch.float32 and torch.isfinite(y).all()
        plain = rel(y, ref(x.double(), idx, w.double()))
        assert plain < bound, f"{engine} {name} T={T}: {plain:.2e} >= {bound}"
        tight = rel(y, emulated(ref, types, x, idx, w))
        assert tight < 2e-3, f"{engine} {name} T={T}: {tight:.2e} against emulated activation rounding"


@needs_kt
def test_kt_reads_the_bytes_in_place_and_follows_chunks():
    tensors = expert_tensors(Q4_K_M, seed=50)
    op, ref = load_pair(tensors, engine="kt_llamafile", chunk_tokens=8)
    gen = torch.Generator().manual_seed(50)
    x = torch.randn(21, H, generator=gen)  # three chunks: 8, 8, 5
    idx, w = routing(21, K, E, gen)
    y = op(x, idx, w)
    assert rel(y, emulated(ref, Q4_K_M, x, idx, w)) < 2e-3
    tensors["down"].data[idx[0, 0]] = 0  # the file's bytes change: kt sees it at once
    assert not torch.equal(op(x, idx, w), y)
    assert op(x[:0], idx[:0], w[:0]).shape == (0, H)
    eng = op._engine
    with pytest.raises(ValueError, match="at most 8 tokens of 4 experts"):  # its buffers hold 8 tokens
        eng.run(None, x[:9], idx[:9], w[:9])


@needs_kt
def test_kt_prints_nothing_on_stdout():
    """kt's C++ banners would land in `hybrid-r1 generate`'s answer on stdout; they go to stderr. The
    test runs kt in a child process: its exit (kt's goodbye) is part of what is checked."""
    import subprocess
    import sys

    code = ("import sys, torch; sys.path.insert(0, 'tests')\n"
            "from test_experts_ggml import expert_tensors, load_pair\n"
            "op, _ = load_pair(expert_tensors((12, 12, 14), seed=1), engine='kt_llamafile')\n"
            "y = op(torch.randn(2, 256), torch.arange(4).repeat(2, 1), torch.rand(2, 4))\n"
            "print('answer', bool(y.norm() > 0))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "answer True\n" and "TP MOE" in done.stderr and "Goodbye" in done.stderr


@needs_kt
def test_kt_is_imported_only_when_a_layer_loads():
    import subprocess
    import sys

    code = ("import sys; import hybrid_r1.ops.experts_ggml; from hybrid_r1.placement import parse_rules\n"
            "parse_rules([{'name': 'x', 'op': 'experts.ggml_cpu', 'device': 'cpu', 'args': {'engine': 'auto'}}])\n"
            "print('kt_kernel' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "False\n", done.stderr


def assert_releases_the_gil(call, calls: int = 3, min_s: float = 0.01) -> None:
    """`call` run `calls` times on a thread while this one counts its own loops that start and end
    strictly inside one call: a call holding the GIL would leave none (a thread in C code that keeps
    the GIL is never asked to give it up)."""
    done, spans, ticks = threading.Event(), [], []

    def work():
        for _ in range(calls):
            t0 = time.perf_counter()
            call()
            spans.append((t0, time.perf_counter()))
        done.set()

    th = threading.Thread(target=work)
    th.start()
    while not done.is_set():
        ticks.append(time.perf_counter())
    th.join()
    inside = sum(1 for t in ticks for a, b in spans if a + 1e-3 < t < b - 1e-3)
    assert max(b - a for a, b in spans) > min_s and inside > 100, \
        f"{inside} loops inside {len(spans)} calls of up to {max(b - a for a, b in spans) * 1e3:.1f} ms"


@needs_kt
def test_kt_releases_the_gil():
    op, _ = load_pair(expert_tensors(Q4_K_M, seed=51), threads=1, engine="kt_llamafile")
    x, idx, w = torch.randn(256, H), torch.randint(0, E, (256, K)), torch.rand(256, K)
    op(x, idx, w)
    assert_releases_the_gil(lambda: op(x, idx, w))


def test_auto_picks_the_fastest_installed_engine_for_the_types(monkeypatch):
    fast = "kt_llamafile" if KT_MISSING is None else "ggml"
    if NATIVE_MISSING is None and cpu_kernels.simd() > 0:  # native up to N tokens, the next engine above
        cls, why = cpu_engines.choose("auto", Q4_K_M)
        n = {(2, "kt_llamafile"): 96, (2, "ggml"): 256}.get((cpu_kernels.simd(), fast), 1)
        assert cls is cpu_engines.AutoNativeEngine and cls.name == "native" and cls.up_to(Q4_K_M) == n
        assert f"up to {n} token" in why and f"a call, {fast} above" in why
        assert cpu_engines.choose("auto", (QT.Q8_0,) * 3)[0].name == "ggml"  # native does not run it
        monkeypatch.setattr(cpu_kernels, "simd", lambda variant="native": 1)  # AVX2: decode only
        assert "native (AVX2) up to 1 token a call" in cpu_engines.choose("auto", Q4_K_M)[1]
        monkeypatch.setattr(cpu_kernels, "simd", lambda variant="native": 0)  # plain C: never auto's
    assert cpu_engines.choose("auto", Q4_K_M)[0].name == fast
    assert cpu_engines.choose("auto", (QT.IQ4_NL,) * 3)[0].name == "ggml"  # kt cannot run it
    assert cpu_engines.choose("auto", (QT.Q4_K, QT.Q4_K, QT.Q4_K))[0].name == fast  # the measured kernels
    assert cpu_engines.choose("auto", (QT.Q8_0,) * 3)[0].name == "ggml"  # kt runs it, but was not measured faster
    assert cpu_engines.choose("ggml", (QT.IQ4_NL,) * 3)[0].name == "ggml"
    monkeypatch.setattr(cpu_engines, "_kt", lambda: "kt-kernel is not installed (pip install ...)")
    assert cpu_engines.choose("auto", Q4_K_M)[0].name == "ggml"
    assert cpu_engines.installed() == (["native"] if NATIVE_MISSING is None else []) + ["ggml"]
    assert "not installed: kt_llamafile" in cpu_engines.describe_missing()


@needs_native
def test_auto_native_hands_longer_calls_to_the_next_engine(monkeypatch):
    op, ref = load_pair(expert_tensors(Q4_K_M, seed=70), engine="native")
    monkeypatch.setattr(cpu_engines.AutoNativeEngine, "up_to", classmethod(lambda cls, types: 96))
    eng = cpu_engines.AutoNativeEngine(op.weights, 2, 1024, K)
    fast = "kt_llamafile" if KT_MISSING is None else "ggml"
    assert eng._above is not None and eng._above.name == fast
    calls, run = [], eng._above.run
    eng._above.run = lambda ex, x, i, w: calls.append(x.shape[0]) or run(ex, x, i, w)
    gen = torch.Generator().manual_seed(70)
    x = torch.randn(97, H, generator=gen)
    idx, w = routing(97, K, E, gen)
    ex = op._executor()
    for T in (96, 97):
        with ex.lock:
            y = eng.run(ex, x[:T], idx[:T], w[:T]).clone()
        assert rel(y, emulated(ref, Q4_K_M, x[:T], idx[:T], w[:T])) < 2e-3
    assert calls == [97]  # 96 tokens on native, 97 on the next engine
    assert cpu_engines.AutoNativeEngine(op.weights, 2, 96, K)._above is None  # chunks never exceed 96


def test_an_engine_not_installed_is_a_typed_error_naming_the_rule(monkeypatch):
    monkeypatch.setattr(cpu_engines, "_kt", lambda: "kt-kernel is not installed (pip install --no-deps kt-kernel)")
    with pytest.raises(cpu_engines.EngineError, match="kt_llamafile cannot run: kt-kernel is not installed"):
        cpu_engines.choose("kt_llamafile", Q4_K_M)
    with pytest.raises(OpArgsError, match="engine kt_llamafile cannot run: kt-kernel is not installed"):
        GGMLExperts(E, H, I, engine="kt_llamafile")
    rule = {"name": r"\.mlp\.experts$", "op": "experts.ggml_cpu", "device": "cpu", "args": {"engine": "kt_llamafile"}}
    with pytest.raises(RuleError, match=r"my.yaml rule 2: bad args for experts.ggml_cpu: engine kt_llamafile "
                                        r"cannot run: .*pip install --no-deps kt-kernel"):
        parse_rules([{"name": "^x$", "device": "cpu"}, rule], where="my.yaml")
    with pytest.raises(RuleError, match=r"rule 1: bad args.*engine must be one of 'auto', 'ggml', 'ggml_numa', 'kt_llamafile'"):
        parse_rules([dict(rule, args={"engine": "llamafile"})])
    with pytest.raises(RuleError, match="pin must be true or false"):
        parse_rules([dict(rule, args={"pin": 1})])
    assert GGMLArgs.parse({"engine": "ggml", "pin": True, "hugepages": True}).engine == "ggml"


@needs_kt
def test_an_engine_that_cannot_run_the_types_names_the_tensor():
    tensors = expert_tensors((QT.Q4_K, QT.Q4_K, QT.IQ4_NL), seed=52)
    op = GGMLExperts(E, H, I, threads=1, engine="kt_llamafile")
    with pytest.raises(CheckpointError,
                       match=r"engine kt_llamafile runs .*Q4_K.*, not Q4_K/Q4_K/IQ4_NL.*ffn_down_exps"):
        op.load_weights(FakeSource(tensors), PREFIX)


def _thread_cpus() -> dict[int, set[int]]:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            out[int(tid)] = os.sched_getaffinity(int(tid))
        except OSError:  # a thread that ended meanwhile
            pass
    return out


def test_core_cpus_one_per_physical_core():
    cpus = ggml_lib.core_cpus()
    assert len(cpus) == ggml_lib.physical_cores() >= 1
    assert set(cpus) <= os.sched_getaffinity(0) and list(cpus) == sorted(set(cpus))
    ids = set()
    for c in cpus:  # no two share a core
        with open(f"/sys/devices/system/cpu/cpu{c}/topology/core_id") as f, \
                open(f"/sys/devices/system/cpu/cpu{c}/topology/physical_package_id") as g:
            ids.add((f.read(), g.read()))
    assert len(ids) == len(cpus)


def test_pinned_executor_pins_its_workers_and_gives_the_caller_its_cpus_back():
    mine = os.sched_getaffinity(0)
    if len(mine) < 2:
        pytest.skip("one usable CPU: pinning to it is indistinguishable from not pinning")
    target = min(mine)
    op, ref = load_pair(expert_tensors(Q4_K_M, seed=53), threads=2, engine="ggml")
    gen = torch.Generator().manual_seed(53)
    x = torch.randn(5, H, generator=gen)
    idx, w = routing(5, K, E, gen)
    before = _thread_cpus()
    try:
        ex = ggml_lib.Executor(2, 0, cpus=(target,))  # both threads on one CPU: visible in the masks
        g = ex.moe_graph(op.weights, 5, K)
        g.tensors["x"].copy_(x), g.tensors["ids"].copy_(idx), g.tensors["w"].copy_(w)
        ex.compute(g)  # an OpenMP build of ggml pins its (shared) workers here, a pthread one at creation
        me = threading.get_native_id()
        pinned_now = [tid for tid, c in _thread_cpus().items() if tid != me and c == {target}]
        assert pinned_now, _thread_cpus()
        assert os.sched_getaffinity(0) == mine  # ggml pinned the caller as thread 0; put back
        assert rel(g.tensors["out"], emulated(ref, Q4_K_M, x, idx, w)) < 2e-3
        ex.clear()
    finally:  # OpenMP's workers are shared by every executor: unpin them for the other tests
        for tid, cpus in before.items():
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:
                pass
    pinned, _ = load_pair(expert_tensors(Q4_K_M, seed=53), threads=2, engine="ggml", pin=True)
    assert torch.equal(pinned(x, idx, w), op(x, idx, w)) and os.sched_getaffinity(0) == mine
    with pytest.raises(ValueError, match="cpus must be CPU numbers"):
        ggml_lib.Executor(1, 0, cpus=(100000,))


def test_hugepage_copy_is_equal_aligned_and_used():
    a = np.random.default_rng(54).integers(0, 256, (3, 1000, 7), dtype=np.uint8)
    b = hugepages.anonymous_copy(a)
    assert b.shape == a.shape and np.array_equal(a, b) and b.ctypes.data % hugepages.HUGE == 0
    assert b.ctypes.data != a.ctypes.data and b.flags.c_contiguous
    assert hugepages.thp_mode() in ("always", "madvise", "never", "unknown")
    assert hugepages.huge_page_bytes(b) >= 0
    tensors = expert_tensors(Q4_K_M, seed=55)
    plain, _ = load_pair(tensors, engine="ggml")
    copied, _ = load_pair(tensors, engine="ggml", hugepages=True)
    assert copied.weights.gate.ctypes.data != tensors["gate"].data.ctypes.data
    gen = torch.Generator().manual_seed(55)
    x = torch.randn(4, H, generator=gen)
    idx, w = routing(4, K, E, gen)
    assert torch.equal(copied(x, idx, w), plain(x, idx, w))
    tensors["down"].data[:] = 0  # the copy no longer depends on the file's bytes
    assert torch.count_nonzero(copied(x, idx, w)) > 0


def test_numa_split_sums_to_the_whole_layer_without_reading_more_experts():
    """Experts split into contiguous parts (one per socket), each part computed on its slice of the
    bytes with split_routing's local ids: the parts sum to the whole layer, and each part reads
    only experts the call uses."""
    from hybrid_r1 import numa

    assert numa.expert_ranges(10, 3) == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(ValueError, match="cannot split 4 experts into 5"):
        numa.expert_ranges(4, 5)
    assert numa._parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    found = numa.nodes()
    assert found and set().union(*map(set, found.values())) <= os.sched_getaffinity(0)
    tensors = expert_tensors(Q4_K_M, seed=56)
    op, _ = load_pair(tensors, engine="ggml")
    gen = torch.Generator().manual_seed(56)
    x = torch.randn(6, H, generator=gen)
    idx, w = routing(6, K, E, gen)
    idx[0] = torch.tensor([0, 1, 2, 3])  # a token with no slot in the second part
    whole = op(x, idx, w).clone()
    total = torch.zeros_like(whole)
    ranges = numa.expert_ranges(E, 2)
    for (lo, hi), part in zip(ranges, numa.split_routing(idx, w, ranges)):
        if part is None:
            continue
        ids, wl = part
        assert set((ids + lo).unique().tolist()) <= set(idx.unique().tolist())  # no expert the call does not use
        sliced = {p: type(t)(t.name, t.file, t.ggml_type, (*t.ne[:2], hi - lo), t.data[lo:hi])
                  for p, t in tensors.items()}
        piece = GGMLExperts(hi - lo, H, I, threads=2, engine="ggml")
        piece.load_weights(FakeSource(sliced), PREFIX)
        total += piece(x, ids, wl)
    # the same Q8_K rounding and dot products per slot; only the fp32 sum over slots runs in another
    # order (k + 1 additions of ~2^-24 each): 1e-5 is 10x that bound
    assert rel(total, whole) < 1e-5
    assert numa.split_routing(torch.tensor([[0, 1]]), torch.ones(1, 2), [(0, 4), (4, 8)])[1] is None


def test_plan_and_the_startup_line_name_the_engine(tmp_path, capsys):
    from conftest import SMALL_VOCAB

    from hybrid_r1.cli import main
    from hybrid_r1.cli_support import load_model
    from hybrid_r1.synth import SyntheticWeights, preset_config, write_gguf

    fast = "kt_llamafile" if KT_MISSING is None else "ggml"
    assert main(["plan", "--rules", "rules/int8-gpu-ggml-experts.yaml"]) == 0
    out = capsys.readouterr().out
    if NATIVE_MISSING is None and cpu_kernels.simd() > 0:  # AVX-512: 96 / 256 tokens; AVX2: decode only
        simd = cpu_kernels.simd()
        n = (96 if fast == "kt_llamafile" else 256) if simd == 2 else 1
        kind = "AVX-512" if simd == 2 else "AVX2"
        assert (f"CPU experts engine: native (auto: native ({kind}) up to {n} token{'s' * (n != 1)} a call, {fast} "
                "above, for Q4_K/Q4_K/Q6_K); decode overlapped, handed over in C, layers 3-60") in out
    else:  # overlap auto in the default rules: serial where the engine is called from Python
        assert (f"CPU experts engine: {fast} (auto: the fastest installed engine for Q4_K/Q4_K/Q6_K); decode serial "
                "(overlap auto: this engine is called from Python), layers 3-60") in out
    rules = tmp_path / "r.yaml"
    rules.write_text("- name: '\\.mlp\\.experts$'\n  op: experts.ggml_cpu\n  device: cpu\n  args: {engine: ggml}\n")
    assert main(["plan", "--rules", str(rules)]) == 0
    assert "CPU experts engine: ggml (engine: ggml), layers 3-60" in capsys.readouterr().out
    path = write_gguf(tmp_path / "t.gguf", SyntheticWeights(preset_config("tiny", vocab_size=SMALL_VOCAB), seed=4),
                      tokenizer=False)
    lines = []
    load_model(path, info=lines.append, device="cpu")
    shown = [line for line in lines if line.startswith("CPU experts engine: ")]
    assert len(shown) == 1 and "layers 1-" in shown[0], lines


@pytest.mark.parametrize("split_name, whole_name", [("ggml_numa", "ggml"),
                                                     pytest.param("native_numa", "native", marks=needs_native)])
def test_numa_engine_equals_its_engine_with_two_nodes(monkeypatch, split_name, whole_name):
    """Two nodes faked as one CPU each (the machines here have one): each node's pinned pool
    computes its half of the experts, the sum equals the one-pool layer to fp32 summation order."""
    import typing

    from hybrid_r1 import numa

    assert typing.get_args(typing.get_type_hints(GGMLArgs)["engine"]) == cpu_engines.ENGINE_NAMES
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("one usable CPU: two nodes cannot be faked")
    monkeypatch.setattr(numa, "nodes", lambda: {0: (cpus[0],), 1: (cpus[1],)})
    monkeypatch.setattr(ggml_lib, "core_cpus", lambda: tuple(cpus))
    tensors = expert_tensors(Q4_K_M, seed=57)
    whole, ref = load_pair(tensors, engine=whole_name)
    split, _ = load_pair(tensors, engine=split_name)
    assert cpu_engines.choose("auto", Q4_K_M)[0].name != split_name
    gen = torch.Generator().manual_seed(57)
    before = _thread_cpus()
    try:
        for T in (1, 7):
            x = torch.randn(T, H, generator=gen)
            idx, w = routing(T, K, E, gen)
            y = split(x, idx, w)
            # only the last slot-sum differs in order: k + 1 fp32 additions (see the numa split test)
            assert rel(y, whole(x, idx, w)) < 1e-5
            assert rel(y, emulated(ref, Q4_K_M, x, idx, w)) < 2e-3
        eng = split._engine
        assert [ex.cpus for _, ex in eng.parts] == [(cpus[0],), (cpus[1],)]
        assert all(p.name == whole_name for p, _ in eng.parts)
        assert [p.weights.n_experts for p, _ in eng.parts] == [E // 2, E // 2]
        assert eng.parts[1][0].weights.gate.ctypes.data == tensors["gate"].data[E // 2:].ctypes.data  # no copy
        one = torch.tensor([[0, 1, 2, 3]])  # every slot on node 0: node 1 skips the call
        assert rel(split(x[:1], one, w[:1]), whole(x[:1], one, w[:1])) < 1e-5
    finally:
        for tid, c in before.items():  # OpenMP builds share pinned workers: unpin them for other tests
            try:
                os.sched_setaffinity(tid, c)
            except OSError:
                pass
