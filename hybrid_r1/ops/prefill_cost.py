"""Which engine computes one routed-experts call of T tokens: the CPU, or one pass streamed to the GPU.

The choice compares two estimated times from a machine profile, per MoE layer:
- CPU: the engine's measured ms per layer at a few token counts (a table per engine, as
  bench_prefill.py measures it; ggml's by default, and an engine without a table is costed as
  ggml: kt-kernel's LLAMAFILE table from CPU inputs, 129 ms at 128 tokens, did not hold in the
  model, where it took ~145 ms a layer against the stream's ~113), linear between the points and
  along the last segment beyond;
- GPU: the used experts' bytes / (pinned host-to-GPU bandwidth x the share of it the stream reaches),
  plus a fixed cost per call; the products run under the copy (experts_gpu_prefill.py), so only the
  longer of copy and compute counts. The used experts of T tokens routing to k of E each are
  estimated as E (1 - (1 - k/E)^T) (uniform routing): the choice depends on T alone, needs no sync
  and is the same for the same profile.
The tables were measured on a layer of `layer_bytes`; both times scale with the layer's bytes
(the CPU reads and multiplies each byte, the GPU streams it), so a narrower layer scales them alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import HybridR1Error

# Measured on the lent H200 machine's host (16-core Xeon, ggml 16 threads), one 671B-width layer of
# 256 experts Q4_K/Q6_K, inputs from the GPU (benchmarks/results/prefill_h200.md): tokens -> ms.
_GGML_H200_HOST = ((128, 216.0), (512, 642.0), (1024, 1147.0), (2048, 2231.0))


class ProfileError(HybridR1Error):
    """A machine profile file that cannot be read: names the file and the field."""


@dataclass(frozen=True)
class PrefillProfile:
    """One machine's prefill costs, per MoE layer (see the module docstring). Defaults: the lent
    H200 machine (benchmarks/results/prefill_h200.md); `bench_prefill.py --profile FILE` writes
    this machine's as JSON, read back by `load_profile`."""

    h2d_gbs: float = 55.4  # pinned host -> GPU copy bandwidth
    stream_share: float = 0.84  # share of that bound a streamed layer reaches (median at 2K+ tokens)
    gpu_fixed_ms: float = 0.0  # per call: host grouping, launches (fits to ~0 at 671B width: the share holds it)
    gpu_us_per_token: float = 2.5  # products and expansion per token (hidden under the copy mostly)
    layer_bytes: int = 7_310_000_000  # the layer the CPU table was measured on
    cpu_ms: dict[str, tuple[tuple[int, float], ...]] = field(default_factory=lambda: {"ggml": _GGML_H200_HOST})

    def __post_init__(self):
        for name in ("h2d_gbs", "stream_share", "layer_bytes"):
            if not getattr(self, name) > 0:
                raise ProfileError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.stream_share <= 1:
            raise ProfileError(f"stream_share must be in (0, 1], got {self.stream_share}")
        for engine, table in self.cpu_ms.items():
            pts = tuple(table)
            if not pts or any(len(p) != 2 or p[0] < 1 or p[1] <= 0 for p in pts) or \
                    any(a[0] >= b[0] for a, b in zip(pts, pts[1:])):
                raise ProfileError(f"cpu_ms[{engine!r}] must be (tokens, ms) pairs, tokens rising from 1, "
                                   f"ms > 0; got {table!r}")


def load_profile(path: str | Path) -> PrefillProfile:
    """A PrefillProfile from a JSON object of its fields (any subset; the rest default)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ProfileError(f"cannot read the prefill profile {path}: {e}") from None
    known = {f.name for f in fields(PrefillProfile)}
    if not isinstance(raw, dict) or set(raw) - known:
        bad = ", ".join(sorted(set(raw) - known)) if isinstance(raw, dict) else repr(raw)
        raise ProfileError(f"{path}: expected a JSON object with fields {', '.join(sorted(known))}; unknown: {bad}")
    if "cpu_ms" in raw:
        try:
            raw["cpu_ms"] = {str(k): tuple((int(t), float(ms)) for t, ms in v) for k, v in raw["cpu_ms"].items()}
        except (AttributeError, TypeError, ValueError):
            raise ProfileError(f"{path}: cpu_ms must map engine names to [[tokens, ms], ...]") from None
    try:
        return PrefillProfile(**raw)
    except ProfileError as e:
        raise ProfileError(f"{path}: {e}") from None
    except TypeError as e:
        raise ProfileError(f"{path}: {e}") from None


def used_experts(tokens: int, n_experts: int, top_k: int) -> float:
    """Expected distinct experts of `tokens` tokens each routed to `top_k` of `n_experts` uniformly."""
    return n_experts * (1.0 - (1.0 - top_k / n_experts) ** tokens)


def cpu_ms(profile: PrefillProfile, engine: str, tokens: int, layer_bytes: int) -> float:
    if engine not in profile.cpu_ms:
        raise ProfileError(f"the prefill profile has no CPU table for engine {engine!r} "
                           f"(it has {', '.join(sorted(profile.cpu_ms))})")
    pts = profile.cpu_ms[engine]
    if tokens <= pts[0][0] or len(pts) == 1:  # below the table: proportional (one token ~ a decode step)
        ms = pts[0][1] * tokens / pts[0][0]
    else:
        i = next((i for i in range(1, len(pts)) if tokens <= pts[i][0]), len(pts) - 1)
        (t0, m0), (t1, m1) = pts[i - 1], pts[i]
        ms = m0 + (m1 - m0) * (tokens - t0) / (t1 - t0)
    return ms * layer_bytes / profile.layer_bytes


def gpu_ms(profile: PrefillProfile, tokens: int, n_experts: int, top_k: int, expert_bytes: int) -> float:
    copy = used_experts(tokens, n_experts, top_k) * expert_bytes / (profile.h2d_gbs * profile.stream_share) / 1e6
    compute = profile.gpu_us_per_token * tokens / 1e3 * (n_experts * expert_bytes) / profile.layer_bytes
    return profile.gpu_fixed_ms + max(copy, compute)


def use_gpu(profile: PrefillProfile, engine: str, tokens: int, n_experts: int, top_k: int, expert_bytes: int) -> bool:
    """True when one streamed GPU pass is estimated faster than `engine` on the CPU."""
    layer = n_experts * expert_bytes
    return gpu_ms(profile, tokens, n_experts, top_k, expert_bytes) < cpu_ms(profile, engine, tokens, layer)


def crossover(profile: PrefillProfile, engine: str, n_experts: int, top_k: int, expert_bytes: int,
              limit: int = 1 << 20) -> int | None:
    """The fewest tokens from which the GPU is chosen (None: the CPU up to `limit`). The CPU cost
    grows with T while the GPU's saturates once every expert is used, so one crossing is assumed."""
    if not use_gpu(profile, engine, limit, n_experts, top_k, expert_bytes):
        return None
    lo, hi = 0, limit  # use_gpu(hi) holds; lo = 0 tokens never runs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if use_gpu(profile, engine, mid, n_experts, top_k, expert_bytes):
            hi = mid
        else:
            lo = mid
    return hi

