"""What the wheel installs, and the console scripts without the training extra."""

import json
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from conftest import copy_package_sources

from hf_clip_train import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_hf_clip_and_hf_clip_train_but_no_training_package(tmp_path):
    source = copy_package_sources(tmp_path / "source")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    wheel = zipfile.ZipFile(next((tmp_path / "dist").glob("hf_clip-*.whl")))
    names = wheel.namelist()
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {
        "hf_clip", "hf_clip_train"}
    assert {"hf_clip_train/train.py", "hf_clip_train/synthetic.py", "hf_clip/model_cards/hf_clip_model_card.md",
            "hf_clip/collators.py", "hf_clip_train/data/__init__.py", "hf_clip_train/search/query.py"} <= set(names)
    entry_points = wheel.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for script in ("train", "evaluate", "finetune"):
        assert f"hf-clip-{script} = hf_clip_train.cli:{script}" in entry_points
    assert "hf-clip-export = hf_clip.export:main" in entry_points


@pytest.mark.parametrize("script", ["train", "evaluate", "finetune"])
def test_console_scripts_name_the_missing_training_extra(script, monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate", None)  # as if the [train] extra were not installed
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(SystemExit) as exited:
        getattr(cli, script)()
    assert str(exited.value) == (f"hf-clip-{script} needs the training extra, and accelerate, datasets are not "
                                 'installed. Install it with: pip install "hf-clip[train]"')


@pytest.mark.slow
def test_import_hf_clip_loads_no_module_beyond_transformers_clip():
    """`import hf_clip` costs what `from transformers import CLIPModel, CLIPProcessor` costs: in a clean interpreter,
    every module it adds is one of its own (no datasets, pyarrow, optional extras or extra Transformers modules)."""
    script = textwrap.dedent("""
        import json, sys
        from transformers import CLIPModel, CLIPProcessor
        before = set(sys.modules)
        import hf_clip
        print(json.dumps(sorted(set(sys.modules) - before)))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    added = json.loads(result.stdout)
    assert added and all(name == "hf_clip" or name.startswith("hf_clip.") for name in added), added


def _layout_table() -> str:
    readme = (REPO / "docs" / "development.md").read_text()
    section = readme[readme.index("\n## Layout\n"):]
    return section[: section.find("\n## ", 1) if section.find("\n## ", 1) > 0 else len(section)]


def test_development_layout_table_names_every_module_and_nothing_else():
    named = set(re.findall(r"`((?:hf_clip|training|benchmarks|examples|tests|model_cards)/[^`]*)`", _layout_table()))
    folders = ("hf_clip", "training/hf_clip_train", "benchmarks", "examples")
    modules = {path.relative_to(REPO).as_posix() for folder in folders
               for path in (REPO / folder).glob("**/*.py" if folder.startswith("training/") else "*.py")}
    missing = sorted(module for module in modules if module not in named
                     and not (module.endswith(("__init__.py", "__main__.py")) and module.startswith("training/")))
    assert not missing, f"docs/development.md's layout table does not name {missing}"
    stale = sorted(path for path in named if not (REPO / path.rstrip("/")).exists())
    assert not stale, f"docs/development.md's layout table names paths that do not exist: {stale}"


QUERY_WITHOUT_TRAINING = textwrap.dedent("""
    import json, sys
    from importlib.machinery import PathFinder

    # the [train] extra's own modules (its pyyaml and tqdm come with huggingface_hub, its datasets with [search])
    TRAINING_ONLY = {"accelerate", "tensorboard"}


    class WithoutTrainingOnly:
        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in TRAINING_ONLY:
                return None
            return self.finder.find_spec(name, path, target)

        def __getattr__(self, name):
            return getattr(self.finder, name)


    sys.meta_path[:] = [WithoutTrainingOnly(finder) if hasattr(finder, "find_spec") else finder
                        for finder in sys.meta_path]
    from hf_clip_train.search import ImageTextIndex

    index = ImageTextIndex.load(sys.argv[1], model_name_or_path=sys.argv[2])
    result = index.search("a red circle", k=4)
    loaded = sorted(name for name in sys.modules if name.partition(".")[0] in TRAINING_ONLY)
    print(json.dumps({"row_ids": result.row_ids, "scores": result.scores, "loaded": loaded}))
""")


@pytest.mark.slow
def test_querying_an_index_needs_nothing_that_only_training_needs():
    """`pip install "hf-clip[search]"` without `[train]`: in a fresh interpreter where accelerate and
    tensorboard cannot be found (pyyaml and tqdm come with huggingface_hub), `ImageTextIndex` loads a real index
    folder and answers as it does here."""
    from hf_clip_train.search import ImageTextIndex

    index_dir, model_dir = REPO / "tests" / "fixtures" / "old_formats" / "index", REPO / "tests" / "fixtures" / \
        "old_formats" / "model"
    result = subprocess.run([sys.executable, "-c", QUERY_WITHOUT_TRAINING, str(index_dir), str(model_dir)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["loaded"] == []
    expected = ImageTextIndex.load(index_dir, model_name_or_path=str(model_dir)).search("a red circle", k=4)
    assert found["row_ids"] == expected.row_ids and found["scores"] == pytest.approx(expected.scores, abs=1e-6)


def test_the_query_blocker_hides_training_only_modules():
    """The blocker of the test above works: `accelerate` cannot be imported under it."""
    script = QUERY_WITHOUT_TRAINING.split("from hf_clip_train.search")[0] + "import accelerate\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "No module named 'accelerate'" in result.stderr
