"""A sandbox for untrusted generated programs. Every program runs in a fresh interpreter:

- as a fresh unprivileged uid (one per run), so RLIMIT_NPROC applies (the kernel ignores it for
  root) and every process the program starts can be found and killed afterwards, even those
  that left the process group;
- in new network and IPC namespaces: no interface is up, not even loopback;
- with RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_NPROC, RLIMIT_FSIZE and RLIMIT_CORE=0, and a
  wall-clock limit enforced by the parent;
- in a temporary working directory that is removed afterwards, together with anything the uid
  created in the world-writable directories (/tmp, /var/tmp, /dev/shm, /run/lock).

Setting this up needs root (CAP_SYS_ADMIN for the namespaces, CAP_SETUID for the uid). The
namespaces, limits and uid change are applied by a small launcher process that then `exec`s the
interpreter, rather than in a `preexec_fn`: preexec_fn runs Python between fork and exec, which
can deadlock when the parent has other threads (torch's thread pools, our two workers).
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sc2quant.core.errors import UserError

Status = Literal["passed", "failed", "timeout", "memory", "error"]
STATUSES: tuple[Status, ...] = ("passed", "failed", "timeout", "memory", "error")

# Each run gets its own uid from this range, which is reserved for the sandbox: nothing else
# may own processes or files with these uids (cleanup kills and deletes everything they own).
SANDBOX_UID_BASE = 1_500_000_000
SANDBOX_UID_SPAN = 1 << 24

WORLD_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")

_SETUP_FAILED = "sc2quant sandbox setup failed"
_SETUP_EXIT = 120
_MINIMAL_PATH = "/usr/local/bin:/usr/bin:/bin"

# Runs as root in the new session, sets everything up, then becomes the program. Kept to the
# standard library (it runs with -I -S) and to calls that are safe before exec.
_LAUNCHER = r"""
import ctypes, os, resource, sys

def unshare(flags):
    if hasattr(os, "unshare"):  # Python 3.12+
        os.unshare(flags)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "unshare: " + os.strerror(err))

try:
    uid, gid, mem, cpu, fsize, nproc = map(int, sys.argv[1:7])
    python, program = sys.argv[7:9]
    unshare(0x40000000 | 0x08000000)  # CLONE_NEWNET | CLONE_NEWIPC
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU, then SIGKILL
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)  # as root this sets real, effective and saved uid: no way back
    os.execv(python, [python, "-I", program])
except BaseException as exc:
    sys.stderr.write("%s: %s\n" % (sys.argv[9], exc))
    sys.stderr.flush()
    os._exit(int(sys.argv[10]))
"""

_KILLER = r"""
import os, signal
try:
    os.kill(-1, signal.SIGKILL)  # every process of this uid, atomically with respect to fork
except ProcessLookupError:
    pass
"""


@dataclass(frozen=True)
class Limits:
    timeout_s: float
    memory_mb: int
    max_procs: int
    file_mb: int

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.memory_mb < 64 or self.max_procs < 1 or self.file_mb < 1:
            raise UserError(
                f"sandbox limits are too small ({self}): the interpreter alone needs a positive "
                "time limit, 64 MB of memory, one process and a writable file"
            )


@dataclass(frozen=True)
class Result:
    passed: bool
    status: Status
    detail: str = ""


def require_sandbox_support() -> None:
    if sys.platform != "linux":
        raise UserError("the HumanEval sandbox needs Linux (namespaces and resource limits)")
    if os.geteuid() != 0:
        raise UserError(
            "the HumanEval sandbox must run as root: it needs a network namespace and a fresh "
            "unprivileged uid per program; run the evaluation in a container as root"
        )


_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()


def _pids_of(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is `uid`, read from /proc."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:
            continue  # it exited meanwhile
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields["Uid"].split()[0]) == uid and fields["State"].split()[0] not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


def _claim_uid() -> int:
    with _uid_lock:
        while True:
            uid = SANDBOX_UID_BASE + secrets.randbelow(SANDBOX_UID_SPAN)
            if uid not in _uids_in_use and not _pids_of(uid):
                _uids_in_use.add(uid)
                return uid


def _release_uid(uid: int) -> None:
    with _uid_lock:
        _uids_in_use.discard(uid)


def _minimal_env(home: str) -> dict[str, str]:
    return {"PATH": _MINIMAL_PATH, "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home}


def _probe(python: str, uid: int | None) -> str | None:
    """What the interpreter reports about its standard library, run as `uid` (None: as us)."""
    code = "import os, sys; print(sys.version, sys.base_prefix, os.__file__)"
    ids: dict[str, Any] = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    try:
        out = subprocess.run(
            [python, "-I", "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
            env=_minimal_env("/"),
            stdin=subprocess.DEVNULL,
            **ids,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.cache
def sandbox_python() -> str:
    """An interpreter that an unprivileged uid can run with its own standard library.

    The venv's interpreter may live under a private directory (here /root/.pyenv): run as
    another uid it then falls back to a different stdlib or fails. HumanEval needs only the
    standard library, so the first candidate that sees the same stdlib as root does is used.
    """
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [sys.executable, getattr(sys, "_base_executable", sys.executable)]
    candidates += [shutil.which(name, path=_MINIMAL_PATH) or "" for name in (version, "python3")]
    uid = _claim_uid()
    try:
        for python in dict.fromkeys(c for c in candidates if c):
            as_root = _probe(python, None)
            if as_root is not None and _probe(python, uid) == as_root:
                return python
    finally:
        _release_uid(uid)
    raise UserError(
        f"no Python interpreter that an unprivileged user can run was found (tried {', '.join(candidates)}): "
        f"install python3 system-wide or make {sys.executable}'s directories world-readable"
    )


def _kill_all(uid: int, python: str) -> None:
    """Kill every process of the sandbox uid, including those that left the process group."""
    for _ in range(5):
        subprocess.run(
            [python, "-I", "-S", "-c", _KILLER],
            user=uid,
            group=uid,
            extra_groups=[],
            cwd="/",
            env=_minimal_env("/"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:  # SIGKILLed processes take a moment to exit
            if not _pids_of(uid):
                return
            time.sleep(0.02)
    raise RuntimeError(f"sandbox processes of uid {uid} survived SIGKILL: {_pids_of(uid)}")


def _remove_owned(directory: str, uid: int, depth: int = 2) -> None:
    """Delete what `uid` created in a world-writable directory (and in world-writable subdirectories)."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if st.st_uid == uid:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        elif depth > 1 and entry.is_dir(follow_symlinks=False) and st.st_mode & 0o002:
            _remove_owned(entry.path, uid, depth - 1)


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _read_tail(f: Any, limit: int = 4000) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - limit))
    return f.read().decode("utf-8", errors="replace")


def _classify(returncode: int, stderr: str, timed_out: bool, limits: Limits) -> Result:
    last = _last_line(stderr)
    if timed_out or returncode == -signal.SIGXCPU:
        return Result(False, "timeout", f"time limit of {limits.timeout_s:g} s exceeded")
    if returncode == 0:
        return Result(True, "passed")
    if returncode == _SETUP_EXIT and _SETUP_FAILED in stderr:
        return Result(False, "error", last)
    if re.match(r"MemoryError\b", last) or "Cannot allocate memory" in last:
        return Result(False, "memory", f"memory limit of {limits.memory_mb} MB exceeded: {last}")
    # Python ignores SIGXFSZ, so a write past RLIMIT_FSIZE raises EFBIG ("File too large").
    if "[Errno 27]" in last or returncode == -signal.SIGXFSZ:
        return Result(False, "error", f"file size limit of {limits.file_mb} MB exceeded: {last}")
    if returncode < 0:
        return Result(False, "error", f"killed by {signal.Signals(-returncode).name}")
    return Result(False, "failed", last or f"exit status {returncode}")


def run_sandboxed(
    program: str,
    timeout_s: float = 10,
    memory_mb: int = 512,
    max_procs: int = 8,
    file_mb: int = 16,
) -> Result:
    """Run a Python program in the sandbox and say whether it exited cleanly.

    Limits: `timeout_s` of wall-clock time (and about as much CPU time), `memory_mb` of address
    space per process, `max_procs` processes and threads in all, files of at most `file_mb`, no
    network. Nothing the program started or wrote survives the call.
    """
    require_sandbox_support()
    limits = Limits(timeout_s=timeout_s, memory_mb=memory_mb, max_procs=max_procs, file_mb=file_mb)
    python = sandbox_python()
    uid = _claim_uid()
    workdir = tempfile.mkdtemp(prefix="sc2quant-humaneval-")
    try:
        os.chown(workdir, uid, uid)  # mkdtemp's 0700 then admits only the sandbox uid (and root)
        Path(workdir, "program.py").write_text(program, encoding="utf-8")
        return _launch(workdir, uid, python, limits)
    finally:
        try:
            _kill_all(uid, python)
            shutil.rmtree(workdir)  # before the sweep, which would also catch it (it is the uid's)
            for directory in WORLD_WRITABLE_DIRS:
                _remove_owned(directory, uid)
        finally:
            _release_uid(uid)


def _launcher_argv(uid: int, python: str, limits: Limits) -> list[str]:
    numbers = [uid, uid, limits.memory_mb << 20, int(limits.timeout_s) + 1, limits.file_mb << 20, limits.max_procs]
    # Python makes a script path absolute, and the sandbox uid may not traverse the temp dir's
    # parents (a private TMPDIR); /proc/self/cwd reaches the working directory without them.
    program = "/proc/self/cwd/program.py"
    return [sys.executable, "-I", "-S", "-c", _LAUNCHER, *map(str, numbers), python, program,
            _SETUP_FAILED, str(_SETUP_EXIT)]


def _launch(workdir: str, uid: int, python: str, limits: Limits) -> Result:
    # stderr goes to an unlinked file: escaped children could hold a pipe open and block us,
    # and RLIMIT_FSIZE caps what the program can write into it.
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            _launcher_argv(uid, python, limits),
            cwd=workdir,
            env=_minimal_env(workdir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,  # its own session and process group, killed as one
        )
        timed_out = False
        try:
            proc.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL)  # those that left the group die in _kill_all
                proc.wait()
        return _classify(proc.returncode, _read_tail(err), timed_out, limits)


def require_working_sandbox() -> None:
    """Fail once, clearly, rather than reporting 164 errors when the sandbox cannot start."""
    result = run_sandboxed("pass\n", timeout_s=30)
    if not result.passed:
        raise UserError(f"the sandbox does not work on this machine: {result.detail}")
