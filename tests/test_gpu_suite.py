"""benchmarks/gpu_suite.py: its smoke run on the CPU gives every row, and a failing or overrunning row is reported
in its cell while the suite goes on."""

import dataclasses
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import script_in_process

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_suite  # noqa: E402  (benchmarks/ is not a package)

MEASURES = ("train step, tiny", "patch dropout", "InfoNCE forward + backward, N = 128",
            "InfoNCE forward + backward, N = 512", "training data path, 1 DataLoader",
            "training data path, 2 DataLoader", "vs sdpa", "no host sync", "train step, composed ViT + BERT",
            "train step, SigLIP loaded with from_pretrained", "compile_towers")


def _table_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]  # after the header


@pytest.mark.slow
def test_smoke_run_gives_every_row(tmp_path):
    output = tmp_path / "suite.md"
    status, printed = script_in_process(gpu_suite.main, ["--smoke", "--output", output])
    assert status == 0 and output.read_text() in printed
    table = output.read_text()
    rows = _table_rows(table)
    assert "failed" not in table and "not run: the suite" not in table, table
    assert len(rows) == len(MEASURES) and all(measure in row[0] for measure, row in zip(MEASURES, rows)), table
    for measure, value, baseline, ratio, goal, notes in rows:
        if measure.startswith("no host sync"):
            assert value == "not run: CUDA only" and goal == "passes"
            continue
        assert "samples/s" in value or " s" in value, (measure, value)
        assert baseline and ratio.endswith("x"), (measure, baseline, ratio)
    assert "eager stands in for it" in rows[6][5]  # no flash-attn on a CPU: the comparison still runs
    assert "first compiled step" in rows[10][5]


def _suite(budget: float = 100.0, row_seconds: float = 1.0) -> gpu_suite.Suite:
    shapes = dataclasses.replace(gpu_suite.SMOKE, row_budget=dict.fromkeys(gpu_suite.SMOKE.row_budget, row_seconds))
    return gpu_suite.Suite(shapes, torch.device("cpu"), budget)


def test_a_failing_row_is_reported_in_its_cell_and_the_suite_goes_on():
    suite = _suite()

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 17.00 GiB\nmore detail")

    def overrun():
        time.sleep(10)

    suite.run("loss", "InfoNCE", "", out_of_memory)
    suite.run("compile", "compile", "", overrun)
    suite.run("flash", "flash", "", lambda: [gpu_suite.Row("flash", "1 samples/s", "sdpa 1 samples/s", "1.00x")])
    rows = _table_rows(suite.table())
    assert rows[0][0] == "InfoNCE" and rows[0][1].startswith(
        "failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 17.00 GiB (at tests/test_gpu_suite.py:")
    assert rows[1][0] == "compile" and rows[1][1].startswith(
        "failed: RowTimeout: over its 1 s budget (at tests/test_gpu_suite.py:")  # where the row was stopped
    assert rows[2][:4] == ["flash", "1 samples/s", "sdpa 1 samples/s", "1.00x"]


def test_no_row_starts_once_the_suite_budget_is_spent():
    suite = _suite(budget=0.0)
    suite.run("step", "train step", ">= 1.3x", lambda: pytest.fail("a row started after the budget was spent"))
    assert _table_rows(suite.table()) == [["train step", "not run: the suite's time budget is spent", "", "",
                                           ">= 1.3x", ""]]
