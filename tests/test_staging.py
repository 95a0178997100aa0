"""Staged output (hybrid_r1.staging) and what its users leave when killed or out of space.

The kill tests run `merge_tools quantize` and `hybrid-r1 synth` in child processes (a forkserver,
so torch is imported once) and SIGKILL them at chosen steps: the first and a middle tensor write,
just before publishing, just after. After each kill the output name holds the old output or the
new one, complete (byte-identical to a clean run), or nothing where there was nothing; the input is
byte-identical; and the next run removes what the killed one left.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import faults
from hybrid_r1 import staging
from hybrid_r1.formats.safetensors import SafetensorsCheckpoint
from hybrid_r1.staging import OutputError, OutputExistsError, remove_stale, staged_output
from hybrid_r1.synth import SyntheticWeights, preset_config, write_checkpoint
from hybrid_r1_merge_tools.cli import main as merge_main
from hybrid_r1_merge_tools.quantize import quantize_checkpoint

WRITE = "hybrid_r1.formats.safetensors_writer:SafetensorsWriter.write"
PUBLISH = "hybrid_r1.staging:_publish"
EXCHANGE = "hybrid_r1.staging:_exchange"
RENAME_NEW = "hybrid_r1.staging:_rename_noreplace"
QUANTIZE, SYNTH = "hybrid_r1_merge_tools.cli", "hybrid_r1.synth"


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


# ---- the helper itself ----------------------------------------------------------------------------
def _filled(folder: Path, text: str) -> Path:
    folder.mkdir()
    (folder / "a.txt").write_text(text)
    return folder


def test_stale_staging_removed_live_one_kept(tmp_path):
    out = tmp_path / "out"
    dead = _filled(tmp_path / ".out.staging-999999", "killed writer")
    (tmp_path / ".out.staging-999999.lock").touch()  # its lock file, nobody holding it
    orphan = _filled(tmp_path / ".out.staging-999998", "no lock file at all")
    live = _filled(tmp_path / ".out.staging-4242", "running writer")
    fd = os.open(tmp_path / ".out.staging-4242.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a writer holds its lock while it runs
    other = _filled(tmp_path / ".other.staging-999999", "another output's")
    try:
        with staged_output(out) as tmp:
            (tmp / "a.txt").write_text("new")
    finally:
        os.close(fd)
    assert not dead.exists() and not orphan.exists() and not (tmp_path / ".out.staging-999999.lock").exists()
    assert (live / "a.txt").read_text() == "running writer" and other.exists()
    assert (out / "a.txt").read_text() == "new"
    assert leftovers(tmp_path, {"out"}) == [".other.staging-999999", ".out.staging-4242", ".out.staging-4242.lock"]
    assert remove_stale(out) == [live]  # its writer gone (lock released), the next run removes it


def test_fallback_left_aside_is_restored(tmp_path):
    """A replacement without RENAME_EXCHANGE killed between its two renames: the old output waits
    under .NAME.staging-RUN.old and the next run puts it back before anything else."""
    _filled(tmp_path / ".out.staging-77.old", "old output")
    _filled(tmp_path / ".out.staging-77", "half-written new")
    (tmp_path / ".out.staging-77.lock").touch()
    remove_stale(tmp_path / "out")
    assert (tmp_path / "out" / "a.txt").read_text() == "old output" and leftovers(tmp_path, {"out"}) == []


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_and_refuse(tmp_path, monkeypatch, exchange):
    out = _filled(tmp_path / "out", "old")
    if not exchange:  # as on a system without renameat2: the rename-aside fallback
        monkeypatch.setattr(staging, "_exchange", lambda src, dst: False)
    with pytest.raises(OutputExistsError, match="out exists; pass --force"):
        with staged_output(out):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with staged_output(out, force=True) as tmp:
            (tmp / "a.txt").write_text("never")
            raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "old" and leftovers(tmp_path, {"out"}) == []
    with staged_output(out, force=True) as tmp:
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"] and leftovers(tmp_path, {"out"}) == []
    with staged_output(out, force=True, keep_existing=lambda p: (p / "b.txt").is_file()) as tmp:
        (tmp / "c.txt").write_text("dropped: a current one is there")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"] and leftovers(tmp_path, {"out"}) == []


def test_not_enough_space_is_refused_first(tmp_path, monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(staging.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - (5 << 20), 5 << 20))
    src = _bf16_checkpoint(tmp_path / "in")
    before = tree_hash(src)
    with pytest.raises(OutputError, match=r"needs about 6.0 MiB, 5.0 MiB free") as e:
        with staged_output(tmp_path / "out", needed_bytes=6 << 20, untouched=src):
            raise AssertionError("not reached")
    assert f"the input {src} is untouched" in str(e.value) and e.value.path == str(tmp_path / "out")
    assert main_rc(["synth", str(tmp_path / "s"), "--preset", "full-slice", "--layers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: not enough space for ") and "GiB, 5.0 MiB free" in err
    assert tree_hash(src) == before and leftovers(tmp_path, {"in"}) == []


def main_rc(argv):
    return merge_main(argv)


# ---- kill at every step ---------------------------------------------------------------------------
def _bf16_checkpoint(folder: Path) -> Path:
    """Two shards, four projections to quantize (one write each, plus one per scale), four copies."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(preset_config("tiny", vocab_size=512, num_hidden_layers=2).to_hf_dict()))
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for i in range(2):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        part = {}
        for j in (2 * i, 2 * i + 1):
            part[f"model.layers.{j}.mlp.down_proj.weight"] = torch.randn(256, 384, generator=g).bfloat16()
            part[f"model.layers.{j}.input_layernorm.weight"] = torch.randn(256, generator=g).bfloat16()
        save_file(part, str(folder / shard))
        weight_map.update({n: shard for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["faults", QUANTIZE, SYNTH])
    return ctx


def child(ctx, cli: str, argv: list[str], injected: list, stderr: Path | None = None) -> int:
    p = ctx.Process(target=faults.run, args=(cli, argv, injected, str(stderr) if stderr else None))
    p.start()
    p.join(120)
    assert not p.is_alive(), "the child hung"
    return p.exitcode


def _check_after_kill(out: Path, expected: dict[str, str] | None, leftover_expected: bool) -> None:
    if expected is None:
        assert not out.exists()
    else:
        assert tree_hash(out) == expected
        SafetensorsCheckpoint(out)  # and it opens: config, index, every shard header
    stale = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.staging-")]
    assert bool(stale) == leftover_expected, stale


@pytest.mark.parametrize("force", [False, True], ids=["new", "force"])
def test_quantize_killed_at_every_step(tmp_path, forkserver, force):
    src = _bf16_checkpoint(tmp_path / "in")
    refs = tmp_path / "refs"
    refs.mkdir()
    new = tree_hash(quantize_checkpoint(src, refs / "new", "block").output)
    old = tree_hash(quantize_checkpoint(src, refs / "old", "channel").output) if force else None
    assert old != new
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    if force:
        shutil.copytree(refs / "old", out)
    before = tree_hash(src)
    argv = ["quantize", "--input", str(src), "--output", str(out), "--scheme", "block"] + ["--force"] * force
    steps = [((WRITE, 1, "kill-before"), old), ((WRITE, 7, "kill-before"), old), ((PUBLISH, 1, "kill-before"), old),
             ((EXCHANGE if force else RENAME_NEW, 1, "kill-after"), new)]
    for fault, expected in steps:
        assert child(forkserver, QUANTIZE, argv, [fault]) == -signal.SIGKILL, fault
        _check_after_kill(out, expected, leftover_expected=True)
        assert tree_hash(src) == before, f"the input changed ({fault})"
        if expected is new and not force:
            argv.append("--force")  # the output exists now
    assert child(forkserver, QUANTIZE, argv, []) == 0
    assert tree_hash(out) == new and tree_hash(src) == before and leftovers(work, set()) == ["out"]


def test_quantize_fallback_killed_between_renames(tmp_path, forkserver):
    """Without RENAME_EXCHANGE: killed after moving the old output aside, the name is empty until
    the next run, which restores the old output first (and then replaces it)."""
    src = _bf16_checkpoint(tmp_path / "in")
    out = tmp_path / "out"
    old = tree_hash(quantize_checkpoint(src, out, "channel").output)
    argv = ["quantize", "--input", str(src), "--output", str(out), "--scheme", "block", "--force"]
    killed = child(forkserver, QUANTIZE, argv, [(EXCHANGE, 1, "return-false"), ("hybrid_r1.staging:os.rename", 1, "kill-after")])
    assert killed == -signal.SIGKILL and not out.exists()
    aside = [p for p in tmp_path.iterdir() if p.name.endswith(".old")]
    assert len(aside) == 1 and tree_hash(aside[0]) == old
    remove_stale(out)
    assert tree_hash(out) == old and leftovers(tmp_path, {"in", "out"}) == []


def test_synth_killed_at_every_step(tmp_path, forkserver):
    base = ["--no-tokenizer", "--set", "vocab_size=64", "--layers", "1", "--no-mtp", "--shard-mb", "0"]
    refs = tmp_path / "refs"
    cfg = preset_config("tiny", vocab_size=64, num_hidden_layers=1, num_nextn_predict_layers=0)
    old = tree_hash(write_checkpoint(refs / "old", SyntheticWeights(cfg, 0), tokenizer=False, shard_mb=0))
    new = tree_hash(write_checkpoint(refs / "new", SyntheticWeights(cfg, 3), tokenizer=False, shard_mb=0))
    work = tmp_path / "work"
    work.mkdir()
    out = work / "ck"
    shutil.copytree(refs / "old", out)
    argv = [str(out), *base, "--seed", "3", "--force"]
    for fault, expected in [((WRITE, 1, "kill-before"), old), ((WRITE, 9, "kill-before"), old),
                            ((PUBLISH, 1, "kill-before"), old), ((EXCHANGE, 1, "kill-after"), new)]:
        assert child(forkserver, SYNTH, argv, [fault]) == -signal.SIGKILL, fault
        _check_after_kill(out, expected, leftover_expected=True)
    assert child(forkserver, SYNTH, argv, []) == 0
    assert tree_hash(out) == new and leftovers(work, set()) == ["ck"]


def test_disk_full_midway(tmp_path, forkserver):
    """ENOSPC on the third tensor write: exit 2, one line naming the output, the space it needs and
    the untouched input; no traceback; nothing left behind."""
    src = _bf16_checkpoint(tmp_path / "in")
    before = tree_hash(src)
    out, err = tmp_path / "out", tmp_path / "stderr.txt"
    argv = ["quantize", "--input", str(src), "--output", str(out), "--scheme", "channel"]
    assert child(forkserver, QUANTIZE, argv, [(WRITE, 3, "enospc")], stderr=err) == 2
    text = err.read_text()
    assert text.startswith(f"error: no space left on the device writing {out} (model-00001-of-00002.safetensors)")
    assert "it needs about 0.4 MiB" in text and f"the input {src} is untouched" in text
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1
    assert tree_hash(src) == before and leftovers(tmp_path, {"in", "stderr.txt"}) == []


def test_cli_wording(tmp_path, capsys):
    """A missing input, a file given as the input folder, an existing output: exit 2, `error:`,
    each said as it is, in the CLI's terms (--force, not force=True)."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    for given, says in [(tmp_path / "nope", "the input does not exist"), (gguf, "the input is a file, not a checkpoint folder")]:
        assert merge_main(["quantize", "--input", str(given), "--output", str(tmp_path / "o"), "--scheme", "block"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: " + says) and str(given) in err
    out = _filled(tmp_path / "ck", "mine")
    assert merge_main(["synth", str(out), "--no-tokenizer", "--set", "vocab_size=64", "--layers", "1"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {out} exists; pass --force to replace it\n" and (out / "a.txt").read_text() == "mine"
    assert merge_main(["synth", str(tmp_path / "x"), "--set", "vocab_size"]) == 2
    assert capsys.readouterr().err == "error: --set expects key=value, got 'vocab_size'\n"


def test_read_only_output_folder(tmp_path, monkeypatch, capsys):
    """EROFS where the staging folder is made (as on a read-only mount; root ignores chmod, so the
    error is injected): exit 2 naming the folder and the untouched input."""
    import errno

    src = _bf16_checkpoint(tmp_path / "in")

    def read_only(out):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(out.parent / f".{out.name}.staging-1.lock"))

    monkeypatch.setattr(staging, "_create", read_only)
    out = tmp_path / "ro" / "out"
    assert merge_main(["quantize", "--input", str(src), "--output", str(out), "--scheme", "block"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {out}: read-only file system ({out.parent}/.out.staging-1.lock)")
    assert err.rstrip().endswith(f"the input {src} is untouched")


def test_fallback_failing_between_renames_restores(tmp_path, monkeypatch):
    """The fallback's second rename fails (not a kill: an error): the old output goes back."""
    out = _filled(tmp_path / "out", "old")
    monkeypatch.setattr(staging, "_exchange", lambda src, dst: False)
    real, calls = os.rename, []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(5, "Input/output error", str(dst))
        return real(src, dst)

    monkeypatch.setattr(staging.os, "rename", second_fails)
    with pytest.raises(OSError, match="Input/output error"):
        with staged_output(out, force=True) as tmp:
            (tmp / "a.txt").write_text("new")
    assert (out / "a.txt").read_text() == "old" and leftovers(tmp_path, {"out"}) == []
