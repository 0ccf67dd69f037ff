"""`hf-clip-serve` in a child process, for scripts, notebooks, tests and benchmarks.

    with ServerProcess(["--index", "OUT", "--port", "0"]) as server:   # returns once the server prints its URL
        httpx.post(f"{server.url}/search", json={"query": "a red circle", "k": 5})
"""

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

URL_LINE = re.compile(r"hf-clip-serve: serving .* on (?P<url>http://\S+) \(page")


class ServerProcess:
    """`python -m hf_clip_train.serve ARGS` with its stdout and stderr in files (`output()`), started on entering and
    stopped with SIGTERM (the server finishes its requests in flight, then exits) on leaving."""

    def __init__(self, args: list, env: dict[str, str] | None = None, startup_timeout: float = 180.0,
                 log_dir: str | Path | None = None):
        self.args, self.env, self.startup_timeout = [str(arg) for arg in args], env, startup_timeout
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="hf-clip-serve-"))
        self.process: subprocess.Popen | None = None
        self.url: str | None = None

    def start(self) -> "ServerProcess":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._stdout = open(self.log_dir / "stdout.txt", "w+")
        self._stderr = open(self.log_dir / "stderr.txt", "w+")
        self.process = subprocess.Popen([sys.executable, "-m", "hf_clip_train.serve", *self.args],
                                        stdout=self._stdout, stderr=self._stderr, env=self.env or dict(os.environ))
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            match = URL_LINE.search(self.stdout())
            if match:
                self.url = match["url"]
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"hf-clip-serve exited with {self.process.returncode} before serving:\n"
                                   f"{self.output()[-5000:]}")
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"hf-clip-serve did not print its URL within {self.startup_timeout} s:\n"
                           f"{self.output()[-5000:]}")

    def stdout(self) -> str:
        return (self.log_dir / "stdout.txt").read_text()

    def output(self) -> str:
        return self.stdout() + (self.log_dir / "stderr.txt").read_text()

    def terminate(self) -> None:
        """Send SIGTERM (the server stops accepting connections, answers those in flight, then exits)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the exit (SIGKILL after `timeout` seconds); the exit code."""
        if self.process is None:
            return 0
        self.terminate()
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._stdout.close()
        self._stderr.close()
        return code

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
