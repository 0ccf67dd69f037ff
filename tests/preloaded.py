"""Python scripts for tests, run in processes forked from one that has already imported torch, torchvision, NumPy
and PIL (about 4 of a script's 6-7 s of imports here). A forked script still imports transformers, huggingface_hub
and datasets itself, after its environment is set, because they read it at import (HF_ENDPOINT, HF_HOME, caches).

    from preloaded import run_python
    result = run_python([script, *args], env=env, cwd=REPO, timeout=300)   # a subprocess.CompletedProcess

`run_python` takes what `python` takes after its own name: a script path, `-c CODE` or `-m MODULE`, then arguments.
The forking process runs this file (`python tests/preloaded.py`): it reads one JSON request per line on stdin and
answers, on stdout, one line with the child's pid, then one with its exit code.
"""

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path


def _child(request: dict) -> None:
    """Become the requested script: its stdio, environment, working directory, argv and thread count. Exits (through
    SystemExit, so atexit handlers and buffers run as in `python`)."""
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY),
                            (2, request["stderr"], os.O_WRONLY)):
        os.dup2(os.open(path, flags), fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    import runpy

    import torch

    if "OMP_NUM_THREADS" in os.environ:  # OpenMP read the forking process's value when torch was imported
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    args = request["args"]
    if args[0] == "-c":
        sys.argv, sys.path[0] = ["-c", *args[2:]], ""
        main = sys.modules["__main__"] = types.ModuleType("__main__")
        exec(compile(args[1], "<string>", "exec"), main.__dict__)
    elif args[0] == "-m":
        sys.argv, sys.path[0] = [args[1], *args[2:]], os.getcwd()
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv, sys.path[0] = list(args), str(Path(args[0]).resolve().parent)
        runpy.run_path(args[0], run_name="__main__")
    sys.exit(0)


def _serve() -> None:
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)


class _Forker:
    """The forking process this test process started, restarted if it died."""

    process: subprocess.Popen | None = None

    @classmethod
    def get(cls) -> subprocess.Popen:
        if cls.process is None or cls.process.poll() is not None:
            cls.process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           text=True, cwd=Path(__file__).parent)
            atexit.register(cls.process.kill)
        return cls.process

    @staticmethod
    def answer(process: subprocess.Popen, deadline: float | None) -> dict | None:
        """The next answer line, or None at the deadline."""
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not select.select([process.stdout], [], [], timeout)[0]:
            return None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError("The preloaded Python process died.")
        return json.loads(line)


def run_python(args: list[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None,
               timeout: float | None = None) -> subprocess.CompletedProcess:
    """`subprocess.run([sys.executable, *args], capture_output=True, text=True, ...)`, forked from a process with
    torch, torchvision, NumPy and PIL imported. Raises subprocess.TimeoutExpired after killing the script."""
    process = _Forker.get()
    with tempfile.TemporaryDirectory(prefix="preloaded-") as folder:
        stdout, stderr = Path(folder) / "stdout", Path(folder) / "stderr"
        stdout.touch()
        stderr.touch()
        request = {"args": [str(arg) for arg in args], "env": dict(os.environ if env is None else env),
                   "cwd": str(cwd or os.getcwd()), "stdout": str(stdout), "stderr": str(stderr)}
        process.stdin.write(json.dumps(request) + "\n")
        process.stdin.flush()
        pid = _Forker.answer(process, None)["pid"]
        finished = _Forker.answer(process, None if timeout is None else time.monotonic() + timeout)
        if finished is None:
            os.kill(pid, signal.SIGKILL)
            _Forker.answer(process, None)
            raise subprocess.TimeoutExpired([sys.executable, *request["args"]], timeout, stdout.read_text(),
                                            stderr.read_text())
        return subprocess.CompletedProcess([sys.executable, *request["args"]], finished["returncode"],
                                           stdout.read_text(), stderr.read_text())


if __name__ == "__main__":
    _serve()
