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

import math
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import needs_cuda
from test_experts_ggml import PREFIX, FakeSource, expert_tensors

from hybrid_r1.handoff import LAYOUT, HandoffError, HostWorker
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


def roundtrip(worker, slot, x, idx, w, number=None):
    slot.out.fill_(math.nan)  # poison: a request the worker skipped cannot pass
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
        seq += 1
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


def test_model_decode_through_the_worker_equals_serial(tmp_path, monkeypatch):
    # The whole overlapped path but the two Triton kernels, on the CPU: MoE passes the shared
    # expert beside, the op registers its slot (under a decode's inference mode), the process's
    # worker runs ggml on it while this thread computes the shared expert; the same greedy tokens
    # and, the same ggml graph on the same inputs, the same logits bit for bit.
    import yaml

    import hybrid_r1
    import hybrid_r1_kernels
    from conftest import SMALL_VOCAB, random_ids
    from hybrid_r1.formats.gguf_writer import write_gguf_from_checkpoint
    from hybrid_r1.generate import forward_tokens, prefill
    from hybrid_r1.synth import SyntheticWeights, preset_config

    cfg = preset_config("tiny", vocab_size=SMALL_VOCAB, q_lora_rank=128)
    (gguf,) = write_gguf_from_checkpoint(SyntheticWeights(cfg, seed=4), tmp_path / "m.gguf", type_mix="Q8_0")
    rules = yaml.safe_load((Path(__file__).resolve().parent.parent / "rules" / "cpu-ggml-experts.yaml").read_text())
    models = {}
    for overlap in (False, True):
        rules[0]["args"] = {"threads": 2, "overlap": overlap, "overlap_timeout_s": WAIT_S}
        path = tmp_path / f"rules-{overlap}.yaml"
        path.write_text(yaml.safe_dump(rules))
        models[overlap] = hybrid_r1.load(gguf, rules=path)
    ops = [m for m in models[True].module.modules() if isinstance(m, OverlappedGGMLExperts)]
    assert ops and all(op.runs_beside for op in ops)
    monkeypatch.setattr(OverlappedGGMLExperts, "hands_over", staticmethod(lambda x: True))
    monkeypatch.setattr(hybrid_r1_kernels, "handoff", _CPUStream, raising=False)
    monkeypatch.setitem(__import__("sys").modules, "hybrid_r1_kernels.handoff", _CPUStream)
    from hybrid_r1 import handoff

    served = handoff.worker().stats["requests"]
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
    assert handoff.worker().stats["requests"] - served == 7 * n_moe  # every MoE call of every step
    assert torch.equal(runs[True], runs[False])
    handoff.worker().raise_if_failed()


# ---- on the GPU ------------------------------------------------------------------------------------

def _hybrid_model(tmp_path, overlap: bool, timeout_s: float = 10.0):
    import yaml
    from conftest import SMALL_VOCAB

    import hybrid_r1
    from hybrid_r1.formats.gguf_writer import write_gguf_from_checkpoint
    from hybrid_r1.synth import SyntheticWeights, preset_config

    gguf = tmp_path / "m.gguf"
    if not gguf.exists():
        cfg = preset_config("tiny", vocab_size=SMALL_VOCAB, q_lora_rank=128)
        write_gguf_from_checkpoint(SyntheticWeights(cfg, seed=3), gguf, type_mix="Q8_0")
    rules = yaml.safe_load((Path(__file__).resolve().parent.parent / "rules" / "int8-gpu-ggml-experts.yaml").read_text())
    rules[0]["args"]["overlap"] = overlap
    rules[0]["args"]["overlap_timeout_s"] = timeout_s  # a broken hand-shake fails fast, not in 60 s a layer
    path = tmp_path / f"rules-{overlap}-{timeout_s}.yaml"
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
@torch.inference_mode()
def test_overlapped_decode_is_one_graph_and_equals_serial(tmp_path):
    from conftest import random_ids

    prompt = random_ids(12, seed=6)
    serial_toks, serial_logits, serial_runner = _decode(_hybrid_model(tmp_path, False), prompt, 24)
    model = _hybrid_model(tmp_path, True)
    toks, logits, runner = _decode(model, prompt, 24)
    assert runner.use_graphs and len(runner.segments) == 1  # no break at the experts
    assert len(serial_runner.segments) > 1
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
