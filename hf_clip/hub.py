"""Share hf_clip checkpoints on the Hugging Face Hub: a model card with real metrics, and a single-commit push.

`push_to_hub` uploads, in one commit: `config.json` (with `auto_map`), `model.safetensors` (sharded above
`max_shard_size`, never a pickle), the processor / tokenizer / image-processor files, the model's code files (so
`trust_remote_code=True` works without hf_clip), `README.md` (the model card), `eval_results.json` and
`hyperparameters.json`. `HF_ENDPOINT` chooses the Hub (huggingface.co when unset).
"""

import contextlib
import copy
import dataclasses
import json
import logging
import math
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
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
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, RepositoryNotFoundError

try:
    import httpx2 as httpx
except ImportError:  # huggingface_hub < 2 uses httpx
    import httpx

logger = logging.getLogger(__name__)

# The card template: the repository keeps it in model_cards/, which the wheel installs as hf_clip/model_cards/ (package
# data, through setup.cfg's package_dir); a source checkout reads it where it is.
MODEL_CARD_TEMPLATE = next(
    (path for folder in (Path(__file__).parent, Path(__file__).parent.parent)
     if (path := folder / "model_cards" / "hf_clip_model_card.md").is_file()),
    Path(__file__).parent / "model_cards" / "hf_clip_model_card.md")
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
# The hyper-parameters published by default, in the vocabulary of Transformers' `TrainingArguments` and hf_clip's
# configs, in the order a card lists them; a caller publishes any other key only by naming it in
# `extra_hyperparameters`.
PUBLISHED_HYPERPARAMETERS = (
    "model_name_or_path", "dataset_name", "dataset_config_name", "train_split", "image_column", "caption_column",
    "max_train_samples", "max_steps", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps",
    "num_processes", "global_batch_size", "learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio",
    "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "optim", "max_grad_norm", "mixed_precision", "bf16",
    "fp16", "activation_checkpointing", "gradient_checkpointing", "torch_compile", "seed", "label_smoothing",
    "loss_type", "loss_chunk_size", "patch_dropout", "grad_cache_micro_batches", "lock_image",
    "lock_image_unlocked_layers", "lock_text", "lock_text_unlocked_layers",
)
# A key names a credential when one of its words (after splitting camelCase and "-"/"_") is one of these, or ends in
# one of the suffixes ("apikey", "hftoken"); such keys are never published, not even when named in
# `extra_hyperparameters`.
_PRIVATE_WORDS = frozenset({
    "auth", "authorization", "bearer", "cookie", "cookies", "credential", "credentials", "database", "db", "dsn",
    "key", "keys", "passphrase", "passwd", "password", "pat", "pwd", "secret", "secrets", "session",
    "signature", "token", "tokens",
})
_PRIVATE_SUFFIXES = ("key", "token", "secret", "password", "passwd", "cookie", "credentials")
# Values that look like a credential, whatever their key: (pattern, what it looks like).
_CREDENTIAL_VALUES = (
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}"), "a Hugging Face token"),
    (re.compile(r"\b(ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{16,}|\bgithub_pat_\w{16,}"), "a GitHub token"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"), "an API secret key"),
    (re.compile(r"\bxox[abpors]-[A-Za-z0-9-]{8,}"), "a Slack token"),
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), "an AWS access key"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"\bBearer\s+\S{8,}"), "a bearer token"),
    (re.compile(r"[A-Za-z][\w+.-]*://[^/\s:@]+:[^/\s@]+@"), "a URL with a user name and password"),
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PATH_LIKE = re.compile(r"^(/|~|\\|\.{1,2}[/\\]|[A-Za-z]:[/\\])")
# An absolute path inside free text: "/a/b", "~/a", "C:\\a"; not the "//host/path" of a URL or a ratio like "1/2".
_PATH_IN_TEXT = re.compile(r"(?<![\w:/.~-])(?:~?/|[A-Za-z]:\\)[^\s'\"`,;()<>]*")

T = TypeVar("T")


@dataclass
class ModelCardInfo:
    """What a model card states beyond the model itself; `render_model_card` and `push_to_hub` both take one.

    metrics: {split: {metric: value in [0, 1]}}, as `hf_clip_train.evaluation.evaluate_split` returns per split. Known
        metrics (zero-shot top-1/top-5, retrieval recall@k) become the front matter's `model-index`; `push_to_hub`
        also writes them to `eval_results.json`. NaN or infinite values raise `ValueError`.
    hyperparameters: {name: value}: the recipe, shown as a table in the order given (and written to
        `hyperparameters.json` by `push_to_hub`). Only the keys in `hf_clip.PUBLISHED_HYPERPARAMETERS` and those
        named in `extra_hyperparameters` are published, and never a key naming a credential (`is_private_key`:
        token, password, secret, key, credentials, auth, cookie, ..., in any case or spelling such as `hfToken` or
        `api-key`) or a value that looks like one (`credential_kind`: `hf_...`, `ghp_...`, `sk-...` tokens, URLs
        with a password, ...); the others are dropped with a warning that names the key. None values are left out;
        local paths, also inside free text, are shown as "local path NAME", and NaN or infinite numbers as strings.
    dataset: the training data's Hub id, or a local path, shown as "local dataset NAME" (its basename only);
        `dataset_split` is the split trained on and `dataset_description` a sentence on the data.
    base_model: the Hub id fine-tuned from; a local directory is not linked.
    limitations: extra text for "Intended use and limitations". Local paths in it and in `dataset_description` are
        shown as "local path NAME".
    """

    metrics: Mapping[str, Mapping[str, float]] | None = None
    hyperparameters: Mapping[str, Any] | None = None
    extra_hyperparameters: Iterable[str] = ()
    dataset: str | None = None
    dataset_split: str | None = None
    dataset_description: str | None = None
    base_model: str | None = None
    limitations: str | None = None
    license: str = "apache-2.0"


_CARD_FIELDS = tuple(field.name for field in dataclasses.fields(ModelCardInfo))


def _card_info(card: ModelCardInfo | None, card_fields: dict[str, Any], function: str) -> ModelCardInfo:
    """`card`, or one built from the card fields passed one by one as keywords (the deprecated form)."""
    unknown = sorted(set(card_fields) - set(_CARD_FIELDS))
    if unknown:
        raise TypeError(f"{function}() got unexpected keyword argument(s) {unknown}.")
    if not card_fields:
        return card or ModelCardInfo()
    if card is not None:
        raise TypeError(f"{function}(): pass the card's contents either as `card=ModelCardInfo(...)` or as keywords, "
                        f"not both (got card and {sorted(card_fields)}).")
    warnings.warn(f"Passing {sorted(card_fields)} to hf_clip.{function} as keywords is deprecated and will be removed "
                  f"in the next release; pass card=hf_clip.ModelCardInfo(...) instead.", FutureWarning, stacklevel=3)
    return ModelCardInfo(**card_fields)


def is_hub_repo_id(name: str) -> bool:
    """Whether `name` is shaped like a Hub repo id: 'name' or 'namespace/name'."""
    return bool(_HUB_ID.match(name))


def _basename(path: str) -> str:
    return re.split(r"[/\\]", path.rstrip("/\\"))[-1] or path


def public_name(name: str, kind: str) -> str:
    """A Hub id as is; a local path (or glob) as f"local {kind} {basename}", so that no local path is published."""
    if name.startswith(f"local {kind} ") or (is_hub_repo_id(name) and not Path(name).expanduser().exists()):
        return name
    return f"local {kind} {_basename(name)}"


def _key_words(key: str) -> list[str]:
    """"hfToken" -> ["hf", "token"]; "API-Key" -> ["api", "key"]; "session_cookie" -> ["session", "cookie"]."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", key))
    return [word for word in re.split(r"[^a-z0-9]+", spaced.lower()) if word]


def is_private_key(key: str) -> bool:
    """Whether a hyper-parameter name names a credential (`api_key`, `hfToken`, `accessToken`, `api-key`,
    `github_pat`, `bearer`, `session_cookie`, `database_url`, ...), whatever its case and separators."""
    words = _key_words(key)
    return any(word in _PRIVATE_WORDS or word.endswith(_PRIVATE_SUFFIXES) for word in [*words, "".join(words)])


def credential_kind(value: str) -> str | None:
    """What `value` looks like when it holds a credential ("a Hugging Face token", "a URL with a user name and
    password", ...), else None."""
    return next((kind for pattern, kind in _CREDENTIAL_VALUES if pattern.search(value)), None)


def _scrub_paths(text: str) -> str:
    """`text` with each absolute local path in it written as "local path NAME"."""
    return _PATH_IN_TEXT.sub(lambda match: public_name(match.group(0), "path") if len(match.group(0)) > 1
                             else match.group(0), text)


def public_text(text: str) -> str:
    """`text` with each absolute local path in it written as "local path NAME", as model cards publish free text."""
    return _scrub_paths(text)


def _public_value(value: Any) -> Any:
    if isinstance(value, str) and (_PATH_LIKE.match(value) or ("/" in value and Path(value).exists())):
        return public_name(value, "path")
    if isinstance(value, str):
        return _scrub_paths(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN or infinity
    return value


def _clean_hyperparameters(hyperparameters: Mapping[str, Any] | None,
                           extra_hyperparameters: Iterable[str] = ()) -> dict[str, Any]:
    """A JSON-safe copy of the allowed keys (`PUBLISHED_HYPERPARAMETERS` and `extra_hyperparameters`). Dropped, with
    a warning that names the key (never the value): keys naming a credential (`is_private_key`), values that look
    like one (`credential_kind`), and values that are not scalars, lists of scalars or enums. Local paths, also inside
    free text, become "local path NAME"; NaN and infinite numbers become the strings "nan", "inf" and "-inf"."""
    if hyperparameters is None:
        return {}
    if not isinstance(hyperparameters, Mapping):
        raise TypeError(f"hyperparameters must be a mapping of names to values, got {type(hyperparameters).__name__}.")
    if isinstance(extra_hyperparameters, str):
        raise TypeError("extra_hyperparameters must be a collection of key names, not one string.")
    allowed = {*PUBLISHED_HYPERPARAMETERS, *extra_hyperparameters}
    unknown = [key for key in hyperparameters if key not in allowed]
    if unknown:
        logger.warning("Not publishing hyper-parameters %s: they are not in hf_clip.PUBLISHED_HYPERPARAMETERS; name "
                       "them in extra_hyperparameters to publish them.", sorted(unknown))
    clean = {}
    for key, value in hyperparameters.items():
        if key not in allowed or is_private_key(key):
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        kinds = [kind for v in values if isinstance(v, str) and (kind := credential_kind(v))]
        if kinds:
            logger.warning("Not publishing hyper-parameter %r: its value looks like %s.", key, kinds[0])
            continue
        if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) for v in value):
            clean[key] = [_public_value(v) for v in value]
        elif isinstance(value, (str, int, float, bool)) or value is None:
            if isinstance(value, float) and not math.isfinite(value):
                logger.warning("Hyper-parameter %r is %s; published as the string %r.", key, value, str(value))
            clean[key] = _public_value(value)
        elif hasattr(value, "value"):  # enums such as transformers' IntervalStrategy
            clean[key] = value.value
    return clean


def _as_number(value: Any) -> Any:
    """A NumPy scalar or a one-element NumPy array or torch tensor as a Python number; anything else unchanged."""
    if isinstance(value, (bool, int, float, str)) or not hasattr(value, "item"):
        return value
    try:
        return value.item()
    except (ValueError, RuntimeError, TypeError):  # more than one element
        return value


def _check_metrics(metrics: Mapping[str, Mapping[str, float]] | None) -> dict[str, dict[str, float]]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping) or not all(isinstance(v, Mapping) for v in metrics.values()):
        raise TypeError("metrics must map split names to {metric name: value}, as in eval_results.json, e.g. "
                        "{'test': {'zero_shot_top1': 0.93}}.")
    checked = {}
    for split, values in metrics.items():
        checked[split] = {key: _as_number(value) for key, value in values.items()}
        for key, value in checked[split].items():
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise ValueError(f"metrics[{split!r}][{key!r}] is {value}: NaN or infinite metrics are not "
                                 "published. Check the evaluation (empty split? diverged training?).")
    return checked


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4) else f"{value:g}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


def _tower_rows(config) -> dict[str, dict[str, str]]:
    """The model card's rows for each tower of a composed model: backbone family, where it was taken from (a Hub id,
    or "local model NAME": no local path is published) and at which revision (`HFClipConfig.tower_sources`), pooling
    and projection."""
    rows = {}
    for modality in ("vision", "text"):
        source = (config.tower_sources or {}).get(modality)
        where = "–" if source is None else f"`{public_name(source['name_or_path'], 'model')}`"
        if source is not None and source.get("revision"):
            where += f" at revision `{source['revision']}`"
        pooling = getattr(config, f"{modality}_pooling")
        projection = getattr(config, f"{modality}_projection_type")
        rows[modality] = {
            "backbone": f"`{getattr(config, f'{modality}_config').model_type}`",
            "source": where,
            "pooling": "built-in" if pooling is None else f"{pooling}, {projection}",
        }
    return rows


def render_model_card(
    model,
    repo_id: str,
    card: ModelCardInfo | None = None,
    *,
    template_path: str | Path = MODEL_CARD_TEMPLATE,
    **card_fields: Any,
) -> ModelCard:
    """Render the hf_clip model card of `model` (an `HFClipModel`) for `repo_id`, with the metrics, recipe, data
    and limitations of `card` (see `ModelCardInfo`). The card's fields may still be passed one by one as keywords
    (deprecated)."""
    card = _card_info(card, card_fields, "render_model_card")
    metrics = _check_metrics(card.metrics)
    shown = {key: _format_value(value)
             for key, value in _clean_hyperparameters(card.hyperparameters, card.extra_hyperparameters).items()
             if value is not None}
    dataset_name = public_name(card.dataset, "dataset") if card.dataset else None
    dataset_id = dataset_name.removeprefix("local dataset ") if dataset_name else None
    base_model = card.base_model
    if base_model is not None and (Path(base_model).exists() or base_model.count("/") != 1):
        base_model = None

    eval_results = []
    for split, values in metrics.items():
        for key, _, task_type, task_name, metric_type, metric_name in _METRICS:
            if values.get(key) is not None:
                eval_results.append(EvalResult(
                    task_type=task_type, task_name=task_name, dataset_type=dataset_id or "unknown",
                    dataset_name=dataset_id or "unknown", dataset_split=split, metric_type=metric_type,
                    metric_name=metric_name,
                    metric_value=round(100 * float(values[key]), 2),
                ))
    model_name = repo_id.split("/")[-1]
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        license=card.license,
        tags=["hf_clip", "clip", "vision", "contrastive-image-text", "zero-shot-image-classification"],
        datasets=[dataset_id] if dataset_id else None,
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
        composed=config.is_composed,
        towers=_tower_rows(config),
        vision_parameters=f"{vision_parameters / 1e6:.2f} M",
        text_parameters=f"{text_parameters / 1e6:.2f} M",
        total_parameters=f"{model.num_parameters() / 1e6:.2f} M",
        logit_scale=math.exp(min(model.logit_scale.item(), math.log(config.logit_scale_max))),
        logit_scale_max=config.logit_scale_max,
        dataset_name=dataset_name,
        dataset_split=card.dataset_split,
        dataset_description=card.dataset_description and _scrub_paths(card.dataset_description),
        hyperparameters=shown,
        results_columns=results_columns,
        results_rows=results_rows,
        limitations=card.limitations and _scrub_paths(card.limitations),
    )


def error_summary(error: BaseException) -> str:
    """"Type: first line of the message", for a log line about a failure that is handled (the rest of a long Hub
    error, such as a server's response body, stays out of the log)."""
    message = str(error)
    return f"{type(error).__name__}: {message.splitlines()[0] if message else ''}"


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
            logger.warning("%s failed (%s); retry %d/%d in %.0f s", what, error_summary(error), attempt + 1,
                           max_retries, delay)
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


def check_push_access(repo_id: str, *, private: bool = False, token: str | None = None, max_retries: int = 2,
                      retry_base_delay: float = 1.0) -> str:
    """Check, before a long run, that a push to `repo_id` can succeed: the token is valid (`whoami`) and may create
    or write to the repo (`create_repo(exist_ok=True)`, which creates it now; `private` applies then).

    Returns the full repo id ("namespace/name"). Raises `PermissionError` for a missing or invalid token or a
    namespace it cannot write to, and `FileNotFoundError` for a repo it cannot see; messages never contain the token.
    Transient failures (5xx, dropped connections) are retried `max_retries` times, then raised as they are.
    """
    api = HfApi(token=token)
    try:
        user = _with_retries(api.whoami, "Checking the Hub token", max_retries, retry_base_delay)["name"]
        logger.info("Hub token of %r accepted by %s", user, api.endpoint)
        return _with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True).repo_id,
                             f"Creating {repo_id}", max_retries, retry_base_delay)
    except LocalTokenNotFoundError:
        raise PermissionError(f"No Hugging Face token found to push to {repo_id!r} on {api.endpoint}: log in with "
                              "`hf auth login`, or set HF_TOKEN to a token with write access.") from None
    except HfHubHTTPError as error:
        clear = _hub_error(error, repo_id, api.endpoint)
        if clear is None:
            raise
        raise clear from None


@contextlib.contextmanager
def _local_tower_paths_hidden(config) -> Iterator[None]:
    """While the block runs, `config`'s tower sources (`tower_sources`) and its backbone configs' `_name_or_path`
    name a local folder as "local model NAME" (`public_name`; a Hub id stays as it is), so that a pushed
    `config.json` publishes no local path; the values are put back afterwards."""
    towers = [tower for tower in (config.text_config, config.vision_config) if tower is not None]
    sources, names = copy.deepcopy(config.tower_sources), [tower._name_or_path for tower in towers]
    try:
        if sources:
            config.tower_sources = {modality: {**source, "name_or_path": public_name(source["name_or_path"], "model")}
                                    for modality, source in sources.items()}
        for tower, name in zip(towers, names):
            if name:
                tower._name_or_path = public_name(name, "model")
        yield
    finally:
        config.tower_sources = sources
        for tower, name in zip(towers, names):
            tower._name_or_path = name


def push_to_hub(
    model,
    processor,
    repo_id: str,
    card: ModelCardInfo | None = None,
    *,
    state_dict: dict[str, Any] | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    max_shard_size: int | str = "5GB",
    max_retries: int = 5,
    retry_base_delay: float = 1.0,
    **card_fields: Any,
) -> CommitInfo:
    """Push `model` (an `HFClipModel`) and `processor` to `repo_id` as one commit, with a model card.

    Creates the repo (and the `revision` branch, from main) if needed; `private` applies when the repo is created.
    `card` (a `ModelCardInfo`) fills the model card (see `render_model_card`); its metrics are also written to
    `eval_results.json` and its hyper-parameters, as the card shows them, to `hyperparameters.json`. NaN or infinite
    metrics raise `ValueError`. The card's fields may still be passed one by one as keywords (deprecated).
    `state_dict` is saved instead of `model.state_dict()` (as `save_pretrained` takes it, e.g. gathered from a
    sharded model). The pushed `config.json` names a composed model's local tower folders as "local model NAME", as
    the card does. A push whose files equal the remote ones makes no commit and returns the current head.
    Transient failures are retried with backoff; a retried commit whose first attempt did land is detected as
    unchanged, so it never creates a duplicate commit.

    Returns the `CommitInfo` of the new (or current) head commit.
    """
    card = _card_info(card, card_fields, "push_to_hub")
    if not isinstance(repo_id, str) or not repo_id.strip("/"):
        raise ValueError(f"repo_id must be 'namespace/name' or 'name', got {repo_id!r}.")
    if processor is None:
        raise ValueError("push_to_hub needs the processor too: without it the repo cannot be used for inference.")
    metrics = _check_metrics(card.metrics)
    hyperparameters = _clean_hyperparameters(card.hyperparameters, card.extra_hyperparameters)
    api = HfApi(token=token)
    try:
        repo_id = _with_retries(lambda: api.create_repo(repo_id, private=private, exist_ok=True).repo_id,
                                f"Creating {repo_id}", max_retries, retry_base_delay)
        if revision is not None and revision != "main":
            _with_retries(lambda: api.create_branch(repo_id, branch=revision, exist_ok=True),
                          f"Creating branch {revision!r} of {repo_id}", max_retries, retry_base_delay)
        with tempfile.TemporaryDirectory(prefix="hf_clip_push_") as folder:
            # save_pretrained empties the state dict it is given; the caller's stays whole
            with _local_tower_paths_hidden(model.config):
                model.save_pretrained(folder, max_shard_size=max_shard_size,
                                      state_dict=None if state_dict is None else dict(state_dict))
            processor.save_pretrained(folder)
            processor.image_processor.save_pretrained(folder)  # preprocessor_config.json, for older tools
            render_model_card(model, repo_id, card).save(Path(folder) / "README.md")
            if metrics:
                (Path(folder) / "eval_results.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))
            if hyperparameters:
                (Path(folder) / "hyperparameters.json").write_text(json.dumps(hyperparameters, indent=2,
                                                                                allow_nan=False))
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


__all__ = [
    "PUBLISHED_HYPERPARAMETERS",
    "ModelCardInfo",
    "check_push_access",
    "credential_kind",
    "is_hub_repo_id",
    "is_private_key",
    "public_name",
    "public_text",
    "push_to_hub",
    "render_model_card",
]
