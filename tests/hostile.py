"""Run the ``deadscan`` command on a hostile input as a new user would: in its own process, with a
memory limit and a timeout, and check that it refused cleanly.

Used by the hostile-input test modules (tests/test_hostile_*.py). A clean refusal is: exit code 1
or 2, exactly one ``Error:`` line on stderr, no traceback, no file created outside the run's own
folder, done before the timeout, peak RSS under a limit.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Address space for the child: room for torch's libraries (CUDA builds map several GB of virtual memory
# they never touch), not for a crafted file's declared gigabytes.
ADDRESS_SPACE = 16 << 30
MAX_RSS_MB = 1200  # a refused input may cost what importing torch and the tiny model cost, not more
TIMEOUT_S = 60


@dataclass
class Run:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    max_rss_mb: float
    timed_out: bool


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_deadscan(args: list[str], cwd: Path, *, timeout: float = TIMEOUT_S, env: dict | None = None,
                 stdin: bytes = b"") -> Run:
    """``python -m deadscan ARGS`` in ``cwd`` (a fresh process), with the limits above."""
    cwd.mkdir(parents=True, exist_ok=True)
    out, err = cwd / ".hostile-stdout", cwd / ".hostile-stderr"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", **(env or {})}
    start = time.monotonic()
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen([sys.executable, "-m", "deadscan", *args], cwd=cwd, stdout=fo, stderr=fe,
                                stdin=subprocess.PIPE, env=full_env, preexec_fn=_limits, start_new_session=True)
        proc.stdin.write(stdin)
        proc.stdin.close()
        timed_out = False
        while True:  # wait4 gives this child's own peak RSS (Popen.wait would discard it)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - start > timeout:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen from waiting again
    seconds = time.monotonic() - start
    run = Run(args, proc.returncode, out.read_text(errors="replace"), err.read_text(errors="replace"),
              seconds, usage.ru_maxrss / 1024, timed_out)
    out.unlink()
    err.unlink()
    return run


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


def assert_refused(run: Run, *, codes=(1, 2), max_rss_mb: float = MAX_RSS_MB, contains: str | None = None) -> str:
    """The run refused cleanly; returns its ``Error:`` line."""
    what = f"deadscan {' '.join(run.args)}\nstdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    assert not run.timed_out, f"hung (killed after {run.seconds:.0f} s): {what}"
    assert run.returncode in codes, f"exit {run.returncode}: {what}"
    assert "Traceback" not in run.stderr, what
    lines = [ln for ln in run.stderr.splitlines() if ln.strip() and not ln.startswith(("scan:", "Warning:"))]
    errors = [ln for ln in lines if ln.startswith("Error:")]
    assert len(errors) == 1, what
    if run.returncode == 1:  # a usage error (2) also prints click's usage lines
        assert lines == errors, what
    assert run.max_rss_mb < max_rss_mb, f"peak RSS {run.max_rss_mb:.0f} MB: {what}"
    assert not any(ord(c) < 32 and c not in "\n\t" or ord(c) == 127 for c in run.stderr + run.stdout), \
        f"raw control characters reached the terminal: {what!r}"
    if contains is not None:
        assert contains in errors[0], what
    return errors[0]
