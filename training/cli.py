"""Console scripts `hf-clip-train`, `hf-clip-evaluate` and `hf-clip-finetune`: they check for the `[train]` extra
before importing the scripts, which need it."""

import importlib
import importlib.util
import sys

TRAIN_EXTRA = {"accelerate": "accelerate", "datasets": "datasets", "yaml": "pyyaml", "tqdm": "tqdm"}


def missing_train_extra() -> list[str]:
    """The distributions of the `[train]` extra that are not installed."""
    return [package for module, package in TRAIN_EXTRA.items() if importlib.util.find_spec(module) is None]


def _run(script: str) -> None:
    missing = missing_train_extra()
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        sys.exit(f"hf-clip-{script.split('_')[0]} needs the training extra, and {', '.join(missing)} {verb} not "
                 'installed. Install it with: pip install "hf-clip[train]"')
    importlib.import_module(f"{__package__}.{script}").main()


def train() -> None:
    _run("train")


def evaluate() -> None:
    _run("evaluate")


def finetune() -> None:
    _run("finetune_trainer")
