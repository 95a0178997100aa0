"""Tensor parallelism over torch.distributed: the whole model on N ranks (GPUs with NCCL, or CPU
processes with gloo), each holding 1/N of every large weight, numerically the single-device model.

Launch: `torchrun --nproc-per-node N -m hybrid_r1.chat --model DIR --rules rules/multi-gpu-int8.yaml`
(also `hybrid-r1 generate`, or `hybrid_r1.load` inside any torchrun process). `from_env` joins the
process group torchrun describes; `shard` marks what each module of the placed model holds:

- attention: q_b_proj (or q_proj) and kv_b_proj by head (rows), o_proj by its input columns, so a
  rank runs n_heads / N heads. The latent cache (c_kv, k_pe) is replicated: every rank computes
  kv_a itself. Split by head after kv_b it would hold (nope + v) * H / N values per token instead
  of kv_lora_rank + rope (5120 vs 576 at 671B width on 8 ranks): 9x the memory, for no saved read.
- dense MLPs and the shared experts: gate/up by rows, down by columns;
- routed experts: every expert's intermediate dimension split the same way (experts.int8_gpu), so
  each rank reads 1/N of each chosen expert whatever the routing. Expert parallelism would leave the
  rank that owns a step's most-used experts slowest, and needs a token exchange per layer.
- replicated: embeddings, norms, q_a / kv_a, the router, lm_head.

The model math has no distributed code: a forward hook on each block's self_attn and mlp adds the
ranks' partial outputs (one all-reduce each, in fp32: row-parallel operators keep their partial sums
in fp32, so the result rounds once to the run dtype as on one device). The loader passes each
module's `placement_shard` to its operator (`Operator.load_weights(source, prefix, shard)`; INT8 is
quantized whole and then sliced, bit-identical to one device's rows) or slices kept parameters.

Rank 0 owns the terminal, the tokenizer and sampling. The other ranks run `follow`: rank 0's Runtime
mirrors to them, over a gloo group, each step it feeds the model (the tokens themselves, so sampling
happens once) and each cache it creates or truncates; they replay it and their collectives meet
rank 0's. When rank 0 exits (normally, on an error or Ctrl-C) it tells them to stop; if it dies, the
control channel breaks and they exit with a message. Collectives time out after
HYBRID_R1_TP_TIMEOUT seconds (default 600), so a dead rank ends the others instead of hanging them.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import weakref
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from .errors import HybridR1Error
from .ops.base import Operator, Shard

log = logging.getLogger(__name__)

CONTROL_TIMEOUT = timedelta(days=30)  # rank 0 may sit at the chat prompt for a long time
DEFAULT_TIMEOUT_S = 600  # the first step compiles kernels on every rank at once


class ParallelError(HybridR1Error, ValueError):
    """A tensor-parallel setup that cannot run (world size, rules, devices), or a rank that stopped."""


@dataclass(frozen=True)
class World:
    """This process's place in the tensor-parallel group. `control` carries rank 0's messages
    (CPU objects, gloo); None in a World made for planning, which never communicates."""

    rank: int
    size: int
    backend: str = "gloo"
    control: object | None = field(default=None, compare=False)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def graph_safe(self) -> bool:
        """CUDA graphs can capture NCCL collectives, not gloo's (they run on the host)."""
        return self.backend == "nccl"

    def shard(self, dim: int) -> Shard:
        return Shard(self.rank, self.size, dim)


def timeout() -> timedelta:
    raw = os.environ.get("HYBRID_R1_TP_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1
    if not seconds > 0:
        raise ParallelError(f"HYBRID_R1_TP_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return timedelta(seconds=seconds)


def from_env(device: torch.device) -> World | None:
    """The World torchrun describes (WORLD_SIZE > 1 in the environment, or a process group already
    initialised by the caller), None for a single process. On CUDA each rank takes the GPU of its
    LOCAL_RANK, which the rules' plain `cuda` then means."""
    if dist.is_available() and dist.is_initialized():
        size = dist.get_world_size()
    else:
        size = _env_int("WORLD_SIZE", 1)
        if size <= 1:
            return None
        if not dist.is_available():
            raise ParallelError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if size <= 1:
        return None
    if device.type == "cuda":
        if device.index is not None:
            raise ParallelError(f"device {device}: under tensor parallelism each rank runs on the GPU of its "
                                "LOCAL_RANK; pass --device cuda (no index)")
        local = _env_int("LOCAL_RANK", 0)
        if local >= torch.cuda.device_count():
            raise ParallelError(f"LOCAL_RANK {local} but this host has {torch.cuda.device_count()} GPU(s): "
                                "--nproc-per-node must not exceed the GPUs of a node")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": torch.device("cuda", torch.cuda.current_device())} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timeout(), **kwargs)
    backend = str(dist.get_backend()).lower()
    if device.type == "cuda" and backend == "gloo":
        log.warning("tensor parallelism over gloo on CUDA tensors: correct but slow, and without CUDA graphs")
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return World(dist.get_rank(), dist.get_world_size(), backend, control)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ParallelError(f"environment variable {name}={raw!r} is not an integer") from None


def follower_process() -> bool:
    """Whether torchrun started this process as a rank other than 0 (known before any loading:
    such a rank reads no terminal input and prints nothing)."""
    return _env_int("WORLD_SIZE", 1) > 1 and _env_int("RANK", 0) > 0


def check_same_source(world: World, source) -> None:
    """Every rank opened the same checkpoint: its config and tensor table (names and shapes, from
    the headers) hashed on each rank and compared with rank 0's. A rank on another node reading a
    different copy or version would otherwise compute garbage silently."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps(vars(source.config), sort_keys=True, default=str).encode())
    for name in sorted(source.names()):
        h.update(f"{name}:{tuple(source.shape(name))};".encode())
    mine = h.hexdigest()[:16]
    every: list[str | None] = [None] * world.size
    dist.all_gather_object(every, mine, group=world.control)
    odd = [r for r, d in enumerate(every) if d != every[0]]
    if odd:
        raise ParallelError(f"ranks {', '.join(map(str, odd))} opened a checkpoint that differs from rank 0's "
                            f"({source.path}: config or tensor table): every rank must load the same files")


# ---- sharding the placed model --------------------------------------------------------------------

def check(config, size: int) -> None:
    """Every split dimension divides by the world size (alignment to 128-row INT8 tiles is checked
    per tensor while loading, naming the tensor)."""
    parts = [("attention heads", config.num_attention_heads), ("routed experts' intermediate size",
                                                               config.moe_intermediate_size)]
    if config.first_k_dense_replace:
        parts.append(("dense MLP intermediate size", config.intermediate_size))
    if config.n_shared_experts:
        parts.append(("shared experts' intermediate size", config.moe_intermediate_size * config.n_shared_experts))
    for what, n in parts:
        if n % size:
            raise ParallelError(f"world size {size} does not divide the model's {n} {what}: "
                                f"use --nproc-per-node among {_divisors(config.num_attention_heads)}")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(2, min(n, 64) + 1) if n % d == 0)


def shard(model: nn.Module, world: World) -> None:
    """Mark each split module's `placement_shard`, set each attention's local head count, and add
    the all-reduce hooks. `model` is placed (placement.apply) and not yet loaded."""
    from .model import MLA, MLP, Experts, MoE

    check(model.config, world.size)
    for i, block in enumerate(model.model.layers):
        attn: MLA = block.self_attn
        attn.n_heads //= world.size
        q = "q_proj" if model.config.q_lora_rank is None else "q_b_proj"  # the heads' query rows
        for name in (q, "kv_b_proj"):
            _mark(attn.get_submodule(name), f"model.layers.{i}.self_attn.{name}", world.shard(0))
        _mark(attn.o_proj, f"model.layers.{i}.self_attn.o_proj", world.shard(1))
        mlp = block.mlp
        mlps = [(f"model.layers.{i}.mlp", mlp)] if isinstance(mlp, MLP) else []
        if isinstance(mlp, MoE):
            if mlp.shared_experts is not None:
                mlps.append((f"model.layers.{i}.mlp.shared_experts", mlp.shared_experts))
            experts, path = mlp.experts, f"model.layers.{i}.mlp.experts"
            if isinstance(experts, Experts):  # kept (BF16/FP32): each expert is a plain MLP
                mlps += [(f"{path}.{e}", m) for e, m in enumerate(experts)]
            else:
                _mark(experts, path, world.shard(0))
        for path, m in mlps:
            _mark(m.gate_proj, f"{path}.gate_proj", world.shard(0))
            _mark(m.up_proj, f"{path}.up_proj", world.shard(0))
            _mark(m.down_proj, f"{path}.down_proj", world.shard(1))
        if world.control is not None:  # a planning World never communicates
            attn.register_forward_hook(_sum_over_ranks)
            mlp.register_forward_hook(_sum_over_ranks)


def _mark(module: nn.Module, path: str, s: Shard) -> None:
    if isinstance(module, Operator) and not module.shardable:
        raise ParallelError(f"{path}: operator {module.name} cannot be split across ranks; under tensor "
                            "parallelism use linear.int8_block / linear.int8_channel and experts.int8_gpu "
                            "(rules/multi-gpu-int8.yaml)")
    module.placement_shard = s  # read by the loader and by hybrid-r1 plan


def _sum_over_ranks(module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
    """Forward hook: the ranks' partial outputs added, in fp32 (float64 in a float64 run), then in
    the input's dtype."""
    total = out.to(torch.float64 if args[0].dtype == torch.float64 else torch.float32)
    dist.all_reduce(total)
    return total.to(args[0].dtype)


def shard_of(module: nn.Module) -> Shard | None:
    return module.__dict__.get("placement_shard")


def slice_param(t: torch.Tensor, s: Shard, name: str) -> torch.Tensor:
    """A kept weight's part for this rank (rows or columns), copied out of the mapped tensor."""
    from .errors import CheckpointError

    try:
        lo, hi = s.bounds(t.shape[s.dim])
    except ValueError as e:
        raise CheckpointError(f"cannot split for tensor parallelism: {e}", tensor=name) from None
    return t.narrow(s.dim, lo, hi - lo).contiguous()


def check_devices(placements, world: World) -> None:
    """Each rank's modules on its own GPU (or the CPU): a rule naming cuda:N would put every rank's
    share on one GPU."""
    for p in placements:
        dev = p.device
        if dev is not None and dev.type == "cuda" and dev.index is not None:
            where = p.rule.where if p.rule else p.path
            raise ParallelError(f"{where}: device {dev} under tensor parallelism: write `device: cuda`, which "
                                "means each rank's own GPU")


# ---- rank 0 drives, the others follow -------------------------------------------------------------

class Leader:
    """Rank 0's side: every model step and cache change, sent to the followers before it runs (so
    their collectives meet rank 0's)."""

    def __init__(self, world: World):
        self.world = world
        self._ids = itertools.count()
        self._dropped: list[int] = []
        self._closed = False
        atexit.register(self.close)

    def send(self, *msg) -> None:
        if self._closed:
            raise ParallelError("the tensor-parallel ranks were already told to stop")
        dropped, self._dropped = self._dropped, []
        dist.broadcast_object_list([(dropped, msg)], src=0, group=self.world.control)

    def attach(self, cache) -> None:
        """Give `cache` its twin on every follower; its steps and truncations are mirrored."""
        cid = next(self._ids)
        self.send("cache", cid, cache.batch, cache.max_tokens)
        cache.mirror = _Mirror(self, cid)
        weakref.finalize(cache, self._dropped.append, cid)  # told with the next message

    def abandon(self, cause: BaseException) -> None:
        """A step the followers had begun failed here: they wait in its collectives, so the run
        cannot go on. Leave the group (their collectives then fail and they exit) and raise."""
        log.error("rank 0 failed in a step the other ranks had begun: %s: %s", type(cause).__name__, cause)
        self._closed = True
        shutdown()
        raise ParallelError(f"rank 0 failed in a tensor-parallel step ({type(cause).__name__}: {cause}); "
                            "every rank stops: the run cannot continue") from cause

    def close(self) -> None:
        if not self._closed and dist.is_initialized():
            try:
                self.send("exit")
            except (RuntimeError, ValueError) as e:  # a follower already gone: nothing to tell
                log.debug("could not tell the followers to stop: %s", e)
            self._closed = True
            shutdown()


def shutdown() -> None:
    """Leave the process group: its communication threads must end before the interpreter does
    (else the C++ runtime aborts the exiting process)."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except (RuntimeError, ValueError) as e:
            log.debug("leaving the process group: %s", e)


@dataclass
class _Mirror:
    leader: Leader
    cid: int

    def __call__(self, *msg) -> None:
        self.leader.send(msg[0], self.cid, *msg[1:])

    def abandon(self, cause: BaseException) -> None:
        self.leader.abandon(cause)


def follow(runtime) -> int:
    """A follower rank's whole life after loading: replay rank 0's steps until it says stop.
    Returns the exit code (0 when told to stop, 1 when rank 0 vanished or a step failed)."""
    world: World = runtime.world
    caches: dict[int, object] = {}
    while True:
        box = [None]
        try:
            dist.broadcast_object_list(box, src=0, group=world.control)
        except (RuntimeError, ValueError) as e:  # rank 0 died: its socket closed under us
            log.error("rank %d: rank 0 stopped without a word (%s); exiting", world.rank, e)
            shutdown()
            return 1
        dropped, msg = box[0]
        for cid in dropped:
            caches.pop(cid, None)
        kind = msg[0]
        if kind == "exit":
            shutdown()
            return 0
        try:
            _replay(runtime, caches, msg)
        except Exception as e:  # noqa: BLE001 - rank 0 left mid-step (its collectives failed), or this rank broke
            log.error("rank %d: a tensor-parallel step failed (%s: %s); exiting", world.rank, type(e).__name__, e)
            shutdown()
            return 1


def _replay(runtime, caches: dict, msg: tuple) -> None:
    from .generate import forward_tokens

    kind = msg[0]
    if kind == "cache":
        _, cid, batch, max_tokens = msg
        caches[cid] = runtime.new_cache(batch, max_tokens)
    elif kind == "truncate":
        _, cid, length = msg
        caches[cid].truncate(length)
    elif kind == "forward":
        _, cid, tokens, mode, last_only, use_graphs = msg
        cache = caches[cid]
        graphs = runtime.decode_graphs(cache, create=True) if use_graphs else None
        with torch.inference_mode():
            forward_tokens(runtime.module, tokens, cache, mode=mode, last_only=last_only, graphs=graphs)
    else:
        raise ParallelError(f"rank {runtime.world.rank}: unknown message from rank 0: {kind!r}")
