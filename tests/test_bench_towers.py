"""benchmarks/bench_towers.py: its smoke run (tiny shapes) gives every row, each with a ratio."""

import re
import sys
from pathlib import Path

import pytest
from conftest import script_in_process

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_towers  # noqa: E402  (benchmarks/ is not a package)

MEASURES = ("train step, composed ViT + BERT", "train step, SigLIP loaded with from_pretrained",
            "LiT train step (lock_image_tower) vs unlocked, composed ViT + BERT, batch 8: speed",
            "LiT train step (lock_image_tower) vs unlocked, composed ViT + BERT, batch 8: peak RSS growth",
            "zero-shot inference, composed ViT + BERT")


@pytest.mark.slow
def test_smoke_run_gives_every_row_with_a_ratio():
    status, printed = script_in_process(bench_towers.main, ["--smoke"])
    assert status == 0
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in printed.splitlines()
            if line.startswith("| ")][2:]  # after the header
    assert len(rows) == len(MEASURES) and all(row[0].startswith(measure) for measure, row in zip(MEASURES, rows)), rows
    for measure, ours, baseline, ratio, noise_floor, goal in rows:
        assert float(ours) > 0 and float(baseline.split()[-1]) > 0, (measure, ours, baseline)
        assert re.fullmatch(r"\*\*\d+\.\d{3}x\*\*", ratio), (measure, ratio)
        assert goal.startswith((">=", "<=")), (measure, goal)
        if "LiT" not in measure:
            assert re.fullmatch(r"\d+\.\d{3}x", noise_floor), (measure, noise_floor)
    assert rows[2][4].startswith("FLOP ceiling")
