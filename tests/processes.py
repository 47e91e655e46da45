"""Child processes the suite and the benchmarks start (Celery workers, gunicorn), each in a session
of its own, so stop() ends it and everything it forked, and nothing else."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Process:
    """`cmd` run from the project's root with `env`, its output in `log_path`."""

    def __init__(self, cmd: list[str], *, log_path: Path, env: dict[str, str]):
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop() or kill()
        self.process = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def exited(self) -> str | None:
        """None while the process runs; once it ended, why, from the end of its log."""
        if self.process.poll() is None:
            return None
        return f"{self.log_path.name} exited: {self.log()[-3000:]}"

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, timeout: float = 20) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log.close()

    def kill(self) -> None:
        """SIGKILL the process and everything it forked at once, as a lost host would vanish."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self._log.close()


def free_port() -> int:
    """A loopback port nothing listens on now, for a server the caller starts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
