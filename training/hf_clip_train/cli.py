"""Console scripts `hf-clip-train`, `hf-clip-evaluate`, `hf-clip-finetune`, `hf-clip-index` and `hf-clip-search`:
they check for the `[train]` extra before importing the scripts, which need it; `hf-clip-serve` checks for the
`[serve]` extra."""

import importlib
import importlib.util
import sys

TRAIN_EXTRA = {"accelerate": "accelerate", "datasets": "datasets", "yaml": "pyyaml", "tqdm": "tqdm"}
SERVE_EXTRA = {"fastapi": "fastapi", "uvicorn": "uvicorn"}
SEARCH_EXTRA = {"datasets": "datasets"}  # faiss-cpu is optional: exact search works without it


def _missing(extra: dict[str, str]) -> list[str]:
    return [package for module, package in extra.items() if importlib.util.find_spec(module) is None]


def missing_train_extra() -> list[str]:
    """The distributions of the `[train]` extra that are not installed."""
    return _missing(TRAIN_EXTRA)


def missing_serve_extra() -> list[str]:
    """The distributions of the `[serve]` extra that are not installed."""
    return _missing(SERVE_EXTRA)


def missing_search_extra() -> list[str]:
    """The distributions of the `[search]` extra that querying an index needs and are not installed."""
    return _missing(SEARCH_EXTRA)


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


def serve() -> None:
    missing = missing_serve_extra()
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        sys.exit(f"hf-clip-serve needs the serve extra, and {', '.join(missing)} {verb} not installed. Install it "
                 'with: pip install "hf-clip[serve]" (and "hf-clip[serve,search]" to serve an index)')
    importlib.import_module(f"{__package__}.serve.main").main()
