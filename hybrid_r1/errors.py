"""Typed errors for anything a user supplies: each names the file, tensor or rule at fault."""

from __future__ import annotations


class HybridR1Error(Exception):
    """Base class: every error hybrid_r1 raises about user input derives from it."""


class ConfigError(HybridR1Error, ValueError):
    """A model config (config.json, GGUF metadata) that is missing keys or inconsistent."""

    def __init__(self, message: str, source: str | None = None):
        self.source = source
        super().__init__(f"{source}: {message}" if source else message)


class CheckpointError(HybridR1Error, ValueError):
    """A checkpoint file or tensor that is missing, truncated, or of the wrong shape or dtype."""

    def __init__(self, message: str, file: str | None = None, tensor: str | None = None):
        self.file = file
        self.tensor = tensor
        where = ", ".join(p for p in (f"file {file}" if file else "", f"tensor {tensor}" if tensor else "") if p)
        super().__init__(f"{message} ({where})" if where else message)


class InputError(HybridR1Error, ValueError):
    """An argument of the Python API, a command-line option or a chat setting that has the wrong type
    or is out of range (token ids outside the vocabulary, a NaN temperature, a seed past 64 bits)."""
