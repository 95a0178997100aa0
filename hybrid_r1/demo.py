"""The built-in demo model: a tiny random-weight DeepSeek-V3 with the real R1 tokenizer.

Written on first use (a few seconds, no download) to `$HYBRID_R1_CACHE/demo`, by default
`$XDG_CACHE_HOME/hybrid_r1/demo` (`~/.cache/hybrid_r1/demo`). Its answers are random text: it is
there so the chat, the tokenizer and the cache can be tried on any machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

PRESET = "tiny"
SEED = 0


def cache_root() -> Path:
    """hybrid_r1's cache folder: $HYBRID_R1_CACHE, else $XDG_CACHE_HOME/hybrid_r1, else ~/.cache/hybrid_r1."""
    if os.environ.get("HYBRID_R1_CACHE"):
        return Path(os.environ["HYBRID_R1_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "hybrid_r1"


def demo_dir() -> Path:
    return cache_root() / "demo"


def _expected_config() -> dict:
    from .synth import preset_config

    return preset_config(PRESET).to_hf_dict()


def is_current(folder: Path) -> bool:
    """True if `folder` holds a complete demo checkpoint of the current preset."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    complete = (folder / "model.safetensors.index.json").is_file() and (folder / "tokenizer.json").is_file()
    return complete and config == _expected_config()


def ensure_demo(announce: Callable[[str], None] = lambda msg: None) -> Path:
    """The demo checkpoint's folder, written first if it is missing or out of date.

    Safe against two processes writing it at once: each stages its own folder (hybrid_r1.staging)
    and a current demo published by the other meanwhile is kept, not replaced."""
    folder = demo_dir()
    if is_current(folder):
        return folder
    from .synth import SyntheticWeights, preset_config, write_checkpoint

    announce(f"writing the demo checkpoint (tiny, random weights, real R1 tokenizer) to {folder} ...")
    # force: an older preset, or a folder left half-written by hand, is replaced
    write_checkpoint(folder, SyntheticWeights(preset_config(PRESET), SEED), force=True, keep_existing=is_current)
    return folder
