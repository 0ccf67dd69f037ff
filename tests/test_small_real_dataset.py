"""Training from scratch on real scans that a package ships (scikit-learn's handwritten digits, 32×32), with the
CLI's defaults plus `--max_steps`; and the defaults that follow from the data."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from hf_clip_train.args import DatasetArguments, FromScratchArguments, default_batch_size, warmup_step_count
from hf_clip_train.data import columns_of, typical_image_size
from hf_clip_train.train import image_geometry, parse_args

REPO = Path(__file__).resolve().parents[1]


def _digits_module():
    spec = importlib.util.spec_from_file_location("digits", REPO / "examples" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_dataset_is_the_real_scans_split_by_class():
    from sklearn.datasets import load_digits

    splits = _digits_module().build_digits_dataset()
    assert {name: len(split) for name, split in splits.items()} == {"train": 1438, "test": 359}
    assert np.bincount(splits["test"]["label"]).min() >= 35
    first = splits["train"][0]
    assert first["image"].size == (32, 32)
    scans = load_digits()
    matches = [i for i in np.flatnonzero(scans.target == first["label"])
               if np.array_equal(Image.fromarray((scans.images[i] * (255 / 16)).astype(np.uint8))
                                 .resize((32, 32), Image.Resampling.BICUBIC), first["image"])]
    assert len(matches) >= 1
    names = splits["train"].features["label"].names
    assert any(names[first["label"]] in caption for caption in first["caption"])


@pytest.mark.slow
def test_readme_digits_commands_reach_95_percent_zero_shot_from_scratch(tmp_path):
    """The two digits commands of docs/training.md as written (paths moved to `tmp_path`; bf16 autocast where the CPU
    runs it natively, else fp32), without trackers: CLI defaults plus `--max_steps` train a `tiny` model from scratch
    to >= 95% zero-shot top-1 on 359 held-out scans."""
    readme = (REPO / "docs" / "training.md").read_text()
    build = re.search(r"^python examples/digits\.py (\S+)$", readme, flags=re.MULTILINE)
    train = re.search(r"^python -m hf_clip_train\.train --dataset_name (\S+) --output_dir (\S+) (--max_steps \d+)$",
                      readme, flags=re.MULTILINE)
    assert build.group(1) == train.group(1)
    data_dir, output_dir = tmp_path / "digits-data", tmp_path / "digits"
    env = dict(os.environ)  # OMP_NUM_THREADS is this worker's share of the cores (conftest.py): more threads than
    # cores spin in OpenMP's barriers while the other pytest-xdist worker is busy too
    built = subprocess.run([sys.executable, "examples/digits.py", str(data_dir)], cwd=REPO, capture_output=True,
                           text=True, timeout=300, env=env)
    assert built.returncode == 0, built.stderr[-4000:]
    result = subprocess.run(
        [sys.executable, "-m", "hf_clip_train.train", "--dataset_name", str(data_dir), "--output_dir", str(output_dir),
         *train.group(3).split(), "--report_to", "none"],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-6000:]
    test = json.loads((output_dir / "eval_results.json").read_text())["test"]
    print(f"\ndigits, {train.group(3)}: zero-shot top-1 {100 * test['zero_shot_top1']:.1f}% on "
          f"{test['num_samples']} held-out scans")
    assert test["num_samples"] == 359
    assert test["zero_shot_top1"] >= 0.95
    vision = json.loads((output_dir / "config.json").read_text())["vision_config"]
    assert (vision["image_size"], vision["patch_size"]) == (32, 8)
    card = (output_dir / "README.md").read_text()
    assert "| `per_device_train_batch_size` | 64 |" in card and "| `warmup_steps` | 40 |" in card
    assert "| `image_size` | 32 |" in card and "| `patch_size` | 8 |" in card


@pytest.mark.parametrize(("preset", "data_size", "expected"), [
    ("tiny", 32, (32, 8)),
    ("tiny", 28, (28, 4)),
    ("tiny", 500, (64, 8)),
    ("tiny", None, (64, 8)),
    ("tiny", 20, (20, 4)),
    ("ViT-B-32", 32, (32, 8)),
    ("ViT-B-32", 1024, (224, 32)),
])
def test_from_scratch_image_geometry_follows_the_data(preset, data_size, expected):
    geometry = image_geometry(FromScratchArguments(preset=preset), data_size)
    assert (geometry["image_size"], geometry["patch_size"]) == expected


def test_image_geometry_flags_win_and_must_fit_whole_patches():
    assert image_geometry(FromScratchArguments(image_size=48, patch_size=12), 32) == {"image_size": 48,
                                                                                      "patch_size": 12}
    with pytest.raises(ValueError, match="--image_size \\(50\\) must be a multiple of --patch_size \\(8\\)"):
        image_geometry(FromScratchArguments(image_size=50), 32)


def test_image_geometry_and_warmup_flags_are_checked_before_any_work():
    with pytest.raises(ValueError, match="--image_size \\(50\\) must be a multiple of --patch_size \\(8\\)"):
        parse_args(["--image_size", "50"])
    with pytest.raises(ValueError, match="--warmup_steps must be a whole number"):
        parse_args(["--warmup_steps", "2.5"])


def test_typical_image_size_is_the_median_longer_side_of_decodable_images(tmp_path):
    sizes = [(40, 30), (48, 48), (20, 64), (30, 40)]
    images = [Image.new("RGB", size) for size in sizes]
    dataset = datasets.Dataset.from_dict({"image": [*images, None], "caption": ["x"] * 5},
                                         features=datasets.Features({"image": datasets.Image(),
                                                                     "caption": datasets.Value("string")}))
    path = tmp_path / "data"
    dataset.save_to_disk(path)
    assert typical_image_size(dataset, columns_of(DatasetArguments(dataset_name=str(path)))) == 44


def test_warmup_steps_are_steps_or_a_fraction_of_max_steps():
    assert warmup_step_count(40, 600) == 40
    assert warmup_step_count(0.1, 150) == 15
    assert warmup_step_count(0.0, 150) == 0
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="--warmup_steps"):
            warmup_step_count(bad, 100)


@pytest.mark.parametrize(("num_rows", "num_processes", "expected"), [
    (24_000, 1, 128), (1438, 1, 64), (1438, 2, 32), (100, 1, 8), (None, 1, 128), (2048, 1, 128), (2047, 1, 64),
])
def test_default_batch_size_gives_small_datasets_at_least_16_steps_per_epoch(num_rows, num_processes, expected):
    assert default_batch_size(num_rows, num_processes) == expected
