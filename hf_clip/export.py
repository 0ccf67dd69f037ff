"""Export an hf_clip model for tools that do not run hf_clip: ONNX graphs of both towers, and a plain Transformers
CLIP folder.

`export_onnx` needs the `[onnx]` extra (onnx, onnxscript, onnxruntime), imported only when it runs. The console
script `hf-clip-export` (`python -m hf_clip.export`) exposes both:

    hf-clip-export onnx MODEL_DIR OUT_DIR [--quantize]
    hf-clip-export clip MODEL_DIR OUT_DIR [--drop_logit_bias]
"""

import argparse
import copy
import importlib.util
import json
import logging
import math
import os
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPModel, CLIPProcessor

from .convert import clip_config_from_hf_clip_config
from .modeling_hf_clip import HFClipModel
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


def missing_onnx_extra() -> list[str]:
    """The distributions of the `[onnx]` extra that are not installed."""
    return [package for module, package in ONNX_EXTRA.items() if importlib.util.find_spec(module) is None]


def _require_onnx_extra() -> None:
    missing = missing_onnx_extra()
    if missing:
        raise ImportError(f"ONNX export needs the onnx extra; {', '.join(missing)} not installed. Install it with: "
                          'pip install "hf-clip[onnx]"')


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
                  dynamic_shapes: tuple, opset_version: int | None) -> None:
    program = torch.onnx.export(
        module.eval(), args, dynamo=True, input_names=input_names, output_names=output_names,
        dynamic_shapes=dynamic_shapes, opset_version=opset_version, verbose=False,
    )
    program.save(str(path))


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
        logit_scale_max=model.config.logit_scale_max, bias_note=bias_note,
        image_size=model.config.vision_config.image_size,
    )


def export_onnx(model: HFClipModel, processor: HFClipProcessor, output_dir: str | os.PathLike, *,
                quantize: bool = False, opset_version: int | None = None) -> dict[str, Path]:
    """Export both towers of `model` to ONNX in `output_dir`, with `processor`'s files and a README of the graphs.

    Writes `text_model.onnx` (input_ids, attention_mask: (batch, sequence) int64 -> text_embeds
    (batch, projection_dim), logit_scale ()) and `vision_model.onnx` (pixel_values (batch, C, H, W) float32 ->
    image_embeds, logit_scale ()); a SigLIP model's graphs also output logit_bias (). The embeddings are the projected,
    unnormalised `get_text_features` / `get_image_features` ones. Batch and sequence length are dynamic; text takes
    right or left padding, as in PyTorch. With `quantize=True`, also `text_model_int8.onnx` and
    `vision_model_int8.onnx` (onnxruntime's dynamic int8 quantisation of the weights).

    Uses torch's dynamo exporter; needs the `[onnx]` extra. Returns {file name: path} of what was written.
    """
    _require_onnx_extra()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    score_outputs = ["logit_scale"] + ([] if model.logit_bias is None else ["logit_bias"])
    was_training = model.training
    try:
        batch = torch.export.Dim("batch")
        sequence = torch.export.Dim("sequence", max=model.config.text_config.max_position_embeddings)
        _export_graph(
            TextTowerForExport(model), _example_text(model), output_dir / TEXT_MODEL_FILE,
            ["input_ids", "attention_mask"], ["text_embeds", *score_outputs],
            ({0: batch, 1: sequence}, {0: batch, 1: sequence}), opset_version,
        )
        size = model.config.vision_config.image_size
        pixel_values = torch.zeros(2, model.config.vision_config.num_channels, size, size, dtype=model.dtype)
        _export_graph(
            VisionTowerForExport(model), (pixel_values,), output_dir / VISION_MODEL_FILE,
            ["pixel_values"], ["image_embeds", *score_outputs], ({0: batch},), opset_version,
        )
    finally:
        model.train(was_training)
    written = {name: output_dir / name for name in (TEXT_MODEL_FILE, VISION_MODEL_FILE)}
    if quantize:
        for source, target in ((TEXT_MODEL_FILE, TEXT_MODEL_INT8_FILE), (VISION_MODEL_FILE, VISION_MODEL_INT8_FILE)):
            _quantize(output_dir / source, output_dir / target)
            written[target] = output_dir / target
    processor.save_pretrained(output_dir)
    processor.image_processor.save_pretrained(output_dir)
    readme = output_dir / "README.md"
    readme.write_text(_onnx_readme(model, written), encoding="utf-8")
    written["README.md"] = readme
    return written


def export_clip(model: HFClipModel, processor: HFClipProcessor, output_dir: str | os.PathLike, *,
                drop_logit_bias: bool = False) -> Path:
    """Write `output_dir` as a plain Transformers `CLIPModel` + `CLIPProcessor` folder: no custom code, no `auto_map`,
    nothing that names hf_clip, for tools that only know `CLIPModel`.

    The outputs are `model`'s: the same weights, the temperature stored clamped to `config.logit_scale_max` (which
    `CLIPModel` does not clamp), and a tokenizer that pads on the right (plain CLIP pools right-padded text as hf_clip
    does, but has no left-padding positions). Refused, with the reason: a SigLIP model (`CLIPModel` has no
    `logit_bias`; `drop_logit_bias=True` drops it, which keeps the embeddings and the ranking of one image's texts
    but not the logits or sigmoid probabilities), and a text config with several end-of-text ids.
    Returns `output_dir`.
    """
    config = model.config
    if isinstance(config.text_config.eos_token_id, list):
        raise ValueError(
            f"export_clip: the text config has several end-of-text ids {config.text_config.eos_token_id}; "
            "CLIPModel pools at one `eos_token_id`."
        )
    state_dict = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    if model.logit_bias is not None:
        if not drop_logit_bias:
            raise ValueError(
                f"export_clip: this model was trained with loss_type {config.loss_type!r}, and its logits add a "
                f"learned logit_bias ({model.logit_bias.item():.4g}) that Transformers' CLIPModel cannot hold. Pass "
                "drop_logit_bias=True to export without it: embeddings, and the ranking of texts for an image, stay "
                "the same; logits and sigmoid probabilities do not."
            )
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

    output_dir = Path(output_dir)
    clip_model.save_pretrained(output_dir)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(output_dir)
    image_processor.save_pretrained(output_dir)
    _check_plain(output_dir)
    return output_dir


def _check_plain(folder: Path) -> None:
    """Every JSON file in `folder` is free of `auto_map` and of hf_clip's names, and it holds no Python file."""
    for path in sorted(folder.iterdir()):
        if path.suffix == ".py":
            raise RuntimeError(f"export_clip wrote custom code {path.name} into {folder}.")
        if path.suffix == ".json":
            text = path.read_text(encoding="utf-8")
            if "auto_map" in json.loads(text) or "hf_clip" in text or "HFClip" in text:
                raise RuntimeError(f"export_clip: {path} still points at hf_clip.")


def main(argv: list[str] | None = None) -> None:
    """`hf-clip-export onnx|clip MODEL_DIR OUT_DIR`: see the module docstring."""
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
        command.add_argument("output_dir")
    args = parser.parse_args(argv)

    if args.command == "onnx" and missing_onnx_extra():
        parser.exit(1, f"hf-clip-export onnx needs the onnx extra ({', '.join(missing_onnx_extra())} not "
                       'installed): pip install "hf-clip[onnx]"\n')
    model = HFClipModel.from_pretrained(args.model).eval()
    processor = HFClipProcessor.from_pretrained(args.model)
    if args.command == "onnx":
        written = export_onnx(model, processor, args.output_dir, quantize=args.quantize,
                              opset_version=args.opset_version)
        print("\n".join(str(path) for path in written.values()))
    else:
        try:
            print(export_clip(model, processor, args.output_dir, drop_logit_bias=args.drop_logit_bias))
        except ValueError as error:
            parser.exit(1, f"{error}\n")


__all__ = ["TextTowerForExport", "VisionTowerForExport", "export_clip", "export_onnx", "missing_onnx_extra"]

if __name__ == "__main__":
    main()
