"""Training levers of hf_clip against hf_clip without them, each pair in one process, as ratios.

1. Patch dropout (FLIP): the train step (forward with loss, backward, AdamW) at `patch_dropout` 0.5 against 0.0,
   same weights and batch, alternating step by step; samples/s ratio. Goal: >= 1.6x. The text tower and the
   optimizer step over CLIP's 49,408-token embedding do not shrink, so the image tower alone is also timed;
   ViT-B-32 is also run with the 32-token context, and `tiny` as the trainer builds it from scratch (2,048-token
   vocabulary, 16-token context, batch 128).
2. GradCache: a contrastive batch of 1,024 pairs from 16 micro-batches of 64 (`hf_clip.grad_cache_backward`)
   against a plain batch-64 step. Peak memory growth of one step in a fresh child process per case (the input
   batch is built before the measurement in both), and throughput per sample. Goals: memory <= 1.3x, speed >= 0.7x.
   Memory is measured twice: with glibc's malloc as it comes, whose retained heap counts in RSS, and with a fixed
   mmap threshold, where RSS follows the live tensors (as a GPU's allocated-memory counter would).
3. `compile_towers()` (torch.compile, inductor): train step and inference forward against eager, plus the wall
   time of the first compiled call (compilation and one step).

    python benchmarks/bench_scaling.py                       # all cases, fp32, 2 threads, wall clock
    python benchmarks/bench_scaling.py --cases patch_dropout --presets tiny ViT-B-32
    python benchmarks/bench_scaling.py --threads 1 --clock cpu   # on a busy machine: CPU seconds of one thread

On a machine shared with other jobs, wall-clock medians swing with the load; `--threads 1 --clock cpu` times the
process's own CPU seconds, which the other jobs barely change.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from common import VOCAB, make_config, make_inputs, peak_rss_growth

from hf_clip import HFClipModel, grad_cache_backward

TRAIN_BATCH = {"tiny": 64, "ViT-B-32": 16}
FROM_SCRATCH_VOCAB = 2048  # hf_clip_train.train's --tokenizer_vocab_size


def train_step(model: HFClipModel, inputs: dict[str, torch.Tensor], micro_batches: int = 1):
    """One optimiser step: plain backward of the loss, or GradCache over `micro_batches`."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        if micro_batches == 1:
            model(**inputs, return_loss=True).loss.backward()
        else:
            grad_cache_backward(model, inputs, micro_batches)
        optimizer.step()
    return step


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def image_tower_step(model: HFClipModel, pixel_values: torch.Tensor):
    """Forward and backward of the image tower and its projection only: the part patch dropout shortens."""
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        model.get_image_features(pixel_values).pooler_output.square().mean().backward()
    return step


def race(steps: dict, repeats: int, clock=time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each step, alternating them so machine drift hits all alike."""
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = clock()
            step()
            times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_patch_dropout(presets: list[str], repeats: int, clock) -> None:
    print("\n1. patch dropout 0.5 vs 0.0: train step samples/s")
    print(f"{'preset':<9} {'text ctx':>8} {'batch':>5} {'p=0.0 /s':>9} {'p=0.5 /s':>9} {'ratio':>6}")
    for preset in presets:
        cases = [(None, VOCAB, TRAIN_BATCH[preset])]
        cases += [(32, VOCAB, TRAIN_BATCH[preset])] if preset != "tiny" else [(16, FROM_SCRATCH_VOCAB, 128)]
        for context, vocab_size, batch in cases:
            torch.manual_seed(0)
            models = {p: HFClipModel(make_config(preset, context, p, vocab_size)) for p in (0.0, 0.5)}
            models[0.5].load_state_dict(models[0.0].state_dict())
            inputs = make_inputs(models[0.0].config, batch)
            seconds = race({p: train_step(model, inputs) for p, model in models.items()}, repeats, clock)
            rate = {p: batch / s for p, s in seconds.items()}
            ctx = models[0.0].config.text_config.max_position_embeddings
            note = "" if vocab_size == VOCAB else f"  ({vocab_size:,}-token vocabulary, as the trainer builds it)"
            print(f"{preset:<9} {ctx:>8} {batch:>5} {rate[0.0]:>9.1f} {rate[0.5]:>9.1f} {rate[0.5] / rate[0.0]:>5.2f}x"
                  f"{note}", flush=True)
            if context is None:
                seconds = race({p: image_tower_step(model, inputs["pixel_values"]) for p, model in models.items()},
                               repeats, clock)
                rate = {p: batch / s for p, s in seconds.items()}
                print(f"{preset:<9} {'images':>8} {batch:>5} {rate[0.0]:>9.1f} {rate[0.5]:>9.1f} "
                      f"{rate[0.5] / rate[0.0]:>5.2f}x  (image tower alone, forward + backward)", flush=True)
            del models


def grad_cache_child(batch_size: int, micro_batches: int) -> None:
    """In a child: reset the peak-RSS mark after building model, optimizer state and inputs, then report how far
    two steps raise it."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = HFClipModel(make_config("tiny"))
    step = train_step(model, make_inputs(model.config, batch_size), micro_batches)
    growth_mb, _ = peak_rss_growth(lambda: (step(), step()))
    print(json.dumps({"peak_growth_mb": growth_mb}))


# glibc's malloc raises its mmap threshold each time a large block is freed, after which freed tensors stay in the
# heap and still count in RSS. A fixed threshold hands every block of 128 KiB or more back to the OS when it is freed,
# so peak RSS then follows the live tensors.
ALLOCATORS = {"glibc defaults": {}, "mmap threshold 128 KiB": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def peak_growth(batch_size: int, micro_batches: int, allocator_env: dict[str, str]) -> float:
    result = subprocess.run([sys.executable, __file__, "--child", str(batch_size), str(micro_batches)],
                            capture_output=True, text=True, check=True, env={**os.environ, **allocator_env})
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_growth_mb"]


def bench_grad_cache(repeats: int, clock, micro_batch: int = 64, batch: int = 1024) -> None:
    micro_batches = batch // micro_batch
    print(f"\n2. GradCache: contrastive batch {batch} from {micro_batches} micro-batches of {micro_batch}, vs a plain "
          f"batch-{micro_batch} step (tiny)")
    torch.manual_seed(0)
    model = HFClipModel(make_config("tiny"))
    seconds = race({"plain": train_step(model, make_inputs(model.config, micro_batch)),
                    "grad_cache": train_step(model, make_inputs(model.config, batch), micro_batches)},
                   max(2, repeats // 2), clock)
    plain_rate, cache_rate = micro_batch / seconds["plain"], batch / seconds["grad_cache"]
    print(f"{'case':<24} {'samples/s':>9}")
    print(f"{f'plain batch {micro_batch}':<24} {plain_rate:>9.1f}")
    print(f"{f'GradCache {batch} = {micro_batches}x{micro_batch}':<24} {cache_rate:>9.1f}")
    print(f"speed per sample, GradCache/plain: {cache_rate / plain_rate:.2f}x (goal >= 0.7)")
    print(f"{'peak RSS growth of 2 steps':<28} {'plain MB':>9} {'GradCache MB':>13} {'ratio':>6}  (goal <= 1.3)")
    for allocator, env in ALLOCATORS.items():
        plain_mb, cache_mb = peak_growth(micro_batch, 1, env), peak_growth(batch, micro_batches, env)
        print(f"{allocator:<28} {plain_mb:>9.0f} {cache_mb:>13.0f} {cache_mb / plain_mb:>5.2f}x", flush=True)


def bench_compile(repeats: int, clock) -> None:
    print("\n3. compile_towers() (inductor) vs eager, tiny")
    torch.manual_seed(0)
    eager = HFClipModel(make_config("tiny"))
    compiled = HFClipModel(make_config("tiny"))
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_towers()
    inputs = make_inputs(eager.config, TRAIN_BATCH["tiny"])

    def inference(model):
        def step():
            model.eval()
            with torch.no_grad():
                model.get_image_features(inputs["pixel_values"])
                model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
        return step

    for mode, make in (("train step", lambda m: train_step(m, inputs)), ("inference", inference)):
        compiled_step = make(compiled)
        start = time.perf_counter()
        compiled_step()
        first = time.perf_counter() - start
        seconds = race({"eager": make(eager), "compiled": compiled_step}, repeats, clock)
        print(f"{mode:<11} eager {TRAIN_BATCH['tiny'] / seconds['eager']:7.1f}/s, compiled "
              f"{TRAIN_BATCH['tiny'] / seconds['compiled']:7.1f}/s: {seconds['eager'] / seconds['compiled']:.2f}x; "
              f"first compiled call (compile + one step) {first:.0f} s wall", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["patch_dropout", "grad_cache", "compile"],
                        choices=["patch_dropout", "grad_cache", "compile"])
    parser.add_argument("--presets", nargs="+", default=["tiny", "ViT-B-32"], choices=sorted(TRAIN_BATCH))
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per contender (median is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                        help="wall: elapsed time; cpu: this process's CPU time (with --threads 1 on a busy machine)")
    parser.add_argument("--child", nargs=2, type=int, metavar=("BATCH", "MICRO_BATCHES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        grad_cache_child(*args.child)
        return
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, median of {args.repeats} steps, "
          f"{args.clock} clock")
    if "patch_dropout" in args.cases:
        bench_patch_dropout(args.presets, args.repeats, clock)
    if "grad_cache" in args.cases:
        bench_grad_cache(args.repeats, clock)
    if "compile" in args.cases:
        bench_compile(args.repeats, clock)


if __name__ == "__main__":
    main()
