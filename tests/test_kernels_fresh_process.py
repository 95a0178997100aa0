"""Reruns the kernel test modules in a fresh interpreter when something imported triton before they
could switch on TRITON_INTERPRET (CPU-only machines; see the top of test_kernels_act_quant.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _triton_imported_compiled():
    std = sys.modules.get("triton.language.standard")
    return std is not None and type(std.max).__name__ != "InterpretedFunction"


@pytest.mark.skipif(torch.cuda.is_available() or not _triton_imported_compiled(),
                    reason="the kernel tests run in this process")
def test_kernel_modules_in_fresh_process():
    here = Path(__file__).parent
    files = sorted(str(p) for p in here.glob("test_kernels_*.py") if p.name != Path(__file__).name)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-2000:]
