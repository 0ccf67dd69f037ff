"""What the wheel installs, and the console scripts without the training extra."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from training import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_hf_clip_and_hf_clip_train_but_no_training_package(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("hf_clip", "training", "model_cards"):
        shutil.copytree(REPO / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    wheel = zipfile.ZipFile(next((tmp_path / "dist").glob("hf_clip-*.whl")))
    names = wheel.namelist()
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {
        "hf_clip", "hf_clip_train"}
    assert {"hf_clip_train/train.py", "hf_clip_train/synthetic.py", "hf_clip/model_cards/hf_clip_model_card.md",
            "hf_clip/evaluation.py"} <= set(names)
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
