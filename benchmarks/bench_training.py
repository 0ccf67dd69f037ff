"""Training speed of the hf_clip recipe against Transformers' CLIPModel, in one process, on the same batches.

1. Recipe vs baseline: hf_clip with the default recipe (bf16 autocast where the hardware runs bf16 natively, fused
   AdamW with CLIP's weight-decay groups) against CLIPModel in fp32 with torch's default AdamW. Same weights, same
   batches, same number of steps; reports the samples/s ratio and the relative loss difference after the steps.
2. fp32 vs fp32: hf_clip in fp32 with the recipe's optimizer against the same baseline.
3. Data pipeline: samples/s of decoding + augmentation alone (DataLoader workers on the embedded dataset) against
   the recipe's train-step rate, and end-to-end training throughput with real decoding against training on
   pre-decoded tensors.

    python benchmarks/bench_training.py                # tiny preset, batch 128, 2 threads
    python benchmarks/bench_training.py --preset ViT-B-32 --batch_size 16 --steps 12
"""

import argparse
import itertools
import statistics
import time
from argparse import Namespace

import torch

from hf_clip import HFClipConfig, HFClipModel, HFClipProcessor
from hf_clip.convert import transformers_from_hf_clip
from training.data import ImageTextCollator, TrainBatches, build_train_dataset, image_transform_for, load_split
from training.synthetic import caption_corpus
from training.train import build_optimizer, resolve_mixed_precision


def make_batches(preset: str, batch_size: int, count: int, num_workers: int):
    """The recipe's tokenizer and processor, and `count` decoded batches of the embedded dataset."""
    from hf_clip import train_clip_tokenizer

    tokenizer = train_clip_tokenizer(caption_corpus(), vocab_size=2048, model_max_length=32)
    config = HFClipConfig.from_preset(preset, tokenizer=tokenizer)
    processor = HFClipProcessor.from_tokenizer(tokenizer, image_size=config.vision_config.image_size)
    data_args = Namespace(dataset_name=None, dataset_config_name=None, embedded_num_train=max(4096, batch_size * 8),
                          image_column="image", caption_column="caption", streaming=False, max_train_samples=None)
    dataset = build_train_dataset(load_split(data_args, "train"), data_args,
                                  image_transform_for(processor, train=True), seed=0, num_processes=1,
                                  process_index=0)
    batches = TrainBatches(dataset, ImageTextCollator(tokenizer), batch_size, num_workers, 1, 0, 0, False)
    return config, batches, [batch for _, batch in itertools.islice(batches.iterate(), count)]


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


def compare(config: HFClipConfig, batches: list, steps: int, ours_precision: str) -> dict[str, float]:
    """Run both models over the same batches from the same weights, alternating step by step."""
    torch.manual_seed(0)
    ours = HFClipModel(config).train()
    baseline = transformers_from_hf_clip(ours).train()
    recipe = Namespace(weight_decay=0.1, learning_rate=5e-4, adam_beta1=0.9, adam_beta2=0.98, adam_epsilon=1e-6)
    trainers = {
        "ours": make_trainer(ours, build_optimizer(ours, recipe), ours_precision),
        "baseline": make_trainer(baseline, torch.optim.AdamW(baseline.parameters(), lr=5e-4, weight_decay=0.1),
                                 "no"),
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
    speed = {name: batch_size / statistics.median(values[2:]) for name, values in times.items()}
    final = {name: statistics.mean(values[-5:]) for name, values in losses.items()}
    return {"ours_samples_per_s": speed["ours"], "baseline_samples_per_s": speed["baseline"],
            "speed_ratio": speed["ours"] / speed["baseline"], "ours_final_loss": final["ours"],
            "baseline_final_loss": final["baseline"],
            "loss_difference": abs(final["ours"] - final["baseline"]) / final["baseline"]}


def decode_rate(batches: TrainBatches, count: int) -> float:
    iterator = batches.iterate()
    next(iterator)  # worker start-up
    start = time.perf_counter()
    seen = sum(len(batch["row_ids"]) for _, batch in itertools.islice(iterator, count))
    return seen / (time.perf_counter() - start)


def end_to_end_rate(config: HFClipConfig, source, count: int, precision: str) -> float:
    torch.manual_seed(0)
    model = HFClipModel(config).train()
    recipe = Namespace(weight_decay=0.1, learning_rate=5e-4, adam_beta1=0.9, adam_beta2=0.98, adam_epsilon=1e-6)
    step = make_trainer(model, build_optimizer(model, recipe), precision)
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
    parser.add_argument("--steps", type=int, default=30, help="train steps per model and comparison")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader workers for decoding")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    precision = resolve_mixed_precision("auto")
    config, batches, cached = make_batches(args.preset, args.batch_size, 8, args.num_workers)
    print(f"torch {torch.__version__}, {args.threads} threads, preset {args.preset}, batch {args.batch_size}, "
          f"{args.steps} steps; recipe precision on this machine: {precision}")

    for label, ours_precision in ((f"recipe ({precision}) vs CLIPModel fp32", precision),
                                  ("fp32 vs CLIPModel fp32", "no")):
        result = compare(config, cached, args.steps, ours_precision)
        print(f"{label:<36} {result['ours_samples_per_s']:7.1f} vs {result['baseline_samples_per_s']:7.1f} "
              f"samples/s = {result['speed_ratio']:.2f}x; loss after {args.steps} steps "
              f"{result['ours_final_loss']:.4f} vs {result['baseline_final_loss']:.4f} "
              f"({100 * result['loss_difference']:.2f}% apart)", flush=True)

    step_rate = end_to_end_rate(config, itertools.cycle(cached), args.steps, precision)
    decoding = decode_rate(batches, args.steps)
    real = end_to_end_rate(config, (batch for _, batch in batches.iterate()), args.steps, precision)
    print(f"decoding + augmentation alone ({args.num_workers} workers): {decoding:7.1f} samples/s "
          f"= {decoding / step_rate:.2f}x the recipe's train-step rate ({step_rate:.1f} samples/s on cached tensors)")
    print(f"training with real decoding: {real:7.1f} samples/s = {real / step_rate:.2f}x of training on "
          f"pre-decoded tensors")


if __name__ == "__main__":
    main()
