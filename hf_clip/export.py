"""Export an hf_clip model for tools that do not run hf_clip: ONNX graphs of both towers, and a plain Transformers
CLIP folder.

`export_onnx` needs the `[onnx]` extra (onnx, onnxscript, onnxruntime), imported only when it runs. The console
script `hf-clip-export` (`python -m hf_clip.export`) exposes both:

    hf-clip-export onnx MODEL_DIR OUT_DIR [--quantize] [--overwrite]
    hf-clip-export clip MODEL_DIR OUT_DIR [--drop_logit_bias] [--overwrite]

Both refuse an output folder that is not empty unless asked to replace it (`overwrite=True`, `--overwrite`), and never
write into, or replace, the folder of the model they export, whatever the flags. They write into a temporary folder
beside the output and rename it into place at the end, so a failed export leaves the output folder as it was.
"""

import argparse
import contextlib
import copy
import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import CLIPModel, CLIPProcessor

from .cli import UsageError, run_cli
from .configuration_hf_clip import HFClipTextConfig
from .convert import clip_config_from_hf_clip_config
from .modeling_hf_clip import HFClipModel, check_image_size, check_text_inputs
from .processing_hf_clip import HFClipProcessor

logger = logging.getLogger(__name__)

ONNX_EXTRA = {"onnx": "onnx", "onnxscript": "onnxscript", "onnxruntime": "onnxruntime"}
TEXT_MODEL_FILE = "text_model.onnx"
VISION_MODEL_FILE = "vision_model.onnx"
TEXT_MODEL_INT8_FILE = "text_model_int8.onnx"
VISION_MODEL_INT8_FILE = "vision_model_int8.onnx"


class TextTowerForExport(nn.Module):
    """input_ids, attention_mask (batch, seq) -> text_embeds (batch, projection_dim), `get_text_features`' projected
    and unnormalised embedding; logit_scale (), the clamped exp(logit_scale); and logit_bias () for SigLIP."""

    def __init__(self, model: HFClipModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        text_embeds = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return (text_embeds, *_score_parameters(self.model))


class VisionTowerForExport(nn.Module):
    """pixel_values (batch, C, H, W) -> image_embeds (batch, projection_dim), `get_image_features`' projected and
    unnormalised embedding; logit_scale (); and logit_bias () for SigLIP."""

    def __init__(self, model: HFClipModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image_embeds = self.model.get_image_features(pixel_values=pixel_values).pooler_output
        return (image_embeds, *_score_parameters(self.model))


def _score_parameters(model: HFClipModel) -> tuple[torch.Tensor, ...]:
    logit_scale = model.clamped_logit_scale()
    return (logit_scale,) if model.logit_bias is None else (logit_scale, model.logit_bias.reshape(()))


class OnnxHFClipModel:
    """The graphs `export_onnx` wrote to `folder`, run in onnxruntime, with the input checks of the PyTorch model.

    The graphs themselves check only what onnxruntime checks (element types, ranks, the fixed image size); an
    out-of-range or negative token id, a row without its end-of-text token, a text longer than the context, or an
    attention_mask of another shape would give an error from inside the graph or a wrong embedding
    (docs/checks.md). `get_text_features` and `get_image_features` first run `check_text_inputs` and
    `check_image_size`, so they refuse the same inputs as `HFClipModel` with the same exceptions and messages.
    `int8=True` runs the quantised graphs.
    """

    def __init__(self, folder: str | os.PathLike, *, int8: bool = False,
                 providers: Sequence[str] = ("CPUExecutionProvider",)):
        import onnxruntime

        folder = Path(folder)
        names = (TEXT_MODEL_INT8_FILE, VISION_MODEL_INT8_FILE) if int8 else (TEXT_MODEL_FILE, VISION_MODEL_FILE)
        for name in names:
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} has no {name}; write it with hf_clip.export.export_onnx"
                                        f"{'(..., quantize=True)' if int8 else ''} (hf-clip-export onnx).")
        self.text_session = onnxruntime.InferenceSession(str(folder / names[0]), providers=list(providers))
        self.vision_session = onnxruntime.InferenceSession(str(folder / names[1]), providers=list(providers))
        metadata = self.text_session.get_modelmeta().custom_metadata_map
        missing = [key for key in TEXT_METADATA_KEYS if f"hf_clip.{key}" not in metadata]
        if missing:
            raise ValueError(f"{folder / names[0]} does not record the text config's {', '.join(missing)} (it was "
                             "exported by an earlier hf_clip); export it again.")
        recorded = {key: json.loads(metadata[f"hf_clip.{key}"]) for key in TEXT_METADATA_KEYS}
        self.text_config = HFClipTextConfig(**recorded, bos_token_id=None, pad_token_id=None)
        self.image_size = self.vision_session.get_inputs()[0].shape[-1]

    def get_text_features(self, input_ids, attention_mask=None) -> np.ndarray:
        """input_ids, attention_mask (default: all ones): (batch, sequence) integers, padded on either side ->
        text_embeds (batch, projection_dim), as `HFClipModel.get_text_features(...).pooler_output`."""
        input_ids = torch.as_tensor(np.asarray(input_ids))
        if attention_mask is not None:
            attention_mask = torch.as_tensor(np.asarray(attention_mask))
        check_text_inputs(input_ids, attention_mask, self.text_config)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        feeds = {"input_ids": input_ids.numpy().astype(np.int64), "attention_mask": attention_mask.numpy().astype(
            np.int64)}
        return self.text_session.run(["text_embeds"], feeds)[0]

    def get_image_features(self, pixel_values) -> np.ndarray:
        """pixel_values (batch, C, H, W) float -> image_embeds (batch, projection_dim), as
        `HFClipModel.get_image_features(...).pooler_output`."""
        pixel_values = np.asarray(pixel_values, dtype=np.float32)
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (batch, channels, height, width), got shape {pixel_values.shape}.")
        check_image_size(*pixel_values.shape[-2:], self.image_size)
        return self.vision_session.run(["image_embeds"], {"pixel_values": pixel_values})[0]


def missing_onnx_extra() -> list[str]:
    """The distributions of the `[onnx]` extra that are not installed."""
    return [package for module, package in ONNX_EXTRA.items() if importlib.util.find_spec(module) is None]


def _require_onnx_extra() -> None:
    missing = missing_onnx_extra()
    if missing:
        raise ImportError(f"ONNX export needs the onnx extra; {', '.join(missing)} not installed. Install it with: "
                          'pip install "hf-clip[onnx]"')


def _model_folder(model: HFClipModel) -> Path | None:
    """The local folder `model` was loaded from (`from_pretrained`), or None (built in memory, or from the Hub)."""
    name = model.name_or_path
    return Path(name).expanduser().resolve() if name and Path(name).expanduser().is_dir() else None


def check_export_target(output_dir: str | os.PathLike, source_dir: str | os.PathLike | None = None, *,
                        overwrite: bool = False) -> Path:
    """The resolved `output_dir` of an export of the model in `source_dir`, after refusing, with the reason:
    - an output that is the source folder, lies inside it, or holds it (always, `overwrite` or not: an export never
      writes into or replaces the model it reads; paths are compared after resolving links);
    - an output that is not a folder;
    - a non-empty output folder, unless `overwrite` (then its content is replaced when the export succeeds).

    Raises `ValueError` for the first two and `FileExistsError` for the last."""
    output = Path(output_dir).expanduser().resolve()
    if source_dir is not None and Path(source_dir).expanduser().is_dir():
        source = Path(source_dir).expanduser().resolve()
        if output == source:
            where = "is the folder of the model it exports"
        elif source in output.parents:
            where = f"lies inside the folder of the model it exports, {source}"
        elif output in source.parents:
            where = f"holds the folder of the model it exports, {source}"
        else:
            where = None
        if where is not None:
            raise ValueError(f"The export's output folder {output} {where}; an export never writes there (it would "
                             "replace the model's own files). Choose an output folder outside the model's.")
    if output.exists() and not output.is_dir():
        raise ValueError(f"The export's output {output} is a file, not a folder.")
    if output.is_dir() and not overwrite:
        entries = sorted(path.name for path in output.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
            raise FileExistsError(f"The export's output folder {output} is not empty (it holds {shown}). Choose a new "
                                  "or empty folder, or pass overwrite=True (hf-clip-export --overwrite) to replace "
                                  "its content.")
    return output


@contextlib.contextmanager
def _staged_folder(output: Path) -> Iterator[Path]:
    """A new temporary folder beside `output` to write into; when the block succeeds it replaces `output` (the
    previous folder is renamed aside, the new one renamed into place, then the previous one deleted). When the block
    fails, the temporary folder is deleted and `output` is left as it was."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
    try:
        if output.is_dir():
            shutil.copymode(output, staging)
        else:
            umask = os.umask(0)
            os.umask(umask)
            staging.chmod(0o777 & ~umask)
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = output.with_name(f".{output.name}.{uuid.uuid4().hex[:8]}.previous") if output.exists() else None
    if previous is not None:
        output.rename(previous)
    try:
        staging.rename(output)
    except BaseException:
        if previous is not None:
            previous.rename(output)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if previous is not None:
        shutil.rmtree(previous)


def _example_text(model: HFClipModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Two right-padded rows of ordinary ids, each ending in end-of-text, for tracing."""
    text_config = model.config.text_config
    eos_ids = text_config.eos_token_id if text_config.eos_token_id is not None else text_config.vocab_size - 1
    eos_token_id = eos_ids if isinstance(eos_ids, int) else eos_ids[0]
    length = min(8, text_config.max_position_embeddings)
    input_ids = torch.full((2, length), text_config.pad_token_id if text_config.pad_token_id is not None else 0)
    attention_mask = torch.zeros(2, length, dtype=torch.long)
    for row, row_length in enumerate((length, max(2, length // 2))):
        input_ids[row, : row_length - 1] = torch.arange(1, row_length) % text_config.vocab_size
        input_ids[row, row_length - 1] = eos_token_id
        attention_mask[row, :row_length] = 1
    return input_ids, attention_mask


def _export_graph(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
                  dynamic_shapes: tuple, opset_version: int | None, metadata: dict[str, str]) -> None:
    program = torch.onnx.export(
        module.eval(), args, dynamo=True, input_names=input_names, output_names=output_names,
        dynamic_shapes=dynamic_shapes, opset_version=opset_version, verbose=False,
    )
    program.model.metadata_props.update(metadata)
    program.save(str(path))


# What `OnnxHFClipModel` needs to check text inputs as the PyTorch model does, kept in the text graph's metadata.
TEXT_METADATA_KEYS = ("vocab_size", "eos_token_id", "max_position_embeddings")


def _text_metadata(model: HFClipModel) -> dict[str, str]:
    """The text config's fields `TEXT_METADATA_KEYS` as "hf_clip.{field}": its JSON value."""
    text_config = model.config.text_config
    return {f"hf_clip.{key}": json.dumps(getattr(text_config, key)) for key in TEXT_METADATA_KEYS}


def _quantize(source: Path, target: Path) -> None:
    """onnxruntime's dynamic quantisation: int8 weights for the matrix products, activations quantised on the fly."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The exporter's intermediate shape annotations disagree with the quantiser's re-inference once it rewrites the
    # graph ("Inferred shape and existing shape differ"); the quantiser infers them again without them.
    graph = onnx.load(str(source))
    del graph.graph.value_info[:]
    unannotated = target.with_name(target.stem + ".unannotated.onnx")
    onnx.save(graph, str(unannotated))
    try:
        quantize_dynamic(str(unannotated), str(target), weight_type=QuantType.QInt8)
    finally:
        unannotated.unlink()


def _describe_values(values) -> list[str]:
    """One Markdown table row per graph input or output: name, element type, shape (symbolic dims by name)."""
    import onnx

    rows = []
    for value in values:
        tensor_type = value.type.tensor_type
        dims = [dim.dim_param or str(dim.dim_value) for dim in tensor_type.shape.dim]
        element_type = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
        rows.append(f"| `{value.name}` | {element_type} | ({', '.join(dims)}) |")
    return rows


_ONNX_README = """# ONNX export of an hf_clip model

Written by `hf_clip.export.export_onnx`. The image and text towers are separate graphs, with a dynamic batch
(and, for text, a dynamic sequence length up to the model's context of {context} tokens).

{graphs}
`text_embeds` and `image_embeds` are the projected, unnormalised embeddings (`get_text_features` and
`get_image_features` in PyTorch). `logit_scale` is the model's temperature, exp(logit_scale) clamped to
{logit_scale_max}. To score images against texts as the model does, L2-normalise both embeddings and take
`logit_scale * image_embeds @ text_embeds.T`{bias_note}.

Preprocess with the processor saved here (`tokenizer.json`, and the image settings in `preprocessor_config.json`):
`HFClipProcessor.from_pretrained(this_folder)`, or `AutoProcessor.from_pretrained(this_folder,
trust_remote_code=True)` without hf_clip. Text is tokenized with `padding=True, truncation=True`; images are
resized and centre-cropped to {image_size}x{image_size}.

The graphs check no input values. Every token id must lie in 0..{last_id}, each row must keep its end-of-text
token, a batch may be at most {context} tokens long, and `attention_mask` must have the shape of `input_ids`; the
processor's output always does. `hf_clip.export.OnnxHFClipModel(this_folder)` runs the graphs with these checks, as
the PyTorch model makes them.
"""


def _onnx_readme(model: HFClipModel, graphs: dict[str, Path]) -> str:
    import onnx

    sections = []
    for name, path in graphs.items():
        graph = onnx.load(str(path), load_external_data=False).graph
        sections.append("\n".join([
            f"## `{name}`", "", "| input | type | shape |", "| --- | --- | --- |", *_describe_values(graph.input), "",
            "| output | type | shape |", "| --- | --- | --- |", *_describe_values(graph.output), "",
        ]))
    bias_note = "" if model.logit_bias is None else " + logit_bias (the SigLIP bias; apply a sigmoid for probabilities)"
    return _ONNX_README.format(
        context=model.config.text_config.max_position_embeddings, graphs="\n".join(sections),
        last_id=model.config.text_config.vocab_size - 1,
        logit_scale_max=model.config.logit_scale_max, bias_note=bias_note,
        image_size=model.config.vision_config.image_size,
    )


def export_onnx(model: HFClipModel, processor: HFClipProcessor, output_dir: str | os.PathLike, *,
                quantize: bool = False, opset_version: int | None = None, overwrite: bool = False) -> dict[str, Path]:
    """Export both towers of `model` to ONNX in `output_dir`, with `processor`'s files and a README of the graphs.

    Writes `text_model.onnx` (input_ids, attention_mask: (batch, sequence) int64 -> text_embeds
    (batch, projection_dim), logit_scale ()) and `vision_model.onnx` (pixel_values (batch, C, H, W) float32 ->
    image_embeds, logit_scale ()); a SigLIP model's graphs also output logit_bias (). The embeddings are the projected,
    unnormalised `get_text_features` / `get_image_features` ones. Batch and sequence length are dynamic; text takes
    right or left padding, as in PyTorch. With `quantize=True`, also `text_model_int8.onnx` and
    `vision_model_int8.onnx` (onnxruntime's dynamic int8 quantisation of the weights). The graphs check no input
    value; `OnnxHFClipModel` runs them with the checks the PyTorch model makes (docs/checks.md).

    The output folder is checked by `check_export_target` against the folder `model` was loaded from, and written
    whole or not at all (`overwrite=True` replaces a non-empty one). Uses torch's dynamo exporter; needs the
    `[onnx]` extra. Returns {file name: path} of what was written.
    """
    _require_onnx_extra()
    output = check_export_target(output_dir, _model_folder(model), overwrite=overwrite)
    names = [TEXT_MODEL_FILE, VISION_MODEL_FILE]
    with _staged_folder(output) as staging:
        _export_towers(model, staging, opset_version)
        if quantize:
            for source, target in ((TEXT_MODEL_FILE, TEXT_MODEL_INT8_FILE),
                                   (VISION_MODEL_FILE, VISION_MODEL_INT8_FILE)):
                _quantize(staging / source, staging / target)
                names.append(target)
        processor.save_pretrained(staging)
        processor.image_processor.save_pretrained(staging)
        readme = _onnx_readme(model, {name: staging / name for name in names})
        (staging / "README.md").write_text(readme, encoding="utf-8")
    return {name: output / name for name in [*names, "README.md"]}


def _export_towers(model: HFClipModel, output_dir: Path, opset_version: int | None) -> None:
    score_outputs = ["logit_scale"] + ([] if model.logit_bias is None else ["logit_bias"])
    was_training = model.training
    try:
        batch = torch.export.Dim("batch")
        sequence = torch.export.Dim("sequence", max=model.config.text_config.max_position_embeddings)
        _export_graph(
            TextTowerForExport(model), _example_text(model), output_dir / TEXT_MODEL_FILE,
            ["input_ids", "attention_mask"], ["text_embeds", *score_outputs],
            ({0: batch, 1: sequence}, {0: batch, 1: sequence}), opset_version, _text_metadata(model),
        )
        size = model.config.vision_config.image_size
        pixel_values = torch.zeros(2, model.config.vision_config.num_channels, size, size, dtype=model.dtype)
        _export_graph(
            VisionTowerForExport(model), (pixel_values,), output_dir / VISION_MODEL_FILE,
            ["pixel_values"], ["image_embeds", *score_outputs], ({0: batch},), opset_version, {},
        )
    finally:
        model.train(was_training)


def export_clip(model: HFClipModel, processor: HFClipProcessor, output_dir: str | os.PathLike, *,
                drop_logit_bias: bool = False, overwrite: bool = False) -> Path:
    """Write `output_dir` as a plain Transformers `CLIPModel` + `CLIPProcessor` folder: no custom code, no `auto_map`,
    nothing that names hf_clip, for tools that only know `CLIPModel`.

    The outputs are `model`'s: the same weights, the temperature stored clamped to `config.logit_scale_max` (which
    `CLIPModel` does not clamp), and a tokenizer that pads on the right (plain CLIP pools right-padded text as hf_clip
    does, but has no left-padding positions). Refused, with the reason: a SigLIP model (`CLIPModel` has no
    `logit_bias`; `drop_logit_bias=True` drops it, which keeps the embeddings and the ranking of one image's texts
    but not the logits or sigmoid probabilities), and a text config with several end-of-text ids.
    The output folder is checked and written as by `export_onnx` (`overwrite`). Returns `output_dir`, resolved.
    """
    config = model.config
    if isinstance(config.text_config.eos_token_id, list):
        raise ValueError(
            f"export_clip: the text config has several end-of-text ids {config.text_config.eos_token_id}; "
            "CLIPModel pools at one `eos_token_id`."
        )
    if model.logit_bias is not None and not drop_logit_bias:
        raise ValueError(
            f"export_clip: this model was trained with loss_type {config.loss_type!r}, and its logits add a "
            f"learned logit_bias ({model.logit_bias.item():.4g}) that Transformers' CLIPModel cannot hold. Pass "
            "drop_logit_bias=True to export without it: embeddings, and the ranking of texts for an image, stay "
            "the same; logits and sigmoid probabilities do not."
        )
    output = check_export_target(output_dir, _model_folder(model), overwrite=overwrite)
    state_dict = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    if model.logit_bias is not None:
        logger.warning("export_clip: dropped logit_bias = %.4g (CLIPModel has none); logits_per_image and "
                       "logits_per_text now lack it.", model.logit_bias.item())
        del state_dict["logit_bias"]
    state_dict["logit_scale"] = state_dict["logit_scale"].clamp(max=math.log(config.logit_scale_max))
    clip_model = CLIPModel(clip_config_from_hf_clip_config(config))
    clip_model.load_state_dict(state_dict, strict=True)

    tokenizer = copy.deepcopy(processor.tokenizer)
    tokenizer.padding_side = "right"
    for key in ("auto_map", "processor_class"):
        tokenizer.init_kwargs.pop(key, None)
    image_processor = copy.deepcopy(processor.image_processor)
    image_processor.__dict__.pop("auto_map", None)

    with _staged_folder(output) as staging:
        clip_model.save_pretrained(staging)
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(staging)
        image_processor.save_pretrained(staging)
        _check_plain(staging)
    return output


def _check_plain(folder: Path) -> None:
    """Every JSON file in `folder` is free of `auto_map` and of hf_clip's names, and it holds no Python file."""
    for path in sorted(folder.iterdir()):
        if path.suffix == ".py":
            raise RuntimeError(f"export_clip wrote custom code {path.name} into {folder}.")
        if path.suffix == ".json":
            text = path.read_text(encoding="utf-8")
            if "auto_map" in json.loads(text) or "hf_clip" in text or "HFClip" in text:
                raise RuntimeError(f"export_clip: {path} still points at hf_clip.")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-clip-export", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    onnx_parser = commands.add_parser("onnx", help="ONNX graphs of both towers, processor files and a README")
    onnx_parser.add_argument("--quantize", action="store_true", help="also write dynamic int8 graphs")
    onnx_parser.add_argument("--opset_version", type=int, default=None)
    clip_parser = commands.add_parser("clip", help="a plain Transformers CLIPModel + CLIPProcessor folder")
    clip_parser.add_argument("--drop_logit_bias", action="store_true",
                             help="export a SigLIP-loss model without its logit_bias")
    for command in (onnx_parser, clip_parser):
        command.add_argument("model", help="an hf_clip model folder or Hub id, with its processor")
        command.add_argument("output_dir", help="a new or empty folder (never the model's own folder)")
        command.add_argument("--overwrite", action="store_true",
                             help="replace the content of a non-empty output folder (once the export succeeds)")
    return parser


def _looks_like_a_path(name: str) -> bool:
    """True when `name` cannot be a Hub id ("name" or "namespace/name"), so it can only mean a local folder."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1
            or name.endswith("/"))


def load_for_export(name: str) -> tuple[HFClipModel, HFClipProcessor]:
    """The model (in eval mode) and processor in folder or Hub id `name`; `UsageError` naming what is missing."""
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{name} is a file; pass the model's folder.")
    if not path.is_dir() and _looks_like_a_path(name):
        raise UsageError(f"The model folder {name} does not exist.")
    where = f"the model folder {name}" if path.is_dir() else f"{name} (no such local folder, so read as a Hub model id)"
    try:
        return HFClipModel.from_pretrained(name).eval(), HFClipProcessor.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise UsageError(f"Cannot load {where}: {error}") from None


def _main(argv: Sequence[str] | None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "onnx" and missing_onnx_extra():
        parser.exit(1, f"hf-clip-export onnx needs the onnx extra ({', '.join(missing_onnx_extra())} not "
                       'installed): pip install "hf-clip[onnx]"\n')
    try:
        check_export_target(args.output_dir, args.model, overwrite=args.overwrite)
    except (ValueError, FileExistsError) as error:
        raise UsageError(str(error).replace("overwrite=True (hf-clip-export --overwrite)", "--overwrite")) from None
    model, processor = load_for_export(args.model)
    if args.command == "onnx":
        written = export_onnx(model, processor, args.output_dir, quantize=args.quantize,
                              opset_version=args.opset_version, overwrite=args.overwrite)
        print("\n".join(str(path) for path in written.values()))
        return
    try:
        print(export_clip(model, processor, args.output_dir, drop_logit_bias=args.drop_logit_bias,
                          overwrite=args.overwrite))
    except ValueError as error:
        raise UsageError(str(error).replace("drop_logit_bias=True", "--drop_logit_bias")) from None


def main(argv: Sequence[str] | None = None) -> None:
    """`hf-clip-export onnx|clip MODEL_DIR OUT_DIR`: see the module docstring. Bad input is one line on stderr and
    exit status 2 (`hf_clip.cli.run_cli`)."""
    run_cli(_main, argv, prog="hf-clip-export")


__all__ = [
    "OnnxHFClipModel",
    "TextTowerForExport",
    "VisionTowerForExport",
    "check_export_target",
    "export_clip",
    "export_onnx",
    "load_for_export",
    "missing_onnx_extra",
]

if __name__ == "__main__":
    main()
