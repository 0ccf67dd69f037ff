"""Console scripts `hf-clip-train`, `hf-clip-evaluate`, `hf-clip-finetune`, `hf-clip-index` and `hf-clip-search`:
they check for the `[train]` extra before importing the scripts, which need it."""

import importlib
import importlib.util
import sys

TRAIN_EXTRA = {"accelerate": "accelerate", "datasets": "datasets", "yaml": "pyyaml", "tqdm": "tqdm"}


def missing_train_extra() -> list[str]:
    """The distributions of the `[train]` extra that are not installed."""
    return [package for module, package in TRAIN_EXTRA.items() if importlib.util.find_spec(module) is None]


def _run(script: str, name: str, function: str = "main") -> None:
    missing = missing_train_extra()
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        sys.exit(f"hf-clip-{name} needs the training extra, and {', '.join(missing)} {verb} not "
                 'installed. Install it with: pip install "hf-clip[train]"')
    getattr(importlib.import_module(f"{__package__}.{script}"), function)()


def train() -> None:
    _run("train", "train")


def evaluate() -> None:
    _run("evaluate", "evaluate")


def finetune() -> None:
    _run("finetune_trainer", "finetune")


def index() -> None:
    _run("search.index_cli", "index", "index_main")


def search() -> None:
    _run("search.cli", "search", "search_main")
