"""Malformed input through the real command lines: exit code 2, a message naming the culprit, no
traceback, no hang, no signal. Most cases run in one driver process (tests/cli_cases.py: a
subprocess per case would spend its time importing torch); those that need a real pipe or real
argv bytes run as their own subprocesses. Then the Python API's own checks, in process."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from conftest import SMALL_VOCAB
from hybrid_r1.errors import ConfigError, HybridR1Error, InputError
from hybrid_r1.synth import SyntheticWeights, preset_config, write_checkpoint, write_gguf

HERE = Path(__file__).parent
TIMEOUT = 240  # the whole driver run; one case alone gets 60 s inside it


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    cfg = preset_config("tiny", vocab_size=SMALL_VOCAB)
    return write_checkpoint(tmp_path_factory.mktemp("bad") / "tiny", SyntheticWeights(cfg, seed=3), tokenizer=False)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    cfg = preset_config("tiny", vocab_size=SMALL_VOCAB)
    return write_gguf(tmp_path_factory.mktemp("badg") / "tiny.gguf", SyntheticWeights(cfg, seed=3), tokenizer=False)


# ---- making broken copies --------------------------------------------------------------------

def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def with_config(tiny: Path, dst: Path, text: str) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text(text)
    return dst


def config_change(tiny: Path, dst: Path, **change) -> Path:
    cfg = json.loads((tiny / "config.json").read_text())
    return with_config(tiny, dst, json.dumps({**cfg, **change}))


def shard(folder: Path) -> Path:
    return next(folder.glob("model-*.safetensors"))


def read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path: Path, header, data: bytes) -> None:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def st_case(tiny: Path, dst: Path, edit) -> Path:
    """A copy of `tiny` whose shard header went through edit(header) (returns the new header)."""
    copy_dir(tiny, dst)
    header, data = read_st(shard(dst))
    write_st(shard(dst), edit(header), data)
    return dst


def first_tensors(header: dict, n: int = 2) -> list[str]:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return [k for k in names if header[k]["data_offsets"][1] > header[k]["data_offsets"][0]][:n]


def gguf_copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def gguf_tensors(path: Path) -> list:
    return sorted(gguf.GGUFReader(path, "r+").tensors, key=lambda t: t.data_offset)


# ---- the cases -------------------------------------------------------------------------------

def build_cases(tiny: Path, tiny_gguf: Path, tmp: Path) -> list[tuple[str, str, list[str], bytes | None, str]]:
    """(id, cli, argv, stdin bytes, what stderr must name)."""
    gen = ["generate", "--model", str(tiny), "--prompt", "hi"]
    cases = [
        ("temperature -1", "hybrid-r1", gen + ["--temperature", "-1"], None, "--temperature"),
        ("temperature nan", "hybrid-r1", gen + ["--temperature", "nan"], None, "--temperature"),
        ("top-p 0", "hybrid-r1", gen + ["--top-p", "0"], None, "--top-p"),
        ("top-k -1", "hybrid-r1", gen + ["--top-k", "-1"], None, "--top-k"),
        ("max-new-tokens 0", "hybrid-r1", gen + ["--max-new-tokens", "0"], None, "--max-new-tokens"),
        ("seed 2**70", "hybrid-r1", gen + ["--seed", str(2**70)], None, "--seed"),
        ("threads 100000", "hybrid-r1", gen + ["--threads", "100000"], None, "--threads"),
        ("threads 2**31", "hybrid-r1", gen + ["--threads", str(2**31)], None, "--threads"),
        ("threads 0", "hybrid-r1", gen + ["--threads", "0"], None, "--threads"),
        ("generate prompt surrogate", "hybrid-r1", ["generate", "--model", str(tiny), "--prompt", "\udcff"], None,
         "--prompt"),
        ("rules with quantize", "hybrid-r1", gen + ["--rules", "x.yaml", "--quantize", "block"], None, "--quantize"),
        ("missing model", "hybrid-r1", ["generate", "--model", str(tmp / "nope"), "--prompt", "hi"], None,
         "does not exist"),
        ("inspect missing", "merge_tools", ["inspect", str(tmp / "nope")], None, "does not exist"),
        ("chat temperature nan", "chat", ["--model", str(tiny), "--prompt", "hi", "--temperature", "nan"], None,
         "temperature"),
        ("chat seed 2**70", "chat", ["--model", str(tiny), "--prompt", "hi", "--seed", str(2**70)], None, "seed"),
        ("chat threads 100000", "chat", ["--model", str(tiny), "--prompt", "hi", "--threads", "100000"], None,
         "--threads"),
        ("chat stdin not utf-8", "chat", ["--model", str(tiny)], b"caf\xe9 \xff\xfe", "stdin"),
        ("chat prompt surrogate", "chat", ["--model", str(tiny), "--prompt", "a\udcffb"], None, "--prompt"),
        ("chat system surrogate", "chat", ["--model", str(tiny), "--prompt", "hi", "--system", "\udcff"], None,
         "system prompt"),
        ("synth --set foo", "hybrid-r1", ["synth", str(tmp / "s"), "--set", "foo"], None, "--set"),
    ]
    configs = {
        "config list": ("[1, 2]", "JSON object"),
        "config not json": ("{oops", "not valid JSON"),
        "config not utf-8": (b"{\"a\xff\": 1}".decode("latin-1"), "config.json"),
    }
    for cid, (text, want) in configs.items():
        d = with_config(tiny, tmp / cid.replace(" ", "_"), text)
        cases.append((cid, "hybrid-r1", ["generate", "--model", str(d), "--prompt", "hi"], None, want))
    changes = {
        "vocab as string": ({"vocab_size": "256"}, "vocab_size"),
        "bool as string": ({"norm_topk_prob": "false"}, "norm_topk_prob"),
        "moe_layer_freq 0": ({"moe_layer_freq": 0}, "moe_layer_freq"),
        "rope_theta 0": ({"rope_theta": 0}, "rope_theta"),
        "rope_theta -1": ({"rope_theta": -1.0}, "rope_theta"),
        "n_shared_experts -1": ({"n_shared_experts": -1}, "n_shared_experts"),
        "rms_norm_eps 0": ({"rms_norm_eps": 0}, "rms_norm_eps"),
        "rms_norm_eps nan": ({"rms_norm_eps": math.nan}, "rms_norm_eps"),
        "experts 2**20": ({"n_routed_experts": 2**20}, "n_routed_experts"),
        "layers 10**5": ({"num_hidden_layers": 10**5}, "num_hidden_layers"),
        "vocab 10**9": ({"vocab_size": 10**9}, "vocab_size"),
        "rope_scaling list": ({"rope_scaling": [1, 2]}, "rope_scaling"),
        "rope factor string": ({"rope_scaling": {"type": "yarn", "factor": "40"}}, "rope_scaling.factor"),
        "layers x experts": ({"num_hidden_layers": 1000, "first_k_dense_replace": 0, "n_routed_experts": 4096,
                              "n_group": 1, "topk_group": 1}, "n_routed_experts"),
    }
    for cid, (change, want) in changes.items():
        d = config_change(tiny, tmp / cid.replace(" ", "_").replace("*", "p"), **change)
        cases.append((cid, "hybrid-r1", ["generate", "--model", str(d), "--prompt", "hi"], None, want))

    def st(cid, edit, want, raw=None):
        d = tmp / ("st_" + cid.replace(" ", "_"))
        if raw is not None:
            copy_dir(tiny, d)
            raw(shard(d))
        else:
            st_case(tiny, d, edit)
        cases.append((cid, "merge_tools", ["inspect", str(d)], None, want))

    def entry(change):
        def edit(h):
            a = first_tensors(h)[0]
            h[a] = change(h[a]) if callable(change) else change
            return h
        return edit

    def overlap(h):
        a, b = first_tensors(h)
        h[b]["data_offsets"] = h[a]["data_offsets"]  # same bytes twice (the real b's bytes: a hole)
        h[b]["shape"], h[b]["dtype"] = h[a]["shape"], h[a]["dtype"]
        return h

    def negative(h):
        a = first_tensors(h)[0]
        b, e = h[a]["data_offsets"]
        h[a]["data_offsets"] = [b - 64, e - 64]
        return h

    def outside(p: Path):
        idx = p.parent / "model.safetensors.index.json"
        data = json.loads(idx.read_text())
        name = next(iter(data["weight_map"]))
        other = p.parent.parent / f"other_{p.parent.name}"
        other.mkdir()
        shutil.copyfile(p, other / p.name)
        data["weight_map"][name] = f"../{other.name}/{p.name}"
        idx.write_text(json.dumps(data))

    st("st header list", lambda h: [1, 2], "not an object")
    st("st header not json", lambda h: b"{nope" + b" " * 27, "not valid JSON")
    st("st entry without offsets", entry(lambda e: {"dtype": e["dtype"], "shape": e["shape"]}), "data_offsets")
    st("st entry a string", entry("x"), "must be an object")
    st("st shape of strings", entry(lambda e: {**e, "shape": ["2"]}), "shape")
    st("st bad dtype", entry(lambda e: {**e, "dtype": "F7"}), "unsupported dtype")
    st("st negative offsets", negative, "data_offsets")
    st("st overlap", overlap, "overlap")
    st("st index outside", None, "outside the checkpoint folder", raw=outside)
    st("st truncated", None, "truncated", raw=lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]))
    st("st header length past end", None, "header length",
       raw=lambda p: p.write_bytes(struct.pack("<Q", 1 << 40) + p.read_bytes()[8:]))
    st("st shorter than 8 bytes", None, "8-byte", raw=lambda p: p.write_bytes(b"\1\2"))

    def gg(cid, edit, want):
        p = gguf_copy(tiny_gguf, tmp / f"g_{cid.replace(' ', '_')}.gguf")
        edit(p)
        cases.append((cid, "merge_tools", ["inspect", str(p)], None, want))

    def g_overlap(p):
        ts = gguf_tensors(p)
        ts[3].field.parts[5][0] = ts[2].field.parts[5][0]

    def g_relabel(p):  # a Q8_0 tensor relabelled Q4_0: same blocks of 32, fewer bytes each
        t = next(t for t in gguf_tensors(p) if t.tensor_type == gguf.GGMLQuantizationType.Q8_0)
        t.field.parts[4][0] = int(gguf.GGMLQuantizationType.Q4_0)

    def g_misaligned(p):
        gguf_tensors(p)[2].field.parts[5][0] += 8

    gg("gguf overlap", g_overlap, "overlaps")
    gg("gguf relabelled type", g_relabel, "wrong type id")
    gg("gguf misaligned", g_misaligned, "aligned")
    gg("gguf bad magic", lambda p: p.write_bytes(b"GGUX" + p.read_bytes()[4:]), "not a GGUF file")
    gg("gguf truncated", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size - 4096]), "truncated")
    gg("gguf header cut", lambda p: p.write_bytes(p.read_bytes()[:2000]), "GGUF")

    for cid, args, want in [("rule threads 100000", "{threads: 100000}", "threads"),
                            ("rule threads many", "{threads: many}", "threads")]:
        rules = tmp / f"{cid.replace(' ', '_')}.yaml"
        rules.write_text(f"- name: 'mlp\\.experts$'\n  op: experts.ggml_cpu\n  device: cpu\n  args: {args}\n")
        cases.append((cid, "hybrid-r1", ["generate", "--model", str(tiny_gguf), "--prompt", "hi",
                                         "--rules", str(rules)], None, want))
    return cases


def test_bad_inputs_exit_2_naming_the_culprit(tiny, tiny_gguf, tmp_path):
    cases = build_cases(tiny, tiny_gguf, tmp_path)
    spec = [{"id": c, "cli": cli, "argv": argv, "stdin": None if data is None else data.decode("latin-1")}
            for c, cli, argv, data, _ in cases]
    (tmp_path / "cases.json").write_text(json.dumps(spec))
    run = subprocess.run([sys.executable, str(HERE / "cli_cases.py"), str(tmp_path / "cases.json"),
                          str(tmp_path / "results.json")], capture_output=True, text=True, timeout=TIMEOUT,
                         env={**os.environ, "NO_COLOR": "1"})
    running = run.stderr.strip().splitlines()[-1:] if run.stderr.strip() else ["(none)"]
    assert run.returncode == 0, f"the driver died (rc {run.returncode}) during {running}: {run.stderr[-2000:]}"
    results = {r["id"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    failures = []
    for cid, _, _, _, want in cases:
        r = results[cid]
        problems = [p for p, bad in [(f"rc {r['rc']}", r["rc"] != 2), ("a traceback", "Traceback" in r["stderr"]),
                                     (f"no {want!r}", want.lower() not in r["stderr"].lower())] if bad]
        if problems:
            failures.append(f"{cid}: {', '.join(problems)}\n    {r['stderr'].strip()[-600:]}")
    assert not failures, "\n".join(failures)


# ---- real pipes and real argv bytes ----------------------------------------------------------

def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def test_closed_stdout_exits_quietly(tiny):
    """`CLI | head`: the reader goes away; the writer stops without a BrokenPipeError traceback."""
    runs = [_cli("hybrid_r1_merge_tools.cli", "inspect", str(tiny)), _cli("hybrid_r1.cli", "generate", "--help"),
            _cli("hybrid_r1.chat", "--help")]
    procs = []
    for argv in runs:  # all at once: each spends seconds importing
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        p.stdout.close()  # before the first write: the first flush meets a closed pipe
        procs.append(p)
    for argv, p in zip(runs, procs):
        _, err = p.communicate(timeout=120)
        assert p.returncode in (0, 141), (argv, p.returncode, err[-1000:])
        assert b"Traceback" not in err and b"BrokenPipe" not in err, (argv, err[-1000:])


def test_real_process_bad_bytes(tiny):
    """Undecodable bytes as they really arrive: in argv (Python hands them over as lone surrogates)
    and on stdin."""
    argv = [os.fsencode(a) for a in _cli("hybrid_r1.chat", "--model", str(tiny), "--prompt")] + [b"x\xff"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE),
             subprocess.Popen(_cli("hybrid_r1.chat", "--model", str(tiny)), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)]
    outs = [procs[0].communicate(timeout=120), procs[1].communicate(b"\xff\xfe hello", timeout=120)]
    for p, (_, err), want in zip(procs, outs, (b"--prompt", b"stdin")):
        assert p.returncode == 2 and b"Traceback" not in err and want in err, err[-1000:]


# ---- the Python API --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
    ({"max_new_tokens": "4"}, "max_new_tokens must be an integer"),
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"seed": 2**64}, "seed"),
    ({"seed": -1}, "seed"),
    ({"seed": True, "temperature": 1.0}, "seed must be an integer"),
    ({"temperature": math.inf}, "temperature must be a finite number"),
    ({"temperature": math.nan}, "temperature must be a finite number"),
    ({"temperature": "0.5"}, "temperature must be a number"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"top_p": 1.5}, "top_p"),
    ({"prefill_chunk": 0}, "prefill_chunk"),
    ({"stop": [1.5]}, "stop token id"),
    ({"cache": "x"}, "cache must be a KVCache"),
])
def test_generate_arguments(tiny_model, kwargs, message):
    with pytest.raises(InputError, match=message):
        tiny_model.generate([1, 2, 3], **kwargs)


@pytest.mark.parametrize("ids, message", [
    ([1, SMALL_VOCAB], f"token id 1 is {SMALL_VOCAB}, outside the vocabulary"),
    ([-1], "outside the vocabulary"),
    ([1, 2.5], "token id 1 must be an integer"),
    ([True], "must be an integer"),
    ([], "empty"),
    ("hello", "encode text"),
])
def test_token_ids_checked(tiny_model, ids, message):
    for call in (tiny_model.generate, tiny_model.logits):
        with pytest.raises(InputError, match=message):
            call(ids)


def test_prompt_longer_than_positions(tiny_model):
    limit = tiny_model.config.max_position_embeddings
    with pytest.raises(InputError, match="max_position_embeddings"):
        tiny_model.logits([1] * (limit + 1))
    with pytest.raises(InputError, match="max_new_tokens 3 - 1 exceed"):
        tiny_model.generate([1] * (limit - 1), max_new_tokens=3)
    with pytest.raises(InputError, match="mode"):
        tiny_model.logits([1, 2], mode="fast")
    # numpy and torch integers are integers
    import numpy as np
    import torch

    assert tiny_model.logits(np.array([1, 2])).shape == tiny_model.logits(torch.tensor([1, 2])).shape


def test_errors_are_typed():
    assert issubclass(InputError, HybridR1Error) and issubclass(InputError, ValueError)


def test_gguf_metadata_types(tiny_gguf):
    from hybrid_r1.formats.gguf import GGUFCheckpoint
    from hybrid_r1.formats.gguf_metadata import config_from_metadata

    ck = GGUFCheckpoint(tiny_gguf)
    ne = {n: tuple(int(x) for x in t.shape) for n, (_, t) in ck._tensors.items()}
    meta = dict(ck.metadata)
    assert config_from_metadata(meta, ne).q_lora_rank == ck.config.q_lora_rank > 0
    # llama.cpp's converter writes q_lora_rank = 0 for models without q-LoRA: "none", not an error
    no_q = {**meta, "deepseek2.attention.q_lora_rank": 0}
    assert config_from_metadata(no_q, ne).q_lora_rank is None
    for key, value, message in [("deepseek2.block_count", "4", "deepseek2.block_count must be an integer"),
                                ("deepseek2.rope.freq_base", -1.0, "rope_theta"),
                                ("deepseek2.attention.layer_norm_rms_epsilon", math.nan, "layer_norm_rms_epsilon must be a finite"),
                                ("deepseek2.expert_weights_norm", 1, "expert_weights_norm must be true or false"),
                                ("deepseek2.expert_shared_count", -1, "n_shared_experts"),
                                ("deepseek2.vocab_size", 2**30, "vocab_size")]:
        with pytest.raises(ConfigError, match=message):
            config_from_metadata({**meta, key: value}, ne, source="x.gguf")



def test_linked_shards_are_not_outside(tiny, tmp_path):
    """A Hugging Face cache snapshot links its shards into a blobs folder elsewhere: that is fine;
    only index names that leave the folder are refused."""
    from hybrid_r1.errors import CheckpointError
    from hybrid_r1.formats.safetensors import SafetensorsCheckpoint

    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for f in tiny.iterdir():
        shutil.copyfile(f, blobs / f.name)
        (snap / f.name).symlink_to(blobs / f.name)
    assert SafetensorsCheckpoint(snap).names() == SafetensorsCheckpoint(tiny).names()
    idx = json.loads((tiny / "model.safetensors.index.json").read_text())
    for bad in ("/etc/passwd", "sub/../../x.safetensors"):
        (snap / "model.safetensors.index.json").unlink()
        first = next(iter(idx["weight_map"]))
        (snap / "model.safetensors.index.json").write_text(json.dumps({**idx, "weight_map": {first: bad}}))
        with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
            SafetensorsCheckpoint(snap)
