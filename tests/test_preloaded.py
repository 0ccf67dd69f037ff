"""tests/preloaded.py: scripts forked from a process with torch imported behave as under `python`."""

import json
import subprocess
import sys

import pytest
from preloaded import run_python

PROBE = ("import json, os, sys, torch; print(json.dumps({'argv': sys.argv, 'cwd': os.getcwd(), 'path0': sys.path[0], "
         "'name': __name__, 'threads': torch.get_num_threads(), 'marker': os.environ.get('PRELOADED_MARKER'), "
         "'transformers_before': 'transformers' in sys.modules})); sys.stderr.write('to stderr'); sys.exit(3)")


@pytest.mark.slow
def test_scripts_get_their_argv_environment_directory_threads_and_exit_code(tmp_path):
    env = {"PRELOADED_MARKER": "set", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    result = run_python(["-c", PROBE, "first", "second"], env=env, cwd=tmp_path, timeout=60)
    report = json.loads(result.stdout)
    assert (result.returncode, result.stderr) == (3, "to stderr")
    assert report == {"argv": ["-c", "first", "second"], "cwd": str(tmp_path), "path0": "", "name": "__main__",
                      "threads": 1, "marker": "set", "transformers_before": False}

    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    report = json.loads(run_python([str(script), "arg"], env=env, cwd="/", timeout=60).stdout)
    assert (report["argv"], report["path0"], report["cwd"]) == ([str(script), "arg"], str(tmp_path), "/")
    (tmp_path / "probe_module.py").write_text(PROBE)
    report = json.loads(run_python(["-m", "probe_module", "arg"], env=env, cwd=tmp_path, timeout=60).stdout)
    assert (report["argv"][1:], report["path0"], report["name"]) == (["arg"], str(tmp_path), "__main__")


@pytest.mark.slow
def test_an_uncaught_exception_exits_1_with_its_traceback_and_a_timeout_kills_the_script():
    result = run_python(["-c", "raise ValueError('boom')"], timeout=60)
    assert result.returncode == 1 and result.stderr.rstrip().endswith("ValueError: boom")
    with pytest.raises(subprocess.TimeoutExpired):
        run_python(["-c", "import time; time.sleep(60)"], timeout=1)
    assert run_python(["-c", "print('still serving')"], timeout=60).stdout == "still serving\n"
    assert sys.executable in run_python(["-c", "import sys; print(sys.executable)"], timeout=60).stdout
