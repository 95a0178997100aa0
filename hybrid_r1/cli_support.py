"""What every command line of hybrid_r1 shares: quiet exit when its output pipe closes (`| head`),
the loading progress bar, the thread choice, and the checks of sampling options (exit code 2)."""

from __future__ import annotations

import functools
import io
import os
import sys
import time

from . import threads as threads_mod
from .generate import Sampling, check_max_new_tokens

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader went away


def quiet_broken_pipe(main):
    """Wrap a CLI main: when stdout's reader exits early (`| head`), stop quietly with 141 instead
    of a BrokenPipeError traceback (Python's documented recipe: point stdout at /dev/null, so the
    flush at exit cannot fail again)."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            rc = main(*args, **kwargs)
            sys.stdout.flush()
            return rc
        except BrokenPipeError:
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError):  # stdout without a file descriptor (a test's StringIO)
                pass
            return EXIT_BROKEN_PIPE

    return run


def sampling_from_args(ap, args) -> Sampling:
    """--temperature/--top-p/--top-k/--seed/--max-new-tokens through the one validation; a bad value
    is a usage error (exit 2) naming the option."""
    try:
        check_max_new_tokens(args.max_new_tokens, minimum=1)
        return Sampling(args.temperature, args.top_p, args.top_k, args.seed)
    except ValueError as e:
        ap.error(f"--{str(e).split(' ', 1)[0].replace('_', '-')}: {e}")


def check_threads_arg(ap, value) -> int | None:
    if value is None:
        return None
    try:
        return threads_mod.check_threads(value, "--threads")
    except ValueError as e:
        ap.error(str(e))


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


class LoadProgress:
    """A tqdm bar of tensors loaded, on stderr, only when stderr is a terminal (off in pipes, logs
    and tests). The loader tells the total as it counts (an operator that loads itself, such as a
    layer's experts, is one), so the bar ends at 100%."""

    def __init__(self, stream=None):
        self.stream = sys.stderr if stream is None else stream
        self.bar = None
        if not _isatty(self.stream):
            return
        from tqdm import tqdm

        self.bar = tqdm(total=None, unit=" tensors", desc="loading", file=self.stream, dynamic_ncols=True,
                        leave=False)

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def load_model(path, *, info, threads: int | None = None, progress_stream=None, **load_kwargs):
    """hybrid_r1.load with a progress bar; the thread choice is printed through `info` first and
    applied to torch before loading and to the model's ggml experts after. Returns the Runtime."""
    from .loading import load_source, open_checkpoint
    from .parallel import follower_process

    if follower_process():  # a tensor-parallel rank other than 0: rank 0 speaks for all
        info, progress_stream = (lambda *a: None), io.StringIO()  # not a terminal: no progress bar
    source = open_checkpoint(path, load_kwargs.pop("gguf", None))  # headers only; the weights stay mapped
    config = source.config
    choice = threads_mod.choose(config.hidden_size, threads)
    info(f"loading {path} ({plural(config.num_hidden_layers, 'layer')}); {choice.describe()}")
    threads_mod.apply(choice)
    t0 = time.perf_counter()
    bar = LoadProgress(progress_stream)
    try:
        runtime = load_source(source, progress=bar, **load_kwargs)
    finally:
        bar.close()
    threads_mod.apply(choice, runtime)
    from .plan import engine_lines

    if runtime.world is not None:
        info(f"loaded in {time.perf_counter() - t0:.1f} s: tensor-parallel over {runtime.world.size} ranks "
             f"({runtime.world.backend}), this one on {runtime.module.lm_head.weight.device}")
    else:
        info(f"loaded in {time.perf_counter() - t0:.1f} s on {runtime.module.lm_head.weight.device}")
    for line in engine_lines(runtime.module):
        info(line)
    if runtime.world is not None and not runtime.world.leader:
        raise SystemExit(runtime.follow())  # the whole life of a follower rank
    return runtime
