"""The commands of README.md and of every docs/*.md page run.

Every ```python block runs: each page's blocks in order, as one script in a fresh namespace, the README's first, in
one process and one fresh directory (so every page can use the `tiny-clip` folder the README's quick start saves),
against the test Hub. Every command of a ```bash block is run by a test: either by a test of this file, which finds
it in its page, or by the test that `COMMANDS` names for it; a command that no entry of `COMMANDS` matches fails
`test_every_docs_command_is_run_by_a_test`, so a page cannot add an untested command. Every relative link resolves.
The tests that run something are `slow`; the checks of the pages themselves are fast.
"""

import ast
import json
import os
import re
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import (
    ALICE_TOKEN,
    FAST_TRAINING_ARGS,
    copy_package_sources,
    hub_env,
    save_tiny_transformers_clip,
    script_in_process,
    train_in_process,
)

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]


HERE = "tests/test_readme.py::"
# Each command of a ```bash block in README.md or docs/*.md (continuation lines joined, comments dropped) -> the test
# that runs it. A test of this file finds its commands in their page itself; the other tests run the same command
# with the paths, model and data of the test (the docstring or the flags of the named test say how).
COMMANDS: dict[str, str] = {
    r"pip install .*": HERE + "test_pip_install_commands_resolve_in_this_environment",
    r"make demo( DEMO_ARGS=.*)?": HERE + "test_make_demo_trains_evaluates_and_saves_the_demo_model",
    r"python -m hf_clip_train\.train --dataset_name path/to/imagefolder .*":
        HERE + "test_image_folder_command_trains_from_scratch",
    r"python -m hf_clip_train\.train --dataset_name \"data/\*\.parquet\" --streaming .*":
        HERE + "test_parquet_glob_command_streams_and_fine_tunes_a_clip_checkpoint_with_a_locked_image_tower",
    r"python -m hf_clip_train\.train recipe\.yaml --learning_rate 5e-4":
        "tests/test_training_data.py::test_config_file_with_command_line_override",
    r"python -m hf_clip_train\.train --help": HERE + "test_help_command_lists_every_argument",
    r"python examples/digits\.py outputs/digits-data|"
    r"python -m hf_clip_train\.train --dataset_name outputs/digits-data .*":
        "tests/test_small_real_dataset.py::test_readme_digits_commands_reach_95_percent_zero_shot_from_scratch",
    r"python -m hf_clip_train\.evaluate --model_name_or_path outputs/demo":
        "tests/test_training_run.py::test_main_job_trains_evaluates_saves_and_runs_the_pipeline",
    r"python -m hf_clip_train\.evaluate --model_name_or_path DIR --dataset_name DATA .*":
        HERE + "test_evaluate_command_on_a_dataset_with_templates",
    r"accelerate launch -m hf_clip_train\.train --dataset_name DATA --per_device_train_batch_size 256|"
    r"accelerate launch --multi_gpu --num_machines 2 .* -m hf_clip_train\.train .*|"
    r"sbatch examples/slurm_multinode\.sh .*":
        "tests/test_multinode.py::test_two_nodes_from_the_slurm_script_match_one_process",
    r"torchrun --nproc_per_node 8 -m hf_clip_train\.train .*":
        "tests/test_training_run.py::test_torchrun_two_processes_match_one_process",
    r"accelerate launch --num_processes 2 --use_fsdp --fsdp_version 2 .*":
        "tests/test_fsdp.py::test_fsdp2_on_two_cpu_processes_trains_clamps_saves_and_resumes_like_one_process",
    r"python -m hf_clip_train\.train --patch_dropout 0\.5|python -m hf_clip_train\.train --torch_compile":
        "tests/test_training_scaling.py::test_compiled_patch_dropout_run_saves_resumes_and_pushes_without_orig_mod_keys",
    r"python -m hf_clip_train\.train --per_device_train_batch_size 1024 --grad_cache_micro_batches 16":
        "tests/test_training_scaling.py::test_grad_cache_run_follows_the_plain_run",
    r"python -m hf_clip_train\.train --loss_type siglip .*":
        HERE + "test_readme_siglip_training_command_trains_a_siglip_model",
    r"python -m hf_clip_train\.train --output_dir outputs/demo --push_to_hub .*":
        "tests/test_hub.py::test_training_run_pushes_model_card_and_results",
    r"python tests/hub_server\.py .* &": HERE + "test_readme_hub_server_command_serves_the_hub_api",
    r"export HF_ENDPOINT=.*": HERE + "test_hub_environment_command_points_at_the_hub_server_command",
    r"hf-clip-index --model_name_or_path outputs/demo .*":
        "tests/test_search.py::test_text_query_returns_red_circles_and_image_queries_find_themselves",
    r"hf-clip-search outputs/shapes-index \"a red circle\" -k 5 --html hits\.html|"
    r"hf-clip-search outputs/shapes-index --image query\.png -k 10":
        "tests/test_search.py::test_search_cli_prints_a_table_and_writes_an_html_page",
    r"hf-clip-search outputs/shapes-index \"a red circle\" --target text":
        "tests/test_search.py::test_caption_search_and_exact_search_without_faiss",
    r"accelerate launch -m hf_clip_train\.search index .*":
        "tests/test_search.py::test_two_processes_give_the_one_process_result",
    r"hf-clip-index \.\.\. --index_type ivf_pq .*":
        "tests/test_search.py::test_approximate_index_measures_its_recall_and_agrees_with_exact",
    r"python -m hf_clip_train\.finetune_trainer --model_name_or_path outputs/demo --output_dir outputs/demo-tuned .*":
        "tests/test_finetune_trainer.py::test_contrastive_fine_tuning_lowers_eval_loss_and_saves_loadable_checkpoints",
    r"torchrun --nproc_per_node 2 -m hf_clip_train\.finetune_trainer .*":
        "tests/test_finetune_trainer.py::test_trainer_under_torchrun_uses_the_global_batch",
    r"python -m hf_clip_train\.finetune_trainer --task image-classification .*":
        "tests/test_finetune_trainer.py::test_classifier_from_zero_shot_fine_tuned_with_trainer_beats_zero_shot",
    r"hf-clip-serve --index outputs/index --port 8000 &|(until )?curl .*http://127\.0\.0\.1:8000/.*":
        "tests/test_serve.py::test_docs_serve_md_commands_run",
    r"hf-clip-export onnx tiny-clip tiny-clip-onnx --quantize":
        "tests/test_onnx_export.py::test_export_writes_graphs_processor_and_readme",
    r"make (test|lint|bench)": HERE + "test_make_test_lint_and_bench_run_what_development_md_says",
    r"\.venv/bin/pytest -m \"not slow\"": HERE + "test_readme_fast_test_command_collects_the_suite",
    r"HF_CLIP_COMMON_FAMILY=transformers \.venv/bin/pytest tests/test_transformers_common\.py":
        HERE + "test_common_tests_command_collects_them_for_transformers_clip",
    r"\.venv/bin/python benchmarks/gpu_suite\.py": HERE + "test_gpu_suite_command_runs_on_a_gpu_and_refuses_a_cpu",
    r"\.venv/bin/python benchmarks/gpu_suite\.py --smoke": "tests/test_gpu_suite.py::test_smoke_run_gives_every_row",
    r"python -m hf_clip_train\.train --output_dir outputs/vit-roberta --vision_model_name_or_path \S+ "
    r"--text_model_name_or_path .*":
        "tests/test_training_towers.py::"
        "test_lit_run_through_the_cli_saves_the_locked_tower_bit_identical_and_the_pipeline_reloads_it",
    r"python examples/pretrain_vision\.py outputs/vit-shapes|"
    r"python -m hf_clip_train\.train --output_dir outputs/(lit|scratch) .*":
        "tests/test_training_towers.py::test_docs_lit_commands_pretrain_a_backbone_and_run_lit_as_written",
}


def _outside_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


# Pages whose ```python blocks need what only their own test sets up -> that test (which runs every block of the page).
PYTHON_BLOCKS_RUN_ELSEWHERE: dict[str, str] = {
    "docs/serve.md": "tests/test_serve.py::test_docs_serve_md_commands_run",  # the OpenAI client needs a server
    "docs/towers.md": "tests/test_towers_docs.py::test_every_docs_towers_code_block_runs",  # pretrained folders
}


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.MULTILINE | re.DOTALL)


def _strip_comment(line: str) -> str:
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def shell_commands(page: Path) -> list[str]:
    """The commands of the page's ```bash blocks: continuation lines joined, comments and blank lines dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", page.read_text(), flags=re.MULTILINE | re.DOTALL):
        for command in re.sub(r"\s*\\\n\s*", " ", block).splitlines():
            if command := _strip_comment(command):
                commands.append(command)
    return commands


def shell_words(command: str, cwd: Path) -> list[str]:
    """`command`'s words after bash's expansions (quotes, globs) in `cwd`: what the program's argv receives."""
    result = subprocess.run(["bash", "-c", f"printf '%s\\0' {command}"], cwd=cwd, capture_output=True, text=True,
                            check=True)
    return result.stdout.split("\0")[:-1]


def command_in(page: str, pattern: str) -> str:
    """The one command of `page` that `pattern` matches in full."""
    found = [command for command in shell_commands(REPO / page) if re.fullmatch(pattern, command)]
    assert len(found) == 1, f"{page}: {len(found)} commands match {pattern!r}: {found}"
    return found[0]


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, hub_server):
    pages = [page for page in PAGES
             if python_blocks(page) and page.relative_to(REPO).as_posix() not in PYTHON_BLOCKS_RUN_ELSEWHERE]
    blocks = [block for page in pages for block in python_blocks(page)]
    assert len(blocks) >= 5
    scripts = []
    for page in pages:
        scripts.append(tmp_path / "pages" / f"{page.relative_to(REPO).as_posix().replace('/', '_')}.py")
        scripts[-1].parent.mkdir(exist_ok=True)
        scripts[-1].write_text("\n\n".join(python_blocks(page)))
    script = tmp_path / "readme.py"
    script.write_text("import runpy\nimport sys\n\nfor page in sys.argv[1:]:\n"
                      "    print(f'--- {page}', flush=True)\n    runpy.run_path(page, run_name='__main__')\n")
    env = hub_env(hub_server, tmp_path / "hf_home", token=ALICE_TOKEN)
    result = subprocess.run([sys.executable, str(script), *map(str, scripts)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "'label': 'red circle'" in result.stdout
    assert (tmp_path / "tiny-clip" / "model.safetensors").exists()
    files = hub_server.hub.repos["alice/tiny-clip"].history("main")[0].files
    assert files["model.safetensors"] == (tmp_path / "tiny-clip" / "model.safetensors").read_bytes()
    assert "zero_shot_top1" in json.loads(files["eval_results.json"])["test"]
    assert f"{hub_server.url}/alice/tiny-clip/commit/" in result.stdout


@pytest.mark.slow
def test_readme_hub_server_command_serves_the_hub_api(tmp_path):
    """`python tests/hub_server.py ...` from docs/hub.md's "Try it offline" section."""
    command = re.search(r"^(python tests/hub_server\.py .*?) &$", (DOCS / "hub.md").read_text(),
                        flags=re.MULTILINE).group(1)
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


def test_hub_environment_command_points_at_the_hub_server_command():
    """docs/hub.md's `export HF_ENDPOINT=... HF_TOKEN=...` names the port and token its server command starts with
    (the server itself: test_readme_hub_server_command_serves_the_hub_api)."""
    page = "docs/hub.md"
    server = command_in(page, r"python tests/hub_server\.py .* &").split()
    variables = dict(word.split("=", 1) for word in command_in(page, r"export HF_ENDPOINT=.*").split()[1:])
    assert variables == {"HF_ENDPOINT": f"http://127.0.0.1:{server[server.index('--port') + 1]}",
                         "HF_TOKEN": server[server.index("--token") + 1]}


@pytest.mark.slow
def test_readme_siglip_training_command_trains_a_siglip_model(tmp_path):
    """docs/loss.md's `--loss_type siglip` command, as written, with the suite's fast settings and the output directory
    appended (later flags win), run in this process (`conftest.train_in_process`)."""
    command = re.search(r"^(python -m hf_clip_train\.train .*--loss_type siglip.*)$", (DOCS / "loss.md").read_text(),
                        flags=re.MULTILINE).group(1)
    args = command.split()[3:]
    output_dir = tmp_path / "run"
    train_in_process([*args, *FAST_TRAINING_ARGS, "--max_steps", "2", "--eval_splits", "test", "--output_dir",
                      output_dir])
    config = json.loads((output_dir / "config.json").read_text())
    assert config["loss_type"] == "siglip" and config["logit_bias_init_value"] == -10.0


@pytest.mark.slow
def test_readme_fast_test_command_collects_the_suite():
    """docs/development.md's `.venv/bin/pytest -m "not slow"`, as written (the `pytest` script, not `python -m
    pytest`, so the repository root is not on sys.path by default), collects every test module without an error."""
    command = re.search(r'^\.venv/bin/(pytest -m "not slow")', (DOCS / "development.md").read_text(),
                        flags=re.MULTILINE).group(1)
    args = shlex.split(command)[1:]
    pytest_script = Path(sys.executable).parent / "pytest"
    result = subprocess.run([str(pytest_script), *args, "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-5000:]
    assert "tests/test_data_path.py::" in result.stdout


def test_every_docs_command_is_run_by_a_test():
    """Each command of a ```bash block is matched by an entry of COMMANDS, each entry matches a command, and each
    test named there exists."""
    commands = {(page.relative_to(REPO).as_posix(), command) for page in PAGES for command in shell_commands(page)}
    assert len(commands) >= 30
    untested = sorted(f"{page}: {command}" for page, command in commands
                      if not any(re.fullmatch(pattern, command) for pattern in COMMANDS))
    assert not untested, ("commands that no test runs (run them in tests/test_readme.py, or name the test that runs "
                          f"them in its COMMANDS): {untested}")
    unused = [pattern for pattern in COMMANDS if not any(re.fullmatch(pattern, c) for _, c in commands)]
    assert not unused, f"COMMANDS entries that match no command of README.md or docs/: {unused}"
    for test in {*COMMANDS.values(), *PYTHON_BLOCKS_RUN_ELSEWHERE.values()}:
        path, name = test.split("::")
        defined = {node.name for node in ast.walk(ast.parse((REPO / path).read_text()))
                   if isinstance(node, ast.FunctionDef)}
        assert name in defined, f"COMMANDS names {test}, which does not exist"


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation but `-` and `_` dropped, spaces as `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_github_anchor(heading) for heading in re.findall(r"^#+ (.+)$", _outside_fences(page.read_text()),
                                                              flags=re.MULTILINE)}


def test_every_relative_link_resolves():
    """Each relative link and image of README.md and docs/*.md names a file that exists, and a `#anchor` names a
    heading of its page; every docs/*.md page is linked from README.md."""
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", _outside_fences(page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{page.name}: {target} (no heading with that anchor)")
    assert not broken, broken
    linked = {(README.parent / target.partition("#")[0]).resolve()
              for target in re.findall(r"\]\((docs/[^)\s]+)\)", README.read_text())}
    assert {page.resolve() for page in PAGES[1:]} <= linked, "docs/ pages the README does not link"


def test_readme_layout_names_every_top_level_folder():
    """The README's package-level layout table names each folder of the repository that git tracks, and only
    folders that exist."""
    section = README.read_text().split("\n## Layout\n", 1)[1]
    named = set(re.findall(r"^\| `([\w./-]+)/` \|", section, flags=re.MULTILINE))
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    folders = {path.split("/")[0] for path in tracked.splitlines() if "/" in path and not path.startswith(".")}
    assert folders - {"training"} <= named and "training/hf_clip_train" in named, folders - named
    assert all((REPO / path).is_dir() for path in named), named


@pytest.mark.slow
def test_pip_install_commands_resolve_in_this_environment(tmp_path):
    """Each `pip install` command, as written plus `--dry-run --no-index --no-build-isolation`, in a copy of the
    sources: every extra it names exists, and every package it needs is in the dev environment (so resolves
    without an index)."""
    source = copy_package_sources(tmp_path / "source")
    commands = sorted({c for page in PAGES for c in shell_commands(page) if c.startswith("pip install ")})
    assert len(commands) >= 7 and 'pip install -e ".[train,search]"' in commands
    for command in commands:
        words = shell_words(command, source)
        result = subprocess.run([sys.executable, "-m", *words, "--dry-run", "--no-index", "--no-build-isolation"],
                                cwd=source, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (command, result.stderr[-3000:])
        assert "does not provide the extra" not in result.stdout + result.stderr, (command, result.stderr)
        assert ("Would install hf-clip" in result.stdout) == ("-e" in words), (command, result.stdout[-2000:])


def _make(*args: str, stamp: Path) -> str:
    """`make -n ARGS` with this interpreter as the venv's and the venv up to date: the recipe make would run."""
    stamp.touch()
    result = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(REPO), *args, f"PY={sys.executable}",
                             f"STAMP={stamp}"], capture_output=True, text=True, timeout=60, check=True)
    return result.stdout


@pytest.mark.slow
def test_make_demo_trains_evaluates_and_saves_the_demo_model(tmp_path):
    """Both `make demo` commands (README.md, docs/training.md): the recipe make runs is the command their comment
    names (with DEMO_ARGS appended), and it trains, evaluates and saves, run in this process with the suite's fast
    settings appended."""
    demo = command_in("docs/training.md", r"make demo")
    fp32 = command_in("docs/training.md", r"make demo DEMO_ARGS=.*")
    assert command_in("README.md", r"make demo") == demo
    named = re.search(r"^make demo +# = make install, then: (\.venv/bin/python .*)$",
                      (DOCS / "training.md").read_text(), flags=re.MULTILINE).group(1)
    recipe = _make(*shell_words(demo, REPO)[1:], stamp=tmp_path / "stamp").strip()
    assert recipe == named.replace(".venv/bin/python", sys.executable)
    fp32_recipe = _make(*shell_words(fp32, REPO)[1:], stamp=tmp_path / "stamp").strip()
    assert fp32_recipe == f"{recipe} {shell_words(fp32, REPO)[2].removeprefix('DEMO_ARGS=')}"
    output_dir = tmp_path / "demo"
    train_in_process([*shell_words(fp32_recipe, REPO)[3:], *FAST_TRAINING_ARGS, "--max_steps", "2", "--eval_splits",
                      "test", "--output_dir", output_dir])
    assert json.loads((output_dir / "config.json").read_text())["vision_config"]["patch_size"] == 16
    for name in ("model.safetensors", "eval_results.json", "README.md", "metrics.jsonl", "processor_config.json"):
        assert (output_dir / name).is_file(), name
    assert "zero_shot_top1" in json.loads((output_dir / "eval_results.json").read_text())["test"]


@pytest.mark.slow
def test_make_test_lint_and_bench_run_what_development_md_says(tmp_path):
    """`make lint` runs (ruff passes); `make test` runs lint, installs the browser test's Chromium where it is missing,
    and then runs the whole suite in 2 pytest-xdist workers;
    `make bench` runs every benchmarks/bench_*.py (each measured apart: docs/benchmarks.md)."""
    commands = [command_in("docs/development.md", rf"make {target}") for target in ("test", "lint", "bench")]
    stamp = tmp_path / "stamp"
    stamp.touch()
    lint = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), *commands[1].split()[1:],
                           f"PY={sys.executable}", f"STAMP={stamp}"], capture_output=True, text=True, timeout=300)
    assert lint.returncode == 0, lint.stdout[-3000:] + lint.stderr[-3000:]
    test_recipe = _make(*commands[0].split()[1:], stamp=stamp).splitlines()
    assert test_recipe == [f"{sys.executable} -m ruff check .", ".ci/install-browser",
                           f"HF_CLIP_REQUIRE_COMMON_TESTS=1 {sys.executable} -m pytest -n 2 --dist worksteal tests"]
    bench_recipe = _make(*commands[2].split()[1:], stamp=stamp)
    ran = set(re.findall(r"benchmarks/(bench_\w+\.py)", bench_recipe))
    assert ran == {path.name for path in (REPO / "benchmarks").glob("bench_*.py")}


@pytest.mark.slow
def test_common_tests_command_collects_them_for_transformers_clip():
    """docs/development.md's `HF_CLIP_COMMON_FAMILY=transformers .venv/bin/pytest tests/test_transformers_common.py`,
    as written plus `--collect-only`: the family is accepted and Transformers' common tests collect for CLIP."""
    if not (REPO / "tests" / "transformers_common" / "test_modeling_common.py").is_file():
        pytest.skip("Transformers' common mixins are not extracted; `make install` runs tests/transformers_common/"
                    "fetch.py.")
    command = command_in("docs/development.md", r"HF_CLIP_COMMON_FAMILY=.*")
    variable, program, *args = shlex.split(command)
    env = {**os.environ, **dict([variable.split("=", 1)])}
    pytest_script = Path(sys.executable).parent / Path(program).name
    result = subprocess.run([str(pytest_script), *args, "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-5000:]
    assert int(re.search(r"(\d+) tests? collected", result.stdout).group(1)) > 100


@pytest.mark.slow
def test_gpu_suite_command_runs_on_a_gpu_and_refuses_a_cpu(tmp_path, capsys, monkeypatch):
    """docs/development.md's `benchmarks/gpu_suite.py` with no budget left (`--budget 0`, so that no row starts):
    on a GPU it writes its table; without one it stops, pointing to `--smoke`."""
    import torch

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_suite

    command = command_in("docs/development.md", r"\.venv/bin/python benchmarks/gpu_suite\.py")
    output = tmp_path / "suite.md"
    argv = [*command.split()[2:], "--budget", "0", "--output", str(output)]
    if torch.cuda.is_available():
        assert gpu_suite.main(argv) == 0
        assert "not run: the suite's time budget is spent" in output.read_text()
    else:
        with pytest.raises(SystemExit) as exited:
            gpu_suite.main(argv)
        assert exited.value.code == 2
        assert "no CUDA device here; run with --smoke" in capsys.readouterr().err


@pytest.mark.slow
def test_help_command_lists_every_argument(capsys):
    from hf_clip_train import train

    command = command_in("docs/data.md", r"python -m hf_clip_train\.train --help")
    with pytest.raises(SystemExit) as exited:
        train.main(command.split()[3:])
    assert exited.value.code == 0
    printed = capsys.readouterr().out
    for flag in ("--dataset_name", "--image_column", "--caption_column", "--preset", "--resume_from_checkpoint",
                 "--loss_type", "--push_to_hub"):
        assert flag in printed, flag


def _image_rows(count: int) -> list[tuple]:
    from PIL import Image

    colours = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 90, 230), "yellow": (230, 210, 40)}
    rows = []
    for i in range(count):
        name = list(colours)[i % 4]
        image = Image.new("RGB", (32, 32), colours[name])
        image.paste((255, 255, 255), (4 + i % 8, 4 + i % 7, 20 + i % 8, 20 + i % 7))
        rows.append((image, f"a {name} picture with a white square", i % 4))
    return rows


@pytest.mark.slow
def test_image_folder_command_trains_from_scratch(tmp_path):
    """The imagefolder command of README.md and docs/data.md, as written (the folder moved to `tmp_path`), with the
    suite's fast settings and the `tiny` preset appended: an imagefolder with a `text` caption column in its
    metadata.jsonl trains a model whose image size follows the data."""
    pattern = r"python -m hf_clip_train\.train --dataset_name path/to/imagefolder .*"
    command = command_in("README.md", pattern)
    assert command_in("docs/data.md", pattern) == command
    folder = tmp_path / "path" / "to" / "imagefolder"
    folder.mkdir(parents=True)
    lines = []
    for i, (image, caption, _) in enumerate(_image_rows(40)):
        image.save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    output_dir = tmp_path / "run"
    train_in_process([*shell_words(command, tmp_path)[3:], *FAST_TRAINING_ARGS, "--preset", "tiny", "--max_steps", "2",
                      "--dataset_name", str(folder), "--output_dir", output_dir])
    vision = json.loads((output_dir / "config.json").read_text())["vision_config"]
    assert (vision["image_size"], vision["patch_size"]) == (32, 8)
    logged = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in logged if "loss" in line] == [1, 2]


@pytest.mark.slow
def test_parquet_glob_command_streams_and_fine_tunes_a_clip_checkpoint_with_a_locked_image_tower(tmp_path, tokenizer):
    """docs/data.md's parquet command, as bash expands it in a folder with two parquet files (the quoted glob reaches
    the script whole), with a local Transformers CLIP checkpoint for `openai/clip-vit-base-patch32` and the suite's
    fast settings appended: it streams both files, and the locked layers of the image tower stay as they were."""
    import torch
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageColumn
    from safetensors.torch import load_file
    command = command_in("docs/data.md", r"python -m hf_clip_train\.train --dataset_name \"data/\*\.parquet\" .*")
    rows = _image_rows(40)
    (tmp_path / "data").mkdir()
    for part in range(2):
        Dataset.from_dict({"image": [row[0] for row in rows[part::2]], "caption": [row[1] for row in rows[part::2]]},
                          features=Features({"image": ImageColumn(), "caption": Value("string")}),
                          ).to_parquet(tmp_path / "data" / f"part-{part}.parquet")
    start = save_tiny_transformers_clip(tmp_path / "clip-vit-base-patch32", tokenizer, num_hidden_layers=3)

    args = shell_words(command, tmp_path)[3:]
    assert args[:2] == ["--dataset_name", "data/*.parquet"]
    args[1] = str(tmp_path / "data" / "*.parquet")
    args[args.index("--model_name_or_path") + 1] = str(start)
    output_dir = tmp_path / "run"
    train_in_process([*args, *FAST_TRAINING_ARGS, "--max_steps", "2", "--output_dir", output_dir])
    before, after = load_file(start / "model.safetensors"), load_file(output_dir / "model.safetensors")
    assert torch.equal(before["vision_model.encoder.layers.0.mlp.fc1.weight"],
                       after["vision_model.encoder.layers.0.mlp.fc1.weight"])
    assert not torch.equal(before["vision_model.encoder.layers.2.mlp.fc1.weight"],
                           after["vision_model.encoder.layers.2.mlp.fc1.weight"])
    assert not torch.equal(before["text_model.encoder.layers.0.mlp.fc1.weight"],
                           after["text_model.encoder.layers.0.mlp.fc1.weight"])


@pytest.mark.slow
def test_evaluate_command_on_a_dataset_with_templates(tmp_path, saved_checkpoint):
    """docs/training.md's `hf_clip_train.evaluate --model_name_or_path DIR --dataset_name DATA --eval_splits test
    --templates ...`, with a saved model for DIR and a `save_to_disk` dataset with a ClassLabel column for DATA:
    zero-shot accuracy over its classes and retrieval recall on its `test` split."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
    from datasets import Image as ImageColumn

    from hf_clip_train import evaluate

    command = command_in("docs/training.md", r"python -m hf_clip_train\.evaluate --model_name_or_path DIR .*")
    rows = _image_rows(12)
    features = Features({"image": ImageColumn(), "caption": Value("string"),
                         "label": ClassLabel(names=["red", "green", "blue", "yellow"])})
    DatasetDict({"test": Dataset.from_dict({"image": [r[0] for r in rows], "caption": [r[1] for r in rows],
                                           "label": [r[2] for r in rows]}, features=features)}
                ).save_to_disk(tmp_path / "data")
    args = shell_words(command, tmp_path)[3:]
    args[args.index("DIR")] = str(saved_checkpoint)
    args[args.index("DATA")] = str(tmp_path / "data")
    assert args[args.index("--templates") + 1] == "a photo of a {}."
    results, _ = script_in_process(evaluate.main, [*args, "--dataloader_num_workers", "0", "--output_file",
                                                   tmp_path / "eval.json"])
    assert set(results) == {"test"} and results["test"]["num_samples"] == 12
    assert 0.0 <= results["test"]["zero_shot_top1"] <= results["test"]["zero_shot_top5"] == 1.0
    assert json.loads((tmp_path / "eval.json").read_text()) == results
