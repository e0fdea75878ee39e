"""viewkeeper processes for the chaos suite: the real CLI as subprocesses, crashed at will.

Each :class:`Daemon` is one ``python -m viewkeeper.cli run -c CONFIG`` in its own process
group, its stdout/stderr appended to a log file (kept across restarts, one header per start,
so a failing run shows every life of the slot). ``kill()`` is SIGKILL (no shutdown path at
all: the lease stays owned until it expires), ``terminate()`` is the graceful SIGTERM drain,
``pause()``/``resume()`` are SIGSTOP/SIGCONT (a process that stops answering while believing
it still holds its lease: the zombie case).

:func:`run_cli` runs one command to its end; :class:`CliJob` runs one in the background (a
``rebuild`` during which the test moves the lease), its output readable while it runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tests.helpers import REPO, vk_env

__all__ = ["CliJob", "Daemon", "Exit", "run_cli"]

_EXCEPTION_LINE = re.compile(
    r"^((?:viewkeeper: |[A-Za-z_][\w.]*(?:Error|Exception|Unavailable|Lost)\b).*)$", re.M
)


@dataclass(frozen=True)
class Exit:
    """A daemon that ended on its own: exit code, why (its last words), and whether it had
    got past start-up (a daemon that cannot reach a service at start exits 1 by design)."""

    code: int
    why: str
    was_running: bool


def run_cli(
    args: Sequence[str], *, log: Path | None = None, timeout: float = 180.0
) -> subprocess.CompletedProcess[str]:
    """Run one ``viewkeeper`` command to its end; its output is also appended to ``log``."""
    started = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "viewkeeper.cli", *args],
        cwd=REPO,
        env=vk_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if log is not None:
        with log.open("a") as out:
            out.write(
                f"\n==== viewkeeper {' '.join(args)} -> exit {res.returncode} "
                f"in {time.monotonic() - started:.1f}s\n{res.stdout}{res.stderr}"
            )
    return res


class CliJob:
    """One ``viewkeeper`` command in the background: a non-blocking :func:`run_cli`. Its
    stdout and stderr go, unbuffered, to ``out`` as they are written, so the test can tell
    which phase it has reached (:meth:`output`); :meth:`poll` gives the exit code once it has
    ended, and then appends the output to ``log`` as run_cli does."""

    def __init__(self, args: Sequence[str], *, out: Path, log: Path | None = None) -> None:
        self.args = list(args)
        self.out = out
        self.log = log
        self.returncode: int | None = None
        self.seconds = 0.0
        self._started = time.monotonic()
        env = {**vk_env(), "PYTHONUNBUFFERED": "1"}
        with out.open("wb") as sink:  # the child keeps its own descriptor
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "viewkeeper.cli", *self.args],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self._proc.pid

    def output(self) -> str:
        try:
            return self.out.read_text(errors="replace")
        except OSError:
            return ""

    def poll(self) -> int | None:
        """The exit code once the command has ended, else None."""
        if self.returncode is None and self._proc.poll() is not None:
            self.returncode = self._proc.returncode
            self.seconds = time.monotonic() - self._started
            if self.log is not None:
                with self.log.open("a") as out:
                    out.write(
                        f"\n==== viewkeeper {' '.join(self.args)} (background) -> exit "
                        f"{self.returncode} in {self.seconds:.1f}s\n{self.output()}"
                    )
        return self.returncode

    def kill(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(10.0)


class Daemon:
    """One slot of ``viewkeeper run``: started, killed and restarted by the test."""

    def __init__(self, slot: str, config: Path, log: Path) -> None:
        self.slot = slot
        self.config = config
        self.log = log
        self.starts = 0
        self.kills = 0
        self.unexpected_exits: list[Exit] = []
        self.paused = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    def __repr__(self) -> str:
        state = "running" if self.alive() else "stopped"
        return f"<Daemon {self.slot} pid {self.pid} {state}>"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, *extra: str) -> None:
        if self.alive():
            return
        self._close_log()
        self.starts += 1
        self._out = self.log.open("ab")
        self._out.write(
            f"\n==== {time.strftime('%T')} start #{self.starts} of {self.slot}\n".encode()
        )
        self._out.flush()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "viewkeeper.cli", "run", "-c", str(self.config), *extra],
            cwd=REPO,
            env=vk_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.paused = False

    def check_exit(self) -> int | None:
        """If the process ended on its own (not by our signal), record and return its code."""
        if self._proc is None or self._proc.poll() is None:
            return None
        code = self._proc.returncode
        self.unexpected_exits.append(Exit(code, self.last_error(), self.was_running()))
        self._proc = None
        self.paused = False
        self._close_log()
        return code

    def kill(self) -> None:
        """SIGKILL: no drain, no lease release, no flush."""
        if self._proc is None:
            return
        self.kills += 1
        self._signal(signal.SIGKILL)
        self._reap(10.0)

    def terminate(self, timeout: float = 40.0) -> int | None:
        """SIGTERM (the graceful drain) and wait; SIGKILL if it does not stop in time."""
        if self._proc is None:
            return None
        if self.paused:
            self.resume()
        self._signal(signal.SIGTERM)
        try:
            code: int | None = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            code = None
        self._reap(10.0)
        return code

    def pause(self) -> None:
        if self.alive():
            self._signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        # a stopped daemon killed meanwhile (kill -9 of the holder during a rebuild's
        # SIGSTOP) has nothing left to resume
        if self.paused and self._proc is not None:
            self._signal(signal.SIGCONT)
        self.paused = False

    def _signal(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)

    def _reap(self, timeout: float) -> None:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout)
        self._proc = None
        self._close_log()

    def _close_log(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def close(self) -> None:
        if self._proc is not None:
            self.resume()
            self._signal(signal.SIGKILL)
            self._reap(10.0)

    def _life(self) -> str:
        """The log of the slot's latest life."""
        try:
            return self.log.read_text(errors="replace").rsplit("\n==== ", 1)[-1]
        except OSError:
            return ""

    def last_error(self) -> str:
        """Why the latest life ended: the CLI's one-line ``viewkeeper: ...`` message or the
        last exception line of a traceback ('' if neither)."""
        found = _EXCEPTION_LINE.findall(self._life())
        return str(found[-1]) if found else ""

    def was_running(self) -> bool:
        """Whether the latest life got past start-up (logged ``running as``)."""
        return " running as " in self._life()

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])
