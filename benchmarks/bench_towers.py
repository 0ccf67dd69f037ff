"""Composed towers, a loaded SigLIP and LiT against their Transformers baselines, in one process, as ratios.

1. Train step (forward with the loss, backward, AdamW) of an hf_clip model composed from a ViT-B/16-sized `ViTModel`
   and a BERT-base-sized `BertModel` (random init from configs, each pooled with its `pooler_output`, linear
   projections) against Transformers' `VisionTextDualEncoderModel` with the same weights (`transformers_from_composed`).
   Goal >= 1.0x.
2. Train step of a SigLIP (SigLIP-base-sized `SiglipModel`, saved, then loaded with `HFClipModel.from_pretrained`)
   against `SiglipModel(return_loss=True)` with the same weights; text padded to 64 tokens without a mask, as
   SigLIP's. Goal >= 1.0x.
3. LiT: the train step of case 1's composition with `lock_image_tower()` against the same model unlocked, batch 32.
   Goals: >= 1.8x samples/s and <= 0.6x peak memory. Memory: the growth of the peak RSS over two steps (gradients
   and AdamW state included) above the resident size after building the model and its batch, in a fresh child
   process per case, with glibc's mmap threshold fixed at 128 KiB so that RSS follows the live tensors. The FLOP
   ceiling of the speed-up (forward FLOPs counted by `torch.utils.flop_counter`, backward as twice the forward) is
   printed beside it.
4. Zero-shot inference (`model(input_ids=prompts, pixel_values=images)` under `inference_mode`, as the zero-shot
   pipeline calls it) of case 1's composition against `VisionTextDualEncoderModel`. Goal >= 1.0x.

Timing: one warm-up call each, then alternating calls (reversed every other round), medians (`common.
median_throughput`). Where the ratio is near 1 (cases 1, 2, 4) a second copy of the baseline with the same weights
runs in the same rounds: baseline copy A / copy B is the noise floor, what two identical models differ by in this
process, below which the ratio cannot resolve. fp32, CPU.

    python benchmarks/bench_towers.py                       # all cases, 2 threads
    python benchmarks/bench_towers.py --cases lit --repeats 3
    python benchmarks/bench_towers.py --smoke               # tiny shapes, one thread: checks every row runs (tested)
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from common import median_throughput, peak_rss_growth
from transformers import BertConfig, SiglipConfig, SiglipModel, ViTConfig
from transformers.utils.logging import disable_progress_bar

from hf_clip import HFClipConfig, HFClipModel
from hf_clip.convert import transformers_from_composed


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Sizes of one run: the full one, or the smoke run's tiny ones."""

    vision: dict  # ViTConfig keywords (case 1, 3, 4)
    text: dict  # BertConfig keywords
    projection_dim: int
    siglip_vision: dict  # SiglipVisionConfig keywords (case 2)
    siglip_text: dict  # SiglipTextConfig keywords
    context: int  # caption tokens, padded to the longest (cases 1, 3)
    train_batch: int  # cases 1 and 2
    lit_batch: int  # case 3
    images: int  # case 4: images scored against `prompts` prompts
    prompts: int
    prompt_length: int
    repeats: int
    threads: int
    clock: str = "wall"


SIGLIP_TOKENS = {"pad_token_id": 1, "eos_token_id": 1, "bos_token_id": None}  # SigLIP's tokenizer: </s> pads
FULL = Shapes(
    vision={}, text={}, projection_dim=512,  # the configs' defaults: ViT-B/16 at 224 px, BERT-base
    siglip_vision={}, siglip_text=dict(SIGLIP_TOKENS), context=32, train_batch=8, lit_batch=32, images=32, prompts=24,
    prompt_length=16, repeats=7, threads=2,
)
_TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
SMOKE = Shapes(
    vision={**_TINY, "image_size": 32, "patch_size": 8}, text={**_TINY, "vocab_size": 500}, projection_dim=16,
    siglip_vision={**_TINY, "image_size": 32, "patch_size": 8},
    siglip_text={**_TINY, **SIGLIP_TOKENS, "vocab_size": 500, "max_position_embeddings": 16}, context=12,
    train_batch=4, lit_batch=8, images=4, prompts=3, prompt_length=8, repeats=2, threads=1,
)


def composed_model(vision: dict, text: dict, projection_dim: int) -> HFClipModel:
    """ViT (`ViTConfig(**vision)`) + BERT (`BertConfig(**text)`) composed, each pooled with its `pooler_output` (the
    families' default, and what `VisionTextDualEncoderModel` does), linear projections; seeded random init."""
    torch.manual_seed(0)
    config = HFClipConfig(vision_config=ViTConfig(**vision), text_config=BertConfig(**text),
                          projection_dim=projection_dim)
    return HFClipModel(config)


def siglip_pair(vision: dict, text: dict) -> tuple[HFClipModel, SiglipModel]:
    """A seeded random `SiglipModel` of these tower configs, and hf_clip's model loaded from its saved folder."""
    torch.manual_seed(0)
    reference = SiglipModel(SiglipConfig(vision_config=vision, text_config=text))
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        return HFClipModel.from_pretrained(folder), reference


def siglip_batch(config: SiglipConfig, batch_size: int) -> dict[str, torch.Tensor]:
    """Token ids filling SigLIP's context (padded to `max_length`, no mask, as SigLIP's tokenizer gives them) and
    random images."""
    text = config.text_config
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, text.vocab_size, (batch_size, text.max_position_embeddings),
                                       generator=generator),
            "pixel_values": images(config.vision_config.image_size, batch_size)}


CLS, SEP = 101, 102  # BERT's [CLS] and [SEP]


def bert_captions(config: BertConfig, batch_size: int, context: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """[CLS] words [SEP] rows of varied length (2 to `context` tokens), right-padded to the longest with [PAD] = 0, as
    a BERT tokenizer with `padding=True` gives them."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, context + 1, (batch_size,), generator=generator)
    lengths[0] = context
    ids = torch.randint(min(1000, config.vocab_size // 2), config.vocab_size, (batch_size, context),
                        generator=generator)  # BERT's vocabulary has its special and unused tokens below 1000
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths.tolist()):
        ids[row, 0], ids[row, length - 1] = CLS, SEP
        ids[row, length:] = config.pad_token_id
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask}


def images(image_size: int, batch_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))


def composed_batch(model: HFClipModel, batch_size: int, context: int) -> dict[str, torch.Tensor]:
    return {**bert_captions(model.config.text_config, batch_size, context),
            "pixel_values": images(model.config.vision_config.image_size, batch_size)}


def train_step(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    """Forward with the loss, backward, AdamW over the trainable parameters; gradients freed at the end."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        model(**inputs, return_loss=True).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def inference_step(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], None]:
    model.eval()

    def step():
        with torch.inference_mode():
            model(**inputs)
    return step


def copy_of(model: torch.nn.Module) -> torch.nn.Module:
    """A second model of `model`'s class, config and weights (its own memory)."""
    twin = type(model)(model.config)
    twin.load_state_dict(model.state_dict())
    return twin


def against_baseline(ours: Callable[[], None], baseline: Callable[[], None], baseline_copy: Callable[[], None],
                     batch_size: int, shapes: Shapes) -> dict[str, float]:
    """Samples/s of ours, the baseline and its copy, alternating: {"ours", "baseline", "copy"}."""
    return median_throughput({"ours": ours, "baseline": baseline, "copy": baseline_copy}, batch_size, shapes.repeats,
                             CLOCKS[shapes.clock])


def ratio_row(measure: str, rates: dict[str, float], baseline: str, goal: str) -> str:
    return (f"| {measure} | {rates['ours']:.2f} | {baseline} {rates['baseline']:.2f} | "
            f"**{rates['ours'] / rates['baseline']:.3f}x** | {rates['baseline'] / rates['copy']:.3f}x | {goal} |")


def bench_composed(shapes: Shapes) -> str:
    ours = composed_model(shapes.vision, shapes.text, shapes.projection_dim)
    theirs = transformers_from_composed(ours)
    inputs = composed_batch(ours, shapes.train_batch, shapes.context)
    with torch.no_grad():
        expected = theirs.eval()(**inputs).logits_per_image
        torch.testing.assert_close(ours.eval()(**inputs).logits_per_image, expected, atol=1e-4, rtol=1e-4)
    rates = against_baseline(train_step(ours, inputs), train_step(theirs, inputs),
                             train_step(copy_of(theirs), inputs), shapes.train_batch, shapes)
    return ratio_row(f"train step, composed ViT + BERT, batch {shapes.train_batch}, {shapes.context} tokens", rates,
                     "VisionTextDualEncoderModel", ">= 1.0x")


def bench_siglip(shapes: Shapes) -> str:
    ours, reference = siglip_pair(shapes.siglip_vision, shapes.siglip_text)
    inputs = siglip_batch(reference.config, shapes.train_batch)
    context = inputs["input_ids"].shape[1]
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(**inputs).logits_per_image,
                                   reference.eval()(**inputs).logits_per_image, atol=1e-4, rtol=1e-4)
    rates = against_baseline(train_step(ours, inputs), train_step(reference, inputs),
                             train_step(copy_of(reference), inputs), shapes.train_batch, shapes)
    return ratio_row(f"train step, SigLIP loaded with from_pretrained, batch {shapes.train_batch}, {context} tokens",
                     rates, "SiglipModel", ">= 1.0x")


def bench_zero_shot(shapes: Shapes) -> str:
    ours = composed_model(shapes.vision, shapes.text, shapes.projection_dim)
    theirs = transformers_from_composed(ours)
    inputs = {**bert_captions(ours.config.text_config, shapes.prompts, shapes.prompt_length, seed=1),
              "pixel_values": images(ours.config.vision_config.image_size, shapes.images)}
    rates = against_baseline(inference_step(ours, inputs), inference_step(theirs, inputs),
                             inference_step(copy_of(theirs), inputs), shapes.images, shapes)
    return ratio_row(f"zero-shot inference, composed ViT + BERT, {shapes.images} images x {shapes.prompts} prompts "
                     "(images/s)", rates, "VisionTextDualEncoderModel", ">= 1.0x")


def lit_model(shapes: Shapes, locked: bool) -> HFClipModel:
    model = composed_model(shapes.vision, shapes.text, shapes.projection_dim)
    if locked:
        model.lock_image_tower()
    return model


def tower_forward_flops(model: HFClipModel, inputs: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Forward FLOPs of the image tower and of the text tower (with their projections) on `inputs`."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    with torch.no_grad():
        for features in (lambda: model.get_image_features(inputs["pixel_values"]),
                         lambda: model.get_text_features(inputs["input_ids"], inputs["attention_mask"])):
            with FlopCounterMode(display=False) as counter:
                features()
            counts.append(counter.get_total_flops())
    return counts[0], counts[1]


def lit_memory_child(shapes: Shapes, locked: bool) -> None:
    """In a child: build the model and its batch, then report the peak RSS growth of two train steps."""
    torch.set_num_threads(shapes.threads)
    model = lit_model(shapes, locked)
    step = train_step(model, composed_batch(model, shapes.lit_batch, shapes.context))
    growth_mb, _ = peak_rss_growth(lambda: (step(), step()))
    print(json.dumps({"peak_growth_mb": growth_mb}))


def lit_memory(shapes: Shapes, locked: bool) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # freed blocks of 128 KiB and more go back to the OS
    child = ["--child", json.dumps(dataclasses.asdict(shapes)), "locked" if locked else "unlocked"]
    result = subprocess.run([sys.executable, __file__, *child],
                            capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_growth_mb"]


def bench_lit(shapes: Shapes) -> list[str]:
    unlocked = lit_model(shapes, locked=False)
    locked = lit_model(shapes, locked=True)
    inputs = composed_batch(unlocked, shapes.lit_batch, shapes.context)
    vision_flops, text_flops = tower_forward_flops(unlocked, inputs)
    ceiling = 3 * (vision_flops + text_flops) / (vision_flops + 3 * text_flops)
    per_sample = f"image {vision_flops / shapes.lit_batch / 1e9:.1f}, text {text_flops / shapes.lit_batch / 1e9:.1f}"
    rates = median_throughput({"locked": train_step(locked, inputs), "unlocked": train_step(unlocked, inputs)},
                              shapes.lit_batch, shapes.repeats, CLOCKS[shapes.clock])
    del unlocked, locked
    memory = {name: lit_memory(shapes, name == "locked") for name in ("locked", "unlocked")}
    measure = f"LiT train step (lock_image_tower) vs unlocked, composed ViT + BERT, batch {shapes.lit_batch}"
    return [
        f"| {measure}: speed | {rates['locked']:.2f} | unlocked {rates['unlocked']:.2f} | "
        f"**{rates['locked'] / rates['unlocked']:.3f}x** | FLOP ceiling {ceiling:.2f}x (forward GFLOPs per sample: "
        f"{per_sample}) | >= 1.8x |",
        f"| {measure}: peak RSS growth of 2 steps (MB) | {memory['locked']:.0f} | unlocked {memory['unlocked']:.0f} | "
        f"**{memory['locked'] / memory['unlocked']:.3f}x** | | <= 0.6x |",
    ]


SHAPES = {"full": FULL, "smoke": SMOKE}
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CASES = ("composed", "siglip", "lit", "zero_shot")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--repeats", type=int, help="timed rounds (median is reported); default 7, smoke 2")
    parser.add_argument("--threads", type=int, help="torch intra-op threads; default 2, smoke 1")
    parser.add_argument("--train_batch", type=int, help="batch of cases 1 and 2 (default 8)")
    parser.add_argument("--lit_batch", type=int, help="batch of case 3 (default 32)")
    parser.add_argument("--images", type=int, help="images of case 4 (default 32)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or this process's CPU time (steadier on a shared machine with --threads 1)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes: checks that every row runs")
    parser.add_argument("--child", nargs=2, metavar=("SHAPES_JSON", "LOCKED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    disable_progress_bar()
    if args.child:
        lit_memory_child(Shapes(**json.loads(args.child[0])), args.child[1] == "locked")
        return 0
    shapes_name = "smoke" if args.smoke else "full"
    overrides = {key: getattr(args, key) for key in ("repeats", "threads", "train_batch", "lit_batch", "images")}
    shapes = dataclasses.replace(SHAPES[shapes_name], clock=args.clock,
                                 **{key: value for key, value in overrides.items() if value is not None})
    torch.set_num_threads(shapes.threads)
    print(f"torch {torch.__version__}, {shapes.threads} thread(s), fp32, CPU, {shapes.clock} clock, median of "
          f"{shapes.repeats} rounds{' (smoke run: tiny shapes, the figures mean nothing)' if args.smoke else ''}")
    print("| measure | hf_clip (samples/s) | baseline (samples/s) | hf_clip / baseline | "
          "noise floor (baseline copy A / B) | goal |")
    print("| --- | --- | --- | --- | --- | --- |")
    runs = {"composed": lambda: [bench_composed(shapes)], "siglip": lambda: [bench_siglip(shapes)],
            "lit": lambda: bench_lit(shapes), "zero_shot": lambda: [bench_zero_shot(shapes)]}
    for case in args.cases:
        for row in runs[case]():
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
