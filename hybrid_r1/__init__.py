"""hybrid_r1: DeepSeek-V3/R1 with INT8 GPU linears and GGML CPU experts.

    model = hybrid_r1.load("path/to/checkpoint")
    model.logits(ids); model.generate(ids, max_new_tokens=64)
"""

from .errors import CheckpointError, ConfigError, HybridR1Error
from .loading import load

__all__ = ["load", "HybridR1Error", "ConfigError", "CheckpointError"]
