"""INT8 (or FP8/BF16) safetensors + a GGUF's routed experts -> one merged folder (hybrid_r1.formats.merged).

Every tensor is copied with its bytes unchanged: the safetensors folder's tensors except the routed
experts of the model's layers (the MTP layer keeps its own: GGUFs do not carry it), and each MoE
layer's `ffn_{gate,up,down}_exps` blocks from the GGUF as `model.layers.L.mlp.experts.*.ggml` uint8
tensors with their ggml type and shape in the shard metadata. Bytes are read with pread in 64 MiB
pieces and written as they come (RAM stays a few hundred MB whatever the model's size), hashed on
the way (sha256 per output file, no second read), into a staging folder published at the end
(hybrid_r1.staging). A journal in the staging folder lists finished files with their checksums; a
rerun for the same output and unchanged inputs takes those files over instead of writing them again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from hybrid_r1.errors import CheckpointError
from hybrid_r1.formats import merged as M
from hybrid_r1.formats.safetensors import SafetensorsCheckpoint, read_header
from hybrid_r1.formats.safetensors_writer import SafetensorsWriter, TensorSpec, plan_shards, write_index
from hybrid_r1.loading import gguf_file, open_gguf
from hybrid_r1.quant import SCHEMES, scheme_of_kind
from hybrid_r1.staging import OutputExistsError, staged_output

VERSION = "hybrid_r1 merge_tools merge 1"
CHUNK = 64 << 20  # bytes copied per read (one buffer per worker)
MAX_WORKERS = 4  # files written at once, at most (and no more than the CPUs this process may use)
JOURNAL = "merge-journal.json"
SMALL_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
               "configuration_deepseek.py", "modeling_deepseek.py", "LICENSE", "README.md")


@dataclass
class _File:
    """One output shard: its tensors in order, where each one's bytes are, and its metadata."""

    name: str
    specs: list[TensorSpec]
    sources: list[tuple[str, int, int]]  # (file, offset, size) per spec
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


@dataclass
class MergeReport:
    output: Path
    files: int
    resumed: int  # files taken over from an interrupted run
    bytes_out: int
    seconds: float
    expert_types: dict[int, dict[str, str]]


def merge(safetensor_dir: str | Path, gguf_path: str | Path, output: str | Path, *, force: bool = False,
          resume: bool = True, shard_bytes: int = 4 << 30,
          progress: Callable[[int, int], None] | None = None) -> MergeReport:
    """Write the merged folder `output`; progress(bytes_done, bytes_total) as it goes."""
    src, out = Path(safetensor_dir), Path(output)
    _check_paths(src, out, force)
    base = SafetensorsCheckpoint(src)
    gpath = gguf_file(gguf_path)
    g = open_gguf(gpath)
    diff = M.config_differences(base.config, g.config)
    if diff:
        raise CheckpointError(f"{src / 'config.json'} and {gpath} describe different models: " + "; ".join(diff),
                              file=str(gpath))
    return _merge(base, g, out, [src], force=force, resume=resume, shard_bytes=shard_bytes, progress=progress,
                  untouched=f"{src} and {gpath}")


def convert_ktransformers(kt_dir: str | Path, config_dir: str | Path | None, output: str | Path, *,
                          force: bool = False, resume: bool = True, shard_bytes: int = 4 << 30,
                          progress: Callable[[int, int], None] | None = None) -> MergeReport:
    """A KTransformers merged folder (formats/ktransformers.py) -> our merged folder, bytes unchanged,
    now with shapes, types, an index and a manifest."""
    from hybrid_r1.formats.ktransformers import KTransformersCheckpoint

    src, out = Path(kt_dir), Path(output)
    _check_paths(src, out, force)
    kt = KTransformersCheckpoint(src, config_dir)
    folders = [src] + ([Path(config_dir)] if config_dir is not None else [])
    return _merge(kt, kt, out, folders, force=force, resume=resume, shard_bytes=shard_bytes, progress=progress,
                  untouched=str(src))


def _merge(base, g, out: Path, folders: list[Path], *, force: bool, resume: bool, shard_bytes: int,
           progress: Callable[[int, int], None] | None, untouched: str) -> MergeReport:
    """`base`'s tensors but the routed experts, and `g`'s GGML experts, into the merged folder `out`."""
    plan, types = _plan(base, g, shard_bytes)
    total = sum(f.nbytes for f in plan)
    fingerprint = {"sources": _sources(base, g), "plan": [(f.name, [(s.name, s.nbytes) for s in f.specs]) for f in plan]}
    t0 = time.perf_counter()
    resumable = _take_resumable(out, fingerprint) if resume else None
    done_bytes, resumed = 0, 0
    with staged_output(out, force=force, needed_bytes=total, untouched=untouched) as tmp:
        journal = {"fingerprint": fingerprint, "done": {}}
        todo = []
        for f in plan:
            entry = _resumed(resumable, f, journal) if resumable else None
            if entry is None:
                todo.append(f)
                continue
            os.rename(resumable / f.name, tmp / f.name)
            resumed += 1
            journal["done"][f.name] = entry
            done_bytes += f.nbytes
        _save_json(tmp / JOURNAL, journal)
        # Files are written by a few threads at once: pread, write and sha256 all release the GIL,
        # so hashing (the slowest step on a small CPU) overlaps the I/O of the other files.
        lock = threading.Lock()
        copied = [done_bytes]

        def one(f: _File) -> None:
            def moved(n: int) -> None:
                with lock:
                    copied[0] += n
                    if progress:
                        progress(copied[0], total)

            entry = _write(tmp / f.name, f, moved)
            with lock:
                journal["done"][f.name] = entry
                _save_json(tmp / JOURNAL, journal)

        with ThreadPoolExecutor(max_workers=max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))) as pool:
            for future in [pool.submit(one, f) for f in todo]:
                future.result()  # the first error, after the others have stopped
        if resumable is not None:
            shutil.rmtree(resumable, ignore_errors=True)
        weight_map = {s.name: f.name for f in plan for s in f.specs}
        write_index(tmp, weight_map, total)
        _write_config(base, tmp)
        small = [n for folder in folders for n in _copy_small_files(folder, tmp)]
        if "tokenizer.json" not in small:
            _tokenizer_from_gguf(g, tmp)
        files = dict(journal["done"])
        (tmp / JOURNAL).unlink()
        for name in sorted(p.name for p in tmp.iterdir() if p.name not in files):
            files[name] = {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
        manifest = {"format": M.MANIFEST_FORMAT, "tool": VERSION, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "sources": fingerprint["sources"], "expert_types": {str(k): v for k, v in types.items()},
                    "files": dict(sorted(files.items()))}
        _save_json(tmp / M.MANIFEST, manifest)
    return MergeReport(out, len(plan), resumed, total, time.perf_counter() - t0, types)


def _check_paths(src: Path, out: Path, force: bool) -> None:
    if not src.exists():
        raise CheckpointError("the safetensors folder does not exist", file=str(src))
    if not src.is_dir():
        raise CheckpointError("--safetensor must be a checkpoint folder (config.json and .safetensors shards)",
                              file=str(src))
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents or o in s.parents:
        raise CheckpointError(f"the output {out} must lie outside the input folder and not contain it", file=str(src))
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it", out)


def _plan(base, g, shard_bytes: int) -> tuple[list[_File], dict[int, dict[str, str]]]:
    from gguf import GGMLQuantizationType

    cfg = base.config
    moe = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    keep = [n for n in base.names() if not _replaced(n, cfg.num_hidden_layers)]
    groups: dict[str, list[TensorSpec]] = {}  # a weight and its scale stay in one shard
    for n in keep:
        groups.setdefault(n.rsplit(".", 1)[0], []).append(TensorSpec(n, base.dtype(n), tuple(base.shape(n))))
    shards = plan_shards(groups.values(), shard_bytes)
    files = [_File(f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors", specs,
                   [base.byte_range(s.name) for s in specs], {"format": "pt"}) for i, specs in enumerate(shards)]
    types: dict[int, dict[str, str]] = {}
    for layer in moe:
        experts = g.ggml_experts(layer)  # a CheckpointError naming the tensor if the GGUF lacks them
        specs, sources, info = [], [], {}
        for part in M.PARTS:
            t = experts[part]
            name = M.blob_name(layer, part)
            spec = TensorSpec(name, torch.uint8, tuple(t.data.shape))
            file, offset, size = g.byte_range(t.name)
            if size != spec.nbytes:
                raise CheckpointError(f"holds {size} bytes, its shape says {spec.nbytes}", file=file, tensor=t.name)
            specs.append(spec)
            sources.append((file, offset, size))
            type_name = GGMLQuantizationType(t.ggml_type).name
            info[name] = {"type": t.ggml_type, "type_name": type_name, "ne": list(t.ne), "gguf_name": t.name}
            types.setdefault(layer, {})[part] = type_name
        files.append(_File(f"experts-layer-{layer:03d}.safetensors", specs, sources,
                           {"format": "pt", M.GGML_KEY: json.dumps(info, sort_keys=True)}))
    return files, types


def _replaced(name: str, n_layers: int) -> bool:
    layer = M.routed_expert_layer(name)
    return layer is not None and layer < n_layers


def _write(path: Path, f: _File, progress: Callable[[int], None]) -> dict:
    """Copy one output file's tensors, hashing every byte written; progress(n) after each piece."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    fds: dict[str, int] = {}
    try:
        with SafetensorsWriter(path, f.specs, f.metadata, hasher=h) as w:
            for spec, (file, offset, size) in zip(f.specs, f.sources):
                fd = fds.get(file)
                if fd is None:
                    fd = fds[file] = os.open(file, os.O_RDONLY)
                pos = 0
                while pos < size:
                    n = os.preadv(fd, [memoryview(buf)[: min(CHUNK, size - pos)]], offset + pos)
                    if n <= 0:
                        raise CheckpointError(f"ended {size - pos} bytes early: truncated?", file=file, tensor=spec.name)
                    w.write_bytes(spec.name, memoryview(buf)[:n])
                    pos += n
                    progress(n)
    finally:
        for fd in fds.values():
            os.close(fd)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def _sources(base, g) -> dict:
    """Each input file's size, modification time and header hash: what a resume compares."""
    def describe(files: list[tuple[str, int]]) -> list[dict]:
        out = []
        for path, header_end in files:
            st = os.stat(path)
            with open(path, "rb") as fh:
                head = fh.read(header_end)
            out.append({"file": Path(path).name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                        "header_sha256": hashlib.sha256(head).hexdigest()})
        return out

    sources = {"safetensor": {"path": str(Path(base.path).resolve()), "files": describe(base.source_files())}}
    if g is not base:
        sources["gguf"] = {"path": str(Path(g.files[0]).resolve()), "files": describe(g.source_files())}
    return sources


def _take_resumable(out: Path, fingerprint: dict) -> Path | None:
    """A staging folder of an interrupted merge into `out` with the same inputs and plan, moved
    aside (so the new run's cleanup keeps it) for its finished files to be taken over."""
    import fcntl

    prefix = f".{out.name}.staging-"
    for stale in sorted(out.parent.glob(f".{out.name}.resume-*")):  # left by a run killed while resuming
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    for folder in sorted(out.parent.glob(f"{prefix}*")):
        if not folder.is_dir() or folder.name.endswith(".old") or not (folder / JOURNAL).is_file():
            continue
        lock = folder.with_name(folder.name + ".lock")
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            fd = None
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a merge still running
            try:
                journal = json.loads((folder / JOURNAL).read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if journal.get("fingerprint") != json.loads(json.dumps(fingerprint)):
                continue
            aside = out.parent / f".{out.name}.resume-{os.getpid()}"
            os.rename(folder, aside)
            return aside
        finally:
            if fd is not None:
                os.close(fd)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _resumed(folder: Path, f: _File, journal: dict) -> dict | None:
    """The journal entry of `f` if the interrupted run finished it (size as recorded)."""
    try:
        old = json.loads((folder / JOURNAL).read_text())["done"].get(f.name)
    except (OSError, json.JSONDecodeError, KeyError):
        return None
    path = folder / f.name
    if old is None or not path.is_file() or path.stat().st_size != old.get("size"):
        return None
    return old


def _write_config(base, tmp: Path) -> None:
    """config.json as the folder's, with the quantization_config the loader expects for INT8
    (Meituan's Channel-INT8 config.json has none)."""
    config = json.loads(Path(base.config_file).read_text())
    scheme = scheme_of_kind(base.quantization())
    if scheme is not None and not config.get("quantization_config"):
        config["quantization_config"] = SCHEMES[scheme.name].quant_config()
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _copy_small_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in SMALL_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def _tokenizer_from_gguf(g, tmp: Path) -> None:
    """No tokenizer files beside the safetensors: the GGUF's own, as tokenizer.json +
    tokenizer_config.json (with its chat template), if it carries one."""
    tok = g.tokenizer()
    if tok is None:
        print("note: neither source has a tokenizer; the merged folder has none", file=sys.stderr)
        return
    tok.save(tmp)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _save_json(path: Path, obj: dict) -> None:
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(obj, indent=1) + "\n")
    with open(part, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(part, path)


# ---- verify ---------------------------------------------------------------------------------------
def verify(folder: str | Path, progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Every problem of a merged folder, one line each naming the file (empty: intact): each file
    of the manifest present with its size and sha256, every index entry in a listed file whose
    header holds it, no unlisted file."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / M.MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"not a merged folder: no {M.MANIFEST}", file=str(folder)) from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"unreadable manifest ({e!r})", file=str(folder / M.MANIFEST)) from None
    total = sum(int(v.get("size", 0)) for v in files.values())
    lock, done = threading.Lock(), [0]

    def check(name: str, want: dict) -> str | None:
        path = folder / name
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != want.get("size"):
            return f"{path}: {size} bytes, the manifest says {want.get('size')}"
        bad = _sha256(path) != want.get("sha256")
        with lock:
            done[0] += size
            if progress:
                progress(done[0], total)
        return f"{path}: sha256 differs from the manifest" if bad else None

    with ThreadPoolExecutor(max_workers=max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))) as pool:
        results = list(pool.map(lambda kv: check(*kv), sorted(files.items())))  # hashing releases the GIL
    problems = [r for r in results if r]
    extra = sorted(p.name for p in folder.iterdir() if p.name != M.MANIFEST and p.name not in files)
    problems += [f"{folder / n}: not in the manifest" for n in extra]
    index = folder / "model.safetensors.index.json"
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        return problems + [f"{index}: unreadable index ({type(e).__name__})"]
    by_file = defaultdict(list)
    for tensor, fname in weight_map.items():
        by_file[fname].append(tensor)
    for fname, tensors in sorted(by_file.items()):
        if fname not in files:
            problems.append(f"{folder / fname}: named by the index, not in the manifest")
            continue
        if not (folder / fname).is_file():
            continue  # reported above
        try:
            header = read_header(folder / fname)[0]
        except (OSError, CheckpointError) as e:
            problems.append(f"{folder / fname}: unreadable header ({e})")
            continue
        lacking = [t for t in tensors if t not in header]
        if lacking:
            problems.append(f"{folder / fname}: lacks {len(lacking)} tensor(s) the index places there, e.g. {lacking[0]}")
    return problems

