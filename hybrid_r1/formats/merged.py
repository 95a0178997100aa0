"""Readers that compose two others: the linears of a safetensors checkpoint (Meituan INT8, the FP8
release, BF16) with the GGML-quantized routed experts of a GGUF, either straight from the pair of
sources (`ExpertOverlay(SafetensorsCheckpoint, GGUFCheckpoint)`) or from a merged folder that
`merge_tools merge` wrote (`open_merged`). Both give the loader the same tensors, byte for byte.

A merged folder is a safetensors checkpoint (config.json, model.safetensors.index.json, shards) in
which each MoE layer's routed experts are three uint8 tensors holding the GGUF's blocks unchanged,

    model.layers.L.mlp.experts.{gate,up,down}_proj.ggml   uint8 [experts, rows, row_bytes]

with their ggml type and logical shape (ggml `ne`) in the shard's `__metadata__` under
`hybrid_r1.ggml` (JSON: name -> {"type": id, "type_name": "Q4_K", "ne": [...]}), plus the manifest
`hybrid_r1_merge.json` (sources, checksums). The blobs are views of the memory-mapped shard: zero
copy for the CPU experts operator, as for a GGUF file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from .ggml_tensor import GGMLTensor
from .safetensors import SafetensorsCheckpoint

MANIFEST = "hybrid_r1_merge.json"
MANIFEST_FORMAT = "hybrid_r1.merged/1"
GGML_KEY = "hybrid_r1.ggml"  # shard __metadata__ key: JSON of each blob's ggml type and ne
PARTS = ("gate", "up", "down")
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_BLOB = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate|up|down)_proj\.ggml$")
# What both sources must agree on to be one model (the experts' source may lack router details).
SAME_MODEL = ("num_hidden_layers", "hidden_size", "intermediate_size", "moe_intermediate_size", "n_routed_experts",
              "n_shared_experts", "num_experts_per_tok", "first_k_dense_replace", "moe_layer_freq", "vocab_size",
              "num_attention_heads", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
              "v_head_dim")


def blob_name(layer: int, part: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{part}_proj.ggml"


def routed_expert_layer(name: str) -> int | None:
    """The layer of a per-expert HF tensor name (`model.layers.3.mlp.experts.7.up_proj.weight`)."""
    m = _EXPERT.match(name)
    return int(m.group(1)) if m else None


def config_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """`key: a vs b` for each SAME_MODEL key on which the two configs differ."""
    return [f"{k}: {getattr(a, k)} vs {getattr(b, k)}" for k in SAME_MODEL if getattr(a, k) != getattr(b, k)]


class BlobExperts:
    """The routed experts a merged folder stores as GGML blobs, read from its safetensors shards."""

    def __init__(self, ckpt: SafetensorsCheckpoint):
        self.ckpt = ckpt
        self.info: dict[str, dict] = {}
        for file, metadata in ckpt.shard_metadata().items():  # each expert file describes its own blobs
            raw = metadata.get(GGML_KEY)
            if raw is None:
                continue
            try:
                entries = json.loads(raw)
                for name, e in entries.items():
                    self.info[name] = {"type": int(e["type"]), "ne": tuple(int(x) for x in e["ne"]), "file": file}
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
                raise CheckpointError(f"unreadable {GGML_KEY} metadata ({err!r})", file=file) from None
        for name in self.info:
            if not ckpt.has(name) or _BLOB.match(name) is None:
                raise CheckpointError(f"{GGML_KEY} names a tensor the shard lacks", file=self.info[name]["file"],
                                      tensor=name)

    def layers(self) -> set[int]:
        return {int(_BLOB.match(n).group(1)) for n in self.info}

    def ggml_experts(self, layer: int) -> dict[str, GGMLTensor] | None:
        names = {p: blob_name(layer, p) for p in PARTS}
        if not all(n in self.info for n in names.values()):
            return None
        return {p: self.tensor_of(n) for p, n in names.items()}

    def tensor_of(self, name: str) -> GGMLTensor:
        info = self.info[name]
        t, _ = self.ckpt.raw(name)  # uint8 view of the mmap
        data = t.numpy()
        view = data.view()
        view.flags.writeable = False
        return GGMLTensor(name, info["file"], info["type"], info["ne"], view)


class ExpertOverlay:
    """A WeightSource: `base` for everything but the routed experts of the model's layers, which
    come from `experts` (whatever gives them as GGML blocks: a GGUF, or a merged folder's blobs).
    The MTP layer (past num_hidden_layers) keeps its experts from `base`: GGUFs do not carry it."""

    def __init__(self, base: SafetensorsCheckpoint, experts, *, experts_path: str | None = None):
        self.base, self.experts = base, experts
        self.path = base.path if experts_path is None else f"{base.path} + {experts_path}"
        self.config: ModelConfig = base.config
        self.metadata: dict[str, Any] = base.metadata
        self._layers = self.config.num_hidden_layers

    # ---- routing of names --------------------------------------------------------------------
    def _from_experts(self, name: str) -> bool:
        layer = routed_expert_layer(name)
        return layer is not None and layer < self._layers

    def _hidden(self, name: str) -> bool:
        """Base tensors this source does not show: the replaced experts and the raw blobs."""
        return self._from_experts(name) or _BLOB.match(name) is not None

    # ---- WeightSource ------------------------------------------------------------------------
    def names(self) -> list[str]:
        own = [n for n in self.base.names() if not self._hidden(n)]
        return own + [n for n in self.experts.names() if self._from_experts(n)]

    def has(self, name: str) -> bool:
        return self.experts.has(name) if self._from_experts(name) else (not self._hidden(name) and self.base.has(name))

    def shape(self, name: str) -> tuple[int, ...]:
        return (self.experts if self._from_experts(name) else self.base).shape(name)

    def file_of(self, name: str) -> str:
        return (self.experts if self._from_experts(name) else self.base).file_of(name)

    def tensor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return (self.experts if self._from_experts(name) else self.base).tensor(name, dtype)

    def raw(self, name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return (self.experts if self._from_experts(name) else self.base).raw(name)

    def ggml_experts(self, layer: int) -> dict[str, GGMLTensor] | None:
        return self.experts.ggml_experts(layer) if layer < self._layers else None

    def quantization(self) -> str | None:
        return self.base.quantization()

    def tokenizer(self):
        tok = self.base.tokenizer()
        return tok if tok is not None else self.experts.tokenizer()


class GGMLExpertsView:
    """The experts side of a composed source: ggml_experts from `provider` (anything with
    `ggml_experts(layer)` and `layers()`: a merged folder's blobs, a KTransformers folder), and each
    expert's HF tensor (`...experts.E.gate_proj.weight`) dequantized from those blocks (gguf-py),
    for operators that compute in torch."""

    def __init__(self, provider, path: str):
        self.provider, self.path = provider, path

    def _locate(self, name: str) -> tuple[GGMLTensor, int] | None:
        m = _EXPERT.match(name)
        if m is None or int(m.group(1)) not in self.provider.layers():
            return None
        experts = self.provider.ggml_experts(int(m.group(1)))
        t, e = (experts or {}).get(m.group(3)), int(m.group(2))
        return (t, e) if t is not None and e < t.ne[2] else None

    def names(self) -> list[str]:
        return [f"model.layers.{layer}.mlp.experts.{e}.{part}_proj.weight"
                for layer in sorted(self.provider.layers())
                for part, t in self.provider.ggml_experts(layer).items() for e in range(t.ne[2])]

    def has(self, name: str) -> bool:
        return self._locate(name) is not None

    def _need(self, name: str) -> tuple[GGMLTensor, int]:
        found = self._locate(name)
        if found is None:
            raise CheckpointError("tensor not found among the GGML experts", file=self.path, tensor=name)
        return found

    def shape(self, name: str) -> tuple[int, ...]:
        t, _ = self._need(name)
        return (t.ne[1], t.ne[0])

    def file_of(self, name: str) -> str:
        return self._need(name)[0].file

    def tensor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        from gguf.quants import dequantize

        t, e = self._need(name)
        try:
            values = dequantize(t.expert(e), t.ggml_type)
        except (NotImplementedError, ValueError, KeyError):
            raise CheckpointError(f"gguf-py cannot dequantize ggml type {t.ggml_type}", file=t.file, tensor=name) from None
        return torch.from_numpy(np.ascontiguousarray(values)).to(dtype)

    def raw(self, name: str):
        raise CheckpointError("stored as GGML blocks: use tensor() to dequantize, or ggml_experts()",
                              file=self.file_of(name), tensor=name)

    def ggml_experts(self, layer: int) -> dict[str, GGMLTensor] | None:
        return self.provider.ggml_experts(layer)

    def tokenizer(self):
        return None


def is_merged(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def open_merged(folder: str | Path) -> ExpertOverlay:
    """A merged folder (merge_tools merge) as one WeightSource."""
    ckpt = SafetensorsCheckpoint(folder)
    blobs = BlobExperts(ckpt)
    cfg = ckpt.config
    want = {i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)}
    missing = sorted(want - blobs.layers())
    if missing:
        raise CheckpointError(f"the merged folder lacks the GGML experts of layer(s) {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}", file=str(folder))
    return ExpertOverlay(ckpt, GGMLExpertsView(blobs, ckpt.path))


def open_pair(safetensor_dir: str | Path, gguf) -> ExpertOverlay:
    """INT8/FP8/BF16 safetensors + a GGUF's routed experts, no merge step. `gguf`: an opened
    GGUFCheckpoint. Both must describe the same model."""
    base = SafetensorsCheckpoint(safetensor_dir)
    diff = config_differences(base.config, gguf.config)
    if diff:
        raise CheckpointError(f"{base.root / 'config.json'} and {gguf.files[0]} describe different models: "
                              + "; ".join(diff), file=gguf.files[0])
    return ExpertOverlay(base, gguf, experts_path=gguf.path)
