"""merge_tools quantize: bit-exact against an independent numpy version of Meituan's converters,
byte-identical copies, config/index, loader round trip, detection, and the safety rules (refusal
without --force, input untouched, nothing left behind on failure, clear errors)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hybrid_r1.errors import CheckpointError
from hybrid_r1.formats.safetensors import SafetensorsCheckpoint, detect_quantization
from hybrid_r1.synth import SyntheticWeights, preset_config, write_checkpoint
from hybrid_r1_merge_tools import quantize as qmod
from hybrid_r1_merge_tools.cli import main

INDEX = "model.safetensors.index.json"
# kv_lora_rank 512 + rope 64: kv_a_proj_with_mqa has the release's 576 rows (a 64-row tail tile).
CFG = dict(vocab_size=1024, num_hidden_layers=2, kv_lora_rank=512, qk_rope_head_dim=64)
SMALL_FILES = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": "{}",
               "generation_config.json": '{"bos_token_id": 0}'}


# ---- the reference: Meituan's formulas, written again in numpy ----------------------------------
# bf16 mantissas of a tile maximum whose quotient amax / (amax / 127) the H100 (Triton fp32 '/',
# i.e. div.full.f32) truncates to 126: measured, not derived.
MEASURED_126 = {3, 18, 19, 22, 23, 24, 33, 48, 49, 81, 85, 87, 95, 112, 113, 116}


def bf16_round(a) -> np.ndarray:
    """float32 -> nearest bf16 (ties to even), as float32: integer arithmetic on the bits."""
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def fp8_table() -> np.ndarray:
    """float8_e4m3fn byte -> value: bias 7, 3 mantissa bits, subnormals at exponent 0, 0x7f/0xff NaN."""
    out = np.empty(256, np.float32)
    for b in range(256):
        sign, e, m = (-1.0 if b & 0x80 else 1.0), (b >> 3) & 0xF, b & 7
        out[b] = np.nan if (e, m) == (15, 7) else sign * (m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return out


def ref_fp8_to_bf16(q: np.ndarray, s: np.ndarray) -> np.ndarray:
    """DeepSeek's fp8_cast_bf16: fp32 product of value and tile scale, stored as bf16."""
    n, k = q.shape
    scale = np.repeat(np.repeat(s, 128, 0), 128, 1)[:n, :k]
    return bf16_round(fp8_table()[q] * scale)


def ref_block(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, k = x.shape
    q = np.zeros((n, k), np.int8)
    s = np.zeros((-(-n // 128), -(-k // 128)), np.float32)
    inv127 = np.float32(1) / np.float32(127)
    for i in range(0, n, 128):
        for j in range(0, k, 128):
            t = x[i:i + 128, j:j + 128]
            amax = np.abs(t).max()
            sc = s[i // 128, j // 128] = amax * inv127  # what div.full.f32(amax, 127) gives
            if sc == 0:
                continue  # all-zero tile: s = 0, q = 0
            tq = np.trunc(t / sc)
            top = np.abs(t) == amax
            mantissa = (int(np.float32(amax).view(np.uint32)) >> 16) & 0x7F
            tq[top] = np.sign(t[top]) * (126 if mantissa in MEASURED_126 else 127)
            q[i:i + 128, j:j + 128] = tq
    return q, s


def ref_channel(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = bf16_round(np.abs(x).max(axis=1, keepdims=True) / np.float32(127))
    with np.errstate(divide="ignore", invalid="ignore"):
        y = bf16_round(x / s)
        q = np.where(s > 0, np.clip(np.round(y), -127, 127), 0)  # np.round: half to even
    return q.astype(np.int8), s


# ---- fixtures -------------------------------------------------------------------------------------
def tensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / INDEX
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else [f.name for f in folder.glob("*.safetensors")]
    out = {}
    for f in files:
        with safe_open(str(folder / f), framework="pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def folder_hash(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def fp8(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.float8_e4m3fn)


def probe_tensors() -> dict[str, torch.Tensor]:
    """Hand-made tensors: tail tiles, an all-zero tile, maxima on the measured-126 mantissas."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(300, 200, generator=g) * 40
    w[:128, :128] = 0  # all-zero tile
    w[128:256, 128:200] = 0
    w[140, 150] = 1.875  # the only non-zero: bf16 mantissa 112, truncated to 126 on the GPU
    w[260, 10] = -448  # fp8's largest magnitude, in the 44-row tail tile
    s = torch.tensor([[2.0**-9, 2.0**-7], [1e-3, 2.0**-3], [3e-4, 5e-5]])
    return {"probe.tiles.weight": fp8(w), "probe.tiles.weight_scale_inv": s,
            "probe.zero.weight": fp8(torch.zeros(128, 64)), "probe.zero.weight_scale_inv": torch.ones(1, 1),
            "probe.rows576.weight": fp8(torch.randn(576, 130, generator=g) * 100),
            "probe.rows576.weight_scale_inv": torch.rand(5, 2, generator=g) * 1e-3,
            "probe.bf16_linear.weight": torch.randn(64, 64, generator=g).bfloat16(),
            "probe.bias": torch.randn(7, generator=g), "probe.count": torch.tensor(12345, dtype=torch.int64)}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quantize")


@pytest.fixture(scope="module")
def fp8_dir(work) -> Path:
    """The tiny model in the FP8 release format, several shards, plus a hand-made shard and small files."""
    d = write_checkpoint(work / "fp8", SyntheticWeights(preset_config("tiny", **CFG), seed=3), fmt="fp8",
                         tokenizer=False, shard_mb=2)
    extra = probe_tensors()
    save_file(extra, str(d / "model-extra.safetensors"), metadata={"format": "pt"})
    index = json.loads((d / INDEX).read_text())
    index["weight_map"].update({k: "model-extra.safetensors" for k in extra})
    (d / INDEX).write_text(json.dumps(index, indent=2))
    for name, text in SMALL_FILES.items():
        (d / name).write_text(text)
    return d


@pytest.fixture(scope="module")
def bf16_dir(work, fp8_dir) -> Path:
    """The same weights as DeepSeek's fp8_cast_bf16 would write them (numpy reference), same shards."""
    d = work / "bf16"
    d.mkdir()
    src = tensors(fp8_dir)
    index = json.loads((fp8_dir / INDEX).read_text())
    files: dict[str, dict] = {}
    for name, f in index["weight_map"].items():
        if name.endswith("_scale_inv"):
            continue
        t = src[name]
        if t.dtype == torch.float8_e4m3fn:
            t = torch.from_numpy(ref_fp8_to_bf16(t.view(torch.uint8).numpy(), src[name + "_scale_inv"].numpy()))
            t = t.bfloat16()
        files.setdefault(f, {})[name] = t
    for f, ts in files.items():
        save_file(ts, str(d / f))
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.endswith("_scale_inv")}
    (d / INDEX).write_text(json.dumps(index))
    config = json.loads((fp8_dir / "config.json").read_text())
    del config["quantization_config"]
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.fixture(scope="module")
def converted(work, fp8_dir, bf16_dir) -> dict[str, Path]:
    before = {p: folder_hash(p) for p in (fp8_dir, bf16_dir)}
    out = {}
    for src, scheme in ((fp8_dir, "block"), (fp8_dir, "channel"), (bf16_dir, "block")):
        dst = work / f"{src.name}-{scheme}"
        assert main(["quantize", "--input", str(src), "--output", str(dst), "--scheme", scheme]) == 0
        out[f"{src.name}-{scheme}"] = dst
    assert {p: folder_hash(p) for p in (fp8_dir, bf16_dir)} == before, "the converter modified its input"
    return out


# ---- bit exactness --------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["block", "channel"])
def test_int8_bit_exact_vs_reference(converted, fp8_dir, scheme):
    src, out = tensors(fp8_dir), tensors(converted[f"fp8-{scheme}"])
    scale_name = {"block": "weight_scale_inv", "channel": "weight_scale"}[scheme]
    ref = ref_block if scheme == "block" else ref_channel
    fp8_names = [n for n, t in src.items() if t.dtype == torch.float8_e4m3fn]
    assert len(fp8_names) > 100 and "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in fp8_names
    for name in fp8_names:
        x = ref_fp8_to_bf16(src[name].view(torch.uint8).numpy(), src[name + "_scale_inv"].numpy())
        q, s = ref(x)
        assert out[name].dtype == torch.int8
        np.testing.assert_array_equal(out[name].numpy(), q, err_msg=name)
        scale = out[name[: -len("weight")] + scale_name]
        assert scale.dtype == torch.float32
        np.testing.assert_array_equal(scale.numpy().view(np.uint32), s.view(np.uint32), err_msg=name)
    if scheme == "block":  # the zero tile and the lone 1.875 (mantissa 112): 0 and 126, no NaN
        assert out["probe.tiles.weight_scale_inv"][0, 0] == 0 and not out["probe.tiles.weight"][:128, :128].any()
        assert out["probe.tiles.weight"][140, 150] == 126
        assert out["probe.zero.weight_scale_inv"].eq(0).all() and not out["probe.zero.weight"].any()
    channel_names = {n[: -len(".weight_scale")] for n in out if n.endswith(".weight_scale")}
    assert channel_names == ({n[: -len(".weight")] for n in fp8_names} if scheme == "channel" else set())


def test_block_matches_gpu_measurements():
    """Tiles measured on an H100 with a Triton kernel written like Meituan's: the stored scale (bits)
    and the quotient of the maximum. The first seven scales differ from IEEE amax / 127 by one ulp."""
    measured = [(0.000789642333984375, 0x36D0A142, 127), (0.00634765625, 0x3851A346, 127),
                (0.01263427734375, 0x38D0A142, 127), (0.5625, 0x3B912244, 127), (1.6171875, 0x3C50A142, 127),
                (3.234375, 0x3CD0A142, 127), (8.9375, 0x3D902040, 127), (0.000919342041015625, 0x36F2E5CC, 126),
                (0.0022430419921875, 0x37942851, 126), (0.0024566650390625, 0x37A24489, 126),
                (0.002288818359375, 0x37972E5D, 126), (0.005401611328125, 0x383264CA, 126),
                (0.01361083984375, 0x38E0C183, 126)]
    w = torch.zeros(128, 128 * len(measured))
    for j, (amax, _, _) in enumerate(measured):
        w[3, 128 * j + 7] = -amax
        w[5, 128 * j + 1] = amax / 3
    q, s = qmod.quantize_block(w.bfloat16())
    assert s.view(torch.int32)[0].tolist() == [bits for _, bits, _ in measured]
    assert (-q[3, 7::128]).tolist() == [top for _, _, top in measured]
    assert (torch.tensor([m[0] for m in measured]) / 127).view(torch.int32).tolist()[:7] != [m[1] for m in measured][:7]


def test_bf16_input_gives_the_same_int8(converted, bf16_dir):
    """A BF16 checkpoint (FP8 dequantized as fp8_cast_bf16 does) converts to the same bits; its
    quantized set is chosen by name: the projections, not the router, norms, embeddings or probes."""
    from_fp8, from_bf16 = tensors(converted["fp8-block"]), tensors(converted["bf16-block"])
    quantized = {n for n, t in from_bf16.items() if t.dtype == torch.int8}
    expected = {n for n, t in tensors(bf16_dir).items()
                if n.endswith(".weight") and n.split(".")[-2] in qmod.LINEAR_PROJECTIONS}
    assert quantized == expected and not any(".mlp.gate." in n or "norm" in n for n in quantized)
    for name in quantized:
        assert torch.equal(from_bf16[name], from_fp8[name]), name
        assert torch.equal(from_bf16[name + "_scale_inv"], from_fp8[name + "_scale_inv"]), name


# ---- everything else ------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["block", "channel"])
def test_other_tensors_copied_byte_for_byte(converted, fp8_dir, scheme):
    src, out = tensors(fp8_dir), tensors(converted[f"fp8-{scheme}"])
    copied = [n for n, t in src.items() if t.dtype != torch.float8_e4m3fn and not n.endswith("_scale_inv")]
    assert {"probe.bf16_linear.weight", "probe.count", "model.embed_tokens.weight", "lm_head.weight"} <= set(copied)
    for name in copied:
        assert out[name].dtype == src[name].dtype and out[name].shape == src[name].shape, name
        assert out[name].reshape(-1).view(torch.uint8).equal(src[name].reshape(-1).view(torch.uint8)), name
    added, dropped = set(out) - set(src), set(src) - set(out)
    if scheme == "block":
        assert not added and not dropped
    else:
        assert {n + "_inv" for n in added} == dropped == {n for n in src if n.endswith("_scale_inv")}


@pytest.mark.parametrize("scheme", ["block", "channel"])
def test_config_index_and_small_files(converted, fp8_dir, scheme):
    out = converted[f"fp8-{scheme}"]
    config, src_config = (json.loads((d / "config.json").read_text()) for d in (out, fp8_dir))
    assert config.pop("quantization_config") == qmod.QUANT_CONFIGS[scheme]
    assert config == {k: v for k, v in src_config.items() if k != "quantization_config"}
    assert qmod.QUANT_CONFIGS["block"] == {"quant_method": "blockwise_int8", "weight_block_size": [128, 128],
                                           "activation_scheme": "dynamic"}
    for name, text in SMALL_FILES.items():
        assert (out / name).read_text() == text
    index, src_index = (json.loads((d / INDEX).read_text()) for d in (out, fp8_dir))
    src_map, weight_map = src_index["weight_map"], index["weight_map"]
    expected = {n: f for n, f in src_map.items() if scheme == "block" or not n.endswith("_scale_inv")}
    if scheme == "channel":
        expected.update({n[: -len("_inv")]: f for n, f in src_map.items() if n.endswith("_scale_inv")})
    assert weight_map == expected
    assert set(weight_map.values()) == {p.name for p in out.glob("*.safetensors")}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors(out).values())


@pytest.mark.parametrize("scheme, bound", [("block", 1.0), ("channel", 0.75)])
def test_loader_round_trip(converted, bf16_dir, scheme, bound):
    """SafetensorsCheckpoint.tensor() dequantizes the INT8 output to within `bound` quantization
    steps s of the BF16 source, per element. Block truncates: < 1 step (the tile maximum can reach
    1 + 127 * 2^-23 where the GPU's reciprocal truncates it to 126). Channel rounds x/s to bf16
    (up to 0.25 step off in [64, 128)) before rounding to an integer (0.5): <= 0.75 step, not the
    0.5 of exact rounding."""
    ckpt, src = SafetensorsCheckpoint(converted[f"fp8-{scheme}"]), SafetensorsCheckpoint(bf16_dir)
    steps = []  # every error, in steps
    for name in ckpt.names():
        if ckpt.dtype(name) != torch.int8:
            continue
        w, (scale,) = ckpt.tensor(name, torch.float32), ckpt.raw(name)[1].values()
        step = scale.float().repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]] \
            if scheme == "block" else scale.float().expand_as(w)
        err = (w - src.tensor(name, torch.float32)).abs()
        assert (err <= bound * step * (1 + 2**-16)).all(), name
        steps.append(err[step > 0] / step[step > 0])
    assert torch.cat(steps).mean() <= {"block": 0.55, "channel": 0.3}[scheme]  # truncation ~0.5, rounding ~0.25


def test_detection(converted, fp8_dir, bf16_dir, work):
    assert detect_quantization(SafetensorsCheckpoint(fp8_dir)) == "fp8"
    assert detect_quantization(SafetensorsCheckpoint(bf16_dir)) is None
    assert detect_quantization(SafetensorsCheckpoint(converted["fp8-block"])) == "int8_block"
    # Meituan's Channel-INT8 release has no quantization_config: the tensors must tell
    release = work / "channel-release"
    shutil.copytree(converted["fp8-channel"], release)
    config = json.loads((release / "config.json").read_text())
    del config["quantization_config"]
    (release / "config.json").write_text(json.dumps(config))
    ckpt = SafetensorsCheckpoint(release)
    assert detect_quantization(ckpt) == ckpt.quantization() == "int8_channel"
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    q, (s,) = ckpt.raw(name)[0], ckpt.raw(name)[1].values()
    assert torch.equal(ckpt.tensor(name, torch.float32), q.float() * s)
    from hybrid_r1.quant import scheme_of_kind

    def int8_scheme(source):
        return scheme_of_kind(source.quantization()).name

    assert int8_scheme(ckpt) == "channel" and int8_scheme(SafetensorsCheckpoint(converted["fp8-block"])) == "block"
    config["quantization_config"] = {"quant_method": "blockwise_int8", "weight_block_size": [128, 128]}
    (release / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="blockwise_int8.*int8_channel"):
        detect_quantization(SafetensorsCheckpoint(release))


# ---- safety ---------------------------------------------------------------------------------------
def small_checkpoint(folder: Path, items: dict[str, torch.Tensor], shards: int = 2) -> Path:
    folder.mkdir()
    config = preset_config("tiny", **CFG).to_hf_dict()
    (folder / "config.json").write_text(json.dumps(config))
    names, per = list(items), -(-len(items) // shards)
    weight_map = {}
    for i in range(shards):
        part = {n: items[n] for n in names[i * per:(i + 1) * per]}
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(folder / fname))
        weight_map.update({n: fname for n in part})
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture
def small(tmp_path) -> Path:
    g = torch.Generator().manual_seed(0)
    items = {}
    for i in range(4):
        items[f"model.layers.{i}.mlp.down_proj.weight"] = torch.randn(200, 300, generator=g).bfloat16()
        items[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(300).bfloat16()
    return small_checkpoint(tmp_path / "in", items)


def test_refuses_to_overwrite_without_force(small, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["quantize", "--input", str(small), "--output", str(out), "--scheme", "channel"]) == 2
    assert "--force" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
    assert main(["quantize", "--input", str(small), "--output", str(out), "--scheme", "channel", "--force"]) == 0
    assert not (out / "keep.txt").exists() and detect_quantization(SafetensorsCheckpoint(out)) == "int8_channel"
    assert "[2/2]" in capsys.readouterr().err  # one progress line per shard
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_failure_midway_leaves_nothing(small, tmp_path, monkeypatch):
    """The third weight (in the second shard) fails: no output, no temporary folder, input intact."""
    calls, real = [], qmod.quantize_channel

    def fail_on_third(w):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real(w)

    monkeypatch.setattr(qmod, "quantize_channel", fail_on_third)
    before = folder_hash(small)
    with pytest.raises(RuntimeError, match="disk full"):
        qmod.quantize_checkpoint(small, tmp_path / "out", "channel")
    assert len(calls) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["in"]
    assert folder_hash(small) == before


def test_clear_errors(small, tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        qmod.quantize_checkpoint(tmp_path, tmp_path / "x", "block")
    with pytest.raises(CheckpointError, match="inside the input"):
        qmod.quantize_checkpoint(small, small / "int8", "block")
    with pytest.raises(CheckpointError, match="contains the input"):
        qmod.quantize_checkpoint(small, tmp_path, "block", force=True)
    w = fp8(torch.randn(256, 128))
    up = "model.layers.{}.mlp.up_proj.weight"
    no_scale = small_checkpoint(tmp_path / "noscale", {up.format(0): w, up.format(1): w.clone(),
                                                        up.format(1) + "_scale_inv": torch.ones(2, 1)})
    with pytest.raises(CheckpointError, match="without .*weight_scale_inv") as e:
        qmod.quantize_checkpoint(no_scale, tmp_path / "o1", "block")
    assert e.value.tensor == up.format(0) and e.value.file.endswith(".safetensors")
    q_a = "model.layers.0.self_attn.q_a_proj.weight"
    bad = small_checkpoint(tmp_path / "int32", {q_a: torch.zeros(8, 8, dtype=torch.int32)}, 1)
    with pytest.raises(CheckpointError, match="unexpected dtype") as e:
        qmod.quantize_checkpoint(bad, tmp_path / "o2", "channel")
    assert e.value.tensor == q_a
    int8 = tmp_path / "o3"
    qmod.quantize_checkpoint(small, int8, "block")
    with pytest.raises(CheckpointError, match="already quantized"):
        qmod.quantize_checkpoint(int8, tmp_path / "o4", "channel")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "int32", "noscale", "o3"]


def test_cli_synth_and_inspect(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["synth", str(out), "--layers", "1", "--set", "vocab_size=512", "--format", "fp8",
                 "--no-tokenizer"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "weights: fp8" in text and "model.layers.0.self_attn.q_a_proj.weight_scale_inv" in text
    n = len(SafetensorsCheckpoint(out).names())
    assert "float8_e4m3fn" in text and text.splitlines()[-1].startswith(f"{n} tensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["inspect", str(empty)]) == 2 and "config.json" in capsys.readouterr().err


def test_cli_inspect_gguf(tmp_path, capsys):
    writer = pytest.importorskip("hybrid_r1.formats.gguf_writer")
    cfg = preset_config("tiny", vocab_size=512, num_hidden_layers=1)
    src = write_checkpoint(tmp_path / "bf16", SyntheticWeights(cfg), tokenizer=False)
    writer.write_gguf_from_checkpoint(src, tmp_path / "m.gguf", type_mix="Q8_0")
    assert main(["inspect", str(tmp_path / "m.gguf")]) == 0
    text = capsys.readouterr().out
    assert "blk.0.attn_q_a.weight" in text and "Q8_0" in text and " F32" in text
