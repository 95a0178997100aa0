"""The prefill cost model (ops/prefill_cost.py): CPU engine or one streamed GPU pass, by T alone.

Pure arithmetic: exact comparisons, no tolerance, except where noted."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from hybrid_r1.ops import prefill_cost as pc
from hybrid_r1.ops.base import OpArgsError
from hybrid_r1.ops.experts_ggml import GGMLArgs

E, K = 256, 8
PER_EXPERT = 7_310_000_000 // E


def test_crossover_of_a_known_profile():
    # CPU 1 ms a token; GPU: every expert used (k = E), 100 ms of copy, nothing else: GPU from 101.
    p = pc.PrefillProfile(h2d_gbs=10.0, stream_share=1.0, gpu_fixed_ms=0.0, gpu_us_per_token=0.0,
                          layer_bytes=1_000_000_000, cpu_ms={"ggml": ((1, 1.0), (1000, 1000.0))})
    per = 1_000_000_000 // 16
    assert pc.gpu_ms(p, 50, 16, 16, per) == pytest.approx(100.0, rel=1e-12)
    assert pc.crossover(p, "ggml", 16, 16, per) == 101
    assert not pc.use_gpu(p, "ggml", 100, 16, 16, per) and pc.use_gpu(p, "ggml", 101, 16, 16, per)
    # both costs scale with the layer's bytes: a layer 100x narrower crosses at the same T
    assert pc.crossover(p, "ggml", 16, 16, per // 100) == 101
    # an engine twice as fast moves the crossover to twice the tokens
    fast = pc.PrefillProfile(**{**asdict(p), "cpu_ms": {"ggml": ((1, 0.5), (1000, 500.0))}})
    assert pc.crossover(fast, "ggml", 16, 16, per) == 201


def test_default_profile_choice_is_deterministic_and_monotone():
    p = pc.PrefillProfile()
    cross = pc.crossover(p, "ggml", E, K, PER_EXPERT)
    assert cross is not None and 32 < cross < 512  # ggml at 109/176 ms for 64/128 tokens vs a ~150 ms pass
    choices = [pc.use_gpu(p, "ggml", t, E, K, PER_EXPERT) for t in range(1, 4097)]
    assert choices == [t >= cross for t in range(1, 4097)]
    again = pc.PrefillProfile(**asdict(p))
    assert [pc.use_gpu(again, "ggml", t, E, K, PER_EXPERT) for t in range(1, 4097)] == choices


def test_cpu_table_interpolation():
    p = pc.PrefillProfile(cpu_ms={"ggml": ((64, 100.0), (128, 164.0), (256, 292.0))}, layer_bytes=1000)
    assert pc.cpu_ms(p, "ggml", 32, 1000) == 50.0  # below the table: proportional
    assert pc.cpu_ms(p, "ggml", 96, 1000) == 132.0  # between points: linear
    assert pc.cpu_ms(p, "ggml", 512, 1000) == 548.0  # beyond: the last segment's slope
    assert pc.cpu_ms(p, "ggml", 96, 500) == 66.0  # half the layer's bytes, half the time
    with pytest.raises(pc.ProfileError, match="no CPU table for engine 'amx'"):
        pc.cpu_ms(p, "amx", 96, 1000)
    assert pc.used_experts(1, E, K) == pytest.approx(K, rel=1e-12)
    assert E - 1e-6 < pc.used_experts(4096, E, K) <= E


def test_profile_file_round_trip_and_errors(tmp_path):
    p = pc.PrefillProfile(h2d_gbs=50.0, cpu_ms={"ggml": ((128, 100.0), (512, 300.0)), "other": ((64, 10.0),)})
    f = tmp_path / "profile.json"
    f.write_text(json.dumps(asdict(p)))
    assert pc.load_profile(f) == p
    assert GGMLArgs(prefill_profile=str(f)).check() is None
    for text, match in (("{", "cannot read"), ('{"h2d_gbs": 0}', "h2d_gbs must be > 0"),
                        ('{"speed": 1}', "unknown: speed"), ('{"cpu_ms": {"ggml": [[512, 1], [128, 2]]}}', "rising"),
                        ('{"stream_share": 1.5}', "stream_share")):
        f.write_text(text)
        with pytest.raises(pc.ProfileError, match=match) as e:
            pc.load_profile(f)
        assert str(f) in str(e.value)
        with pytest.raises(OpArgsError, match="prefill_profile"):
            GGMLArgs(prefill_profile=str(f)).check()
    with pytest.raises(pc.ProfileError, match="cannot read"):
        pc.load_profile(tmp_path / "missing.json")
