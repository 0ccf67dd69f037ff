"""The fp32 train step on the CPU with the padding side handed in (no host read) against the former text tower.

Before this change the text tower read `attention_mask[:, 0].all()` on the host in every forward to decide whether
to mask, and built its end-of-text id tensor from a Python list (a host-to-device copy) in every forward; a
left-padded batch also went through Transformers' `fast_all` read of the mask. Now the collator decides the padding
side on the host and the model takes it (`padding_side`), and the id comparison is `input_ids == eos_token_id`.

In one process, with the same weights and batch, this times the training step (forward with the loss, backward,
gradient clipping, fused AdamW, the logit-scale clamp) in fp32 with
  after  - the model as it is, given the collator's `padding_side`;
  before - the former `_left_padding_mask` and `pooling_positions` swapped in for the step.
Two copies of the model take turns: each round one copy runs after and the other before, and the next round they
swap (the order within a round alternates too), so that neither path always runs on the same copy's memory. The
two paths compute the same numbers (asserted), so both copies follow one training trajectory.
ratio = after / before in samples/s, medians over the rounds (goal >= 1.0: no regression). The noise floor is
copy A / copy B over the same steps: what two identical models differ by in this process (heap layout, page
faults, the machine's drift), which the ratio cannot resolve below. On a CPU a host read costs almost nothing, so
this checks that the change costs nothing; the stall it removes is on GPUs.

    python benchmarks/bench_host_sync.py
    python benchmarks/bench_host_sync.py --presets tiny ViT-B-32 --repeats 8
    python benchmarks/bench_host_sync.py --threads 1 --clock cpu   # on a busy machine: CPU seconds of one thread
"""

import argparse
import contextlib
import statistics
import time

import torch
from common import make_config, make_inputs

from hf_clip import HFClipModel
from hf_clip import modeling_hf_clip as modeling
from hf_clip.collators import padding_side_of

BATCH = {"tiny": 64, "ViT-B-32": 16}


def former_left_padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The text tower's mask decision before the change (a host read of the first column in every forward)."""
    if attention_mask is None:
        return None
    if not torch.compiler.is_compiling() and bool(attention_mask[:, 0].all()):
        return None
    return attention_mask


def former_pooling_positions(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`HFClipTextModel.pooling_positions` before the change (its id tensor built from a list in every forward)."""
    eos_token_id = self.config.eos_token_id
    if eos_token_id == 2:
        return input_ids.argmax(dim=-1)
    eos_ids = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
    is_eos = torch.isin(input_ids, torch.tensor(eos_ids, device=input_ids.device))
    if padding_mask is not None:
        is_eos = is_eos & padding_mask.bool()
    if all(0 <= token_id < self.config.vocab_size for token_id in eos_ids):
        modeling._check_end_of_text(is_eos, eos_token_id)
    if padding_mask is None:
        return is_eos.int().argmax(dim=-1)
    return (2 * is_eos.int() + padding_mask.bool().int()).argmax(dim=-1)


@contextlib.contextmanager
def former_text_tower():
    """Swap the former mask decision, pooling and causal-mask call (which let Transformers read a left-padded mask
    to see whether it could be skipped) into the modeling module for the duration of one step."""
    saved = modeling._padding_mask, modeling.HFClipTextModel.pooling_positions, modeling.create_causal_mask
    create_causal_mask = saved[2]
    modeling._padding_mask = lambda attention_mask, padding_side: former_left_padding_mask(attention_mask)
    modeling.HFClipTextModel.pooling_positions = former_pooling_positions
    modeling.create_causal_mask = lambda *args, allow_is_causal_skip=True, **kwargs: create_causal_mask(*args, **kwargs)
    try:
        yield
    finally:
        modeling._padding_mask, modeling.HFClipTextModel.pooling_positions, modeling.create_causal_mask = saved


def left_padded(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same rows with their padding moved to the front."""
    shifts = (inputs["attention_mask"] == 0).sum(-1).tolist()
    roll = [(key, torch.stack([row.roll(shift) for row, shift in zip(inputs[key], shifts)]))
            for key in ("input_ids", "attention_mask")]
    return {**inputs, **dict(roll)}


def make_step(model: HFClipModel, inputs: dict):
    """One training step of `model` on `inputs`: step(former) runs it with the former text tower if `former`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    step_inputs = {**inputs, "padding_side": padding_side_of(inputs["attention_mask"])}

    def step(former: bool) -> None:
        with former_text_tower() if former else contextlib.nullcontext():
            loss = model(**step_inputs, return_loss=True).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.clamp_logit_scale_()
    return step


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def crossed_throughput(copies: list, batch_size: int, repeats: int, clock) -> dict[str, float]:
    """Samples/s (medians over `repeats` rounds) of the after and before paths, and of copy A and copy B, with the
    copies swapping paths each round: {"after", "before", "copy A", "copy B"}. One warm-up step per copy and path."""
    for step in copies:
        step(False), step(True)
    times = {"after": [], "before": [], "copy A": [], "copy B": []}
    for round_index in range(repeats):
        pairs = [(0, False), (1, True)] if round_index % 2 == 0 else [(1, False), (0, True)]
        for copy, former in pairs if round_index % 4 < 2 else reversed(pairs):
            start = clock()
            copies[copy](former)
            elapsed = clock() - start
            times["before" if former else "after"].append(elapsed)
            times["copy B" if copy else "copy A"].append(elapsed)
    return {name: batch_size / statistics.median(values) for name, values in times.items()}


def time_case(preset: str, padding: str, repeats: int, clock: str) -> dict[str, float]:
    config = make_config(preset)
    torch.manual_seed(0)
    models = [HFClipModel(config).eval(), HFClipModel(config).eval()]
    models[1].load_state_dict(models[0].state_dict())
    inputs = make_inputs(config, BATCH[preset])
    if padding == "left":
        inputs = left_padded(inputs)
    with torch.no_grad(), torch.random.fork_rng():  # same embeddings both ways, or the timing compares nothing
        expected = models[0](**inputs, padding_side=padding_side_of(inputs["attention_mask"])).text_embeds
        with former_text_tower():
            torch.testing.assert_close(models[1](**inputs).text_embeds, expected, atol=1e-6, rtol=0)
    copies = [make_step(model.train(), inputs) for model in models]
    return crossed_throughput(copies, BATCH[preset], repeats, CLOCKS[clock])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny"], choices=sorted(BATCH))
    parser.add_argument("--padding", nargs="+", default=["right", "left"], choices=["right", "left"])
    parser.add_argument("--repeats", type=int, default=32,
                        help="timed rounds, one step of each path each (a multiple of 4 balances copies and order)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or this process's CPU time (steadier on a shared machine with --threads 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), fp32 train step, median of {args.repeats} "
          f"rounds of crossed steps, {args.clock} clock")
    print("| preset | batch | padding | before (samples/s) | after (samples/s) | after / before | "
          "noise floor (copy A / copy B) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for preset in args.presets:
        for padding in args.padding:
            rates = time_case(preset, padding, args.repeats, args.clock)
            print(f"| {preset} | {BATCH[preset]} | {padding} | {rates['before']:.1f} | {rates['after']:.1f} | "
                  f"{rates['after'] / rates['before']:.3f}x | {rates['copy A'] / rates['copy B']:.3f}x |", flush=True)


if __name__ == "__main__":
    main()
