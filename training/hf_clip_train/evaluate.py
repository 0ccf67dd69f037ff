"""Zero-shot classification and image-text retrieval evaluation of a saved hf_clip model (`evaluate_split` of
`hf_clip_train.evaluation`).

    python -m hf_clip_train.evaluate --model_name_or_path outputs/hf-clip      # the embedded dataset's test splits
    python -m hf_clip_train.evaluate --model_name_or_path DIR --dataset_name DATA --eval_splits test \
        --templates "a photo of a {}."

The model, dataset, column and eval-split flags are those of `hf_clip_train.train`. Under `accelerate launch` /
`torchrun`, every process embeds its share of the rows.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoModel, AutoProcessor

from .args import (
    DatasetArguments,
    EvalArguments,
    InputError,
    LoaderArguments,
    ModelArguments,
    parse_with_config_file,
)
from .data import check_label_columns, columns_of
from .evaluation import evaluate_splits, format_results_table, load_eval_splits, zero_shot_templates
from .runtime import process_state, setup_logging

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
        raise InputError("--model_name_or_path is required: the saved hf_clip or Transformers CLIP model to evaluate.")
    return parsed


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    model_args, data_args, eval_args, loader_args, output_args = parse_args(argv)
    state = process_state()
    setup_logging(state.is_main_process)
    model = AutoModel.from_pretrained(model_args.model_name_or_path).to(state.device)
    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path)
    columns = columns_of(data_args)
    splits = load_eval_splits(data_args, eval_args, missing="raise")
    check_label_columns(splits, data_args.dataset_name, columns.label)
    results = evaluate_splits(model, processor, splits, columns, zero_shot_templates(data_args, eval_args),
                              loader_args, split_across_processes=True)
    if state.is_main_process:
        print(format_results_table(results))
        if output_args.output_file:
            Path(output_args.output_file).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    from .cli import run_script

    run_script(main, "evaluate")
