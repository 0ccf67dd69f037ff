"""The GPU suite: one command, one markdown table, sized to finish in under 8 minutes on one H100 / H200.

    python benchmarks/gpu_suite.py                        # on a CUDA GPU
    python benchmarks/gpu_suite.py --output suite.md      # also write the table (with its header) to a file
    python benchmarks/gpu_suite.py --smoke                # every row with tiny shapes on the CPU, in seconds

Rows, each a ratio of two runs in this process, alternating step by step where both are timed (medians):
1. ViT-B/32 train step at batch 256 in bf16 autocast (forward with the loss, backward, fused AdamW): hf_clip
   against Transformers' `CLIPModel` with the same weights, batch and optimiser. Goal >= 1.3x.
2. Patch dropout 0.5 against 0.0, same step.
3. Chunked InfoNCE (forward and backward, d = 512, fp32) at N = 65,536 and 262,144: time and peak memory against
   the dense loss where the dense loss fits in memory.
4. The training data path (`hf_clip_train.data.build_train_dataset` + `TrainBatches`, random-resized-crop training
   samples of realistic JPEGs, about 720 px on a side) with 8 and 16 DataLoader workers, against row 1's step rate.
5. FlashAttention-2 against SDPA where `flash-attn` is installed: the step's speed, and the embeddings compared.
6. Host syncs: `hf_clip_train.train.train_step`, right/left-padded, under `torch.cuda.set_sync_debug_mode("error")`.
7. Composed towers: the train step of an hf_clip model composed from a ViT-B/16 and a BERT-base (random init from
   configs, `pooler_output` poolings, linear projections) against `VisionTextDualEncoderModel` with the same weights,
   32-token captions, batch 128, bf16 autocast. Goal >= 1.0x.
8. SigLIP: the train step of a SigLIP-base `SiglipModel` saved and loaded with `HFClipModel.from_pretrained`
   against `SiglipModel(return_loss=True)` with the same weights, 64-token text, batch 128, bf16. Goal >= 1.0x.
9. `compile_towers()` (`--torch_compile`, inductor) against eager, and the first compiled step's wall time (last:
   it is the longest row).

Each row runs in its own try/except under a time budget (SIGALRM): a failure, an out-of-memory or an overrun is
reported in its cell and the suite goes on; the whole suite stops starting rows after `--budget` seconds.
`--smoke` runs the same code with tiny shapes on the CPU (compile with the "eager" backend, eager against SDPA where
flash-attn is missing); tests/test_gpu_suite.py runs it.
"""

import argparse
import contextlib
import dataclasses
import gc
import io
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import bench_towers
import torch
from common import VOCAB, make_inputs, median_throughput
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from hf_clip import ContrastiveDataCollator, HFClipConfig, HFClipModel, HFClipProcessor, contrastive_loss
from hf_clip.collators import padding_side_of
from hf_clip.convert import transformers_from_composed, transformers_from_hf_clip

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Sizes of one suite run: the real one on a GPU, or the smoke run on a CPU."""

    preset: str
    text: dict
    vision: dict
    projection_dim: int | None
    batch_size: int
    repeats: int
    loss_sizes: tuple[int, ...]
    loss_dim: int
    loss_chunk_size: int | None  # None: the loss's own choice (panels of 2**23 logits at these N)
    loss_repeats: int
    workers: tuple[int, ...]
    image_sides: tuple[int, int]  # distinct JPEGs are re-encoded at sides in this range (longer side, px)
    compile_backend: str
    bf16: bool  # bf16 autocast in the train steps (fp32 in the smoke run: CPUs without AVX512-BF16 emulate bf16)
    row_budget: dict  # seconds per row
    composed_vision: dict  # rows 8 and 9: ViTConfig / BertConfig / SiglipVisionConfig / SiglipTextConfig keywords
    composed_text: dict
    siglip_vision: dict
    siglip_text: dict
    towers_batch_size: int
    towers_context: int  # row 8's caption tokens


GPU = Shapes(
    preset="ViT-B-32", text={}, vision={}, projection_dim=None, batch_size=256, repeats=10,
    loss_sizes=(65_536, 262_144), loss_dim=512, loss_chunk_size=None, loss_repeats=2, workers=(8, 16),
    image_sides=(380, 1280), compile_backend="inductor", bf16=True,
    row_budget={"step": 60, "patch_dropout": 45, "loss": 120, "data": 100, "flash": 45, "sync": 30, "compile": 240,
                "composed": 60, "siglip": 60},
    composed_vision={}, composed_text={}, siglip_vision={}, siglip_text=dict(bench_towers.SIGLIP_TOKENS),
    towers_batch_size=128, towers_context=32,
)
SMOKE_LAYER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
SMOKE = Shapes(
    preset="tiny", text={**SMOKE_LAYER, "vocab_size": 1000, "max_position_embeddings": 16},
    vision={**SMOKE_LAYER, "image_size": 32, "patch_size": 8}, projection_dim=16, batch_size=8, repeats=3,
    loss_sizes=(128, 512), loss_dim=32, loss_chunk_size=64, loss_repeats=1, workers=(1, 2),
    image_sides=(48, 96), compile_backend="eager", bf16=False,
    row_budget=dict.fromkeys(("step", "patch_dropout", "loss", "data", "flash", "sync", "compile", "composed",
                              "siglip"), 90),
    composed_vision=bench_towers.SMOKE.vision, composed_text=bench_towers.SMOKE.text,
    siglip_vision=bench_towers.SMOKE.siglip_vision, siglip_text=bench_towers.SMOKE.siglip_text,
    towers_batch_size=8, towers_context=12,
)


@dataclasses.dataclass
class Row:
    measure: str
    result: str = ""
    baseline: str = ""
    ratio: str = ""
    goal: str = ""
    notes: str = ""

    def cells(self) -> list[str]:
        return [self.measure, self.result, self.baseline, self.ratio, self.goal, self.notes]


class RowTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise `RowTimeout` in the main thread after `seconds` (Unix: SIGALRM)."""
    def expire(signum, frame):
        raise RowTimeout(f"over its {seconds:.0f} s budget")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Suite:
    """Runs the rows on one device, shares what rows need from each other, and collects the table."""

    def __init__(self, shapes: Shapes, device: torch.device, budget: float):
        self.shapes, self.device, self.budget = shapes, device, budget
        self.start = time.perf_counter()
        self.rows: list[Row] = []
        self.step_rate: float | None = None  # row 1's hf_clip samples/s, which the data row compares against

    # -- running rows -------------------------------------------------------------------------------------------
    def run(self, key: str, measure: str, goal: str, body: Callable[[], list[Row]]) -> None:
        """Run one row's `body` under its time budget; its failure becomes the row's cell."""
        left = self.budget - (time.perf_counter() - self.start)
        budget = min(self.shapes.row_budget[key], left)
        print(f"[{time.perf_counter() - self.start:6.1f} s, CPU {time.process_time():6.1f} s] {measure} ...",
              file=sys.stderr, flush=True)
        if left < min(5.0, self.shapes.row_budget[key]):
            self.rows.append(Row(measure, "not run: the suite's time budget is spent", goal=goal))
            return
        try:
            with time_limit(budget):
                rows = body()
        except Exception as error:  # noqa: BLE001 (every failure is reported in the row, and the suite goes on)
            traceback.print_exc()
            rows = [Row(measure, f"failed: {type(error).__name__}: {first_line(error)}{where(error)}", goal=goal)]
        for row in rows:
            row.goal = row.goal or goal
        self.rows.extend(rows)
        self.free_memory()

    def free_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def table(self) -> str:
        header = ["measure", "result", "baseline", "ratio", "goal", "notes"]
        lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row.cells()) + " |" for row in self.rows]
        return "\n".join(lines)

    # -- models and steps ---------------------------------------------------------------------------------------
    def config(self, patch_dropout: float = 0.0) -> HFClipConfig:
        shapes = self.shapes
        vocab = shapes.text.get("vocab_size", VOCAB)
        text = {**shapes.text, "vocab_size": vocab, "eos_token_id": vocab - 1, "bos_token_id": vocab - 2,
                "pad_token_id": vocab - 1}
        extra = {} if shapes.projection_dim is None else {"projection_dim": shapes.projection_dim}
        return HFClipConfig.from_preset(shapes.preset, text_config=text,
                                        vision_config={**shapes.vision, "patch_dropout": patch_dropout}, **extra)

    def model(self, config: HFClipConfig, like: torch.nn.Module | None = None) -> HFClipModel:
        torch.manual_seed(0)
        with torch.device(self.device):
            model = HFClipModel(config)
        if like is not None:
            model.load_state_dict(like.state_dict())
        return model.train()

    def inputs(self, config: HFClipConfig) -> dict:
        """Right-padded captions filling the context and random images, on the device, with the collator's padding
        side (hf_clip's inputs; `CLIPModel` takes the same without `padding_side`)."""
        inputs = {k: v.to(self.device) for k, v in make_inputs(config, self.shapes.batch_size).items()}
        return {**inputs, "padding_side": padding_side_of(inputs["attention_mask"].cpu())}

    @property
    def precision(self) -> str:
        return "bf16" if self.shapes.bf16 else "fp32"

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.shapes.bf16)

    def train_step(self, model: torch.nn.Module, inputs: dict) -> Callable[[], None]:
        """A train step (bf16 autocast on GPUs) with fused AdamW; the device synchronises at its end, so the timing
        is exact."""
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

        def step():
            with self.autocast():
                loss = model(**inputs, return_loss=True).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self.synchronize()
        return step

    def peak_memory(self, step: Callable[[], None]) -> float | None:
        """Call `step` once; on CUDA, its peak allocated memory above what was allocated before, in GiB."""
        if self.device.type != "cuda":
            step()
            return None
        self.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        return (torch.cuda.max_memory_allocated() - before) / 2**30

    def memory_note(self, steps: dict[str, Callable[[], None]]) -> str:
        """The note "peak memory A vs B GiB" for two steps, measured one after the other; empty on CPUs."""
        peaks = [self.peak_memory(step) for step in steps.values()]
        if None in peaks:
            return ""
        return "peak memory " + " vs ".join(f"{peak:.1f}" for peak in peaks) + " GiB"

    # -- the rows -----------------------------------------------------------------------------------------------
    def train_step_row(self) -> list[Row]:
        config = self.config()
        ours = self.model(config)
        with torch.device(self.device):
            theirs = transformers_from_hf_clip(ours).train()
        inputs = self.inputs(config)
        plain = {k: v for k, v in inputs.items() if k != "padding_side"}
        steps = {"hf_clip": self.train_step(ours, inputs), "CLIPModel": self.train_step(theirs, plain)}
        rates = median_throughput(steps, self.shapes.batch_size, self.shapes.repeats)
        self.step_rate = rates["hf_clip"]
        return [Row(f"train step, {self.shapes.preset}, batch {self.shapes.batch_size}, {self.precision}",
                    f"hf_clip {rates['hf_clip']:,.0f} samples/s", f"CLIPModel {rates['CLIPModel']:,.0f} samples/s",
                    ratio(rates["hf_clip"], rates["CLIPModel"]), notes=self.memory_note(steps))]

    def patch_dropout_row(self) -> list[Row]:
        full = self.model(self.config())
        dropped = self.model(self.config(patch_dropout=0.5), like=full)
        inputs = self.inputs(full.config)
        steps = {"0.5": self.train_step(dropped, inputs), "0.0": self.train_step(full, inputs)}
        rates = median_throughput(steps, self.shapes.batch_size, self.shapes.repeats)
        return [Row(f"patch dropout 0.5 vs 0.0, train step, {self.shapes.preset}, batch {self.shapes.batch_size}, "
                    f"{self.precision}", f"{rates['0.5']:,.0f} samples/s", f"{rates['0.0']:,.0f} samples/s",
                    ratio(rates["0.5"], rates["0.0"]), notes=self.memory_note(steps))]

    def loss_rows(self) -> list[Row]:
        rows = []
        for n in self.shapes.loss_sizes:
            chunked = self.loss_case(n, self.shapes.loss_chunk_size)
            dense_bytes = 3 * n * n * 4  # the logit matrix, its softmax and its gradient, in fp32
            if self.device.type == "cuda" and dense_bytes > torch.cuda.mem_get_info()[0]:
                dense, note = None, f"dense not run: needs about {dense_bytes / 2**30:,.0f} GB"
            else:
                try:
                    dense, note = self.loss_case(n, 0), ""
                except torch.OutOfMemoryError:
                    dense, note = None, "dense ran out of memory"
            self.free_memory()
            chunk = self.shapes.loss_chunk_size or "auto"
            memory = "" if dense is None or dense[1] is None else f"; memory {chunked[1] / dense[1]:.3f}x"
            rows.append(Row(f"InfoNCE forward + backward, N = {n:,}, d = {self.shapes.loss_dim}, fp32",
                            f"chunked ({chunk} rows): {describe_loss(*chunked)}",
                            "" if dense is None else f"dense: {describe_loss(*dense)}",
                            "" if dense is None else ratio(chunked[0], dense[0], "time ") + memory, notes=note))
        return rows

    def loss_case(self, n: int, chunk_size: int | None) -> tuple[float, float | None]:
        generator = torch.Generator(self.device).manual_seed(0)
        image = torch.nn.functional.normalize(
            torch.randn(n, self.shapes.loss_dim, device=self.device, generator=generator), dim=-1).requires_grad_()
        text = torch.nn.functional.normalize(
            torch.randn(n, self.shapes.loss_dim, device=self.device, generator=generator), dim=-1).requires_grad_()
        scale = torch.tensor(100.0, device=self.device)

        def step():
            image.grad = text.grad = None
            contrastive_loss(image, text, scale, chunk_size=chunk_size).backward()
            self.synchronize()
        memory = self.peak_memory(step)
        times = []
        for _ in range(self.shapes.loss_repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return statistics.median(times), memory

    def data_rows(self) -> list[Row]:
        from hf_clip_train.args import DatasetArguments
        from hf_clip_train.data import TrainBatches, build_train_dataset, columns_of, image_transform_for, load_split

        shapes = self.shapes
        rows_needed = (3 * max(shapes.workers) + 2) * shapes.batch_size
        with tempfile.TemporaryDirectory() as folder:
            data_args = DatasetArguments(dataset_name=realistic_jpeg_dataset(Path(folder), rows_needed, shapes))
            config = self.config()
            processor = suite_processor(config, self.shapes)
            dataset = build_train_dataset(load_split(data_args, "train"), columns_of(data_args),
                                          image_transform_for(processor, train=True), seed=0)
            results = []
            for workers in shapes.workers:
                batches = TrainBatches(dataset, ContrastiveDataCollator(processor), shapes.batch_size, seed=0,
                                       num_workers=workers)
                rate = loader_rate(batches.iterate(), workers, shapes.batch_size)
                step = self.step_rate
                results.append(Row(f"training data path, {workers} DataLoader workers, batch {shapes.batch_size}",
                                   f"{rate:,.0f} samples/s",
                                   "train step: n/a (row 1 failed)" if step is None
                                   else f"train step {step:,.0f} samples/s",
                                   "" if step is None else ratio(rate, step),
                                   notes=f"{rate / workers:,.0f} samples/s per worker; images "
                                         f"{shapes.image_sides[0]}-{shapes.image_sides[1]} px, JPEG q90"))
        return results

    def flash_row(self) -> list[Row]:
        from transformers import utils

        installed = [f"flash_attention_{v}" for v in (2, 3, 4) if getattr(utils, f"is_flash_attn_{v}_available")()]
        installed = installed if self.device.type == "cuda" else []
        candidate = installed[0] if installed else "eager"
        config = self.config()
        sdpa = self.model(config)
        other = self.model(config, like=sdpa)
        other.set_attn_implementation(candidate)
        inputs = self.inputs(config)
        with torch.no_grad(), self.autocast():
            expected, got = sdpa.eval()(**inputs), other.eval()(**inputs)
        sdpa.train(), other.train()
        difference = max((got.image_embeds - expected.image_embeds).abs().max().item(),
                         (got.text_embeds - expected.text_embeds).abs().max().item())
        steps = {candidate: self.train_step(other, inputs), "sdpa": self.train_step(sdpa, inputs)}
        rates = median_throughput(steps, self.shapes.batch_size, self.shapes.repeats)
        note = f"largest embedding difference {difference:.1e} ({self.precision})"
        if not installed:
            note += ("; flash-attn is not installed" + ("" if self.device.type == "cuda" else " (CPU)")
                     + ", so eager stands in for it")
        return [Row(f"{candidate} vs sdpa, train step, {self.shapes.preset}, batch {self.shapes.batch_size}, "
                    f"{self.precision}",
                    f"{rates[candidate]:,.0f} samples/s", f"sdpa {rates['sdpa']:,.0f} samples/s",
                    ratio(rates[candidate], rates["sdpa"]), notes=note)]

    def sync_row(self) -> list[Row]:
        if self.device.type != "cuda":
            return [Row("no host sync in hf_clip_train.train's step", "not run: CUDA only",
                        notes="on CPUs tests/test_host_sync.py proves it with a guard on every host read")]
        from accelerate import Accelerator
        from transformers import get_cosine_schedule_with_warmup

        from hf_clip_train.args import RunArguments
        from hf_clip_train.data import ImageTransform
        from hf_clip_train.train import build_optimizer, model_inputs, train_step

        run = RunArguments(max_steps=4, warmup_steps=1)
        accelerator = Accelerator(mixed_precision="bf16", step_scheduler_with_optimizer=False)  # as hf_clip_train.train
        config = self.config()
        model = HFClipModel(config)
        optimizer = build_optimizer(model, run)
        scheduler = get_cosine_schedule_with_warmup(optimizer, 1, run.max_steps)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        model.train()
        right = {k: v.cpu() for k, v in make_inputs(config, self.shapes.batch_size).items()}
        right["pixel_values"] = torch.randint(0, 256, right["pixel_values"].shape, dtype=torch.uint8)  # as collated
        transform = ImageTransform(size=config.vision_config.image_size, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
                                   train=True)
        shifts = (right["attention_mask"] == 0).sum(-1).tolist()
        left = {**right, **{key: torch.stack([row.roll(s) for row, s in zip(right[key], shifts)])
                            for key in ("input_ids", "attention_mask")}}
        passed = []
        for name, batch in (("right-padded", right), ("left-padded", left)):
            for index in range(2):  # a warm-up step outside the check, then one inside it
                previous = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("error" if index else "default")
                try:
                    inputs = model_inputs({**batch, "padding_side": padding_side_of(batch["attention_mask"])},
                                          accelerator.device, transform)
                    train_step(accelerator, model, optimizer, scheduler, inputs, run)
                    accelerator.unwrap_model(model).clamp_logit_scale_()
                finally:
                    torch.cuda.set_sync_debug_mode(previous)
            passed.append(name)
        self.synchronize()
        return [Row("no host sync in hf_clip_train.train's step (bf16, Accelerate)",
                    "passed: " + ", ".join(passed), notes='torch.cuda.set_sync_debug_mode("error") around the '
                    "batch's copy, forward, loss, backward, clipping, AdamW and the scale clamp")]

    def compile_row(self) -> list[Row]:
        eager = self.model(self.config())
        compiled = self.model(self.config(), like=eager)
        compiled.compile_towers(backend=self.shapes.compile_backend)
        inputs = self.inputs(eager.config)
        steps = {"compiled": self.train_step(compiled, inputs), "eager": self.train_step(eager, inputs)}
        start = time.perf_counter()
        steps["compiled"]()
        first_call = time.perf_counter() - start
        rates = median_throughput(steps, self.shapes.batch_size, self.shapes.repeats)
        return [Row(f"compile_towers ({self.shapes.compile_backend}) vs eager, train step, {self.shapes.preset}, "
                    f"batch {self.shapes.batch_size}, {self.precision}",
                    f"{rates['compiled']:,.0f} samples/s", f"eager {rates['eager']:,.0f} samples/s",
                    ratio(rates["compiled"], rates["eager"]), notes=f"first compiled step {first_call:.0f} s")]

    def towers_rows(self, ours: HFClipModel, theirs: torch.nn.Module, inputs: dict, measure: str,
                    baseline: str) -> list[Row]:
        """hf_clip's train step against a Transformers model with the same weights, on the device."""
        ours, theirs = ours.to(self.device).train(), theirs.to(self.device).train()
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        steps = {"hf_clip": self.train_step(ours, inputs), baseline: self.train_step(theirs, inputs)}
        rates = median_throughput(steps, self.shapes.towers_batch_size, self.shapes.repeats)
        return [Row(f"{measure}, batch {self.shapes.towers_batch_size}, {self.precision}",
                    f"hf_clip {rates['hf_clip']:,.0f} samples/s", f"{baseline} {rates[baseline]:,.0f} samples/s",
                    ratio(rates["hf_clip"], rates[baseline]), notes=self.memory_note(steps))]

    def composed_row(self) -> list[Row]:
        shapes = self.shapes
        ours = bench_towers.composed_model(shapes.composed_vision, shapes.composed_text,
                                           shapes.projection_dim or 512)
        inputs = bench_towers.composed_batch(ours, shapes.towers_batch_size, shapes.towers_context)
        return self.towers_rows(ours, transformers_from_composed(ours), inputs,
                                f"train step, composed ViT + BERT ({shapes.towers_context} tokens)",
                                "VisionTextDualEncoderModel")

    def siglip_row(self) -> list[Row]:
        ours, reference = bench_towers.siglip_pair(self.shapes.siglip_vision, self.shapes.siglip_text)
        inputs = bench_towers.siglip_batch(reference.config, self.shapes.towers_batch_size)
        return self.towers_rows(ours, reference, inputs, "train step, SigLIP loaded with from_pretrained",
                                "SiglipModel")


def describe_loss(seconds: float, memory: float | None) -> str:
    return f"{seconds:.3f} s" + ("" if memory is None else f", {memory:.2f} GiB")


def ratio(value: float, baseline: float, prefix: str = "") -> str:
    return f"{prefix}{value / baseline:.2f}x"


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else "")[:160]


def where(error: BaseException) -> str:
    """The suffix " (at path:line)": the innermost frame of this repository's code that the error passed through."""
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if Path(frame.filename).resolve().is_relative_to(REPO) and frame.name != "expire"]
    if not frames:
        return ""
    return f" (at {Path(frames[-1].filename).resolve().relative_to(REPO)}:{frames[-1].lineno})"


def suite_processor(config: HFClipConfig, shapes: Shapes) -> HFClipProcessor:
    """A processor for `config`'s image size with a small trained tokenizer (the captions are few and short)."""
    from hf_clip import train_clip_tokenizer

    captions = [f"a photo of a {c} {t}" for c in ("red", "green", "blue") for t in ("flower", "building", "car")]
    tokenizer = train_clip_tokenizer(captions, vocab_size=600,
                                     model_max_length=config.text_config.max_position_embeddings)
    return HFClipProcessor.from_tokenizer(tokenizer, image_size=config.vision_config.image_size)


def realistic_jpeg_dataset(folder: Path, rows: int, shapes: Shapes, distinct: int = 48) -> str:
    """A `save_to_disk` dataset of `rows` image-caption rows whose images are `distinct` real photographs
    (scikit-learn's two sample photos, 427x640) cropped and re-encoded as JPEG (quality 90) with the longer side
    between `shapes.image_sides`; rows reuse them, so building it takes seconds while every row is decoded anew."""
    import datasets
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(array) for array in load_sample_images().images]
    rng = np.random.default_rng(0)
    encoded = []
    for index in range(distinct):
        photo = photos[index % len(photos)]
        width, height = photo.size
        crop_w, crop_h = int(width * rng.uniform(0.6, 1.0)), int(height * rng.uniform(0.6, 1.0))
        left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
        crop = photo.crop((left, top, left + crop_w, top + crop_h))
        side = int(rng.integers(*shapes.image_sides))
        scale = side / max(crop.size)
        crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))),
                           Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    table = {"image": [{"bytes": encoded[i % distinct], "path": None} for i in range(rows)],
             "caption": [f"a photo, number {i}" for i in range(rows)]}
    datasets.Dataset.from_dict(table, features=features).save_to_disk(str(folder / "jpegs"))
    return str(folder / "jpegs")


def loader_rate(batches: Iterator, workers: int, batch_size: int) -> float:
    """Samples/s of a DataLoader in its steady state: the first round of batches (one per worker: start-up) is
    skipped, then the next two rounds are timed."""
    first_round, timed = max(1, workers), 2 * max(1, workers)
    for _ in range(first_round):
        next(batches)
    start = time.perf_counter()
    for _ in range(timed):
        next(batches)
    return timed * batch_size / (time.perf_counter() - start)


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())


def describe(device: torch.device, smoke: bool) -> str:
    import transformers

    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        where = (f"{properties.name} ({properties.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, TF32 "
                 f"matmuls {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}")
    else:
        where = f"CPU ({cpu_name()}), {torch.get_num_threads()} thread(s)"
    mode = "smoke run (tiny shapes; the figures mean nothing)" if smoke else "full run"
    return f"{mode} on {where}; torch {torch.__version__}, transformers {transformers.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks that every row runs")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds after which no new row starts")
    parser.add_argument("--output", help="also write the header and table to this markdown file")
    args = parser.parse_args(argv)
    sys.path[:0] = [str(REPO), str(REPO / "training")]  # the checkout's hf_clip and hf_clip_train, uninstalled
    if args.smoke:
        shapes, device = SMOKE, torch.device("cpu")
        torch.set_num_threads(1)  # tiny shapes gain nothing from more threads, and lose much on a shared machine
    elif torch.cuda.is_available():
        shapes, device = GPU, torch.device("cuda")
    else:
        parser.error("no CUDA device here; run with --smoke to check the suite on the CPU")
    suite = Suite(shapes, device, args.budget)
    suite.run("step", f"train step, {shapes.preset}, batch {shapes.batch_size}", ">= 1.3x",
              suite.train_step_row)
    suite.run("patch_dropout", "patch dropout 0.5 vs 0.0", "", suite.patch_dropout_row)
    suite.run("loss", "chunked InfoNCE vs dense", "", suite.loss_rows)
    suite.run("data", "training data path vs the train step", ">= 1.0x", suite.data_rows)
    suite.run("flash", "flash attention vs sdpa", "", suite.flash_row)
    suite.run("sync", "no host sync in hf_clip_train.train's step", "passes", suite.sync_row)
    suite.run("composed", "train step, composed ViT + BERT", ">= 1.0x", suite.composed_row)
    suite.run("siglip", "train step, SigLIP loaded with from_pretrained", ">= 1.0x", suite.siglip_row)
    suite.run("compile", "compile_towers vs eager", "", suite.compile_row)
    text = f"{describe(device, args.smoke)}; {time.perf_counter() - suite.start:.0f} s\n\n{suite.table()}\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
