"""Data-parallel scans under torchrun: the one module that reads torchrun's environment.

:func:`setup` resolves the process group once per process (like nanoGPT's ``master_process``); scan and
the writers ask :func:`current`. In one process (no torchrun, or a world of 1) every method is a no-op,
so the single-process path is unchanged. Importing this module does not import torch (the CLI asks
:func:`launched` on its torch-free error path).
"""

from __future__ import annotations

import atexit
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta

from .errors import DeadscanError, TraceError, one_line

TIMEOUT_ENV = "DEADSCAN_DIST_TIMEOUT"  # seconds a collective waits for the other processes
DEFAULT_TIMEOUT = 1800.0
MAX_TIMEOUT = 365 * 24 * 3600.0  # a year: beyond it torch's timedelta overflows (inf) or it is a typo
_STATUS_BYTES = 1024  # one process's status line in check(): "ok", "oom N" or "error MESSAGE"


class PeerError(TraceError):
    """Another process of the group failed; its message, prefixed with its rank."""


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None  # nccl or gloo; None: one process, nothing initialised
    handle: object = field(default=None, compare=False, repr=False)  # a torch ProcessGroup; None: the default

    @property
    def is_main(self) -> bool:
        """Only this process claims --out, writes outputs and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1 and self.backend is not None

    def span(self, n: int) -> tuple[int, int]:
        """This process's contiguous share [start, stop) of ``n`` samples (:func:`span`)."""
        return span(n, self.rank, self.world)

    def check(self, error: DeadscanError | None = None, oom: int | None = None) -> int | None:
        """Every process reports how its step ended; all then raise or go on together, so none waits
        forever in a later collective. Raises this process's own ``error``, else the lowest failing
        rank's (as :class:`PeerError`). Returns the smallest batch any process ran out of memory on
        (None if none did), so all back off alike."""
        if not self.active:
            if error is not None:
                raise error
            return oom
        import torch
        import torch.distributed as dist

        mine = "ok" if error is None and oom is None else f"oom {oom}" if error is None else f"error {one_line(error)}"
        buf = torch.zeros(_STATUS_BYTES, dtype=torch.uint8, device=self.device)
        raw = mine.encode()[:_STATUS_BYTES]
        buf[:len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
        gathered = [torch.empty_like(buf) for _ in range(self.world)]
        _collective(dist.all_gather, gathered, buf, group=self.handle)
        statuses = [bytes(t.cpu().tolist()).rstrip(b"\0").decode(errors="replace") for t in gathered]
        if error is not None:
            raise error
        for rank, status in enumerate(statuses):
            if status.startswith("error "):
                raise PeerError(f"process {rank} of {self.world}: {status[6:]}")
        ooms = [int(s[4:]) for s in statuses if s.startswith("oom ")]
        return min(ooms) if ooms else None

    def all_reduce(self, tensor, op: str):
        """In place over all processes; ``op``: "sum" or "max" (the rules of :data:`deadscan.scan.COMBINE`)."""
        if not self.active:
            return tensor
        import torch.distributed as dist

        _collective(dist.all_reduce, tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op],
                    group=self.handle)
        return tensor

    def gather_ints(self, value: int) -> list[int]:
        """Every process's ``value`` (an int64), in rank order: e.g. checksums compared after a strip step."""
        if not self.active:
            return [value]
        import torch
        import torch.distributed as dist

        mine = torch.tensor([value], dtype=torch.int64, device=self.device)
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        _collective(dist.all_gather, gathered, mine, group=self.handle)
        return [int(t) for t in gathered]

    @property
    def device(self):
        """Where collectives' tensors live: this process's GPU under NCCL, else the CPU."""
        import torch

        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


def span(n: int, rank: int, world: int) -> tuple[int, int]:
    """Process ``rank``'s contiguous share [start, stop) of ``n`` samples: disjoint, no padding, the first
    ``n % world`` ranks one sample more (a DistributedSampler pads, which would count samples twice)."""
    return n * rank // world, n * (rank + 1) // world


def _collective(fn, *args, **kwargs) -> None:
    tensors = [t for a in args for t in (a if isinstance(a, list) else [a])]
    counts = [t._use_count() for t in tensors]
    try:
        fn(*args, **kwargs)
    except RuntimeError as e:  # gloo: a peer's socket closed; either backend: the timeout passed
        raise TraceError(f"another process of the torchrun group failed or stopped answering within "
                         f"{timeout_seconds():g} s ({one_line(e, 160)}); see its own output "
                         f"(set {TIMEOUT_ENV} to wait longer)") from None
    _await_release(tensors, counts)


_RELEASE_WAIT = 5.0  # seconds at most; past it go on (a tensor something else kept)


def _await_release(tensors, counts) -> None:
    """Wait until gloo's worker thread has dropped a finished collective's CPU tensors. It drops them after
    the caller has woken, and dropping a tensor Python knows takes the GIL; if the interpreter is exiting by
    then, the worker aborts the whole process ("terminate called without an active exception": a race in
    torch, about 1 run in 15 of a DDP loop that ends soon after a collective, or after a barrier, which keeps
    the collective before it alive). Sleeping releases the GIL to that thread. NCCL's tensors are CUDA ones,
    left to its own watchdog."""
    pending = [(t, c) for t, c in zip(tensors, counts) if t.device.type == "cpu"]
    deadline = time.monotonic() + _RELEASE_WAIT
    while any(t._use_count() > c for t, c in pending) and time.monotonic() < deadline:
        time.sleep(0.0002)


_ONE = Group()
_current: Group | None = None
_store = None  # the store this process joined its group through (setup)
_DONE_KEY = "deadscan/done"  # set by process 0 once its outputs are written
_WRITES_WAIT = timedelta(days=7)  # how long the others wait for them: no collective timeout applies


def launched() -> Group:
    """torchrun's rank and world size from its environment, without initialising anything."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return _ONE
    return Group(rank, world, local) if world > 1 else _ONE


def restarts() -> int:
    """How many times torchrun has restarted this launch's processes (``--max-restarts``); 0 outside torchrun."""
    try:
        return max(int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), 0)
    except ValueError:
        return 0


def launch_token() -> str | None:
    """What one torchrun launch keeps over its restarts, as process 0 sees it: its machine, its torchrun
    agent (the parent process, which restarts the processes) and the rendezvous id. A strip run saves it
    with its state, so a restarted process 0 knows the state as its own launch's. None outside torchrun."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if run is None:
        return None
    return f"{socket.gethostname()}:{os.getppid()}:{run}"


def timeout_seconds() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        raise TraceError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds") from None
    if not 0 < value <= MAX_TIMEOUT:  # also rejects nan and inf
        raise TraceError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds, at most "
                         f"{MAX_TIMEOUT:.0f} (a year)")
    return value


def setup(device=None) -> Group:
    """Resolve this process's group once: under torchrun with a world of several processes, initialise
    torch.distributed (NCCL on CUDA, each process on its LOCAL_RANK GPU; gloo on CPU) with the timeout
    of ``DEADSCAN_DIST_TIMEOUT``. ``device``: the resolved scan device of the first call."""
    global _current, _store
    if _current is not None:
        return _current
    env = launched()
    if env.world == 1:
        _current = _ONE
        return _current
    import torch
    import torch.distributed as dist

    cuda = device is not None and torch.device(device).type == "cuda"
    backend = "nccl" if cuda else "gloo"
    if cuda:
        if env.local_rank >= torch.cuda.device_count():
            raise TraceError(f"torchrun process {env.rank} has LOCAL_RANK {env.local_rank} but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s): use --nproc-per-node "
                             f"{torch.cuda.device_count()} or fewer, or --device cpu")
        torch.cuda.set_device(env.local_rank)
    timeout = timedelta(seconds=timeout_seconds())
    if not dist.is_initialized():
        try:
            # Keys of this attempt only: after torchrun restarts the processes (--max-restarts), a process
            # reading the address a dead one left in the store fails to connect (seen with gloo).
            store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
            store = dist.PrefixStore(f"deadscan/attempt{restarts()}", store)
            dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world, timeout=timeout)
            _store = store
        except (RuntimeError, ValueError) as e:
            raise TraceError(f"cannot join the torchrun process group ({backend}): {one_line(e, 200)}") from None
    _current = Group(env.rank, env.world, env.local_rank, backend)
    atexit.register(_teardown)
    return _current


def finish() -> None:
    """End of a command that succeeded in every process: the others wait until process 0 has written its
    outputs, then every process tears the group down. Without the wait a process that finishes first closes
    its connections while process 0 still writes, and gloo can abort it at exit ("terminate called without an
    active exception"). The wait is on a key of the store, not a collective: no ``DEADSCAN_DIST_TIMEOUT``
    bounds it (a large model's export can take longer), and if process 0 dies torchrun stops the others."""
    global _current
    if _current is None or not _current.active:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        if _store is None:  # a group deadscan did not start: every process there is its owner's
            _collective(dist.barrier)
        elif _current.is_main:
            _store.set(_DONE_KEY, "1")
        else:
            try:
                _store.wait([_DONE_KEY], _WRITES_WAIT)
            except RuntimeError as e:  # the store's host is gone
                raise TraceError(f"process 0 stopped before writing its outputs ({one_line(e, 160)}); see its "
                                 "own output") from None
        dist.destroy_process_group()
    _current = None


def _teardown() -> None:
    # Error paths: a group left to the interpreter's exit can abort the process while its communication
    # threads still run. No barrier here: another process may be gone.
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def of(handle=None) -> Group:
    """The group of a process group the caller initialised itself (its own DDP loop): ``handle`` a
    torch ProcessGroup, or None for the default one; one process if torch.distributed is not initialised."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if handle is not None:
            raise TraceError("a process group was passed but torch.distributed is not initialised")
        return _ONE
    world, rank = dist.get_world_size(handle), dist.get_rank(handle)
    if world == 1:
        return _ONE
    backend = str(dist.get_backend(handle))
    if backend == "nccl":
        import torch

        local = torch.cuda.current_device()  # the GPU this process's collectives use
    else:
        local = 0
    return Group(rank, world, local, backend, handle)


def current() -> Group:
    """The group :func:`setup` resolved; one process if it was never called."""
    return _current or _ONE


def scan_device(device):
    """The device this process scans on: under NCCL its own LOCAL_RANK GPU (``cuda`` means that one)."""
    g = current()
    if g.backend == "nccl":
        import torch

        return torch.device("cuda", g.local_rank)
    return device
