"""What the benchmarks share: CLIP-sized configs and inputs, and the alternating timing loop."""

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from hf_clip import HFClipConfig

VOCAB = 49408


def make_config(preset: str, context_length: int | None = None, patch_dropout: float = 0.0,
                vocab_size: int = VOCAB) -> HFClipConfig:
    """`preset` with CLIP's 49,408-token vocabulary (and, optionally, another vocabulary, text context or patch
    dropout)."""
    text = {"vocab_size": vocab_size, "eos_token_id": vocab_size - 1, "bos_token_id": vocab_size - 2,
            "pad_token_id": vocab_size - 1}
    if context_length is not None:
        text["max_position_embeddings"] = context_length
    return HFClipConfig.from_preset(preset, text_config=text, vision_config={"patch_dropout": patch_dropout})


def make_inputs(config: HFClipConfig, batch_size: int) -> dict[str, torch.Tensor]:
    """Right-padded captions of varied length filling the context (as the processor pads them), random images."""
    generator = torch.Generator().manual_seed(0)
    seq_len, eos = config.text_config.max_position_embeddings, config.text_config.eos_token_id
    ids = torch.randint(0, config.text_config.vocab_size - 2, (batch_size, seq_len), generator=generator)
    mask = torch.ones_like(ids)
    for row, length in enumerate(torch.randint(5, seq_len, (batch_size,), generator=generator).tolist()):
        ids[row, length - 1] = eos
        ids[row, length:] = eos
        mask[row, length:] = 0
    size = config.vision_config.image_size
    return {"input_ids": ids, "attention_mask": mask,
            "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator)}


def median_throughput(steps: dict[str, Callable[[], None]], batch_size: int, repeats: int,
                      clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Samples/s of each step: one warm-up call each (allocator, optimizer state, kernels), then `repeats` timed
    calls, alternating step by step (in reverse order every other round, so that no step always runs first) so that
    machine drift hits all alike; the median is reported. `clock` is wall time by default; `time.process_time`
    counts this process's CPU seconds, which other jobs on a shared machine barely change."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(repeats):
        order = list(steps.items())
        for name, step in order if round_index % 2 == 0 else reversed(order):
            start = clock()
            step()
            times[name].append(clock() - start)
    return {name: batch_size / statistics.median(values) for name, values in times.items()}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def peak_rss_growth(run: Callable[[], Any]) -> tuple[float, Any]:
    """Collect garbage, reset the kernel's peak-RSS mark (Linux), call `run`; returns how far the peak rose above
    the resident size before the call, in MB, and what `run` returned. Run it in a fresh process per case: a
    process's earlier allocations stay in its heap."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM (peak RSS) to the current RSS
    baseline = _rss_kib("VmRSS")
    result = run()
    return (_rss_kib("VmHWM") - baseline) / 1024, result
