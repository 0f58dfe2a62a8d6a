"""Run a command in a pseudo-terminal and see what a person at an 80-column terminal sees."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from dataclasses import dataclass

import pyte


@dataclass
class Screen:
    lines: list[str]  # the terminal's content at the end, trailing blanks removed
    raw: str  # everything written, escape codes included (progress redraws too)
    returncode: int


def run_in_terminal(args: list[str], columns: int = 80, rows: int = 50, timeout: float = 300,
                    env: dict[str, str] | None = None, cwd: str | None = None) -> Screen:
    master, slave = pty.openpty()
    environment = {**os.environ, "COLUMNS": str(columns), "LINES": str(rows), "TERM": "xterm-256color", **(env or {})}
    environment.pop("SC2QUANT_NO_PROGRESS", None)
    environment.update({k: v for k, v in (env or {}).items()})
    import fcntl
    import struct
    import termios

    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=environment, cwd=cwd, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"{args} ran past {timeout} s")
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the slave side closed
                data = b""
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(10)
    os.close(master)
    raw = b"".join(chunks).decode("utf-8", errors="replace")
    screen = pyte.Screen(columns, rows)
    screen.set_mode(pyte.modes.LNM)  # a pty turns "\n" into "\r\n"
    pyte.Stream(screen).feed(raw)
    lines = [line.rstrip() for line in screen.display]
    while lines and not lines[-1]:
        lines.pop()
    return Screen(lines, raw, proc.returncode)
