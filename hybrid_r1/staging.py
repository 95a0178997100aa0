"""Write a folder under a temporary name and publish it under its final name in one step.

Every writer of checkpoint folders (synth, merge_tools quantize, the demo model, the merge) writes
through `staged_output(out)`: into `.NAME.staging-RUN` next to `out` (RUN = pid, plus a counter when
one process stages the same name twice), guarded by the lock file `.NAME.staging-RUN.lock` that the
writer holds (flock) until it is done. A later run for the same output removes the staging folders
whose lock nobody holds (their writer died), never a running writer's.

Publishing: a new `out` is renamed into place (RENAME_NOREPLACE where the OS has it, so a folder that
appeared meanwhile is never clobbered). An existing `out` (force) is swapped with the staged folder
in one atomic `renameat2(RENAME_EXCHANGE)` (Linux 3.15+, on ext4, xfs, btrfs, tmpfs, overlayfs...);
the old contents, now under the staging name, are removed after. Where the exchange is not
available the old folder is first renamed to `.NAME.staging-RUN.old`, then the new one in.

What a kill (SIGKILL, power loss after the fsyncs) leaves at each moment:
- while writing: `out` as it was (old or absent), and a stale staging folder;
- after the exchange (or the rename of a new `out`): the new `out`, complete; the old contents in a
  stale staging folder while they are being removed;
- fallback only, between its two renames: no `out`, the old one complete in
  `.NAME.staging-RUN.old`. The next run for `out` renames it back before anything else.
The next run for the same output removes every stale staging folder (and restores as above).

Failures of the output itself (disk full, read-only, no permission) are an OutputError naming the
path, the space needed where the caller knows it, and that the input was not touched.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import HybridR1Error

_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class OutputError(HybridR1Error):
    """The output could not be written: no space left, a read-only or not writable folder, or an
    existing output without --force. Names the path; says that the input was not touched."""

    def __init__(self, message: str, path: str | Path):
        self.path = str(path)
        super().__init__(message)


class OutputExistsError(OutputError):
    """The output exists and replacing it was not asked for."""


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _prefix(out: Path) -> str:
    return f".{out.name}.staging-"


@contextmanager
def staged_output(out: str | Path, *, force: bool = False, needed_bytes: int | None = None,
                  untouched: str | Path | None = None,
                  keep_existing: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield an empty staging folder for `out`; publish it as `out` when the block ends normally,
    remove it when the block raises.

    force: replace an existing `out` (atomically, see the module docstring); without it an existing
    `out` is an OutputExistsError before anything is written. needed_bytes: what the output will
    take, checked against the free space first and named in a disk-full message. untouched: the
    input, named in failure messages as not modified. keep_existing(out): asked at publish time
    when `out` exists (e.g. written by a concurrent process); True keeps it and drops ours."""
    out = Path(out)
    where = f"; the input {untouched} is untouched" if untouched else ""
    if out.exists() and not force and keep_existing is None:
        raise OutputExistsError(f"{out} exists; pass --force to replace it", out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out)
        if needed_bytes is not None:
            free = shutil.disk_usage(out.parent).free
            if free < needed_bytes:
                raise OutputError(f"not enough space for {out}: it needs about {_size(needed_bytes)}, "
                                  f"{_size(free)} free in {out.parent}; nothing was written{where}", out)
        lock_fd, staging = _create(out)
    except OSError as e:  # here only the output's folder is touched: any OSError is about it
        raise _output_error(e, out, needed_bytes, where) from None
    try:
        try:
            yield staging
            _fsync_tree(staging)
            _publish(staging, out, force, keep_existing)
        except BaseException:
            if _old(staging).is_dir() and not out.exists():  # the fallback failed between its renames
                os.rename(_old(staging), out)
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(_old(staging), ignore_errors=True)
            raise
        finally:
            _unlock(lock_fd, staging)
    except OSError as e:  # the body also reads the input: only errors no read gives are the output's
        if e.errno not in _NO_SPACE + (errno.EROFS, errno.EFBIG):
            raise
        raise _output_error(e, out, needed_bytes, where) from None


@contextmanager
def staged_file(out: str | Path, *, force: bool = False, untouched: str | Path | None = None) -> Iterator[Path]:
    """Yield the path to write a single-file output at: inside a staging folder of its own (named,
    locked and found stale by the next run as staged_output's are), published with one rename when
    the block ends normally (os.replace under force: the old file or the new one, never neither)."""
    out = Path(out)
    where = f"; the input {untouched} is untouched" if untouched else ""
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it", out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out)
        lock_fd, staging = _create(out)
    except OSError as e:
        raise _output_error(e, out, None, where) from None
    try:
        path = staging / out.name
        yield path
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.replace(path, out)
        elif not _rename_noreplace(path, out):
            raise OutputExistsError(f"{out} exists; pass --force to replace it", out)
        _fsync_dir(out.parent)
    except OSError as e:
        if e.errno not in _NO_SPACE + (errno.EROFS, errno.EFBIG):
            raise
        raise _output_error(e, out, None, where) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        _unlock(lock_fd, staging)


def remove_stale(out: str | Path) -> list[Path]:
    """Remove the staging folders of `out` whose writer is gone (its lock is free); restore an old
    output left aside by the fallback replacement if `out` is missing. Returns what was removed."""
    out = Path(out)
    prefix = _prefix(out)
    runs = {p.name[len(prefix):].split(".")[0] for p in out.parent.glob(f"{prefix}*")} if out.parent.is_dir() else set()
    removed = []
    for run in sorted(runs):
        staging = out.parent / f"{prefix}{run}"
        lock = staging.with_name(staging.name + ".lock")
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            fd = None  # a writer takes its lock before creating its folder: no lock, no writer
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a running writer
            old = _old(staging)
            if old.is_dir() and not out.exists():
                os.rename(old, out)  # the fallback was killed between its renames: the old output comes back
            for p in (staging, old):
                if p.exists():
                    shutil.rmtree(p)
                    removed.append(p)
            if fd is not None:
                os.unlink(lock)
        finally:
            if fd is not None:
                os.close(fd)
    return removed


def _old(staging: Path) -> Path:
    return staging.with_name(staging.name + ".old")


def _create(out: Path) -> tuple[int, Path]:
    """Take a fresh run's lock, then create its staging folder (in that order: see remove_stale)."""
    for k in range(1000):
        run = f"{os.getpid()}" + (f"-{k}" if k else "")
        staging = out.parent / f"{_prefix(out)}{run}"
        fd = os.open(staging.with_name(staging.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # this process stages `out` already (another thread)
            os.close(fd)
            continue
        if staging.exists():  # a dead run of the same pid; remove_stale ran before we held the lock
            shutil.rmtree(staging)
        staging.mkdir()  # mode from the umask, as a plain mkdir
        return fd, staging
    raise RuntimeError(f"could not create a staging folder for {out}")


def _unlock(fd: int, staging: Path) -> None:
    try:
        os.unlink(staging.with_name(staging.name + ".lock"))
    except FileNotFoundError:
        pass
    os.close(fd)


def _publish(staging: Path, out: Path, force: bool, keep_existing: Callable[[Path], bool] | None) -> None:
    if not _rename_noreplace(staging, out):  # `out` exists
        if keep_existing is not None and keep_existing(out):
            shutil.rmtree(staging)
            return
        if not force:
            raise OutputExistsError(f"{out} exists; pass --force to replace it", out)
        if _exchange(staging, out):
            _fsync_dir(out.parent)
            shutil.rmtree(staging)  # the old contents, now under the staging name
            return
        old = _old(staging)
        os.rename(out, old)  # fallback: a kill from here to the next rename leaves `out` in `old`
        os.rename(staging, out)
        _fsync_dir(out.parent)
        shutil.rmtree(old)
        return
    _fsync_dir(out.parent)


def _renameat2(src: Path, dst: Path, flags: int) -> bool | None:
    """renameat2(src, dst, flags): True done, False dst exists (NOREPLACE), None not available."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)  # glibc >= 2.28
    if fn is None:
        return None
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        return False
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # the kernel or file system lacks the flag
        return None
    raise OSError(err, os.strerror(err), str(dst))


def _rename_noreplace(src: Path, dst: Path) -> bool:
    done = _renameat2(src, dst, _RENAME_NOREPLACE)
    if done is not None:
        return done
    if dst.exists():
        return False
    try:
        os.rename(src, dst)  # replaces an empty folder that appeared meanwhile, fails on a non-empty one
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    return True


def _exchange(src: Path, dst: Path) -> bool:
    return bool(_renameat2(src, dst, _RENAME_EXCHANGE))


def _fsync_tree(folder: Path) -> None:
    """Data on disk before the rename makes it visible: a power loss then leaves old or new, whole."""
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _output_error(e: OSError, out: Path, needed_bytes: int | None, where: str) -> OutputError:
    path = e.filename or out
    file = f" ({Path(path).name})" if e.filename else ""
    if e.errno in _NO_SPACE:
        need = f": it needs about {_size(needed_bytes)}" if needed_bytes else ""
        free = shutil.disk_usage(out.parent).free if out.parent.is_dir() else 0
        return OutputError(f"no space left on the device writing {out}{file}{need}, {_size(free)} free in "
                           f"{out.parent} once the partial output was removed{where}", out)
    if e.errno == errno.EFBIG:
        return OutputError(f"file too large for the file system of {out.parent} writing {out}{file} "
                           f"(FAT32 caps files at 4 GiB: use smaller shards or another file system){where}", out)
    why = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
           errno.EPERM: "permission denied"}.get(e.errno, e.strerror or str(e))
    return OutputError(f"cannot write {out}: {why} ({path}){where}", out)
