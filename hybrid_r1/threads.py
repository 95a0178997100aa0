"""CPU threads for torch's intra-op pool and for ggml's expert kernels, bounded by the CPUs this
process may use (its affinity mask, as `taskset` or a container sets it) and chosen together.

Torch and ggml never compute on the CPU at the same time: a layer's attention (torch) runs, then its
routed experts (ggml), and with a GPU the CPU's share is ggml alone. So each may use every core,
and neither is given more threads than there are cores (that only makes threads wait for each
other). Small models are the exception for torch: at hidden sizes below 1024 a matrix is too small
to split, and a second thread costs more in synchronisation than it saves (the demo model decodes
at 1-4 tok/s with two threads on a 2-core machine and at 12-20 with one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import checks
from .errors import InputError

MAX_THREADS = 512  # ggml's GGML_MAX_N_THREADS; torch's pool crashes far below absurd values too
OVERSUBSCRIBE = 4  # at most this many threads per usable CPU: beyond, a typo, not a choice
SMALL_HIDDEN = 1024  # below this hidden size torch runs on one thread (see the module docstring)


def usable_cpus() -> int:
    """CPUs this process may run on (logical ones, SMT siblings included)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def physical_cores() -> int:
    from .ggml_lib import physical_cores  # reads /sys once per call; nothing loads at import

    return physical_cores()


def check_threads(value, name: str = "threads", error=InputError) -> int:
    """`value` as a thread count: an int from 1 to 4x the usable CPUs (and at most 512)."""
    n = checks.integer(name, value, 1, error=error)
    cpus = usable_cpus()
    cap = min(MAX_THREADS, OVERSUBSCRIBE * cpus)
    if n > cap:
        raise error(f"{name} {n} is more than {cap}: this process may use {cpus} CPU{'s' * (cpus != 1)} "
                    f"(at most {OVERSUBSCRIBE} threads per CPU, {MAX_THREADS} in all)")
    return n


@dataclass(frozen=True)
class ThreadChoice:
    torch: int
    ggml: int
    why: str

    def describe(self) -> str:
        return f"threads: torch {self.torch}, ggml {self.ggml} ({self.why})"


def choose(hidden_size: int, requested: int | None = None) -> ThreadChoice:
    """Thread counts for a model of this hidden size; `requested` (--threads) sets both."""
    cpus, cores = usable_cpus(), physical_cores()
    if requested is not None:
        return ThreadChoice(requested, requested, "--threads")
    if hidden_size < SMALL_HIDDEN:
        return ThreadChoice(1, cores, f"small model: one torch thread; ggml on the {cores} physical cores of {cpus} CPUs")
    return ThreadChoice(cores, cores, f"the {cores} physical cores of the {cpus} CPUs this process may use")


def apply(choice: ThreadChoice, runtime=None) -> None:
    """Set torch's pool; with a runtime, give its ggml expert operators the choice too, except
    where a rule set `threads` (the rule wins)."""
    import torch

    torch.set_num_threads(choice.torch)
    if runtime is None:
        return
    from .ops.experts_ggml import GGMLArgs, GGMLExperts

    ruled = {p.path for p in runtime.placements
             if p.rule is not None and isinstance(p.rule.args, GGMLArgs) and p.rule.args.threads is not None}
    for path, m in runtime.module.named_modules():
        if isinstance(m, GGMLExperts) and path not in ruled:
            m.threads = choice.ggml
