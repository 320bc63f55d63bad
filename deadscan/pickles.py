"""Reading a pickle without running it: its opcodes, through pickletools.

Nothing is imported and no object is built: GLOBAL / STACK_GLOBAL names (with memo look-ups and
Python 2 names mapped) and persistent ids are collected, so a file can be judged before loading.
"""

from __future__ import annotations

import _compat_pickle
import os
import pickletools
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .defaults import DEFAULTS
from .errors import CheckpointError, few, one_line, printable


# What one pickle may cost to read: DEFAULTS.max_pickle_ops / max_pickle_bytes (why: see defaults.py).
MAX_PICKLE_OPS = DEFAULTS.max_pickle_ops
MAX_PICKLE_BYTES = DEFAULTS.max_pickle_bytes
TRUST_FLAG = "--trust-pickle"  # loads full pickles: runs code from the file
ALLOW_FLAG = "--allow-global"  # lets one named global through torch.load(weights_only=True)

_MARK = object()
_UNKNOWN = object()
_STRING_ARGS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
                "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "INT", "BININT", "BININT1",
                "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT"}


@dataclass
class PickleScan:
    """What a pickle would import and which storages it declares, read from its opcodes alone."""

    globals: list[str] = field(default_factory=list)  # module.name, in first-seen order
    persistent_ids: list[tuple] = field(default_factory=list)  # torch: ('storage', type, key, location, numel...)
    pickles: int = 0  # complete pickles read (a legacy torch.save file holds five in a row)
    error: str | None = None  # why reading stopped early (damaged or unsupported bytes)


class _Limit(Exception):
    """Reading stopped at one of the limits above (the message says which)."""


class _Capped:
    """A binary file read through ``read``/``readline`` that refuses to go ``limit`` bytes past where it
    started: a declared length (BINBYTES8 n) is checked before it is read, and a line never runs on."""

    def __init__(self, f, limit: int):
        self.f, self.limit, self.start = f, limit, f.tell()

    def _room(self) -> int:
        return self.start + self.limit - self.f.tell()

    def _stop(self):
        raise _Limit(f"larger than the {self.limit} bytes deadscan reads from one pickle")

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > self._room():
            self._stop()
        return self.f.read(n)

    def readline(self, n: int = -1) -> bytes:
        room = self._room()
        line = self.f.readline(room + 1 if n is None or n < 0 else min(n, room + 1))
        if len(line) > room:
            self._stop()
        return line

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence)


class _Global(str):
    """A name a GLOBAL / STACK_GLOBAL opcode would import (a value on the simulated stack)."""


def scan_pickle(f, *, max_pickles: int = 1, max_ops: int = MAX_PICKLE_OPS,
                max_bytes: int = MAX_PICKLE_BYTES) -> PickleScan:
    """Walk the opcodes of up to ``max_pickles`` consecutive pickles in the binary file ``f`` (which must
    tell its position), reading at most ``max_ops`` opcodes and ``max_bytes`` bytes in all; past either,
    ``error`` says so (a caller that must see every storage then refuses the file).

    A small stack machine follows what reaches GLOBAL (``module name``), STACK_GLOBAL (the two strings
    below it, pushed directly or fetched from the memo by GET/BINGET after PUT/BINPUT/MEMOIZE), and the
    tuples handed to (BIN)PERSID. EXT1/2/4 (the copyreg registry) are listed as ``<extension N>``.
    Nothing is imported, constructed or called."""
    result = PickleScan()
    seen: dict[str, None] = {}
    f = _Capped(f, max_bytes)
    ops = 0

    def record(name: str) -> _Global:
        seen.setdefault(name, None)
        return _Global(name)

    for i in range(max_pickles):
        if i and _at_eof(f):
            break
        stack: list = []
        memo: dict = {}
        done = False
        try:
            for op, arg, _pos in pickletools.genops(f):
                ops += 1
                if ops > max_ops:
                    raise _Limit(f"more than the {max_ops} opcodes deadscan reads from one pickle")
                name = op.name
                if name in _STRING_ARGS:
                    stack.append(arg)
                elif name == "NONE":
                    stack.append(None)
                elif name in ("GLOBAL", "INST"):
                    module, _, attr = str(arg).partition(" ")
                    # Python 2 names (protocol 2 pickles say __builtin__.set), mapped as both unpicklers do
                    module, attr = _compat_pickle.NAME_MAPPING.get(
                        (module, attr), (_compat_pickle.IMPORT_MAPPING.get(module, module), attr))
                    g = record(f"{module}.{attr}")
                    if name == "GLOBAL":
                        stack.append(g)
                    else:
                        _pop_mark(stack)
                        stack.append(_UNKNOWN)
                elif name == "STACK_GLOBAL":
                    attr, module = stack.pop(), stack.pop()
                    if isinstance(module, str) and isinstance(attr, str):
                        stack.append(record(f"{module}.{attr}"))
                    else:
                        stack.append(record("<unresolved STACK_GLOBAL>"))
                elif name in ("EXT1", "EXT2", "EXT4"):
                    stack.append(record(f"<extension {arg}>"))
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = stack[-1]
                elif name == "MEMOIZE":
                    memo[len(memo)] = stack[-1]
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    stack.append(memo.get(arg, _UNKNOWN))
                elif name == "TUPLE":
                    stack.append(tuple(_pop_mark(stack)))
                elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                    n = int(name[-1])
                    items = tuple(stack[-n:])
                    del stack[-n:]
                    stack.append(items)
                elif name == "EMPTY_TUPLE":
                    stack.append(())
                elif name == "DUP":
                    stack.append(stack[-1])
                elif name == "BINPERSID":
                    pid = stack.pop()
                    result.persistent_ids.append(pid if isinstance(pid, tuple) else (pid,))
                    stack.append(_UNKNOWN)
                elif name == "PERSID":
                    result.persistent_ids.append((arg,))
                    stack.append(_UNKNOWN)
                elif name == "STOP":
                    done = True
                else:  # every other opcode: its documented stack effect, values unknown
                    before = op.stack_before
                    if pickletools.markobject in before:
                        _pop_mark(stack)
                        below = before.index(pickletools.markobject)
                    else:
                        below = len(before)
                    if below:
                        if len(stack) < below:
                            raise ValueError(f"{name} needs {below} stack items")
                        del stack[-below:]
                    for kind in op.stack_after:
                        stack.append(_MARK if kind is pickletools.markobject else _UNKNOWN)
        except _Limit as e:
            result.error = str(e)
            break
        except Exception as e:  # damaged or hostile bytes: report how far we got
            result.error = f"{type(e).__name__}: {one_line(e)}"
            break
        if not done:
            break
        result.pickles += 1
    result.globals = list(seen)
    return result


def _pop_mark(stack: list) -> list:
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is _MARK:
            items = stack[i + 1:]
            del stack[i:]
            return items
    raise ValueError("no MARK on the stack")


def _at_eof(f) -> bool:
    pos = f.tell()
    if not f.read(1):
        return True
    f.seek(pos)
    return False


# Modules whose functions a pickle can use to run code (files, processes, imports, attribute tricks).
DANGEROUS_MODULES = ("builtins", "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "sys", "pathlib", "shutil",
                     "importlib", "pickle", "_pickle", "copyreg", "runpy", "socket", "ctypes", "code", "codeop", "pty",
                     "webbrowser", "io", "_io", "tempfile", "operator", "functools", "types", "marshal", "zipimport",
                     "multiprocessing", "asyncio", "signal", "urllib", "http", "ftplib", "smtplib", "telnetlib",
                     "inspect", "pdb", "timeit", "trace", "cProfile", "profile", "linecache", "glob", "fileinput",
                     "torch.hub", "torch.jit", "torch.ops", "torch._ops", "torch.classes", "torch.load",
                     "torch.serialization", "torch.utils.cpp_extension", "numpy.load", "numpy.f2py", "numpy.testing")


def is_dangerous_global(name: str) -> bool:
    """A name torch does not allow whose module is one a pickle can run code with (``builtins.eval``,
    ``os.system``, ``pathlib.Path.write_text``, ``operator.attrgetter``...) or an extension code."""
    if name.startswith("<"):  # <extension N>, <unresolved STACK_GLOBAL>
        return True
    if torch_allows(name):
        return False
    return any(name == m or name.startswith(m + ".") for m in DANGEROUS_MODULES)


def torch_allows(name: str) -> bool:
    """Whether ``torch.load(weights_only=True)`` accepts global ``name`` without being told (by name only)."""
    try:
        from torch import _weights_only_unpickler as w

        return name in w._get_allowed_globals() or name in w._get_user_allowed_globals()
    except Exception:  # a private API: if it moves, say "not allowed" (the safe answer)
        return False


# ---------------------------------------------------------------------------------------------
# What a file's pickles would import (``deadscan inspect --list-globals FILE``)


@dataclass
class GlobalsListing:
    path: str
    format: str
    members: dict[str, PickleScan]  # pickle name -> what it imports
    carries_code: bool  # TorchScript / .pt2: code travels beside the pickles

    @property
    def globals(self) -> list[str]:
        seen: dict[str, None] = {}
        for scan in self.members.values():
            for g in scan.globals:
                seen.setdefault(g, None)
        return list(seen)

    @property
    def needs_allowing(self) -> list[str]:
        return [g for g in self.globals if not torch_allows(g)]

    def describe(self) -> str:
        """What ``deadscan inspect --list-globals FILE`` prints."""
        if self.format == "safetensors":
            return printable(f"{self.path}: safetensors: no pickle, nothing to import; it loads without any flag")
        lines = [f"{self.path}: {self.format}; names read from the pickle opcodes (nothing was imported or run)"]
        width = max([len(g) for g in self.globals] + [10])
        for member, scan in self.members.items():
            lines.append(f"{member}: {len(scan.globals)} global(s)"
                         + (f"; reading stopped early ({scan.error})" if scan.error else ""))
            for g in scan.globals:
                if torch_allows(g):
                    verdict = "allowed by torch.load(weights_only=True)"
                elif is_dangerous_global(g):
                    verdict = "DANGEROUS: can run arbitrary code (files, processes, imports); do not allow it"
                else:
                    verdict = f"not allowed: needs {ALLOW_FLAG} (or {TRUST_FLAG})"
                lines.append(f"  {g.ljust(width)}  {verdict}")
        needed = self.needs_allowing
        dangerous = [g for g in needed if is_dangerous_global(g)]
        stopped = [member for member, scan in self.members.items() if scan.error]
        if self.carries_code:
            lines.append(f"it also carries code ({self.format}): only {TRUST_FLAG} loads it, and that runs the code")
        elif dangerous:
            lines.append(f"it imports {few(dangerous)}, which can run arbitrary code: do not load it unless you "
                         "made it yourself")
        elif stopped:
            lines.append(f"{few(stopped)} could not be read to the end, so this list may be incomplete; deadscan "
                         f"does not load a pickle it cannot read through (without {TRUST_FLAG})")
        elif needed:
            flags = " ".join(f"{ALLOW_FLAG} {g}" for g in needed)
            lines.append(f"to load it without {TRUST_FLAG}: {flags} (imports each named class or function; "
                         "its code runs as the pickle builds objects with it)")
        else:
            lines.append("it loads without any flag")
        return "\n".join(map(printable, lines))  # names from the file may hold control characters


def list_globals(path: str | os.PathLike) -> GlobalsListing:
    """What the pickles in ``path`` would import (classes, functions), without importing or running anything."""
    from .checkpoint import detect_format  # format detection is the checkpoint module's (which imports this one)

    path = Path(path)
    fmt = detect_format(path)
    if fmt == "safetensors":
        return GlobalsListing(str(path), fmt, {}, False)
    members = {}
    if fmt == "torch-legacy":  # a bare pickle, or five in a row (legacy torch.save); streamed, not read whole
        with open(path, "rb") as f:
            members[path.name] = scan_pickle(f, max_pickles=5)
    else:
        try:
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():  # streamed: scan_pickle stops at its opcode and byte limits
                    if info.filename.endswith(".pkl"):
                        with z.open(info) as f:
                            members[info.filename] = scan_pickle(f)
        except CheckpointError:
            raise
        except Exception as e:
            what = one_line(e) or type(e).__name__
            raise CheckpointError(printable(f"{path}: damaged zip archive ({what})")) from None
    return GlobalsListing(str(path), fmt, members, fmt in ("torchscript", "pt2"))
