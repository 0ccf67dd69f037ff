"""Loss at scale: the chunked (memory-bounded, exact) losses against dense references, forward plus backward.

Each row pits a candidate against its baseline on the same inputs (N unit-norm embedding pairs of dimension d,
scale 14.3 (= 1/0.07), SigLIP bias −10): time is the median of `--repeats` alternating runs in this process, and
peak memory is the growth of the peak RSS over one forward+backward in a fresh child process per case (a
process's peak RSS cannot be reset), as `bench_model.py` measures it. Ratios are candidate / baseline.

- `two-matrix`: the dense InfoNCE before the single-matrix change (one logit matrix per direction, as
  `hf_clip.contrastive_loss` computed it until then); `dense`: `chunk_size=0` (one matrix, its transpose for the
  text direction); `chunked`: `chunk_size=None` (the automatic panel size).
- `sigmoid-dense`: the dense sigmoid loss (the full n×N logit matrix and its ±1 label matrix, as open_clip's
  `SigLipLoss` builds them); `sigmoid-chunked`: `sigmoid_loss` with the automatic panel size.

    python benchmarks/bench_loss.py                          # every case of the issue's table
    python benchmarks/bench_loss.py --cases infonce-4096 --repeats 5
"""

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from common import peak_rss_growth

from hf_clip.loss import contrastive_loss, resolve_chunk_size, sigmoid_loss

DIM = 512
SCALE = 1 / 0.07
BIAS = -10.0


def two_matrix_infonce(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The dense InfoNCE as it was: both directions' (N, N) logit matrices, then two cross-entropies."""
    labels = torch.arange(image.shape[0])
    logits_per_image = scale * image @ text.T
    logits_per_text = scale * text @ image.T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


LOSSES = {
    "two-matrix": lambda image, text, scale, bias: two_matrix_infonce(image, text, scale),
    "dense": lambda image, text, scale, bias: contrastive_loss(image, text, scale, chunk_size=0),
    "chunked": lambda image, text, scale, bias: contrastive_loss(image, text, scale, chunk_size=None),
    "sigmoid-dense": lambda image, text, scale, bias: sigmoid_loss(image, text, scale, bias, chunk_size=0),
    "sigmoid-chunked": lambda image, text, scale, bias: sigmoid_loss(image, text, scale, bias, chunk_size=None),
}

# case -> (N, candidate, baseline or None, the goal)
CASES = {
    "infonce-4096": (4096, "dense", "two-matrix", "time <= 0.9x, memory <= 1x"),
    "infonce-16384": (16384, "chunked", "dense", "memory <= 1/10, time <= 1.0x"),
    "sigmoid-16384": (16384, "sigmoid-chunked", "sigmoid-dense", "memory <= 1/10, time <= 1.0x"),
    "infonce-65536": (65536, "chunked", None, "runs; report memory and time"),
}


def make_inputs(batch_size: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    image, text = F.normalize(torch.randn(2, batch_size, DIM, generator=generator), dim=-1)
    return [image.requires_grad_(), text.requires_grad_(), torch.tensor(SCALE, requires_grad=True),
            torch.tensor(BIAS, requires_grad=True)]


def step(name: str, inputs: list[torch.Tensor]) -> float:
    """One forward+backward; returns its wall time in seconds."""
    for tensor in inputs:
        tensor.grad = None
    start = time.perf_counter()
    LOSSES[name](*inputs).backward()
    return time.perf_counter() - start


def peak_growth_child(name: str, batch_size: int) -> None:
    """In a child: build the inputs, reset the kernel's peak-RSS mark, run one step, report the growth and time."""
    inputs = make_inputs(batch_size)
    growth_mb, seconds = peak_rss_growth(lambda: step(name, inputs))
    print(json.dumps({"peak_growth_mb": growth_mb, "seconds": seconds}))


def in_child(name: str, batch_size: int, threads: int) -> dict[str, float]:
    result = subprocess.run([sys.executable, __file__, "--child", name, str(batch_size), "--threads", str(threads)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per loss and case (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--child", nargs=2, metavar=("LOSS", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        peak_growth_child(args.child[0], int(args.child[1]))
        return

    print(f"torch {torch.__version__}, {args.threads} threads, d = {DIM}, fp32, forward + backward; "
          f"time: median of {args.repeats} alternating runs; memory: peak RSS growth in a fresh child")
    header = (f"{'case':<14} {'N':>6} {'candidate':<16} {'baseline':<14} {'cand. s':>8} {'base s':>8} {'time':>6} "
              f"{'cand. MB':>9} {'base MB':>9} {'memory':>7}  goal")
    print(header)
    print("-" * len(header))
    for case in args.cases:
        batch_size, candidate, baseline, goal = CASES[case]
        chunk = resolve_chunk_size(None, batch_size, batch_size)
        label = f"{candidate}" + (f" ({chunk} rows)" if "chunked" in candidate and chunk else "")
        if baseline is None:
            measured = in_child(candidate, batch_size, args.threads)
            print(f"{case:<14} {batch_size:>6} {label:<16} {'-':<14} {measured['seconds']:>8.2f} {'-':>8} {'-':>6} "
                  f"{measured['peak_growth_mb']:>9.0f} {'-':>9} {'-':>7}  {goal}", flush=True)
            continue
        inputs = make_inputs(batch_size)
        times: dict[str, list[float]] = {candidate: [], baseline: []}
        for _ in range(args.repeats):
            for name in times:
                times[name].append(step(name, inputs))
        del inputs
        gc.collect()
        seconds = {name: statistics.median(values) for name, values in times.items()}
        memory = {name: in_child(name, batch_size, args.threads)["peak_growth_mb"] for name in times}
        print(f"{case:<14} {batch_size:>6} {label:<16} {baseline:<14} {seconds[candidate]:>8.2f} "
              f"{seconds[baseline]:>8.2f} {seconds[candidate] / seconds[baseline]:>5.2f}x "
              f"{memory[candidate]:>9.0f} {memory[baseline]:>9.0f} {memory[candidate] / memory[baseline]:>6.3f}x  "
              f"{goal}", flush=True)


if __name__ == "__main__":
    main()
