"""The hand-over of CPU expert calls from a CUDA stream to the host worker (hybrid_r1/handoff.py,
ops/experts_ggml_overlap.py).

On the CPU a test thread plays the stream: it writes a slot's inputs and the request word in
ordinary memory (HostWorker(pinned=False)) and waits for the done word, as kernels/handoff.py does
on a GPU. The worker must give, for every request, exactly what the compute gives when called
directly (same function, same inputs: bit for bit), into an output poisoned with NaN beforehand;
and every failure (a request out of sequence, a compute that raises, a slot whose owner is gone, a
stream that gave up) must answer the stream (NaN, done) and raise a HandoffError on the caller's
side instead of hanging. On a GPU the overlapped decode (one CUDA graph) must give the serial
decode's greedy tokens and logits (the same ggml graph on the same inputs, the same GPU kernels:
bit for bit expected; the bound allowed is one bf16 step at the logits' scale).
"""

from __future__ import annotations

import gc
import math
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import needs_cuda
from test_experts_ggml import PREFIX, FakeSource, expert_tensors

from hybrid_r1 import cpu_kernels, ggml_lib, handoff
from hybrid_r1.handoff import LAYOUT, HandoffError, HostWorker, NativeWorker
from hybrid_r1.ops import OpArgsError
from hybrid_r1.ops.experts_ggml import GGMLArgs, GGMLExperts
from hybrid_r1.ops.experts_ggml_overlap import OverlappedGGMLExperts

E, H, K = 8, 256, 4
WAIT_S = 10.0  # the test thread's patience: far above a tiny ggml call (~ms) on a loaded 2-core box


def toy(x, idx, w, out):
    """An independent compute: anything exact that reads all three inputs."""
    out.copy_(x * w.sum(-1, keepdim=True) + idx.sum(-1, keepdim=True).to(x.dtype))


def inputs(n: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(n)])
    w = torch.rand(n, K, generator=g)
    return x, idx, w


@pytest.fixture
def worker():
    w = HostWorker(pinned=False)
    w.start()
    yield w
    w.stop()


def roundtrip(worker, slot, x, idx, w, number=None, poison=math.nan):
    slot.out.fill_(poison)  # NaN: a request the worker skipped cannot pass; a number: one it did not poison
    n = worker.post(slot, x, idx, w, number)
    out = worker.answer(slot, n, x.shape[0], WAIT_S)
    assert out is not None, "the worker did not answer"
    return out


def test_worker_answers_each_request_with_the_compute(worker):
    slot = worker.add_slot("toy", toy, H, K, torch.float32, torch.int64, max_tokens=4)
    for step in range(6):  # several steps, varying token counts, fresh inputs
        x, idx, w = inputs(1 + step % 4, seed=step)
        want = torch.empty(x.shape)
        toy(x, idx, w, want)
        assert torch.equal(roundtrip(worker, slot, x, idx, w), want)
    worker.raise_if_failed()
    assert worker.stats["requests"] == 6


@pytest.mark.parametrize("made_in_inference_mode", [True, False])
def test_buffers_made_in_either_mode_are_written_in_both(worker, made_in_inference_mode):
    # Decodes run under torch.inference_mode() (per thread): tensors made there are inference
    # tensors, which code outside it may not write. The slot's buffers and ggml's arena must be
    # writable by the worker and by serial calls whichever thread and mode made them first.
    tensors = expert_tensors((8, 8, 8), seed=14)
    serial = GGMLExperts(E, H, H, threads=2)
    serial.load_weights(FakeSource(tensors), PREFIX)
    op = OverlappedGGMLExperts(E, H, H, threads=2)
    op.load_weights(FakeSource(tensors), PREFIX)
    first = torch.inference_mode(made_in_inference_mode)
    with first:
        slot = worker.add_slot(op.module_name, op._host_compute, H, K, torch.bfloat16, torch.int64, max_tokens=1)
        x, idx, w = inputs(1, seed=31, dtype=torch.bfloat16)
        got = roundtrip(worker, slot, x, idx, w)  # the worker makes ggml's graph for 1 token
    with torch.inference_mode(not made_in_inference_mode):  # then the other mode, on this thread
        assert torch.equal(serial(x, idx, w), got)
        assert torch.equal(roundtrip(worker, slot, x, idx, w), got)
    worker.raise_if_failed()


def test_worker_runs_ggml_experts_as_the_serial_path(worker):
    tensors = expert_tensors((8, 8, 8), seed=11)  # Q8_0
    serial = GGMLExperts(E, H, H, threads=2)
    serial.load_weights(FakeSource(tensors), PREFIX)
    op = OverlappedGGMLExperts(E, H, H, threads=2)
    op.load_weights(FakeSource(tensors), PREFIX)
    slot = worker.add_slot(op.module_name, op._host_compute, H, K, torch.bfloat16, torch.int64, max_tokens=2)
    for step in range(4):
        x, idx, w = inputs(1 + step % 2, seed=20 + step, dtype=torch.bfloat16)
        assert torch.equal(roundtrip(worker, slot, x, idx, w), serial(x, idx, w))  # same graph, same bits


def test_request_out_of_sequence_fails_without_hanging(worker):
    slot = worker.add_slot("toy", toy, H, K, torch.float32, torch.int64, max_tokens=1)
    roundtrip(worker, slot, *inputs(1, seed=1))
    last = int(worker.ctrl[LAYOUT["req"]])
    out = roundtrip(worker, slot, *inputs(1, seed=2), number=last + 2)  # one skipped
    assert out.isnan().all()
    with pytest.raises(HandoffError, match=f"request {last + 2} arrived after {last}"):
        worker.raise_if_failed()
    assert roundtrip(worker, slot, *inputs(1, seed=3)).isnan().all()  # later requests: NaN at once, no compute


def test_compute_error_names_the_layer(worker):
    op = OverlappedGGMLExperts(E, H, H, threads=2)
    op.load_weights(FakeSource(expert_tensors((8, 8, 8), seed=12)), PREFIX)
    slot = worker.add_slot(op.module_name, op._host_compute, H, K, torch.bfloat16, torch.int64, max_tokens=1)
    x, idx, w = inputs(1, seed=4, dtype=torch.bfloat16)
    idx[0, 1] = E  # out of range: ggml would write out of bounds, the check must catch it first
    assert roundtrip(worker, slot, x, idx, w).isnan().all()
    with pytest.raises(HandoffError, match=rf"{PREFIX}: ValueError: expert ids must lie in \[0, {E}\)"):
        worker.raise_if_failed()


def test_slot_of_a_dropped_caller_fails(worker):
    class Owner:
        def compute(self, x, idx, w, out):
            toy(x, idx, w, out)

    owner = Owner()
    slot = worker.add_slot("owned", owner.compute, H, K, torch.float32, torch.int64, max_tokens=1)
    assert not roundtrip(worker, slot, *inputs(1, seed=5)).isnan().any()
    del owner  # held weakly: the slot goes with it
    assert roundtrip(worker, slot, *inputs(1, seed=6)).isnan().all()
    with pytest.raises(HandoffError, match="no live caller holds"):
        worker.raise_if_failed()


def test_stop_ends_the_thread_and_answers_a_request_in_flight():
    w = HostWorker(pinned=False)
    w.start()
    slot = w.add_slot("slow", lambda *a: (time.sleep(0.3), toy(*a)), H, K, torch.float32, torch.int64, 1)
    roundtrip(w, slot, *inputs(1, seed=7))
    assert_stop_answers_a_request_in_flight(w, slot)


def assert_stop_answers_a_request_in_flight(w, slot):
    w.stop()
    assert not w.alive
    n = w.post(slot, *inputs(1, seed=8))  # nobody serves it now: the stream's own timeout applies ...
    assert w.answer(slot, n, 1, timeout_s=0.05) is None
    w.stop()  # ... or stop() answers it with an error
    assert w.answer(slot, n, 1, timeout_s=1.0).isnan().all()
    with pytest.raises(HandoffError, match="stopped with a request in flight"):
        w.raise_if_failed()


def test_stream_timeout_is_reported():
    w = HostWorker(pinned=False)  # never started: what the GPU's wait kernel does when it gives up
    w.ctrl[LAYOUT["err"]] = 5
    with pytest.raises(HandoffError, match="waited too long for request 5"):
        w.raise_if_failed()


# ---- the native kernel's own poller (cpu_kernels.Poller behind handoff.NativeWorker) --------------
# The same protocol served in C: every request answered with exactly what the kernel gives when
# called directly on the same inputs (same code, same order of operations: bit for bit), into a
# poisoned output; each failure answers NaN and names its cause on the caller's side.

NATIVE = cpu_kernels.missing()
needs_native = pytest.mark.skipif(NATIVE is not None, reason=f"no native kernel: {NATIVE}")
Q4_K_M = (12, 12, 14)  # Q4_K gate and up, Q6_K down


class _Owner:
    """Stands for the operator a kernel slot belongs to."""


def _kernel_weights(seed: int) -> ggml_lib.ExpertWeights:
    t = expert_tensors(Q4_K_M, seed=seed)
    return ggml_lib.ExpertWeights(t["gate"].data, t["up"].data, t["down"].data, Q4_K_M, H, H)


@pytest.fixture
def native():
    w = NativeWorker(cpu_kernels.Pool(2), pinned=False)
    w.start()
    yield w
    w.stop()


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_worker_answers_each_request_with_the_kernel(native, dtype):
    weights, owner = _kernel_weights(40), _Owner()
    slot = native.add_kernel_slot("blk.3.experts", owner, weights, K, dtype, max_tokens=4)
    for step in range(6):  # varying token counts, fresh inputs
        x, idx, w = inputs(1 + step % 4, seed=50 + step, dtype=dtype)
        want = torch.full(x.shape, math.nan, dtype=dtype)
        native.pool.moe(weights, x, idx, w, want)
        assert torch.equal(roundtrip(native, slot, x, idx, w), want)  # NaN anywhere would not be equal
    native.raise_if_failed()
    stats = native.stats
    assert stats["requests"] == 6 and 0 < stats["compute_s"] <= stats["busy_s"]


@needs_native
@pytest.mark.parametrize("case", ["ids", "sequence", "tokens", "dropped"])
def test_native_worker_answers_a_bad_request_with_nan_and_says_why(native, case):
    weights, owner = _kernel_weights(41), _Owner()
    slot = native.add_kernel_slot("blk.5.experts", owner, weights, K, torch.float32, max_tokens=2)
    assert not roundtrip(native, slot, *inputs(1, seed=60)).isnan().any()
    last = int(native.ctrl[LAYOUT["req"]])
    x, idx, w = inputs(1, seed=61)
    seven = 7.0  # the output's old contents: the answer must be NaN written by the worker, not them
    if case == "ids":
        idx[0, 1] = E  # out of range: the kernel refuses it before it reads a row
        out, why = roundtrip(native, slot, x, idx, w, poison=seven), rf"blk.5.experts: expert ids must lie in \[0, {E}\)"
    elif case == "sequence":
        out = roundtrip(native, slot, x, idx, w, number=last + 2, poison=seven)
        why = f"request {last + 2} arrived after {last}"
    elif case == "tokens":  # a token count past the slot's room, as a broken stream might write
        slot.out.fill_(seven)
        words = native._words
        words[LAYOUT["slot"]], words[LAYOUT["ntok"]] = slot.index, 3
        words[LAYOUT["req"]] = last + 1
        out, why = native.answer(slot, last + 1, 2, WAIT_S), rf"request {last + 1} for blk.5.experts has 3 tokens \(1..2\)"
    else:
        del owner  # the slot's hold on the weights goes with its operator; its buffers answer NaN
        gc.collect()
        assert slot.index not in native._kernel_slots
        out = roundtrip(native, slot, x, idx, w, poison=seven)
        why = f"names slot {slot.index}, which no live caller holds"
    assert out is not None and out.isnan().all()
    with pytest.raises(HandoffError, match=why):
        native.raise_if_failed()
    assert roundtrip(native, slot, *inputs(1, seed=62), poison=seven).isnan().all()  # later requests: NaN at once


@needs_native
def test_native_worker_restarts_and_stop_answers_a_request_in_flight():
    w = NativeWorker(cpu_kernels.Pool(2), pinned=False)
    w.start()
    owner = _Owner()
    slot = w.add_kernel_slot("blk.3.experts", owner, _kernel_weights(43), K, torch.float32, max_tokens=1)
    first = roundtrip(w, slot, *inputs(1, seed=64))
    w.stop()
    assert not w.alive
    w.start()  # a new thread serves the slots the worker had
    assert torch.equal(roundtrip(w, slot, *inputs(1, seed=64)), first)
    assert_stop_answers_a_request_in_flight(w, slot)


@needs_native
def test_overlapped_op_hands_the_native_kernel_its_own_poller():
    tensors = expert_tensors(Q4_K_M, seed=44)
    ops = {}
    for engine in ("native", "ggml"):
        ops[engine] = OverlappedGGMLExperts(E, H, H, threads=2, engine=engine)
        ops[engine].load_weights(FakeSource(tensors), PREFIX)
    assert isinstance(ops["native"]._default_worker(torch.bfloat16), NativeWorker)
    assert type(ops["native"]._default_worker(torch.float16)) is HostWorker  # a dtype the kernel does not read
    assert type(ops["ggml"]._default_worker(torch.bfloat16)) is HostWorker


@pytest.mark.parametrize("engine, types", [("ggml", (8, 8, 8)), pytest.param("native", Q4_K_M, marks=needs_native)])
def test_overlap_auto_hands_over_only_where_the_c_thread_serves(monkeypatch, engine, types):
    from hybrid_r1 import graphs

    assert GGMLArgs.parse({"overlap": "auto"}).overlap == "auto"
    with pytest.raises(OpArgsError, match="overlap must be true or false or one of 'auto', got 'yes'"):
        GGMLArgs.parse({"overlap": "yes"})
    tensors = expert_tensors(types, seed=45)
    op = OverlappedGGMLExperts(E, H, H, threads=2, engine=engine, overlap="auto")
    op.load_weights(FakeSource(tensors), PREFIX)
    serial = GGMLExperts(E, H, H, threads=2, engine=engine)
    serial.load_weights(FakeSource(tensors), PREFIX)
    c = engine == "native"  # the native kernel's C thread serves it; ggml would go through Python
    assert op.hands_off == c
    assert (op.graph_safe, op.host_sync, op.runs_beside, op.host_work) == (c, not c, c, c)
    assert graphs.breaks_graph(op) == (not c)
    assert ("decode overlapped, handed over in C" if c else "decode serial (overlap auto: this engine is called "
            "from Python)") in op.extra_repr()
    if not c:  # a call that would hand over runs the serial path instead
        monkeypatch.setattr(OverlappedGGMLExperts, "hands_over", staticmethod(lambda x: True))
        x, idx, w = inputs(2, seed=46, dtype=torch.bfloat16)
        assert not op.takes_handoff(x, idx)
        assert torch.equal(op(x, idx, w), serial(x, idx, w))


def test_overlap_arg_picks_the_overlapped_operator_and_cpu_calls_run_serially():
    from hybrid_r1.model import Experts
    from hybrid_r1.synth import preset_config

    cfg = preset_config("tiny")
    with torch.device("meta"):
        module = Experts(cfg)
    assert type(GGMLExperts.from_module(module, args=GGMLArgs())) is GGMLExperts
    op = GGMLExperts.from_module(module, args=GGMLArgs(overlap=True))
    assert type(op) is OverlappedGGMLExperts and op.graph_safe and not op.host_sync and op.runs_beside
    with pytest.raises(OpArgsError, match="overlap_timeout_s must be > 0"):
        GGMLArgs(overlap_timeout_s=0).check()
    # on CPU inputs the overlapped op is the serial op plus `beside`, in MoE's order
    tensors = expert_tensors((8, 8, 8), seed=13)
    serial, over = GGMLExperts(E, H, H, threads=2), OverlappedGGMLExperts(E, H, H, threads=2)
    serial.load_weights(FakeSource(tensors), PREFIX)
    over.load_weights(FakeSource(tensors), PREFIX)
    x, idx, w = inputs(3, seed=9, dtype=torch.bfloat16)
    shared = torch.randn(3, H).to(torch.bfloat16)
    assert torch.equal(over(x, idx, w, lambda: shared), serial(x, idx, w) + shared)


def test_moe_reads_runs_beside_through_a_graph_break(tiny_model):
    # While capturing, the graph runner wraps modules that break the graph (graphs._Break): MoE must
    # still learn from the wrapper whether its experts run the shared expert beside them.
    from types import SimpleNamespace

    from hybrid_r1 import graphs
    from hybrid_r1.model import MoE

    moe = next(b.mlp for b in tiny_model.module.model.layers if isinstance(b.mlp, MoE))
    x = torch.randn(3, tiny_model.config.hidden_size)
    want = moe(x)
    inner = moe.experts
    moe.experts = graphs._Break(SimpleNamespace(capturing=False), inner)
    try:
        assert moe.experts.runs_beside is False
        assert torch.equal(moe(x), want)
    finally:
        moe.experts = inner


class _CPUStream:
    """kernels/handoff.py's submit and collect for CPU tensors: what the stream does, in order,
    played by the calling thread (the worker is the real one)."""

    @staticmethod
    def submit(x, idx, w, hx, hidx, hw, seq, ctrl, slot, layout):
        n = x.shape[0]
        hx[:n], hidx[:n], hw[:n] = x, idx, w
        seq[0] += 1
        ctrl[layout["slot"]], ctrl[layout["ntok"]] = slot, n
        ctrl[layout["req"]] = seq[0]

    @staticmethod
    def collect(hout, beside, seq, ctrl, shape, dtype, timeout_ns, layout):
        deadline = time.perf_counter() + timeout_ns / 1e9
        while int(ctrl[layout["done"]]) != int(seq[0]):
            if time.perf_counter() > deadline:
                ctrl[layout["err"]] = seq[0]
                return torch.full(shape, math.nan, dtype=dtype)
            time.sleep(0)
        y = hout.flatten()[: math.prod(shape)].view(shape).float()
        return (y if beside is None else y + beside.float()).to(dtype)


@pytest.mark.parametrize("type_mix, engine", [("Q8_0", "ggml"),
                                              pytest.param("Q4_K_M", "native", marks=needs_native)])
def test_model_decode_through_the_worker_equals_serial(tmp_path, monkeypatch, type_mix, engine):
    # The whole overlapped path but the two Triton kernels, on the CPU: MoE passes the shared
    # expert beside, the op registers its slot (under a decode's inference mode), the process's
    # worker (Python for ggml, the kernel's C poller for native) computes it while this thread
    # computes the shared expert; the same greedy tokens and, the same engine on the same inputs,
    # the same logits bit for bit.
    import yaml

    import hybrid_r1
    import hybrid_r1_kernels
    from conftest import SMALL_VOCAB, random_ids
    from hybrid_r1.formats.gguf_writer import write_gguf_from_checkpoint
    from hybrid_r1.generate import forward_tokens, prefill
    from hybrid_r1.synth import SyntheticWeights, preset_config

    cfg = preset_config("tiny", vocab_size=SMALL_VOCAB, q_lora_rank=128)
    (gguf,) = write_gguf_from_checkpoint(SyntheticWeights(cfg, seed=4), tmp_path / "m.gguf", type_mix=type_mix)
    rules = yaml.safe_load((Path(__file__).resolve().parent.parent / "rules" / "cpu-ggml-experts.yaml").read_text())
    models = {}
    for overlap in (False, True):
        rules[0]["args"] = {"threads": 2, "overlap": overlap, "overlap_timeout_s": WAIT_S, "engine": engine}
        path = tmp_path / f"rules-{overlap}.yaml"
        path.write_text(yaml.safe_dump(rules))
        models[overlap] = hybrid_r1.load(gguf, rules=path)
    ops = [m for m in models[True].module.modules() if isinstance(m, OverlappedGGMLExperts)]
    assert ops and all(op.runs_beside for op in ops)
    monkeypatch.setattr(OverlappedGGMLExperts, "hands_over", staticmethod(lambda x: True))
    monkeypatch.setattr(hybrid_r1_kernels, "handoff", _CPUStream, raising=False)
    monkeypatch.setitem(__import__("sys").modules, "hybrid_r1_kernels.handoff", _CPUStream)
    chosen = ops[0]._default_worker(torch.float32)  # the process's, as the ops pick it
    assert isinstance(chosen, NativeWorker) == (engine == "native")
    served = chosen.stats["requests"]
    prompt = random_ids(6, seed=9)  # <= 8 tokens: the prompt hands over too
    runs = {}
    with torch.inference_mode():
        for overlap, model in models.items():
            cache = model.new_cache()
            logits = [prefill(model.module, prompt, cache)]
            for _ in range(6):
                logits.append(forward_tokens(model.module, [int(logits[-1].argmax())], cache)[-1])
            runs[overlap] = torch.stack(logits)
    n_moe = sum(1 for b in models[True].module.model.layers if cfg.is_moe_layer(b.self_attn.layer))
    assert all(op.worker is chosen for op in ops)
    assert chosen.stats["requests"] - served == 7 * n_moe  # every MoE call of every step
    assert torch.equal(runs[True], runs[False])
    chosen.raise_if_failed()


# ---- on the GPU ------------------------------------------------------------------------------------

def _hybrid_model(tmp_path, overlap: bool, timeout_s: float = 10.0, type_mix: str = "Q8_0", engine: str = "auto"):
    import yaml
    from conftest import SMALL_VOCAB

    import hybrid_r1
    from hybrid_r1.formats.gguf_writer import write_gguf_from_checkpoint
    from hybrid_r1.synth import SyntheticWeights, preset_config

    gguf = tmp_path / f"m-{type_mix}.gguf"
    if not gguf.exists():
        cfg = preset_config("tiny", vocab_size=SMALL_VOCAB, q_lora_rank=128)
        write_gguf_from_checkpoint(SyntheticWeights(cfg, seed=3), gguf, type_mix=type_mix)
    rules = yaml.safe_load((Path(__file__).resolve().parent.parent / "rules" / "int8-gpu-ggml-experts.yaml").read_text())
    rules[0]["args"]["overlap"] = overlap
    rules[0]["args"]["overlap_timeout_s"] = timeout_s  # a broken hand-shake fails fast, not in 60 s a layer
    rules[0]["args"]["engine"] = engine
    path = tmp_path / f"rules-{overlap}-{timeout_s}-{engine}.yaml"
    path.write_text(yaml.safe_dump(rules))
    return hybrid_r1.load(gguf, rules=path)


def _decode(model, prompt, steps):
    from hybrid_r1.generate import prefill
    from hybrid_r1.graphs import DecodeGraphs

    cache = model.new_cache()
    runner = DecodeGraphs(model.module, cache)
    logits = prefill(model.module, prompt, cache)
    toks, seen = [], []
    for _ in range(steps):
        toks.append(int(logits.argmax()))
        logits = runner.step(toks[-1]).clone()
        seen.append(logits)
    return toks, torch.stack(seen), runner


@needs_cuda
@pytest.mark.parametrize("type_mix, engine", [("Q8_0", "ggml"),
                                              pytest.param("Q4_K_M", "native", marks=needs_native)])
@torch.inference_mode()
def test_overlapped_decode_is_one_graph_and_equals_serial(tmp_path, type_mix, engine):
    # ggml's layers hand over to the Python worker, the native kernel's to its C poller
    from conftest import random_ids

    prompt = random_ids(12, seed=6)
    serial_toks, serial_logits, serial_runner = _decode(_hybrid_model(tmp_path, False, type_mix=type_mix, engine=engine),
                                                        prompt, 24)
    model = _hybrid_model(tmp_path, True, type_mix=type_mix, engine=engine)
    toks, logits, runner = _decode(model, prompt, 24)
    ops = [m for m in model.module.modules() if isinstance(m, OverlappedGGMLExperts)]
    assert ops and all(isinstance(op.worker, NativeWorker) == (engine == "native") for op in ops)
    assert runner.use_graphs and runner.breaks == 0  # no break at the experts: graphs only
    assert serial_runner.breaks > 0
    assert toks == serial_toks
    bound = 2**-7 * serial_logits.abs().max().item()  # one bf16 step at the logits' scale
    assert (logits - serial_logits).abs().max().item() <= bound
    assert not logits.isnan().any()
    # the eager path (no graphs) overlaps too and gives the same tokens
    assert list(model.generate(prompt, max_new_tokens=12, stop=[], cuda_graphs=False)) == serial_toks[:12]


@needs_cuda
@torch.inference_mode()
def test_overlapped_call_that_times_out_raises_not_hangs(tmp_path):
    from conftest import random_ids

    model = _hybrid_model(tmp_path, True, timeout_s=0.2)
    own = HostWorker(pinned=True)  # not the process's: its failure must not leak into other tests
    own.start()
    ops = [m for m in model.module.modules() if isinstance(m, OverlappedGGMLExperts)]
    slow = threading.Event()
    for op in ops:
        op.worker = own
        fast = op._host_compute
        op._host_compute = lambda *a, f=fast: (slow.is_set() and time.sleep(3.0), f(*a))
    from hybrid_r1.generate import prefill
    from hybrid_r1.graphs import DecodeGraphs

    cache = model.new_cache()
    runner = DecodeGraphs(model.module, cache)
    logits = prefill(model.module, random_ids(8, seed=8), cache)
    for _ in range(3):
        logits = runner.step(int(logits.argmax()))
    slow.set()
    t0 = time.perf_counter()
    with pytest.raises(HandoffError, match="waited too long"):
        runner.step(int(logits.argmax()))
    assert time.perf_counter() - t0 < 0.2 * len(ops) + 2.5  # bounded: it gave up, it did not hang (the worker sleeps 3 s)
    own.stop()
