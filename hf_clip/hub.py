"""Share hf_clip checkpoints on the Hugging Face Hub: a model card with real metrics, and a single-commit push.

`push_to_hub` uploads, in one commit: `config.json` (with `auto_map`), `model.safetensors` (sharded above
`max_shard_size`, never a pickle), the processor / tokenizer / image-processor files, the model's code files (so
`trust_remote_code=True` works without hf_clip), `README.md` (the model card), `eval_results.json` and
`training_args.json`. `HF_ENDPOINT` chooses the Hub (huggingface.co when unset).
"""

import dataclasses
import json
import logging
import math
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
)
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

try:
    import httpx2 as httpx
except ImportError:  # huggingface_hub < 2 uses httpx
    import httpx

logger = logging.getLogger(__name__)

MODEL_CARD_TEMPLATE = Path(__file__).parent / "model_cards" / "hf_clip_model_card.md"
# 412: the branch moved between reading its head and committing; a retry re-reads the head and re-diffs.
RETRY_STATUS_CODES = (408, 412, 429, 500, 502, 503, 504)

# (metric key in eval_results.json, column title, model-index task type, task name, metric type, metric name)
_METRICS = (
    ("zero_shot_top1", "zero-shot top-1", "zero-shot-image-classification", "Zero-shot image classification",
     "accuracy", "Zero-shot top-1 accuracy"),
    ("zero_shot_top5", "zero-shot top-5", "zero-shot-image-classification", "Zero-shot image classification",
     "top_5_accuracy", "Zero-shot top-5 accuracy"),
    *((f"image_to_text_R@{k}", f"image→text R@{k}", "image-to-text-retrieval", "Image-to-text retrieval",
       f"recall@{k}", f"Image-to-text recall@{k}") for k in (1, 5, 10)),
    *((f"text_to_image_R@{k}", f"text→image R@{k}", "text-to-image-retrieval", "Text-to-image retrieval",
       f"recall@{k}", f"Text-to-image recall@{k}") for k in (1, 5, 10)),
)
_CARD_TRAINING_KEYS = (
    "model_name_or_path", "preset", "dataset_name", "dataset_config_name", "train_split", "image_column",
    "caption_column", "max_train_samples", "max_steps", "num_train_epochs", "per_device_train_batch_size",
    "gradient_accumulation_steps", "num_processes", "global_batch_size", "learning_rate", "lr_scheduler_type",
    "warmup_steps", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim",
    "mixed_precision", "bf16", "fp16", "gradient_checkpointing", "activation_checkpointing", "lock_image",
    "lock_image_unlocked_layers", "lock_text", "lock_text_unlocked_layers", "tokenizer_vocab_size",
    "context_length", "seed",
)
# The training arguments published in `training_args.json` and the card: known hyper-parameters only, so that a
# credential or a private setting under any name (api_key, passwd, credentials, ...) is never uploaded. Other keys
# are published only when named in `extra_hyperparameters`.
PUBLISHED_TRAINING_KEYS = frozenset({
    "model_name_or_path", "preset", "tokenizer_vocab_size", "context_length", "gradient_checkpointing",
    "activation_checkpointing", "lock_image", "lock_image_unlocked_layers", "lock_text", "lock_text_unlocked_layers",
    "task", "templates", "wise_ft_alpha",
    "dataset_name", "dataset_config_name", "train_split", "eval_splits", "image_column", "caption_column",
    "label_column", "streaming", "shuffle_buffer_size", "max_train_samples", "max_eval_samples", "embedded_num_train",
    "seed", "max_steps", "num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size",
    "gradient_accumulation_steps", "num_processes", "global_batch_size", "learning_rate", "lr_scheduler_type",
    "warmup_steps", "warmup_ratio", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
    "optim", "label_smoothing", "label_smoothing_factor", "mixed_precision", "bf16", "fp16",
    "logging_steps", "eval_strategy", "eval_steps", "save_strategy", "save_steps", "save_total_limit",
    "checkpointing_steps", "checkpoints_total_limit", "hub_model_id",
})
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_ABSOLUTE_PATH = re.compile(r"^(/|~|\\|\.{1,2}[/\\]|[A-Za-z]:[/\\])")

T = TypeVar("T")


def _basename(path: str) -> str:
    return re.split(r"[/\\]", path.rstrip("/\\"))[-1] or path


def _public_name(name: str, kind: str) -> str:
    """A Hub id as is; a local path (or glob) as f"local {kind} {basename}", so no local path is published."""
    if name.startswith(f"local {kind} ") or (_HUB_ID.match(name) and not Path(name).expanduser().exists()):
        return name
    return f"local {kind} {_basename(name)}"


def _public_value(key: str, value: Any) -> Any:
    if key == "dataset_name" and isinstance(value, str):
        return _public_name(value, "dataset")
    if key == "model_name_or_path" and isinstance(value, str):
        return _public_name(value, "model")
    if isinstance(value, str) and _ABSOLUTE_PATH.match(value):
        return _basename(value)
    return value


def _as_dict(training_args: Any, extra_hyperparameters: Iterable[str] = ()) -> dict[str, Any]:
    """Mapping, dataclass (ours or `transformers.TrainingArguments`) or object with `to_dict()` -> a JSON-safe dict
    of the keys in `PUBLISHED_TRAINING_KEYS` or `extra_hyperparameters`, with local paths reduced to basenames."""
    if training_args is None:
        return {}
    if isinstance(training_args, Mapping):
        raw = dict(training_args)
    elif hasattr(training_args, "to_dict"):
        raw = training_args.to_dict()
    elif dataclasses.is_dataclass(training_args):
        raw = dataclasses.asdict(training_args)
    else:
        raise TypeError(f"training_args must be a mapping or a dataclass, got {type(training_args).__name__}.")
    if isinstance(extra_hyperparameters, str):
        raise TypeError("extra_hyperparameters must be a list of key names, not a string.")
    allowed = PUBLISHED_TRAINING_KEYS | set(extra_hyperparameters)
    left_out = sorted(key for key in raw if key not in allowed)
    if left_out:
        logger.info("Not publishing training_args keys that are not known hyper-parameters: %s (publish more with "
                    "extra_hyperparameters=[...]).", ", ".join(map(str, left_out)))
    clean = {}
    for key, value in raw.items():
        if key not in allowed:
            continue
        if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) for v in value):
            clean[key] = [_public_value(key, v) for v in value]
        elif isinstance(value, (str, int, float, bool)) or value is None:
            clean[key] = _public_value(key, value)
        elif hasattr(value, "value"):  # enums such as transformers' IntervalStrategy
            clean[key] = value.value
    return clean


def _check_metrics(metrics: Mapping[str, Mapping[str, float]] | None) -> dict[str, dict[str, float]]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping) or not all(isinstance(v, Mapping) for v in metrics.values()):
        raise TypeError("metrics must map split names to {metric name: value}, as in eval_results.json, e.g. "
                        "{'test': {'zero_shot_top1': 0.93}}.")
    for split, values in metrics.items():
        for key, value in values.items():
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise ValueError(f"metrics[{split!r}][{key!r}] is {value}: NaN or infinite metrics are not "
                                 "published. Check the evaluation (empty split? diverged training?).")
    return {split: dict(values) for split, values in metrics.items()}


def _dataset_id(dataset_name: str | None) -> str:
    if dataset_name is None:
        return "hf_clip-embedded-shapes"
    return dataset_name.removeprefix("local dataset ")


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4) else f"{value:g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def render_model_card(
    model,
    repo_id: str,
    *,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    training_args: Any = None,
    dataset_description: str | None = None,
    limitations: str | None = None,
    license: str = "apache-2.0",
    template_path: str | Path = MODEL_CARD_TEMPLATE,
    extra_hyperparameters: Iterable[str] = (),
) -> ModelCard:
    """Render the hf_clip model card for `model` (an `HFClipModel`).

    Args:
        metrics: {split: {metric: value in [0, 1]}}, as `training.train` writes to `eval_results.json`. Known
            metrics (zero-shot top-1/top-5, retrieval recall@k) become the front matter's `model-index`.
        training_args: the run's arguments (mapping or dataclass). Only known hyper-parameters
            (`PUBLISHED_TRAINING_KEYS`) and `extra_hyperparameters` are shown; `dataset_name` and `model_name_or_path`
            name the data and the base model by Hub id, or as "local dataset NAME" with only a local path's basename.
        dataset_description: a sentence on the training data, shown under "Training".
        limitations: extra text for "Intended use and limitations".
    """
    metrics = _check_metrics(metrics)
    args = _as_dict(training_args, extra_hyperparameters)
    dataset_name = args.get("dataset_name")
    dataset_id = _dataset_id(dataset_name)
    base_model = args.get("model_name_or_path")
    if base_model is not None and (Path(base_model).exists() or base_model.count("/") != 1):
        base_model = None  # a local directory is not a Hub id the card can link to

    eval_results = []
    for split, values in metrics.items():
        for key, _, task_type, task_name, metric_type, metric_name in _METRICS:
            if values.get(key) is not None:
                eval_results.append(EvalResult(
                    task_type=task_type, task_name=task_name, dataset_type=dataset_id, dataset_name=dataset_id,
                    dataset_split=split, metric_type=metric_type, metric_name=metric_name,
                    metric_value=round(100 * float(values[key]), 2),
                ))
    model_name = repo_id.split("/")[-1]
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        license=license,
        tags=["hf_clip", "clip", "vision", "contrastive-image-text", "zero-shot-image-classification"],
        datasets=[dataset_id] if args else None,
        base_model=base_model,
        eval_results=eval_results or None,
    )
    present = [m for m in _METRICS if any(values.get(m[0]) is not None for values in metrics.values())]
    results_columns = [m[1] for m in present] + ["images"]
    results_rows = [
        [split] + [f"{100 * values[m[0]]:.1f}" if values.get(m[0]) is not None else "–" for m in present]
        + [str(values.get("num_samples", "–"))]
        for split, values in metrics.items()
    ]
    shown_args = {
        key: _format_value(args[key]) for key in (*_CARD_TRAINING_KEYS, *extra_hyperparameters)
        if args.get(key) not in (None, False)
        and not (key.endswith("_unlocked_layers") and not args.get(key.removesuffix("_unlocked_layers")))
    }
    config = model.config
    vision_parameters = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("vision", "visual")))
    text_parameters = sum(p.numel() for n, p in model.named_parameters() if n.startswith("text"))
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        repo_id=repo_id,
        model_name=model_name,
        projection_dim=config.projection_dim,
        vision=config.vision_config,
        text=config.text_config,
        vision_parameters=f"{vision_parameters / 1e6:.2f} M",
        text_parameters=f"{text_parameters / 1e6:.2f} M",
        total_parameters=f"{model.num_parameters() / 1e6:.2f} M",
        logit_scale=math.exp(min(model.logit_scale.item(), math.log(config.logit_scale_max))),
        logit_scale_max=config.logit_scale_max,
        dataset_display_name=dataset_name or "the embedded shapes dataset of hf_clip",
        dataset_description=dataset_description,
        train_split=args.get("train_split", "train"),
        training_args=shown_args,
        results_columns=results_columns,
        results_rows=results_rows,
        limitations=limitations,
    )


def _is_transient(error: Exception) -> bool:
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        return error.response.status_code in RETRY_STATUS_CODES
    return isinstance(error, (httpx.TransportError, ConnectionError, TimeoutError))


def _with_retries(action: Callable[[], T], what: str, max_retries: int, base_delay: float) -> T:
    """Run `action`, retrying transient HTTP failures (5xx, 429, dropped connections) with exponential backoff."""
    for attempt in range(max_retries + 1):
        try:
            return action()
        except Exception as error:
            if not _is_transient(error) or attempt == max_retries:
                raise
            delay = base_delay * 2**attempt
            logger.warning("%s failed (%s: %s); retry %d/%d in %.0f s", what, type(error).__name__,
                           str(error).splitlines()[0] if str(error) else "", attempt + 1, max_retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _hub_error(error: HfHubHTTPError, repo_id: str, endpoint: str) -> Exception | None:
    """A clear error for auth failures and missing repos (the message never contains the token)."""
    status = error.response.status_code if error.response is not None else None
    server_message = (error.server_message or "").strip()
    if isinstance(error, RepositoryNotFoundError):
        return FileNotFoundError(
            f"Repository {repo_id!r} was not found on {endpoint}, or your token cannot access it. Check the repo id "
            f"and that the token has write access to its namespace. ({server_message or status})")
    if status in (401, 403):
        return PermissionError(
            f"The Hub at {endpoint} refused the push to {repo_id!r} (HTTP {status}: {server_message}). Log in with "
            "`hf auth login`, set HF_TOKEN, or pass token=... with write access to the repo's namespace.")
    return None


def _commit_folder(api: HfApi, repo_id: str, folder: Path, revision: str | None,
                   commit_message: str | None) -> CommitInfo:
    """One commit of every file in `folder`, on top of the branch head read just before (the Hub rejects it if the
    branch moved), deleting weight shards of an earlier push that this one no longer has.

    Files equal to the remote ones are left out, and a commit left with nothing to do is not made, so re-running
    this after a commit whose answer was lost does not duplicate it. (`HfApi.upload_folder` may split an upload
    into several commits and re-POSTs a commit whose answer was lost, which duplicates it.)
    """
    head = api.repo_info(repo_id, revision=revision).sha
    local = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in local]
    stale = [name for name in api.list_repo_files(repo_id, revision=head)
             if name.endswith(".safetensors") or name == "model.safetensors.index.json"]
    operations += [CommitOperationDelete(path_in_repo=name) for name in stale if name not in local]
    return api.create_commit(repo_id, operations, commit_message=commit_message or "Upload hf_clip model",
                             revision=revision, parent_commit=head)


def push_to_hub(
    model,
    processor,
    repo_id: str,
    *,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    training_args: Any = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    max_shard_size: int | str = "5GB",
    dataset_description: str | None = None,
    max_retries: int = 5,
    retry_base_delay: float = 1.0,
    extra_hyperparameters: Iterable[str] = (),
) -> CommitInfo:
    """Push `model` (an `HFClipModel`) and `processor` to `repo_id` as one commit, with a model card.

    Creates the repo (and the `revision` branch, from main) if needed; `private` applies when the repo is created.
    `metrics` ({split: {metric: value}}, as in `eval_results.json`) and `training_args` (mapping or dataclass)
    fill the card; of `training_args`, only known hyper-parameters (`PUBLISHED_TRAINING_KEYS`) and the keys named in
    `extra_hyperparameters` are written, with local paths reduced to basenames. NaN or infinite metrics raise. A push whose files equal the remote ones
    makes no commit and returns the current head. Transient failures are retried with backoff; a retried commit
    whose first attempt did land is detected as unchanged, so it never creates a duplicate commit.

    Returns the `CommitInfo` of the new (or current) head commit.
    """
    if not isinstance(repo_id, str) or not repo_id.strip("/"):
        raise ValueError(f"repo_id must be 'namespace/name' or 'name', got {repo_id!r}.")
    if processor is None:
        raise ValueError("push_to_hub needs the processor too: without it the repo cannot be used for inference.")
    metrics = _check_metrics(metrics)
    args = _as_dict(training_args, extra_hyperparameters)
    api = HfApi(token=token)
    try:
        repo_id = _with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True).repo_id,
                                f"Creating {repo_id}", max_retries, retry_base_delay)
        if revision is not None and revision != "main":
            _with_retries(lambda: api.create_branch(repo_id, branch=revision, exist_ok=True),
                          f"Creating branch {revision!r} of {repo_id}", max_retries, retry_base_delay)
        with tempfile.TemporaryDirectory(prefix="hf_clip_push_") as folder:
            model.save_pretrained(folder, max_shard_size=max_shard_size)
            processor.save_pretrained(folder)
            processor.image_processor.save_pretrained(folder)  # preprocessor_config.json, for older tools
            render_model_card(model, repo_id, metrics=metrics, training_args=args,
                              dataset_description=dataset_description,
                              extra_hyperparameters=extra_hyperparameters).save(Path(folder) / "README.md")
            if metrics:
                (Path(folder) / "eval_results.json").write_text(json.dumps(metrics, indent=2))
            if args:
                (Path(folder) / "training_args.json").write_text(json.dumps(args, indent=2))
            pickles = [p.name for p in Path(folder).iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
            if pickles:
                raise RuntimeError(f"Refusing to push pickle files {pickles}: hf_clip pushes safetensors only.")
            return _with_retries(lambda: _commit_folder(api, repo_id, Path(folder), revision, commit_message),
                                 f"Pushing to {repo_id}", max_retries, retry_base_delay)
    except HfHubHTTPError as error:
        clear = _hub_error(error, repo_id, api.endpoint)
        if clear is None:
            raise
        raise clear from None


__all__ = ["push_to_hub", "render_model_card"]
