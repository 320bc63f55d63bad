"""The ``--out`` folder: checked before any work, claimed by one run at a time, written atomically.

Needs no torch (``report`` and ``compare`` write through it). Two runs started at once with the same ``--out`` would both pass the "already holds" check and the
later would silently replace the earlier's outputs. A run takes a lock file in the folder, created
exclusively, for its whole length; a lock left by a run that was killed is detected by its process
id (on the same host) and taken over.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError, printable

LOCK_FILE = ".deadscan.lock"


# ---------------------------------------------------------------------------------------------
# Atomic writes (temp file in a private folder beside the target, then rename) and --out checks


_FILE_MODE: list[int] = []


def _file_mode() -> int:
    """The mode open() gives a new file (0o666 less the umask), read once. /proc tells the umask without
    changing it; elsewhere os.umask must set it to read it, so it is set straight back."""
    if not _FILE_MODE:
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
        except (OSError, StopIteration, ValueError, IndexError):
            umask = os.umask(0o022)
            os.umask(umask)
        _FILE_MODE.append(0o666 & ~umask)
    return _FILE_MODE[0]


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp path for ``path`` (the block writes a file or a folder there); rename it over ``path``
    only if the block succeeds.

    The temp path lies in a private folder ``.NAME.XXXX.tmp/`` beside ``path`` (same file system, so the
    rename is atomic): a process killed at any moment leaves the old file or the new one, never a torn
    one, and whatever it leaves behind is hidden and ends in ``.tmp`` -- including temp files the writer
    makes next to its own target (the safetensors library does)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise OutputError(f"cannot write {path} ({e.strerror}); choose another --out") from None
    try:
        yield folder / path.name
        new = folder / path.name
        if new.is_dir():  # a folder output (a Hugging Face model folder): an earlier run's is moved aside first
            for f in new.rglob("*"):
                if f.is_file() and not f.is_symlink():
                    os.chmod(f, _file_mode())
            if os.path.lexists(path):
                os.replace(path, folder / ".replaced")  # removed with the temp folder
        else:  # writers that make their own temp file (mkstemp) leave it 0600: outputs follow the umask
            os.chmod(new, _file_mode())
        os.replace(new, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check_out_dir(out: str | os.PathLike, outputs, *, overwrite: bool = False, inputs=(),
                  replaceable=()) -> Path:
    """Before any work: ``out`` must be (or become) a writable folder, none of ``outputs`` written there may
    be an input file, and outputs already there are refused unless ``overwrite`` (a run never silently
    replaces an earlier one). ``replaceable``: names that may be replaced anyway (e.g. a strip reusing its
    own inspect folder). Creates nothing."""
    out = Path(out)
    for name in outputs:
        target = out / name
        for src in inputs:
            if src is not None and _same_file(target, Path(src)):
                raise OutputError(f"--out {out} would overwrite the input {src} (as {name}); choose another --out")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == out else f"cannot be created: {existing} is a file"
        raise OutputError(f"--out {out} {where}, not a folder; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"--out {out}: {existing} is not writable; choose another --out")
    if overwrite:
        return out
    found = [name for name in outputs if (out / name).exists() and name not in replaceable]
    if found:
        raise OutputError(f"--out {out} already holds {', '.join(found)} from an earlier run; pass --overwrite to "
                          "replace them, or choose another --out")
    return out


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# One run per folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return False
    return True


def _holder(lock: Path) -> dict | None:
    """Who holds ``lock`` ({} if unreadable, None if gone)."""
    try:
        with open(lock, "rb") as f:
            obj = json.loads(f.read(4096).decode("utf-8", "replace"))
        return obj if isinstance(obj, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _stale(info: dict) -> bool:
    pid = info.get("pid")
    return (isinstance(pid, int) and not isinstance(pid, bool) and info.get("host") == socket.gethostname()
            and pid != os.getpid() and not _alive(pid))


@contextmanager
def lock_out_dir(out: str | os.PathLike):
    """Hold ``out/.deadscan.lock`` for the block; a folder this created and left empty is removed again."""
    out = Path(out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create --out {out} ({e.strerror}); choose another --out") from None
    lock = out / LOCK_FILE
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv[1:])[:300]})
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            info = _holder(lock)
            if info is None:  # released meanwhile: try again
                continue
            if _stale(info):
                try:
                    lock.unlink()  # its run was killed; only one taker's O_EXCL create can win the retry
                except FileNotFoundError:
                    pass
                continue
            who = f"pid {info['pid']}" if isinstance(info.get("pid"), int) else "another process"
            cmd = f": deadscan {printable(str(info['command']), 120)}" if info.get("command") else ""
            raise OutputError(f"--out {out} is in use by a running deadscan ({who}{cmd}); wait for it to finish "
                              f"or choose another --out (a stale lock is {lock})") from None
        except OSError as e:
            raise OutputError(f"cannot write in --out {out} ({e.strerror}); choose another --out") from None
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    else:
        raise OutputError(f"--out {out}: cannot take its lock {lock}; choose another --out")
    try:
        yield out
    finally:
        try:
            lock.unlink()
        except OSError:
            pass
        if created:
            try:
                out.rmdir()  # only if the run wrote nothing
            except OSError:
                pass


@contextmanager
def claim_out_dir(out: str | os.PathLike, outputs, *, overwrite: bool = False, inputs=(), replaceable=()):
    """:func:`check_out_dir` before anything is created, then the lock, then the check again under it (a run
    that finished meanwhile has left its outputs)."""
    check_out_dir(out, outputs, overwrite=overwrite, inputs=inputs, replaceable=replaceable)
    with lock_out_dir(out) as folder:
        check_out_dir(out, outputs, overwrite=overwrite, inputs=inputs, replaceable=replaceable)
        yield folder
