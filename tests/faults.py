"""Fault injection for tests/test_staging.py: run a command line's `main` in a child process and,
at the k-th call of a named function, SIGKILL the process or make the call fail as a full disk.

A fault is (target, k, action): target "module:attr.path" (e.g.
"hybrid_r1.formats.safetensors_writer:SafetensorsWriter.write"); action one of
  kill-before / kill-after   SIGKILL before / after the k-th call runs
  enospc                     the k-th call raises OSError(ENOSPC) naming the writer's file
  return-false               the k-th and later calls return False without running (no exchange)
"""

from __future__ import annotations

import errno
import importlib
import os
import signal
import sys


def _owner(target: str):
    module, attr = target.split(":")
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for p in path:
        owner = getattr(owner, p)
    return owner, name


def _inject(target: str, k: int, action: str) -> None:
    owner, name = _owner(target)
    real = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == k and action == "kill-before":
            os.kill(os.getpid(), signal.SIGKILL)
        if calls[0] == k and action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[0].path))
        if calls[0] >= k and action == "return-false":
            return False
        result = real(*args, **kwargs)
        if calls[0] == k and action == "kill-after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, wrapper)


def run(cli: str, argv: list[str], faults: list[tuple[str, int, str]], stderr_path: str | None = None) -> None:
    """The child's body: `cli`'s main(argv) with `faults` injected; exits with its return code."""
    if stderr_path:
        fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        sys.stderr = os.fdopen(2, "w", closefd=False)
    for fault in faults:
        _inject(*fault)
    sys.exit(importlib.import_module(cli).main(argv))
