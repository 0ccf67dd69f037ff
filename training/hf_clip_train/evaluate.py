"""Zero-shot classification and image-text retrieval evaluation of a saved hf_clip model (`evaluate_split` of
`hf_clip_train.data`).

    python -m hf_clip_train.evaluate --model_name_or_path outputs/hf-clip      # the embedded dataset's test splits
    python -m hf_clip_train.evaluate --model_name_or_path DIR --dataset_name DATA --eval_splits test \
        --templates "a photo of a {}."

The model, dataset, column and eval-split flags are those of `hf_clip_train.train`. Under `accelerate launch` /
`torchrun`, every process embeds its share of the rows.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState
from transformers import AutoModel, AutoProcessor

from hf_clip.zero_shot import check_templates

from .args import (
    DatasetArguments,
    EvalArguments,
    LoaderArguments,
    ModelArguments,
    check_at_least_one,
    check_model_name_or_path,
    parse_with_config_file,
)
from .common import evaluate_splits, format_results_table
from .data import check_label_columns, dataset_label, first_rows, load_split

RENAMED_FLAGS = {"model": "model_name_or_path", "dataset": "dataset_name", "splits": "eval_splits",
                 "batch_size": "per_device_eval_batch_size", "num_workers": "dataloader_num_workers"}


@dataclass
class OutputArguments:
    output_file: str | None = field(default=None, metadata={"help": "Write the results as JSON here."})


def parse_args(argv: list[str] | None = None
               ) -> tuple[ModelArguments, DatasetArguments, EvalArguments, LoaderArguments, OutputArguments]:
    parsed = parse_with_config_file(
        (ModelArguments, DatasetArguments, EvalArguments, LoaderArguments, OutputArguments), argv, RENAMED_FLAGS,
        defaults={"embedded_num_train": 0})
    if parsed[0].model_name_or_path is None:
        raise ValueError("--model_name_or_path is required: the saved hf_clip or Transformers CLIP model to evaluate.")
    check_model_name_or_path(parsed[0].model_name_or_path)
    check_at_least_one(parsed[3], "per_device_eval_batch_size")
    if parsed[2].templates is not None:
        check_templates(parsed[2].templates)
    return parsed


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model_args, data_args, eval_args, loader_args, output_args = parse_args(argv)

    state = PartialState()
    model = AutoModel.from_pretrained(model_args.model_name_or_path).to(state.device)
    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path)
    splits = {}
    for name in eval_args.eval_splits:
        dataset = load_split(data_args, name)
        if dataset is None:
            raise ValueError(f"Dataset {dataset_label(data_args.dataset_name)!r} has no split {name!r}.")
        splits[name] = dataset if eval_args.max_eval_samples is None else first_rows(dataset,
                                                                                     eval_args.max_eval_samples)
    check_label_columns(splits, data_args)
    results = evaluate_splits(model, processor, splits, data_args, eval_args, loader_args,
                              split_across_processes=True)
    if state.is_main_process:
        print(format_results_table(results))
        if output_args.output_file:
            Path(output_args.output_file).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
