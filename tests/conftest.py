"""Shared fixtures: tiny synthetic checkpoints written once per test session."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when first imported: without a GPU the kernel tests run in its interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hybrid_r1.synth import SyntheticWeights, preset_config, write_checkpoint

CUDA = torch.cuda.is_available()
NEEDS_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]


def needs_cuda(test):
    """A GPU-only test: skipped without CUDA, selected by `pytest -m cuda`."""
    for mark in NEEDS_CUDA:
        test = mark(test)
    return test


# A small vocabulary keeps the transformers reference fast; the real-vocabulary preset (with the
# real tokenizer) is used where tokens must mean something.
SMALL_VOCAB = 1024


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    cfg = preset_config("tiny", vocab_size=SMALL_VOCAB)
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", SyntheticWeights(cfg, seed=1), tokenizer=False)


@pytest.fixture(scope="session")
def tiny_noqlora_dir(tmp_path_factory):
    cfg = preset_config("tiny", vocab_size=SMALL_VOCAB, q_lora_rank=None)
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_noq", SyntheticWeights(cfg, seed=2), tokenizer=False)


@pytest.fixture(scope="session")
def tiny_fp8_dir(tmp_path_factory):
    cfg = preset_config("tiny", vocab_size=SMALL_VOCAB)
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_fp8", SyntheticWeights(cfg, seed=1), fmt="fp8",
                            tokenizer=False, shard_mb=4)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    import hybrid_r1

    return hybrid_r1.load(tiny_dir, device="cpu")  # the CPU fp32 path, also on a GPU machine


def random_ids(n: int, vocab: int = SMALL_VOCAB, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """A HYBRID_R1_CACHE with the demo checkpoint (real R1 tokenizer) written once for the session."""
    from unittest import mock

    from hybrid_r1 import demo

    root = tmp_path_factory.mktemp("hybrid_r1_cache")
    with mock.patch.dict(os.environ, {"HYBRID_R1_CACHE": str(root)}):
        demo.ensure_demo()
    return root


@pytest.fixture(scope="session")
def demo_runtime(demo_cache):
    import hybrid_r1

    return hybrid_r1.load(demo_cache / "demo", device="cpu")
