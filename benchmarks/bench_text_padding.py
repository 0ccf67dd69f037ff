"""The text tower's padding paths under SDPA: no slowdown for right-padded text.

Right-padded (or unmasked) text runs causal attention with no mask, SDPA's `is_causal` path; a left-padded batch
needs a padding mask. In one process, with the same weights and tokens, this times the text tower on
  unmasked     - no attention_mask (the baseline),
  right-padded - the processor's usual output: the mask is checked, then dropped,
  left-padded  - the same rows padded on the left: masked attention, shifted positions,
and Transformers' `CLIPTextModel` on the right-padded batch (it materialises the padding mask). Ratios are
throughput against the unmasked baseline (1.00 = no slowdown). Cases alternate so machine drift hits all alike.

    python benchmarks/bench_text_padding.py
    python benchmarks/bench_text_padding.py --presets tiny --modes inference --repeats 5
"""

import argparse

import torch
from common import VOCAB, make_config, median_throughput

from hf_clip import HFClipModel
from hf_clip.convert import transformers_from_hf_clip

BATCH = {"tiny": 64, "ViT-B-32": 32}


def make_inputs(seq_len: int, batch_size: int) -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB - 2, (batch_size, seq_len), generator=generator)
    mask = torch.ones_like(ids)
    lengths = torch.randint(5, seq_len, (batch_size,), generator=generator).tolist()
    for row, length in enumerate(lengths):
        ids[row, length - 1] = VOCAB - 1
        ids[row, length:] = VOCAB - 1
        mask[row, length:] = 0
    shifts = [seq_len - length for length in lengths]
    left_ids = torch.stack([row.roll(shift) for row, shift in zip(ids, shifts)])
    left_mask = torch.stack([row.roll(shift) for row, shift in zip(mask, shifts)])
    return {
        "unmasked": {"input_ids": ids},
        "right-padded": {"input_ids": ids, "attention_mask": mask},
        "left-padded": {"input_ids": left_ids, "attention_mask": left_mask},
    }


def make_step(model: torch.nn.Module, inputs: dict[str, torch.Tensor], mode: str):
    if mode == "inference":
        def step():
            with torch.inference_mode():
                model.eval()(**inputs)
        return step

    def step():
        model.train()
        model.zero_grad(set_to_none=True)
        model(**inputs).pooler_output.float().square().mean().backward()
    return step


def time_cases(preset: str, mode: str, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    config = make_config(preset)
    full = HFClipModel(config)
    ours, theirs = full.text_model, transformers_from_hf_clip(full).text_model
    ours.set_attn_implementation("sdpa")
    theirs.set_attn_implementation("sdpa")
    inputs = make_inputs(config.text_config.max_position_embeddings, BATCH[preset])
    steps = {name: make_step(ours, batch, mode) for name, batch in inputs.items()}
    steps["CLIPTextModel right-padded"] = make_step(theirs, inputs["right-padded"], mode)
    return median_throughput(steps, BATCH[preset], repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "ViT-B-32"], choices=sorted(BATCH))
    parser.add_argument("--modes", nargs="+", default=["inference", "train"], choices=["inference", "train"])
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per case (median is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, SDPA, text tower only, median of {args.repeats} steps")
    names = ["unmasked", "right-padded", "left-padded", "CLIPTextModel right-padded"]
    header = f"{'preset':<9} {'mode':<10} {'batch':>5} " + " ".join(f"{name:>26}" for name in names)
    print(header + "\n" + "-" * len(header))
    for preset in args.presets:
        for mode in args.modes:
            throughput = time_cases(preset, mode, args.repeats)
            cells = [f"{throughput[name]:>9.1f}/s ({throughput[name] / throughput['unmasked']:.2f}x)"
                     for name in names]
            print(f"{preset:<9} {mode:<10} {BATCH[preset]:>5} " + " ".join(f"{cell:>26}" for cell in cells),
                  flush=True)


if __name__ == "__main__":
    main()
