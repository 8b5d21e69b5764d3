"""Keeping the fleet's own secrets out of reach of the agents it runs.

- `make_undumpable()`: `prctl(PR_SET_DUMPABLE, 0)`. A process of the same uid can then no longer
  read this process's /proc/PID/environ, /proc/PID/mem or its open file descriptors, nor ptrace
  it; and no core dump is written. Forked children (Celery's pool) inherit it; exec (an agent)
  resets it, so an agent is never hidden from its own tools.
- `append_private()`: a log file (fleet up's part logs, cli.jsonl) opened for appending and readable
  by this user only, since those lines name runs and carry errors and agents' output.
- `private_folder()` / `write_private()`: a 0700 folder of 0600 files, the form in which `fleet up`
  hands secrets to its children (FLEET_*_FILE) instead of putting them in their start environment,
  which /proc/PID/environ shows for the process's whole life (PITFALLS #19).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4


def _prctl(option: int, arg: int = 0) -> int | None:
    """prctl(2) through libc; None where there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(option, arg, 0, 0, 0))


def make_undumpable() -> bool:
    """Mark this process non-dumpable; whether it now is (False off Linux or when refused)."""
    return _prctl(PR_SET_DUMPABLE, 0) == 0 and is_dumpable() is False


def is_dumpable() -> bool | None:
    """This process's dumpable flag (None off Linux)."""
    value = _prctl(PR_GET_DUMPABLE)
    return None if value is None or value < 0 else value != 0


def _memory_backed() -> str | None:
    """/dev/shm when usable: a secret written there never reaches a disk."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


@contextlib.contextmanager
def private_folder(prefix: str) -> Iterator[Path]:
    """A fresh folder only this user can enter (0700), removed with everything in it on exit."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=_memory_backed()))  # mkdtemp creates it 0700
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_private(folder: Path, name: str, value: str) -> Path:
    """Write `value` to a new file in `folder` readable by this user only (0600); its path."""
    path = folder / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(value)
    return path


def replace_private(path: Path, value: str) -> None:
    """Put `value` in `path` as a file readable by this user only (0600), all at once: a reader finds the old
    file or the new one, never a half-written one."""
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        staged.unlink()
    try:
        write_private(staged.parent, staged.name, value)
        os.replace(staged, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a half-written copy of a secret must not stay behind
            staged.unlink()
        raise


def append_private(path: Path) -> int:
    """A descriptor appending to `path`, created 0600; an existing file loses any group and other access
    (it may predate this rule, or come from a lax umask). Not inherited across exec unless dup'ed (Popen)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    mode = os.fstat(fd).st_mode & 0o7777
    if mode & 0o077:
        # Another user's file (a shared log folder) is theirs to protect: EPERM must not stop the write.
        with contextlib.suppress(PermissionError):
            os.fchmod(fd, mode & ~0o077)
    return fd
