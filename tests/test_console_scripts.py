"""Issue 29: every console script of the training package (`hf-clip-train`, `-evaluate`, `-finetune`, `-index`,
`-search`, `-serve`) answers `--help`, and turns a user error into one line "hf-clip-NAME: error: ..." on stderr and
exit status 2 (argparse's convention) with no traceback, while a bug keeps its traceback.

The scripts run as their entry points do (the functions of `hf_clip_train.cli` that setup.cfg's console_scripts
name), in one subprocess that calls each in turn with its argv and records its exit status, stdout and stderr: one
import of torch, Transformers and datasets instead of twelve."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DRIVER = r"""
import contextlib, io, json, sys, traceback
from hf_clip_train import cli

def run(name, argv):
    sys.argv, function = [f"hf-clip-{name}", *argv], getattr(cli, name)
    out, err, status = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            function()
        except SystemExit as exit:
            status = exit.code if isinstance(exit.code, int) else 1
        except BaseException:
            traceback.print_exc()
            status = "raised"
    return {"status": status, "stdout": out.getvalue(), "stderr": err.getvalue()}

def bug(argv):
    raise RuntimeError("a bug in the script")

results = {f"{name} {' '.join(argv)}": run(name, argv) for name, argv in json.loads(sys.argv[1])}
with contextlib.redirect_stderr(io.StringIO()) as err:
    try:
        cli.run_script(bug, "train")
        results["bug"] = "returned"
    except RuntimeError:
        traceback.print_exc()
results["bug"] = err.getvalue()
print(json.dumps(results))
"""


def test_every_console_script_answers_help_and_reports_a_user_error_as_one_line_with_status_2(tmp_path):
    missing_model, missing_data = str(tmp_path / "no-model"), str(tmp_path / "no-data")
    cases = {
        ("train", "--help"): (0, "--max_steps"),
        ("train", "--max_steps", "0"): (2, "hf-clip-train: error: --max_steps must be at least 1, got 0."),
        ("train", "--dataset_name", missing_data, "--output_dir", str(tmp_path / "run")): (
            2, f"hf-clip-train: error: --dataset_name {missing_data!r}: no such file or folder, and not a Hub dataset "
               "id ('name' or 'namespace/name')."),
        ("train", str(tmp_path / "recipe.yaml")): (
            2, f"hf-clip-train: error: Config file {str(tmp_path / 'recipe.yaml')!r} does not exist (a first argument "
               "ending in .yaml is read as a file of arguments)."),
        ("evaluate", "--help"): (0, "--eval_splits"),
        ("evaluate", "--model_name_or_path", missing_model): (
            2, f"hf-clip-evaluate: error: --model_name_or_path {missing_model!r}: no such directory, and not a Hub "
               "repo id ('name' or 'namespace/name')."),
        ("finetune", "--help"): (0, "--wise_ft_alpha"),
        ("finetune", "--model_name_or_path", missing_model, "--output_dir", str(tmp_path / "ft")): (
            2, f"hf-clip-finetune: error: --model_name_or_path {missing_model!r}: no such directory, and not a Hub "
               "repo id ('name' or 'namespace/name')."),
        ("index", "--help"): (0, "--target_recall"),
        ("index", "--shard_size", "0"): (2, "hf-clip-index: error: --shard_size must be at least 1, got 0."),
        ("search", "--help"): (0, "--target"),
        ("search", "INDEX", "cat", "-k", "0"): (2, "hf-clip-search: error: -k must be at least 1, got 0."),
        ("serve", "--help"): (0, "--max_image_pixels"),
        ("serve", "--model_name_or_path", missing_model): (
            2, f"hf-clip-serve: error: --model_name_or_path {missing_model!r}: no such folder, and not a Hub repo id "
               "('name' or 'namespace/name')."),
    }
    argvs = [[name, list(argv)] for name, *argv in cases]
    completed = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs)], cwd=tmp_path, capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = json.loads(completed.stdout.splitlines()[-1])
    for (name, *argv), (status, expected) in cases.items():
        result = results[f"{name} {' '.join(argv)}"]
        assert result["status"] == status, (name, argv, result)
        if status == 0:
            assert expected in result["stdout"] and result["stderr"] == "", (name, argv, result)
        else:
            assert "Traceback" not in result["stderr"], (name, argv, result)
            assert result["stderr"].splitlines()[-1] == expected, (name, argv, result)
    assert "Traceback" in results["bug"] and results["bug"].rstrip().endswith("RuntimeError: a bug in the script")
