"""Training speed of the hf_clip recipe against Transformers' CLIPModel, in one process, on the same batches.

1. Recipe vs baseline: hf_clip with the default recipe (bf16 autocast where the hardware runs bf16 natively, fused
   AdamW with CLIP's weight-decay groups) against CLIPModel in fp32 with torch's default AdamW. Same weights, same
   batches, same number of steps; reports the samples/s ratio and the relative loss difference after the steps.
2. fp32 vs fp32: hf_clip in fp32 with the recipe's optimizer against the same baseline; and the recipe against
   this fp32 run, which isolates the effect of mixed precision on the loss.
3. Data pipeline: samples/s of decoding + augmentation alone (DataLoader workers on the embedded dataset) against
   the recipe's train-step rate, and end-to-end training throughput with real decoding against training on
   pre-decoded tensors.

    python benchmarks/bench_training.py                # tiny preset, batch 128, 2 threads
    python benchmarks/bench_training.py --preset ViT-B-32 --batch_size 16 --steps 20
"""

import argparse
import itertools
import statistics
import time

import torch

from hf_clip import ContrastiveDataCollator, HFClipConfig, HFClipModel, HFClipProcessor
from hf_clip.convert import transformers_from_hf_clip
from hf_clip_train.args import DatasetArguments, RunArguments
from hf_clip_train.data import TrainBatches, build_train_dataset, columns_of, load_split
from hf_clip_train.data.transforms import image_transform_for, normalize_pixels
from hf_clip_train.synthetic import caption_corpus
from hf_clip_train.train import build_optimizer, resolve_mixed_precision


def make_batches(preset: str, batch_size: int, count: int, num_workers: int):
    """The config, the decoded batches of the embedded dataset as the training loop hands them to the model
    (an endless iterator), and `count` of them cached."""
    from hf_clip import train_clip_tokenizer

    tokenizer = train_clip_tokenizer(caption_corpus(), vocab_size=2048, model_max_length=32)
    config = HFClipConfig.from_preset(preset, tokenizer=tokenizer)
    processor = HFClipProcessor.from_tokenizer(tokenizer, image_size=config.vision_config.image_size)
    data_args = DatasetArguments(embedded_num_train=max(4096, batch_size * 8))
    transform = image_transform_for(processor, train=True)
    dataset = build_train_dataset(load_split(data_args, "train"), columns_of(data_args), transform, seed=0)
    batches = TrainBatches(dataset, ContrastiveDataCollator(processor), batch_size, seed=0, num_workers=num_workers)

    def model_batches():
        for _, batch in batches.iterate():
            yield {**batch, "pixel_values": normalize_pixels(batch["pixel_values"], transform.mean, transform.std)}
    return config, model_batches, list(itertools.islice(model_batches(), count))


def make_trainer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, precision: str):
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(batch) -> float:
        inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
        with autocast:
            loss = model(**inputs, return_loss=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if hasattr(model, "clamp_logit_scale_"):
            model.clamp_logit_scale_()
        return loss.item()
    return step


RECIPE = RunArguments(weight_decay=0.1, learning_rate=5e-4, adam_beta1=0.9, adam_beta2=0.98, adam_epsilon=1e-6)


def race(config: HFClipConfig, batches: list, steps: int, precision: str) -> dict[str, dict[str, float]]:
    """Three contenders from the same initial weights over the same batches, alternating step by step:
    the recipe (hf_clip, `precision`, fused AdamW with CLIP's groups), hf_clip in fp32 with the same optimizer,
    and Transformers' CLIPModel in fp32 with torch's default AdamW."""
    torch.manual_seed(0)
    recipe_model = HFClipModel(config).train()
    fp32_model = HFClipModel(config).train()
    fp32_model.load_state_dict(recipe_model.state_dict())
    baseline = transformers_from_hf_clip(recipe_model).train()
    trainers = {
        "recipe": make_trainer(recipe_model, build_optimizer(recipe_model, RECIPE), precision),
        "hf_clip fp32": make_trainer(fp32_model, build_optimizer(fp32_model, RECIPE), "no"),
        "CLIPModel fp32": make_trainer(baseline, torch.optim.AdamW(baseline.parameters(), lr=5e-4,
                                                                   weight_decay=0.1), "no"),
    }
    times = {name: [] for name in trainers}
    losses = {name: [] for name in trainers}
    for index in range(steps):
        batch = batches[index % len(batches)]
        for name, step in trainers.items():
            start = time.perf_counter()
            losses[name].append(step(batch))
            times[name].append(time.perf_counter() - start)
    batch_size = len(batches[0]["row_ids"])
    return {name: {"samples_per_s": batch_size / statistics.median(times[name][2:]),
                   "final_loss": statistics.mean(losses[name][-10:])} for name in trainers}


def decode_rate(batches, count: int) -> float:
    iterator = batches()
    next(iterator)  # worker start-up
    start = time.perf_counter()
    seen = sum(len(batch["row_ids"]) for batch in itertools.islice(iterator, count))
    return seen / (time.perf_counter() - start)


def end_to_end_rate(config: HFClipConfig, source, count: int, precision: str) -> float:
    torch.manual_seed(0)
    model = HFClipModel(config).train()
    step = make_trainer(model, build_optimizer(model, RECIPE), precision)
    iterator = iter(source)
    step(next(iterator))
    start, seen = time.perf_counter(), 0
    for batch in itertools.islice(iterator, count):
        step(batch)
        seen += len(batch["row_ids"])
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="model preset for both models")
    parser.add_argument("--batch_size", type=int, default=128, help="images per step")
    parser.add_argument("--steps", type=int, default=60, help="train steps per model in the race")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader workers for decoding")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    precision = resolve_mixed_precision("auto")
    config, batches, cached = make_batches(args.preset, args.batch_size, 8, args.num_workers)
    print(f"torch {torch.__version__}, {args.threads} threads, preset {args.preset}, batch {args.batch_size}, "
          f"{args.steps} steps; recipe precision on this machine: {precision}")

    results = race(config, cached, args.steps, precision)
    recipe, fp32, baseline = results["recipe"], results["hf_clip fp32"], results["CLIPModel fp32"]
    def gap(a, b):
        return 100 * abs(a["final_loss"] - b["final_loss"]) / b["final_loss"]
    for name, result in results.items():
        print(f"{name:<16} {result['samples_per_s']:7.1f} samples/s, mean loss over the last 10 of {args.steps} "
              f"steps {result['final_loss']:.4f}")
    print(f"speed: recipe ({precision}) / CLIPModel fp32 = {recipe['samples_per_s'] / baseline['samples_per_s']:.2f}x;"
          f" hf_clip fp32 / CLIPModel fp32 = {fp32['samples_per_s'] / baseline['samples_per_s']:.2f}x")
    print(f"loss: recipe vs hf_clip fp32 (same optimizer, precision only) {gap(recipe, fp32):.2f}% apart; "
          f"recipe vs CLIPModel fp32 (default AdamW) {gap(recipe, baseline):.2f}% apart; "
          f"hf_clip fp32 vs CLIPModel fp32 {gap(fp32, baseline):.2f}% apart", flush=True)

    count = min(args.steps, 20)
    step_rate = end_to_end_rate(config, itertools.cycle(cached), count, precision)
    decoding = decode_rate(batches, count)
    real = end_to_end_rate(config, batches(), count, precision)
    print(f"decoding + augmentation alone ({args.num_workers} workers): {decoding:7.1f} samples/s "
          f"= {decoding / step_rate:.2f}x the recipe's train-step rate ({step_rate:.1f} samples/s on cached tensors)")
    print(f"training with real decoding: {real:7.1f} samples/s = {real / step_rate:.2f}x of training on "
          f"pre-decoded tensors")


if __name__ == "__main__":
    main()
