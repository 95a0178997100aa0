"""Loading the DeepSeek FP8 release format: block dequantization against a plain reference."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

import hybrid_r1
from hybrid_r1.formats.safetensors import SafetensorsCheckpoint
from hybrid_r1.synth import PRESETS


def block_dequant_reference(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Pad to whole 128x128 tiles, multiply tile by tile, crop: the published recipe, in fp64."""
    n, k = q.shape
    nb, kb = -(-n // 128), -(-k // 128)
    padded = torch.zeros(nb * 128, kb * 128, dtype=torch.float64)
    padded[:n, :k] = q.double()
    for i in range(nb):
        for j in range(kb):
            padded[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] *= s[i, j].double()
    return padded[:n, :k]


def random_fp8(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)


def test_fp8_576_row_tensor_dequantizes_like_reference(tmp_path):
    # kv_a_proj_with_mqa of the 671B model: 576 rows = 4.5 row blocks; K = 320 is a partial block too.
    q = random_fp8((576, 320), seed=1)
    s = torch.rand(5, 3, generator=torch.Generator().manual_seed(2)) * 1e-3 + 1e-5
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["tiny"]))
    save_file({name: q, name.replace("weight", "weight_scale_inv"): s}, str(tmp_path / "model.safetensors"))
    ckpt = SafetensorsCheckpoint(tmp_path)
    got = ckpt.tensor(name, torch.float32)
    want = block_dequant_reference(q, s)
    # fp32 product of an exactly representable fp8 value and an fp32 scale: one rounding.
    torch.testing.assert_close(got.double(), want, rtol=2 ** -23, atol=0)
    assert ckpt.tensor(name, torch.bfloat16).dtype == torch.bfloat16


def test_fp8_checkpoint_loads_every_linear_as_reference(tiny_fp8_dir):
    ckpt = SafetensorsCheckpoint(tiny_fp8_dir)
    model = hybrid_r1.load(tiny_fp8_dir, device="cpu")
    params = dict(model.module.named_parameters())
    fp8_names = [n for n in ckpt.names() if ckpt.dtype(n) == torch.float8_e4m3fn]
    assert any("kv_a_proj_with_mqa" in n for n in fp8_names)  # 80 rows: a partial block
    checked = 0
    for name in fp8_names:
        if name not in params:
            assert ".layers.4." in name  # only the MTP layer is skipped
            continue
        q, extra = ckpt.raw(name)
        want = block_dequant_reference(q, extra["weight_scale_inv"])
        torch.testing.assert_close(params[name].double(), want, rtol=2 ** -23, atol=0)
        checked += 1
    assert checked == sum(1 for n in params if n.endswith(("_proj.weight", "_mqa.weight")))
    # Non-quantized tensors are loaded as stored.
    assert params["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    logits = model.logits(list(range(5, 25)))
    assert torch.isfinite(logits).all()
