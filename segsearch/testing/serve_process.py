"""A real `segsearch serve` child process on loopback, for the tests and benches that need the
server in its own process: its RSS (memory under hostile input, load, soak), everything it
logs (no secret in the logs), and a client that does not share its GIL.

stdout and stderr go to files, not pipes: a server logging at DEBUG would otherwise fill a
pipe nobody reads and block. The port is 0 (any free one); the address comes from the
serving line `segsearch serve` prints once loaded.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

READY = re.compile(r"segsearch serving .* on (127\.0\.0\.1:\d+)")


class ServeProcess:
    """`segsearch [-v] serve INDEX --model CKPT --port 0 --no-metrics [extra...]` as a child
    (checkpoint None: no --model, the shipped general model)."""

    def __init__(self, index_dir: Path, checkpoint: Path | None, log_dir: Path, extra: list[str] = (),
                 verbose: bool = False, env: dict[str, str] | None = None, start_timeout: float = 120.0):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = log_dir / "serve.stdout", log_dir / "serve.stderr"
        argv = [sys.executable, "-m", "segsearch.cli", *(["-v"] if verbose else []), "serve", str(index_dir),
                *(["--model", str(checkpoint)] if checkpoint else []), "--port", "0", "--no-metrics", *extra]
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                            env={**os.environ, **(env or {})})
        self.address = self._wait_for_address(start_timeout)

    def _wait_for_address(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = READY.search(self.stdout_path.read_text(errors="replace"))
            if found:
                return found.group(1)
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"segsearch serve did not start (exit {self.process.returncode}):\n{self.logs()[-3000:]}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_bytes(self) -> int:
        """Resident set size of the server process now."""
        return psutil.Process(self.process.pid).memory_info().rss

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        """The last `lines` lines the server wrote (for error messages)."""
        return "\n".join(self.logs().splitlines()[-lines:])

    def logs(self) -> str:
        """Everything the server wrote so far, stdout then stderr."""
        return (self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(errors="replace"))

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (a clean drain) and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
            self.process.wait(10)
