"""The exported model against eager PyTorch, in one process, side by side (alternating calls, medians):

1. onnxruntime fp32 and dynamic int8 (`hf_clip.export.export_onnx(..., quantize=True)`) against eager PyTorch fp32
   (`get_image_features` / `get_text_features` under `torch.inference_mode`), for the ViT-B/32 image tower at
   batch 32 and the text tower at batch 256 x 77 (random weights; goals: fp32 >= 1.2x, int8 >= 2.0x);
2. the zero-shot top-1 agreement of the int8 graphs with the fp32 ones on the demo's `test` split (the 1,200
   held-out scenes of `make demo`, 24 "colour shape" classes, the demo's prompt templates), with a trained model:
   `--demo_model` (default outputs/demo, written by `make demo`);
3. `pipeline("image-feature-extraction")` against the processor plus `get_image_features` on its output, for the
   ViT-B/32 model at batch 32 (goal >= 0.9x).

    python benchmarks/bench_export.py [--repeats 5] [--demo_model outputs/demo] [--threads 2]
"""

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from common import make_config
from PIL import Image
from transformers import pipeline

from hf_clip import HFClipModel, HFClipProcessor, train_clip_tokenizer, zero_shot_classifier
from hf_clip.export import export_onnx


def cpu_kind() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        text = cpuinfo.read()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                 platform.processor())
    return f"{model}, {os.cpu_count()} CPUs, AVX512-BF16: {'yes' if 'avx512_bf16' in text else 'no'}"


def median_seconds(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """One warm-up call each, then `repeats` rounds calling each in turn; the median seconds per call."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def report(title: str, seconds: dict[str, float], batch: int, baseline: str) -> None:
    print(f"\n{title}")
    for name, value in seconds.items():
        print(f"  {name:<34} {value * 1000:9.1f} ms  {batch / value:8.1f} samples/s  "
              f"{seconds[baseline] / value:5.2f}x vs {baseline}")


def tower_speed(model: HFClipModel, out: Path, repeats: int, threads: int, tower_names: list[str]) -> None:
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(32, 3, 224, 224, generator=generator)
    vocab, context = model.config.text_config.vocab_size, model.config.text_config.max_position_embeddings
    input_ids = torch.randint(0, vocab - 2, (256, context), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row, length in enumerate(torch.randint(5, context, (256,), generator=generator).tolist()):
        input_ids[row, length - 1 :] = model.config.text_config.eos_token_id
        attention_mask[row, length:] = 0

    def eager(method, **inputs):
        def call():
            with torch.inference_mode():
                method(**inputs)
        return call

    image_feed = {"pixel_values": pixel_values.numpy()}
    text_feed = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
    sessions = {name: session(out / name, threads) for name in
                ("vision_model.onnx", "vision_model_int8.onnx", "text_model.onnx", "text_model_int8.onnx")}
    towers = {
        "image": ("vision_model", model.get_image_features, {"pixel_values": pixel_values}, image_feed,
                  "ViT-B/32 image tower, batch 32 (224 px)", 32),
        "text": ("text_model", model.get_text_features, {"input_ids": input_ids, "attention_mask": attention_mask},
                 text_feed, "ViT-B/32 text tower, batch 256 x 77", 256),
    }
    for tower in tower_names:
        name, method, inputs, feed, title, batch = towers[tower]
        seconds = median_seconds({
            "eager PyTorch fp32": eager(method, **inputs),
            "onnxruntime fp32": lambda: sessions[f"{name}.onnx"].run(None, feed),
            "onnxruntime int8 (dynamic)": lambda: sessions[f"{name}_int8.onnx"].run(None, feed),
        }, repeats)
        report(title, seconds, batch, "eager PyTorch fp32")
        with torch.inference_mode():
            expected = method(**inputs).pooler_output.numpy()
        fp32 = sessions[f"{name}.onnx"].run(None, feed)[0]
        int8 = sessions[f"{name}_int8.onnx"].run(None, feed)[0]
        cosine = (F.normalize(torch.from_numpy(int8), dim=-1) * F.normalize(torch.from_numpy(fp32), dim=-1)).sum(-1)
        print(f"  {name}: max |onnx fp32 - eager| = {np.abs(fp32 - expected).max():.2e}; int8 vs fp32 cosine "
              f"min {cosine.min():.4f}, mean {cosine.mean():.4f}")


def class_embeddings(text_session: ort.InferenceSession, processor: HFClipProcessor, class_names, templates):
    """Per class, the renormalised mean of its normalised prompt embeddings (as `hf_clip.zero_shot_classifier`)."""
    prompts = [template.format(name) for name in class_names for template in templates]
    inputs = processor(text=prompts, padding=True, truncation=True, return_tensors="np")
    embeds = text_session.run(["text_embeds"], {k: inputs[k] for k in ("input_ids", "attention_mask")})[0]
    embeds = F.normalize(torch.from_numpy(embeds), dim=-1).view(len(class_names), len(templates), -1).mean(1)
    return F.normalize(embeds, dim=-1)


def zero_shot_agreement(demo_model: Path, repeats: int, threads: int) -> None:
    from hf_clip_train.synthetic import CLASS_NAMES, TEMPLATES, build_shapes_dataset

    model = HFClipModel.from_pretrained(demo_model).eval()
    processor = HFClipProcessor.from_pretrained(demo_model)
    test = build_shapes_dataset(num_train=1, num_test=1200, num_unseen=1)["test"]
    labels = torch.tensor(test["label"])
    pixel_values = processor(images=list(test["image"]), return_tensors="np")["pixel_values"]
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, processor, tmp, quantize=True)
        predictions = {}
        for kind, suffix in (("fp32", ""), ("int8", "_int8")):
            text_session = session(Path(tmp, f"text_model{suffix}.onnx"), threads)
            vision_session = session(Path(tmp, f"vision_model{suffix}.onnx"), threads)
            classes = class_embeddings(text_session, processor, CLASS_NAMES, TEMPLATES)
            images = np.concatenate([
                vision_session.run(["image_embeds"], {"pixel_values": pixel_values[start : start + 200]})[0]
                for start in range(0, len(pixel_values), 200)])
            predictions[kind] = (F.normalize(torch.from_numpy(images), dim=-1) @ classes.T).argmax(-1)
    with torch.inference_mode():
        images = model.get_image_features(pixel_values=torch.from_numpy(pixel_values)).pooler_output
        classes = zero_shot_classifier(model, processor.tokenizer, CLASS_NAMES, TEMPLATES)
        eager = (F.normalize(images, dim=-1) @ classes.T).argmax(-1)
    def share(a: torch.Tensor, b: torch.Tensor) -> str:
        return f"{(a == b).float().mean():.2%}"

    print(f"\nZero-shot on the demo's test split ({len(labels)} scenes, {len(CLASS_NAMES)} classes, {demo_model}):")
    print(f"  top-1 accuracy: eager fp32 {share(eager, labels)}, onnx fp32 {share(predictions['fp32'], labels)}, "
          f"onnx int8 {share(predictions['int8'], labels)}")
    print(f"  top-1 agreement: int8 vs onnx fp32 {share(predictions['int8'], predictions['fp32'])}, "
          f"onnx fp32 vs eager {share(predictions['fp32'], eager)}")


def pipeline_speed(model: HFClipModel, repeats: int) -> None:
    tokenizer = train_clip_tokenizer(["a photo of a cat", "a photo of a dog"] * 4, vocab_size=600)
    processor = HFClipProcessor.from_tokenizer(tokenizer, image_size=224)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)) for _ in range(32)]
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        extractor = pipeline("image-feature-extraction", model=tmp)
        loaded = extractor.model

    def direct():
        inputs = processor(images=images, return_tensors="pt")
        with torch.inference_mode():
            loaded.get_image_features(**inputs)

    def pipelined():
        extractor(images, pool=True, return_tensors=True, batch_size=32)

    seconds = median_seconds({"processor + get_image_features": direct, "image-feature-extraction pipeline": pipelined},
                             repeats)
    report("ViT-B/32 image features with preprocessing, batch 32 (300x400 images)", seconds, 32,
           "processor + get_image_features")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--demo_model", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--skip", nargs="*", default=[], choices=["image", "text", "agreement", "pipeline"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_kind()}; torch {torch.__version__} with {args.threads} threads, onnxruntime {ort.__version__} "
          f"with {args.threads} intra-op threads; medians of {args.repeats} alternating calls")

    model = HFClipModel(make_config("ViT-B-32")).eval()
    tower_names = [name for name in ("image", "text") if name not in args.skip]
    if tower_names:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = train_clip_tokenizer(["a photo of a cat", "a photo of a dog"] * 4, vocab_size=600)
            start = time.perf_counter()
            export_onnx(model, HFClipProcessor.from_tokenizer(tokenizer), tmp, quantize=True)
            print(f"export_onnx(ViT-B/32, quantize=True): {time.perf_counter() - start:.0f} s")
            tower_speed(model, Path(tmp), args.repeats, args.threads, tower_names)
    if "agreement" not in args.skip:
        if (args.demo_model / "config.json").is_file():
            zero_shot_agreement(args.demo_model, args.repeats, args.threads)
        else:
            print(f"\nZero-shot agreement skipped: no trained model at {args.demo_model} (run `make demo`).")
    if "pipeline" not in args.skip:
        pipeline_speed(model, args.repeats)


if __name__ == "__main__":
    main()
