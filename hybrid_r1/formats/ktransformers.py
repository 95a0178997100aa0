"""KTransformers' merged folders (their merge_safetensor_gguf.py), read as they are.

Their layout (FORMATS.md section 4): every tensor under its GGUF-style name (`blk.3.attn_q_a.weight`,
`blk.3.attn_q_a.weight_scale_inv`, `token_embd.weight`: llama.cpp's old names, `attn_kv_b` whole),
the safetensors' tensors as they were (HF orientation, FP8 or INT8 with their scales), and each MoE
layer's expert projections as ONE 1-D uint8 tensor of the GGUF's raw blocks (`blk.3.ffn_gate_exps.weight`)
beside a 0-d int64 `blk.3.ffn_gate_exps.ggml_type`; one shard per layer, no index, no config.json
unless the user put one there (`config=` names the folder holding it otherwise). The experts'
shapes are lost in that format: they come back from the config (gate/up [hidden, moe_inter, experts],
down [moe_inter, hidden, experts] in ggml order) and are checked against the bytes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from . import names as N
from .ggml_tensor import GGMLTensor
from .safetensors import SafetensorsCheckpoint, read_header

SUFFIXES = ("weight_scale_inv", "weight_scale")
GGML_TYPE = ".ggml_type"


def is_ktransformers(folder: Path) -> bool:
    """A folder of their shards: no index, and a `.ggml_type` tensor in some shard's header (their
    first shards, the embeddings and the dense layers, have none)."""
    if (folder / "model.safetensors.index.json").is_file():
        return False
    for f in sorted(folder.glob("*.safetensors")):
        try:
            if any(k.endswith(GGML_TYPE) for k in read_header(f)[0]):
                return True
        except (OSError, CheckpointError):
            return False  # not theirs either: the safetensors reader reports it
    return False


class KTransformersCheckpoint:
    """A WeightSource over their folder: HF names outside, their names inside; the routed experts
    as GGML blocks (ggml_experts) for the CPU experts operator, zero copy."""

    def __init__(self, folder: str | Path, config: str | Path | None = None):
        folder = Path(folder)
        cfg_dir = Path(config) if config is not None else folder
        if not (cfg_dir / "config.json").is_file():
            raise CheckpointError("a KTransformers merged folder carries no config.json: put the model's "
                                  "config.json there or pass --config DIR", file=str(folder))
        self.st = SafetensorsCheckpoint(folder, config_file=cfg_dir / "config.json")
        self.path, self.config, self.metadata = str(folder), self.st.config, self.st.metadata
        self.config_file = self.st.config_file
        self._hf: dict[str, str] = {}  # HF name -> their name, for everything but the expert blobs
        self._blobs: dict[tuple[int, str], str] = {}  # (layer, part) -> their blob name
        for name in self.st.names():
            if name.endswith(GGML_TYPE):
                continue
            stem, suffix = name, None  # a scale companion: the weight's name + its suffix
            for s in SUFFIXES:
                if name.endswith("." + s):
                    stem, suffix = name[: -len(s)] + "weight", s
            m = N.match_gguf(stem)
            if m is None or m.kind in (N.K_B, N.V_B):
                raise CheckpointError("a tensor name outside llama.cpp's deepseek2 table", file=self.st.file_of(name),
                                      tensor=name)
            if m.kind == N.EXPERTS:
                self._blobs[m.layer, _part(stem)] = name
            else:
                self._hf[m.hf() if suffix is None else m.hf()[: -len("weight")] + suffix] = name

    # ---- the experts --------------------------------------------------------------------------
    def layers(self) -> set[int]:
        return {layer for layer, _ in self._blobs}

    def ggml_experts(self, layer: int) -> dict[str, GGMLTensor] | None:
        names = {p: self._blobs.get((layer, p)) for p in ("gate", "up", "down")}
        if any(n is None for n in names.values()):
            return None
        return {p: self._blob(layer, p, n) for p, n in names.items()}

    def _blob(self, layer: int, part: str, name: str) -> GGMLTensor:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        cfg = self.config
        file = self.st.file_of(name)
        type_name = name[: -len(".weight")] + GGML_TYPE
        if not self.st.has(type_name):
            raise CheckpointError(f"expert blob without its {type_name}", file=file, tensor=name)
        ggml_type = int(self.st.raw(type_name)[0].reshape(-1)[0])
        try:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise CheckpointError(f"unknown ggml type {ggml_type}", file=file, tensor=type_name) from None
        h, i, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
        ne = (h, i, e) if part in ("gate", "up") else (i, h, e)
        row_bytes = ne[0] // block * size
        data = self.st.raw(name)[0]
        if data.dtype != torch.uint8 or data.numel() != e * ne[1] * row_bytes or ne[0] % block:
            raise CheckpointError(f"{data.numel()} bytes of {data.dtype} do not hold ne {list(ne)} of ggml type "
                                  f"{GGMLQuantizationType(ggml_type).name}", file=file, tensor=name)
        view = data.numpy().reshape(e, ne[1], row_bytes).view()
        view.flags.writeable = False
        return GGMLTensor(name, file, ggml_type, ne, view)

    # ---- WeightSource over HF names -----------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._hf)

    def has(self, name: str) -> bool:
        return name in self._hf

    def _theirs(self, name: str) -> str:
        try:
            return self._hf[name]
        except KeyError:
            raise CheckpointError("tensor not found in the KTransformers folder", file=self.path, tensor=name) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.st.shape(self._theirs(name))

    def dtype(self, name: str) -> torch.dtype:
        return self.st.dtype(self._theirs(name))

    def file_of(self, name: str) -> str:
        return self.st.file_of(self._theirs(name))

    def byte_range(self, name: str) -> tuple[str, int, int]:
        """Of an HF name, or of one of their own (an expert blob)."""
        return self.st.byte_range(self._hf.get(name, name))

    def raw(self, name: str):
        t, extra = self.st.raw(self._theirs(name))
        return t, extra  # companions are found by their own names' suffixes, as in any folder

    def tensor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return self.st.tensor(self._theirs(name), dtype)

    def quantization(self) -> str | None:
        return self.st.quantization()

    def tokenizer(self):
        return self.st.tokenizer()

    def source_files(self) -> list[tuple[str, int]]:
        return self.st.source_files()


def _part(gguf_name: str) -> str:
    return next(p for p in ("gate", "up", "down") if f".ffn_{p}_exps." in gguf_name)


def open_ktransformers(folder: str | Path, config: str | Path | None = None):
    from .merged import ExpertOverlay, GGMLExpertsView

    kt = KTransformersCheckpoint(folder, config)
    return ExpertOverlay(kt, GGMLExpertsView(kt, kt.path))
