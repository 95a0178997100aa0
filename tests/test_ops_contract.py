"""The operator and reader contracts (ops/base.py, formats/source.py): what every operator declares,
typed rule args checked before any weight is read, shards, graph breaks, the fusion pass, and a
new operator added as one class plus one registry line."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import hybrid_r1
from hybrid_r1 import graphs, ops, placement
from hybrid_r1.errors import CheckpointError
from hybrid_r1.formats.source import WeightSource
from hybrid_r1.loading import build, open_checkpoint
from hybrid_r1.ops import LinearOperator, OpArgs, OpArgsError, Shard, op_class
from hybrid_r1.ops.linear_int8 import Int8BlockLinear, Int8ChannelLinear
from hybrid_r1.placement import RuleError, parse_rules
from hybrid_r1.synth import SyntheticWeights, preset_config


def test_every_registered_operator_declares_the_contract():
    for name in ops.OPS:
        cls = op_class(name)
        assert cls.name == name and issubclass(cls, ops.Operator)
        assert cls.replaces in placement.MODULE_CLASSES
        assert issubclass(cls.Args, OpArgs) and cls.Args.parse({}) == cls.Args()  # defaults parse
        assert set(cls.devices) <= {"cpu", "cuda"} and cls.devices
        assert not (cls.graph_safe and cls.host_sync)  # runs inside a graph, or between graphs


@pytest.mark.parametrize("op, args, message", [
    ("experts.ggml_cpu", {"threads": "many"}, "threads must be an integer or null, got 'many'"),
    ("experts.ggml_cpu", {"threads": True}, "threads must be an integer or null, got True"),
    ("experts.ggml_cpu", {"poll": 2.5}, "poll must be an integer, got 2.5"),
    ("experts.ggml_cpu", {"poll": 101}, r"poll must be in 0..100, got 101"),
    ("experts.ggml_cpu", {"threads": 0}, "threads must be >= 1"),
    ("experts.ggml_cpu", {"prefill_device": "tpu"}, "prefill_device must be a CUDA device"),
    ("experts.ggml_cpu", {"thread": 4}, r"thread is not an argument of this operator \(allowed: threads, "),
    ("linear.int8_block", {"rounding": "up"}, "rounding must be one of 'nearest_even', 'trunc', got 'up'"),
    ("linear.int8_channel", {"rounding": 1}, "rounding must be one of"),
    ("experts.dequant", {"compute_dtype": "int8"}, "compute_dtype must be one of 'float32'"),
])
def test_bad_args_name_file_rule_and_arg(op, args, message):
    rule = {"name": "x", "op": op, "args": args, "device": "cpu"}
    with pytest.raises(RuleError, match=f"my.yaml rule 2: bad args for {op}: {message}"):
        parse_rules([{"name": "ok"}, rule], where="my.yaml")


@pytest.mark.parametrize("rule, message", [
    ({"name": 5}, "`name` must be a string, got 5"),
    ({"name": [1, 2]}, r"`name` must be a string, got \[1, 2\]"),
    ({"class": 7}, "`class` must be a string, got 7"),
    ({"class": "Linera"}, "unknown class 'Linera'"),
    ({"name": "x", "device": 0}, "`device` must be a string"),
    ({"name": "x", "op": ["linear.int8_block"]}, "`op` must be a string"),
    ({"name": "x", "args": {"threads": 2}}, "args without an op"),
    ({"class": "Experts", "op": "experts.ggml_cpu", "device": "cuda"}, "experts.ggml_cpu computes on cpu, but the rule says device: cuda"),
])
def test_rule_fields_are_type_checked(rule, message):
    with pytest.raises(RuleError, match=f"f.yaml rule 1: {message}"):
        parse_rules([rule], where="f.yaml")


def test_inherited_device_the_operator_cannot_run_on():
    model = build(preset_config("tiny", vocab_size=64))
    rules = parse_rules([{"class": "Experts", "op": "experts.dequant"}], where="r.yaml")
    with pytest.raises(RuleError, match="r.yaml rule 1: experts.dequant computes on cpu, but .* would be on cuda"):
        placement.apply(model, rules, torch.device("cuda"), torch.bfloat16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_absent_device_is_named_before_loading(tiny_dir):
    rules = [{"name": "^model", "device": "cuda:1"}]
    with pytest.raises(RuleError, match="rules rule 1: device cuda:1: this machine has no CUDA GPU"):
        hybrid_r1.load(tiny_dir, rules=rules)
    with pytest.raises(hybrid_r1.HybridR1Error, match="device cuda: this machine has no CUDA GPU"):
        hybrid_r1.load(tiny_dir, device="cuda")
    with pytest.raises(hybrid_r1.HybridR1Error, match="'gpu' is not a device"):
        hybrid_r1.load(tiny_dir, device="gpu")


class _OneTensor:
    """A WeightSource holding one BF16 weight (the converter quantizes it while loading)."""

    path = "<test>"

    def __init__(self, w):
        self.w = w

    def has(self, name):
        return name == "l.weight"

    def shape(self, name):
        return tuple(self.w.shape)

    def file_of(self, name):
        return self.path

    def tensor(self, name, dtype):
        return self.w.to(dtype)


@pytest.mark.parametrize("cls", [Int8BlockLinear, Int8ChannelLinear])
@pytest.mark.parametrize("dim", [0, 1])
def test_a_shard_is_the_slice_of_the_whole(cls, dim):
    g = torch.Generator().manual_seed(dim)
    w = torch.randn(512, 768, generator=g).bfloat16()
    whole = cls(768, 512, "cpu", torch.float32)
    whole.load_weights(_OneTensor(w), "l")
    x = torch.randn(5, 768, generator=g)
    parts = []
    for rank in range(2):
        op = cls(768, 512, "cpu", torch.float32)
        op.load_weights(_OneTensor(w), "l", shard=Shard(rank, 2, dim))
        assert torch.equal(op.weight, whole.weight.chunk(2, dim)[rank])  # quantized whole, then sliced
        lo = rank * 384
        parts.append(op(x if dim == 0 else x[:, lo:lo + 384]))
    y = torch.cat(parts, -1) if dim == 0 else parts[0] + parts[1]
    ref = whole(x)
    err = ((y - ref).norm() / ref.norm()).item()
    if dim == 0:  # the same rows: bit for bit
        assert torch.equal(y, ref)
    elif cls is Int8BlockLinear:  # 128-groups do not straddle the split: the same exact int8 tile
        assert err < 1e-6  # products, summed in another order (fp32 rounding only)
    else:
        # Channel: each rank quantizes its half of the row with its own per-token scale, so the two
        # roundings differ: each is at most half a step (max|x|/127) per element, i.e. a relative
        # error ~ (max/rms)/127/sqrt(3) ~ 1.5% for Gaussian rows of 384; two independent ones:
        # below 3%. (Tensor parallelism must share the scale where parity matters.)
        assert 1e-4 < err < 3e-2
    if cls is Int8BlockLinear:
        with pytest.raises(CheckpointError, match="whole 128-blocks"):
            cls(768, 512, "cpu").load_weights(_OneTensor(w), "l", shard=Shard(0, 3, 0))


def test_graph_breaks_are_declared():
    assert graphs.breaks_graph(op_class("experts.ggml_cpu")(8, 256, 256))
    assert not graphs.breaks_graph(Int8BlockLinear(256, 256))

    class Unsafe(LinearOperator):
        name, graph_safe = "test.unsafe", False

    model = build(preset_config("tiny", vocab_size=64))
    model.model.layers[0].self_attn.o_proj = Unsafe()
    assert graphs.unsupported(model) == "operator Unsafe is not graph-safe"


def test_readers_implement_the_whole_protocol(tiny_dir, tmp_path):
    from hybrid_r1.formats.gguf_writer import write_gguf_from_checkpoint

    cfg = preset_config("tiny", vocab_size=64, num_hidden_layers=2)
    (gguf,) = write_gguf_from_checkpoint(SyntheticWeights(cfg, seed=1), tmp_path / "m.gguf", type_mix="Q8_0")
    for source in (open_checkpoint(tiny_dir), open_checkpoint(gguf), SyntheticWeights(cfg)):
        assert isinstance(source, WeightSource)
        name = "model.layers.0.self_attn.o_proj.weight"
        assert source.file_of(name) and source.quantization() is None
        assert isinstance(source.metadata, dict)
    assert open_checkpoint(tiny_dir).tokenizer() is None  # written without tokenizer.json
    assert open_checkpoint(gguf).metadata["general.architecture"] == "deepseek2"
    rules = placement.default_rules(open_checkpoint(gguf), "cpu")
    assert [r.op for r in rules] == ["experts.ggml_cpu"]


def test_safetensors_metadata_is_kept(tmp_path):
    from safetensors.torch import save_file

    from hybrid_r1.formats.safetensors import SafetensorsCheckpoint
    from hybrid_r1.synth import write_checkpoint

    path = write_checkpoint(tmp_path / "ck", SyntheticWeights(preset_config("tiny", vocab_size=64)), tokenizer=False)
    save_file({"extra.weight": torch.ones(2)}, str(path / "zz-extra.safetensors"), metadata={"origin": "test"})
    (path / "model.safetensors.index.json").unlink(missing_ok=True)
    assert SafetensorsCheckpoint(path).metadata["origin"] == "test"


# ---- a new operator: one class (here in this file), one registry line, this test ----------------

@dataclass(frozen=True)
class ScaledArgs(OpArgs):
    scale: float = 1.0

    def check(self) -> None:
        if self.scale <= 0:
            raise OpArgsError("scale", f"must be > 0, got {self.scale}")


class ScaledLinear(LinearOperator):
    """y = scale * (x @ W.T), W in the run dtype: an example of the whole contract."""

    name = "linear.scaled_example"
    Args = ScaledArgs

    def __init__(self, n_in, n_out, device, dtype, scale):
        super().__init__()
        self.in_features, self.out_features, self.device, self.dtype, self.scale = n_in, n_out, device, dtype, scale

    @classmethod
    def from_module(cls, module, device, dtype, args):
        return cls(module.in_features, module.out_features, device, dtype, args.scale)

    def load_weights(self, source, prefix, shard=None):
        self.weight = source.tensor(prefix + ".weight", self.dtype).to(self.device)

    def dense_weight(self):
        return self.weight * self.scale

    def forward(self, x):
        return F.linear(x, self.weight) * self.scale


def test_a_new_operator_is_a_class_and_a_registry_line(monkeypatch, tiny_dir):
    monkeypatch.setitem(ops.OPS, "linear.scaled_example", "test_ops_contract:ScaledLinear")
    rule = {"name": r"\.o_proj$", "op": "linear.scaled_example", "args": {"scale": 1.0}}
    plain, scaled = hybrid_r1.load(tiny_dir, device="cpu"), hybrid_r1.load(tiny_dir, device="cpu", rules=[rule])
    assert isinstance(scaled.module.model.layers[0].self_attn.o_proj, ScaledLinear)
    ids = list(range(5, 20))
    assert torch.equal(plain.logits(ids), scaled.logits(ids))
    with pytest.raises(RuleError, match="bad args for linear.scaled_example: scale must be > 0"):
        parse_rules([dict(rule, args={"scale": -1})])
