"""merge_tools merge / verify / inspect, and loading a merged folder or the (safetensors, GGUF) pair.

A tiny model is written three ways from one set of seeded weights: BF16 safetensors, its Meituan
block-INT8 conversion (merge_tools quantize), and GGUFs (Q8_0, Q4_K_M with its Q6_K/Q5_0 fallbacks,
IQ4_XS experts). The merged folder must hold every byte of both sources unchanged and load to the
same logits as the pair, bit for bit."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hybrid_r1
from conftest import SMALL_VOCAB, needs_cuda, random_ids
from hybrid_r1.errors import CheckpointError
from hybrid_r1.formats import merged as M
from hybrid_r1.formats.gguf import GGUFCheckpoint
from hybrid_r1.formats.gguf_writer import write_gguf_from_checkpoint
from hybrid_r1.formats.safetensors import SafetensorsCheckpoint
from hybrid_r1.staging import OutputExistsError
from hybrid_r1.synth import SyntheticWeights, preset_config, write_checkpoint
from hybrid_r1_merge_tools import cli
from hybrid_r1_merge_tools.merge import merge, verify
from hybrid_r1_merge_tools.quantize import quantize_checkpoint
from routing import metrics, record_routing, replay_routing

TESTS = Path(__file__).resolve().parent
CFG = dict(vocab_size=SMALL_VOCAB, num_hidden_layers=3)


def _digests(folder: Path) -> dict[str, str]:
    paths = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    weights = SyntheticWeights(preset_config("tiny", **CFG), seed=21)
    bf16 = write_checkpoint(root / "bf16", weights, tokenizer=False, shard_mb=1)
    int8 = quantize_checkpoint(bf16, root / "int8", "block").output
    ggufs = {mix: write_gguf_from_checkpoint(weights, root / f"{mix}.gguf", type_mix=mix)[0] for mix in ("Q8_0", "Q4_K_M")}
    ggufs["IQ4_XS"] = write_gguf_from_checkpoint(weights, root / "iq.gguf", type_mix="Q4_K_M",
                                                 tensor_types={r"ffn_(gate|up)_exps": "IQ4_XS"})[0]
    return root, bf16, int8, ggufs


@pytest.fixture(scope="module")
def merged_q4(sources):
    root, _, int8, ggufs = sources
    before = {**_digests(int8), **_digests(ggufs["Q4_K_M"])}
    out = merge(int8, ggufs["Q4_K_M"], root / "merged-q4", shard_bytes=1 << 20).output
    assert {**_digests(int8), **_digests(ggufs["Q4_K_M"])} == before  # the inputs are only read
    return out


def test_merged_folder_holds_both_sources_bytes_unchanged(sources, merged_q4):
    _, _, int8, ggufs = sources
    st, g = SafetensorsCheckpoint(int8), GGUFCheckpoint(ggufs["Q4_K_M"])
    out = SafetensorsCheckpoint(merged_q4)
    cfg = st.config
    for name in st.names():  # every non-routed-expert tensor (the MTP layer's experts included)
        layer = M.routed_expert_layer(name)
        if layer is not None and layer < cfg.num_hidden_layers:
            assert not out.has(name)
            continue
        a, b = st.raw(name)[0], out.raw(name)[0]
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
    assert any(n.startswith(f"model.layers.{cfg.num_hidden_layers}.mlp.experts.") for n in out.names())  # MTP kept
    types = json.loads((merged_q4 / M.MANIFEST).read_text())["expert_types"]
    for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        mine, theirs = M.BlobExperts(out).ggml_experts(layer), g.ggml_experts(layer)
        for part in M.PARTS:
            assert mine[part].ggml_type == theirs[part].ggml_type and mine[part].ne == theirs[part].ne
            assert (mine[part].data == theirs[part].data).all()
        assert types[str(layer)]["gate"] == "Q4_K" and types[str(layer)]["down"] in ("Q4_K", "Q6_K")
    index = json.loads((merged_q4 / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(out.names())
    assert verify(merged_q4) == []


@pytest.mark.parametrize("mix", ["Q8_0", "Q4_K_M", "IQ4_XS"])
def test_merged_equals_pair_bit_for_bit(sources, mix, tmp_path):
    _, _, int8, ggufs = sources
    out = merge(int8, ggufs[mix], tmp_path / "m", shard_bytes=1 << 20).output
    a = hybrid_r1.load(out, device="cpu")
    b = hybrid_r1.load(int8, gguf=ggufs[mix], device="cpu")
    ops = {p.op for p in a.placements if p.op}
    assert ops == {p.op for p in b.placements if p.op} == {"experts.ggml_cpu", "linear.int8_block"}  # default rules
    ids = random_ids(20, seed=3)
    assert torch.equal(a.logits(ids), b.logits(ids))


def test_merged_model_is_faithful(sources, merged_q4):
    """INT8 linears + ggml experts (the merged folder, default rules) vs fp32 on the BF16 weights
    with the same GGUF experts dequantized exactly (experts.dequant in float64), teacher-forced with
    the reference's routing replayed: the INT8 envelope of tests/test_int8_model.py (block: mean KL
    7e-3, max relative error 0.2) must hold with the experts computed by ggml (Q8_K activations for
    the K-quants: ~1% per expert output, which the 3 layers of this model add to the INT8 linears')."""
    _, bf16, _, ggufs = sources
    ref = hybrid_r1.load(bf16, gguf=ggufs["Q4_K_M"], device="cpu",
                         rules=[{"class": "Experts", "op": "experts.dequant", "device": "cpu",
                                 "args": {"compute_dtype": "float64"}}])
    prompt = random_ids(16, seed=9)
    ids = prompt + list(ref.generate(prompt, max_new_tokens=24, stop=[]))
    ref_logits, chosen, _ = record_routing(ref, ids)
    model = hybrid_r1.load(merged_q4, device="cpu")
    hooks = replay_routing(model, chosen)
    kl, rel = metrics(model.logits(ids), ref_logits)
    for h in hooks:
        h.remove()
    assert kl.mean() <= 7e-3 and rel.max() <= 0.2, (kl.mean(), rel.max())
    assert kl.mean() > 0  # really another computation than the reference


def test_verify_catches_a_flipped_byte_and_a_missing_file(sources, merged_q4, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(merged_q4, copy)
    blob = next(copy.glob("experts-layer-*.safetensors"))
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    shard = next(copy.glob("model-*.safetensors"))
    shard.unlink()
    problems = verify(copy)
    assert any(str(blob) in p and "sha256" in p for p in problems)
    assert any(str(shard) in p and "missing" in p for p in problems)
    assert cli.main(["verify", str(copy)]) == 1
    assert cli.main(["verify", str(merged_q4)]) == 0 and "intact" in capsys.readouterr().out


def test_merge_refuses_what_it_cannot_do(sources, merged_q4, tmp_path):
    root, _, int8, ggufs = sources
    with pytest.raises(OutputExistsError, match="pass --force"):
        merge(int8, ggufs["Q8_0"], merged_q4)  # an existing folder, no force
    with pytest.raises(CheckpointError, match="must lie outside the input folder"):
        merge(int8, ggufs["Q8_0"], root, force=True)  # would replace the folder holding the input
    other = SyntheticWeights(preset_config("tiny", **CFG, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                                           topk_group=1), seed=1)
    (odd,) = write_gguf_from_checkpoint(other, tmp_path / "odd.gguf", type_mix="Q8_0")
    with pytest.raises(CheckpointError, match=r"describe different models: n_routed_experts: 16 vs 8") as e:
        merge(int8, odd, tmp_path / "x")
    assert "config.json" in str(e.value) and "odd.gguf" in str(e.value)
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(int8, broken)
    next(broken.glob("model-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        merge(broken, ggufs["Q8_0"], tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert cli.main(["merge", "--safetensor", str(int8), "--gguf", str(odd), "--output", str(tmp_path / "z")]) == 2


def test_pair_from_a_gguf_folder_and_a_mismatch(sources, tmp_path):
    _, _, int8, ggufs = sources
    folder = tmp_path / "one-set"
    folder.mkdir()
    os.symlink(ggufs["Q8_0"], folder / "model.gguf")
    assert hybrid_r1.load(int8, gguf=folder, device="cpu").config.n_routed_experts == 16
    with pytest.raises(CheckpointError, match="one GGUF file or one split set"):
        hybrid_r1.load(int8, gguf=tmp_path, device="cpu")


def _merge_child(args: list[str], faults: list) -> subprocess.CompletedProcess:
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import faults; "
            f"faults.run('hybrid_r1_merge_tools.cli', {args!r}, {faults!r})")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=os.environ)


def test_killed_merge_leaves_nothing_and_resumes(sources, merged_q4, tmp_path):
    _, _, int8, ggufs = sources
    out = tmp_path / "resumed"
    args = ["merge", "--safetensor", str(int8), "--gguf", str(ggufs["Q4_K_M"]), "--output", str(out), "--shard-gb",
            str(1 / 1024)]
    before = {**_digests(int8), **_digests(ggufs["Q4_K_M"])}
    # SIGKILL right after the journal records the second finished file (its first save lists none)
    r = _merge_child(args, [("hybrid_r1_merge_tools.merge:_save_json", 3, "kill-after")])
    assert r.returncode == -9, r.stderr
    assert not out.exists()  # nothing under the output name, so nothing half-written loads
    assert {**_digests(int8), **_digests(ggufs["Q4_K_M"])} == before
    # the rerun takes the two finished files over and writes the rest
    r = _merge_child(args, [])
    assert r.returncode == 0, r.stderr
    assert "2 taken over" in r.stdout
    assert not list(tmp_path.glob(".resumed.*"))  # no staging or resume folder left behind
    want = json.loads((merged_q4 / M.MANIFEST).read_text())
    got = json.loads((out / M.MANIFEST).read_text())
    assert got["files"] == want["files"] and got["expert_types"] == want["expert_types"]  # same bytes as one clean run
    assert verify(out) == []


def test_inspect_a_merged_folder(merged_q4, capsys):
    assert cli.main(["inspect", str(merged_q4)]) == 0
    text = capsys.readouterr().out
    assert "merged folder" in text and "routed experts for CPU RAM" in text
    assert "layer 1: Q4_K/Q4_K/Q4_K" in text and "layer 2: Q4_K/Q4_K/Q6_K" in text  # llama.cpp's Q4_K_M down rule


def _write_ktransformers(int8: Path, gguf: Path, out: Path) -> None:
    """A folder as KTransformers' merge script writes it: GGUF-style names (old layout), the
    safetensors' tensors as they are, each expert projection one 1-D uint8 blob + a 0-d int64
    ggml_type, one shard per layer plus one for the rest, no index, no config.json, no MTP layer."""
    from hybrid_r1.formats import names as N
    from hybrid_r1.formats.safetensors_writer import write_file

    st, g = SafetensorsCheckpoint(int8), GGUFCheckpoint(gguf)
    cfg = st.config
    shards: dict[int, dict[str, torch.Tensor]] = {}
    for name in st.names():
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        if layer is not None and int(layer) >= cfg.num_hidden_layers:
            continue  # they drop the MTP layer
        if M.routed_expert_layer(name) is not None:
            continue
        stem, suffix = name, None
        for s in ("weight_scale_inv", "weight_scale"):
            if name.endswith(s):
                stem, suffix = name[: -len(s)] + "weight", s
        (theirs,) = N.hf_to_gguf(stem, layout=N.OLD)
        theirs = theirs if suffix is None else theirs[: -len("weight")] + suffix
        shards.setdefault(-1 if layer is None else int(layer), {})[theirs] = st.raw(name)[0]
    for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        for part, t in g.ggml_experts(layer).items():
            blob = f"blk.{layer}.ffn_{part}_exps"
            shards[layer][blob + ".weight"] = torch.from_numpy(t.data.reshape(-1).copy())
            shards[layer][blob + ".ggml_type"] = torch.tensor(t.ggml_type)
    out.mkdir()
    for i, (_, tensors) in enumerate(sorted(shards.items())):
        write_file(out / f"model-{i:05}-of-{len(shards) - 1:05}.safetensors", tensors)  # their off-by-one


def test_ktransformers_folder_loads_as_is_and_converts(sources, tmp_path):
    import shutil

    _, _, int8, ggufs = sources
    kt = tmp_path / "kt"
    _write_ktransformers(int8, ggufs["Q4_K_M"], kt)
    ids = random_ids(16, seed=4)
    want = hybrid_r1.load(int8, gguf=ggufs["Q4_K_M"], device="cpu").logits(ids)
    with pytest.raises(CheckpointError, match="carries no config.json: put the model's config.json there or pass --config"):
        hybrid_r1.load(kt, device="cpu")
    assert cli.main(["merge", "--ktransformers", str(kt), "--config", str(int8), "--output", str(tmp_path / "ours"),
                     "--shard-gb", "0.001"]) == 0
    assert verify(tmp_path / "ours") == []
    assert torch.equal(hybrid_r1.load(tmp_path / "ours", device="cpu").logits(ids), want)
    shutil.copyfile(int8 / "config.json", kt / "config.json")
    model = hybrid_r1.load(kt, device="cpu")
    assert {p.op for p in model.placements if p.op} == {"experts.ggml_cpu", "linear.int8_block"}
    assert torch.equal(model.logits(ids), want)


@needs_cuda
def test_merged_on_the_gpu_rules_equals_the_pair(sources, merged_q4):
    """The product's path: the merged folder under rules/int8-gpu-ggml-experts.yaml (INT8 Triton
    linears on the GPU, ggml experts on the CPU, CUDA-graph decode) against the pair, same rules."""
    _, _, int8, ggufs = sources
    rules = Path(__file__).resolve().parent.parent / "rules" / "int8-gpu-ggml-experts.yaml"
    a = hybrid_r1.load(merged_q4, rules=rules)
    b = hybrid_r1.load(int8, gguf=ggufs["Q4_K_M"], rules=rules)
    ids = random_ids(24, seed=5)
    assert torch.equal(a.logits(ids), b.logits(ids))
    cache = a.new_cache()
    graphed = a.generate(ids, max_new_tokens=12, stop=[], cache=cache)
    assert list(graphed) == list(b.generate(ids, max_new_tokens=12, stop=[], cuda_graphs=False))
    assert a.decode_graphs(cache).use_graphs  # decoded under CUDA graphs, the CPU experts between them


def test_torch_experts_read_the_blobs(sources, merged_q4, tmp_path):
    """Experts kept as the model's own torch modules (no GGML operator) load each expert dequantized
    from the merged folder's blobs (and from a KTransformers folder's), as from the GGUF itself."""
    import shutil

    _, _, int8, ggufs = sources
    kept = [{"class": "Experts", "device": "cpu"}]
    ids = random_ids(12, seed=6)
    want = hybrid_r1.load(int8, gguf=ggufs["Q4_K_M"], device="cpu", rules=kept).logits(ids)
    assert torch.equal(hybrid_r1.load(merged_q4, device="cpu", rules=kept).logits(ids), want)
    kt = tmp_path / "kt"
    _write_ktransformers(int8, ggufs["Q4_K_M"], kt)
    shutil.copyfile(int8 / "config.json", kt / "config.json")
    assert torch.equal(hybrid_r1.load(kt, device="cpu", rules=kept).logits(ids), want)


def test_merge_refuses_a_gguf_without_expert_tensors(sources, tmp_path):
    _, _, int8, ggufs = sources
    data = ggufs["Q8_0"].read_bytes()
    header = data[:1 << 20]  # the tensor names live in the header: rename the experts away, same length
    broken = tmp_path / "no-experts.gguf"
    broken.write_bytes(header.replace(b"_exps.", b"_expz.") + data[1 << 20:])
    with pytest.raises(CheckpointError, match=r"tensor missing .*no-experts.gguf.*ffn_\w+_exps"):
        merge(int8, broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
