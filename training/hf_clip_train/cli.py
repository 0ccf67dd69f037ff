"""Console scripts `hf-clip-train`, `hf-clip-evaluate`, `hf-clip-finetune`, `hf-clip-index` and `hf-clip-search`:
they check for the `[train]` extra before importing the scripts, which need it; `hf-clip-serve` checks for the
`[serve]` extra. Each runs its script through `hf_clip.cli.run_cli`: a user error (a `hf_clip.cli.UsageError`, such
as `hf_clip_train.args.InputError` and `MissingInputError`, or a file that does not match its saved checksum) is one
line "hf-clip-NAME: error: ..." on stderr and exit status 2, as argparse reports bad flags; any other exception is a
bug and keeps its traceback. A process of a multi-process FSDP run ends without the interpreter's shutdown once its
script has returned (`exit_after_fsdp` says why)."""

import gc
import importlib
import importlib.util
import logging
import os
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
    run_script(getattr(importlib.import_module(f"{__package__}.{script}"), function), name)


def run_script(main, name: str) -> None:
    """`main()` of the script `hf-clip-{name}` (also what `python -m` runs) through `hf_clip.cli.run_cli`; a
    process of a multi-process FSDP run then ends at once (`exit_after_fsdp`)."""
    from hf_clip.cli import run_cli
    from hf_clip.integrity import CorruptFileError

    run_cli(main, None, prog=f"hf-clip-{name}", user_errors=(CorruptFileError,))
    exit_after_fsdp()


def exit_after_fsdp() -> None:
    """In a process of a multi-process FSDP launch (`accelerate launch --use_fsdp`) whose script, one that loaded
    `hf_clip_train.fsdp`, has returned: collect garbage, flush the logs and the standard streams, and end the process
    with status 0 without the interpreter's shutdown (`os._exit`). Elsewhere, return.

    Under FSDP2, DTensor's caches and Accelerate's `device_mesh` keep gloo's process group alive past
    `destroy_process_group`, so its worker threads outlive the script. One of them may still be releasing a finished
    collective whose tensor Python has dropped, which takes the GIL. Once the interpreter is shutting down, CPython
    ends a thread that takes the GIL with `pthread_exit`, and unwinding through that release's `noexcept` destructor
    aborts the process ("terminate called without an active exception") after everything was saved. A core dump of
    such a run shows it (`ProcessGroupGloo::runLoop` -> `~AsyncBarrierWork` -> `~AsyncAllreduceWork` ->
    `decref_pyobject` -> `take_gil` -> `pthread_exit` -> `std::terminate`). With DDP, `destroy_process_group` frees
    the group and joins its threads."""
    fsdp = sys.modules.get(f"{__package__}.fsdp")  # loaded by every script that can train with FSDP
    if fsdp is None or not fsdp.fsdp_requested() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return
    gc.collect()  # DataLoader workers and open files of the finished script are released as at a normal exit
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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
    run_script(importlib.import_module(f"{__package__}.serve.main").main, "serve")
