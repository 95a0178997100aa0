"""The streaming safetensors writer against the `safetensors` package's reader."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from hybrid_r1.formats.safetensors_writer import (SafetensorsWriter, TensorSpec, plan_shards, shard_name, write_file,
                                                  write_index)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(300, 7, generator=g).bfloat16(),  # odd byte count: the next one is misaligned
        "a.weight_scale_inv": torch.rand(3, 1, generator=g),
        "fp8": (torch.randn(5, 16, generator=g) * 50).to(torch.float8_e4m3fn),
        "int8": torch.randint(-127, 128, (33,), generator=g, dtype=torch.int8),
        "int64": torch.randint(-2**62, 2**62, (2, 3), generator=g, dtype=torch.int64),
        "scalar": torch.tensor(3.25, dtype=torch.float64),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
        "mask": torch.rand(9, generator=g) > 0.5,
    }


def test_round_trip_through_safetensors(tmp_path):
    tensors = _tensors()
    path = tmp_path / "x.safetensors"
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with SafetensorsWriter(path, specs, {"format": "pt", "note": "chunked"}) as w:
        for n, t in tensors.items():
            for chunk in (t.split(64) if t.dim() else [t]):  # several chunks for the 300-row tensor
                w.write(n, chunk)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "chunked"}
        assert sorted(f.keys()) == sorted(tensors)
        for n, t in tensors.items():
            got = f.get_tensor(n)
            assert got.dtype == t.dtype and got.shape == t.shape, n
            assert got.reshape(-1).view(torch.uint8).equal(t.reshape(-1).view(torch.uint8)), n
    head = path.read_bytes()
    assert (8 + int.from_bytes(head[:8], "little")) % 8 == 0  # data 8-byte aligned
    assert write_file(tmp_path / "y.safetensors", tensors) == sum(s.nbytes for s in specs)
    with safe_open(str(tmp_path / "y.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("int64"), tensors["int64"]) and f.metadata() is None


def test_sharded_checkpoint_reads_back(tmp_path):
    """plan_shards + shard_name + write_index: shards the safetensors reader accepts, an index naming them."""
    tensors = _tensors()
    groups = [[TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items() if n.startswith("a.")]]
    groups += [[TensorSpec(n, t.dtype, tuple(t.shape))] for n, t in tensors.items() if not n.startswith("a.")]
    shards = plan_shards(groups, 100)
    assert [len(s) for s in shards] == [2, 2, 4]  # the weight and its scale stay together; cut at >= 100 bytes
    assert plan_shards(groups, 0) == [g for g in groups]
    weight_map = {}
    for i, shard in enumerate(shards):
        write_file(tmp_path / shard_name(i, len(shards)), {s.name: tensors[s.name] for s in shard}, {"format": "pt"})
        weight_map.update({s.name: shard_name(i, len(shards)) for s in shard})
    write_index(tmp_path, weight_map, sum(t.numel() * t.element_size() for t in tensors.values()))
    assert shard_name(0, 163) == "model-00001-of-000163.safetensors"
    for shard in sorted(set(weight_map.values())):
        with safe_open(str(tmp_path / shard), framework="pt") as f:
            for n in f.keys():
                assert f.get_tensor(n).reshape(-1).view(torch.uint8).equal(tensors[n].reshape(-1).view(torch.uint8))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map


def test_misuse_is_refused(tmp_path):
    specs = [TensorSpec("a", torch.float32, (4,)), TensorSpec("b", torch.int8, (2,))]
    with pytest.raises(ValueError, match="expects 'a'"):
        SafetensorsWriter(tmp_path / "1", specs).write("b", torch.zeros(2, dtype=torch.int8))
    with pytest.raises(ValueError, match="declared torch.float32"):
        SafetensorsWriter(tmp_path / "2", specs).write("a", torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="got more"):
        SafetensorsWriter(tmp_path / "3", specs).write("a", torch.zeros(5))
    w = SafetensorsWriter(tmp_path / "4", specs)
    w.write("a", torch.ones(4))
    with pytest.raises(ValueError, match="before b was written"):
        w.close()
    with pytest.raises(ValueError, match="twice"):
        SafetensorsWriter(tmp_path / "5", specs + specs[:1])
    with pytest.raises(ValueError, match="strings to strings"):
        SafetensorsWriter(tmp_path / "6", specs, {"n": 1})
