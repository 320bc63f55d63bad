"""The ``--out`` folder: claimed by one run at a time.

Two runs started at once with the same ``--out`` would both pass the "already holds" check and the
later would silently replace the earlier's outputs. A run takes a lock file in the folder, created
exclusively, for its whole length; a lock left by a run that was killed is detected by its process
id (on the same host) and taken over.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

from .checkpoint import check_out_dir
from .errors import OutputError, printable

LOCK_FILE = ".deadscan.lock"


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
