"""Every ```python block of README.md runs, in order, as one script in a fresh directory, against the test Hub."""

import json
import re
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import ALICE_TOKEN, FAST_TRAINING_ARGS, hub_env, train_in_process

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

pytestmark = pytest.mark.slow


def test_readme_python_blocks_run(tmp_path, hub_server):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 5
    script = tmp_path / "readme.py"
    script.write_text("\n\n".join(blocks))
    env = hub_env(hub_server, tmp_path / "hf_home", token=ALICE_TOKEN)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env=env)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "'label': 'red circle'" in result.stdout
    assert (tmp_path / "tiny-clip" / "model.safetensors").exists()
    files = hub_server.hub.repos["alice/tiny-clip"].history("main")[0].files
    assert files["model.safetensors"] == (tmp_path / "tiny-clip" / "model.safetensors").read_bytes()
    assert "zero_shot_top1" in json.loads(files["eval_results.json"])["test"]
    assert f"{hub_server.url}/alice/tiny-clip/commit/" in result.stdout


def test_readme_hub_server_command_serves_the_hub_api(tmp_path):
    """`python tests/hub_server.py ...` from the README's "Share your model" section."""
    command = re.search(r"^(python tests/hub_server\.py .*?) &$", README.read_text(), flags=re.MULTILINE).group(1)
    args = command.split()[2:]
    args[args.index("--port") + 1] = "0"
    token = args[args.index("--token") + 1]
    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "hub_server.py"), *args], stdout=subprocess.PIPE,
                              text=True)
    try:
        url = re.search(r"http://[\d.:]+", server.stdout.readline()).group(0)
        request = urllib.request.Request(f"{url}/api/whoami-v2", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.loads(response.read())["name"] == args[args.index("--user") + 1]
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_readme_siglip_training_command_trains_a_siglip_model(tmp_path):
    """The "Large batches" section's `--loss_type siglip` command, as written, with the suite's fast settings and the
    output directory appended (later flags win), run in this process (`conftest.train_in_process`)."""
    command = re.search(r"^(python -m hf_clip_train\.train .*--loss_type siglip.*)$", README.read_text(),
                        flags=re.MULTILINE).group(1)
    args = command.split()[3:]
    output_dir = tmp_path / "run"
    train_in_process([*args, *FAST_TRAINING_ARGS, "--max_steps", "2", "--eval_splits", "test", "--output_dir",
                      output_dir])
    config = json.loads((output_dir / "config.json").read_text())
    assert config["loss_type"] == "siglip" and config["logit_bias_init_value"] == -10.0


def test_readme_fast_test_command_collects_the_suite():
    """The Development section's `.venv/bin/pytest -m "not slow"`, as written (the `pytest` script, not `python -m
    pytest`, so the repository root is not on sys.path by default), collects every test module without an error."""
    command = re.search(r'^\.venv/bin/(pytest -m "not slow")', README.read_text(), flags=re.MULTILINE).group(1)
    args = shlex.split(command)[1:]
    pytest_script = Path(sys.executable).parent / "pytest"
    result = subprocess.run([str(pytest_script), *args, "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-5000:]
    assert "tests/test_data_path.py::" in result.stdout
