"""HFClipModel against Transformers' CLIPModel: same config, same weights, same inputs, same process.

Times a train step (forward with loss, backward, AdamW step) and an inference forward, alternating the two
models so that machine drift hits both alike, and reports ours/theirs throughput ratios (> 1 means hf_clip is
faster). Peak memory growth of one step is measured in fresh child processes (one per model and mode), since a
process's peak RSS cannot be reset.

    python benchmarks/bench_model.py                 # tiny and ViT-B-32, 2 threads
    python benchmarks/bench_model.py --presets tiny --repeats 5
"""

import argparse
import json
import subprocess
import sys

import torch
from common import make_config, make_inputs, median_throughput, peak_rss_growth

import hf_clip  # noqa: F401
from hf_clip import HFClipModel
from hf_clip.convert import transformers_from_hf_clip

BATCH = {"tiny": {"train": 64, "inference": 64}, "ViT-B-32": {"train": 16, "inference": 32}}


def make_models(preset: str) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    ours = HFClipModel(make_config(preset))
    return {"hf_clip": ours, "transformers": transformers_from_hf_clip(ours)}


def make_step(model: torch.nn.Module, inputs: dict[str, torch.Tensor], mode: str):
    if mode == "inference":
        model.eval()

        def step():
            with torch.inference_mode():
                model(**inputs)
        return step
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(**inputs, return_loss=True).loss.backward()
        optimizer.step()
    return step


def time_steps(preset: str, mode: str, repeats: int) -> dict[str, float]:
    models = make_models(preset)
    inputs = make_inputs(models["hf_clip"].config, BATCH[preset][mode])
    steps = {name: make_step(model, inputs, mode) for name, model in models.items()}
    return median_throughput(steps, BATCH[preset][mode], repeats)


def peak_growth_child(preset: str, mode: str, name: str) -> None:
    """In a child: build one model and its inputs, reset the kernel's peak-RSS mark, and report how far two
    steps raise it above the resident size before them."""
    torch.set_num_threads(2)
    model = make_models(preset)[name]
    step = make_step(model, make_inputs(model.config, BATCH[preset][mode]), mode)
    growth_mb, _ = peak_rss_growth(lambda: (step(), step()))
    print(json.dumps({"peak_growth_mb": growth_mb}))


def peak_growth(preset: str, mode: str, name: str) -> float:
    result = subprocess.run(
        [sys.executable, __file__, "--child", preset, mode, name], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_growth_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "ViT-B-32"], choices=sorted(BATCH))
    parser.add_argument("--modes", nargs="+", default=["train", "inference"], choices=["train", "inference"])
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per model (median is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--child", nargs=3, metavar=("PRESET", "MODE", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        peak_growth_child(*args.child)
        return

    torch.set_num_threads(args.threads)
    header = (f"{'preset':<9} {'mode':<10} {'batch':>5} {'hf_clip/s':>10} {'CLIPModel/s':>12} {'speed ratio':>11} "
              f"{'hf_clip MB':>10} {'CLIPModel MB':>12} {'mem ratio':>9}")
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats} steps; ratios are ours/theirs")
    print(header)
    print("-" * len(header))
    for preset in args.presets:
        for mode in args.modes:
            throughput = time_steps(preset, mode, args.repeats)
            memory = {name: peak_growth(preset, mode, name) for name in ("hf_clip", "transformers")}
            print(
                f"{preset:<9} {mode:<10} {BATCH[preset][mode]:>5} {throughput['hf_clip']:>10.1f} "
                f"{throughput['transformers']:>12.1f} {throughput['hf_clip'] / throughput['transformers']:>11.2f} "
                f"{memory['hf_clip']:>10.0f} {memory['transformers']:>12.0f} "
                f"{memory['hf_clip'] / memory['transformers']:>9.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
