"""File manifests: the size and SHA-256 of each file of a saved folder, recorded when it is saved and checked before
its files are read, so a file truncated or altered later (a full disk, a bad copy, flipped bytes in a weights file)
fails loudly instead of loading wrong weights.

A manifest maps relative paths to {"size": bytes, "sha256": hex digest}. A model folder keeps it in
`hf_clip_manifest.json` as {"files": {...}}, written (or rewritten) by every `save_pretrained` of an hf_clip model
(`write_model_manifest`: its weight files and `config.json`); a training checkpoint keeps the same mapping under "files"
in its completion marker, `run_state.json`. `from_pretrained` of every hf_clip model class checks the weight files it
reads, and `config.json`, against the manifest of their folder when the folder has one (`verify_loaded_files`);
files a manifest does not list are not checked. Hashing reads each file once (about a second per GB).
"""

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

MANIFEST_FILE = "hf_clip_manifest.json"
CHECKPOINT_MARKER = "run_state.json"
FILES_KEY = "files"


class CorruptFileError(OSError):
    """A file that does not match its manifest (missing, another size, another SHA-256). The message names the
    folder and the file."""


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_manifest(folder: str | Path, names: Iterable[str] | None = None, exclude: Iterable[str] = ()
                  ) -> dict[str, dict[str, int | str]]:
    """{relative path: {"size", "sha256"}} of `names` in `folder` (default: every file below it), leaving out the
    file names in `exclude`."""
    folder, exclude = Path(folder), set(exclude)
    paths = sorted(folder.rglob("*")) if names is None else [folder / name for name in sorted(names)]
    return {path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": sha256_of(path)}
            for path in paths if path.is_file() and path.name not in exclude}


def write_manifest(folder: str | Path, names: Iterable[str]) -> Path:
    """Record `names` (paths relative to `folder`) in `folder/hf_clip_manifest.json`; returns its path."""
    path = Path(folder) / MANIFEST_FILE
    path.write_text(json.dumps({FILES_KEY: file_manifest(folder, names)}, indent=2))
    return path


def write_model_manifest(folder: str | Path) -> Path:
    """Record the weight files (`*.safetensors`, `*.safetensors.index.json`) and `config.json` of a saved model
    `folder` in its `hf_clip_manifest.json`, replacing any earlier manifest; returns its path."""
    folder = Path(folder)
    names = [path.name for pattern in ("*.safetensors", "*.safetensors.index.json") for path in folder.glob(pattern)]
    return write_manifest(folder, [*names, "config.json"])


def _find_manifest(folder: str | Path) -> tuple[str, dict[str, dict[str, int | str]]] | None:
    for name in (MANIFEST_FILE, CHECKPOINT_MARKER):
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            files = json.loads(path.read_text()).get(FILES_KEY)
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
            raise CorruptFileError(f"{folder}: {name} is damaged ({error}).") from None
        if files is not None:
            return name, files
    return None


def read_manifest(folder: str | Path) -> dict[str, dict[str, int | str]] | None:
    """The file manifest of `folder`: from `hf_clip_manifest.json`, else from a checkpoint's `run_state.json`; None
    when the folder has neither (or the marker holds no manifest). An unreadable manifest raises `CorruptFileError`."""
    found = _find_manifest(folder)
    return None if found is None else found[1]


def verify_files(folder: str | Path, files: Mapping[str, Mapping], names: Iterable[str] | None = None, *,
                 label: str | None = None) -> None:
    """Check `names` (default: all) of the manifest `files` against the files in `folder`.

    Raises `CorruptFileError` "{label}: {name} ..." (label defaults to the folder) for the first file that is missing,
    has another size (truncated?) or another SHA-256.
    """
    label = label or str(folder)
    for name in files if names is None else names:
        expected, path = files[name], Path(folder) / name
        if not path.is_file():
            raise CorruptFileError(f"{label}: {name} is missing.")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CorruptFileError(f"{label}: {name} has {size} bytes, {expected['size']} were saved (truncated?).")
        if sha256_of(path) != expected["sha256"]:
            raise CorruptFileError(f"{label}: {name} does not match its saved SHA-256.")


def verify_loaded_files(paths: Iterable[str | Path] | None) -> None:
    """Before weights are read from `paths`: check each, and the `config.json` beside it, against the manifest of its
    folder when that folder has one (see the module docstring). Raises `CorruptFileError` naming the file, and what to
    do if the folder was rewritten on purpose."""
    by_folder: dict[Path, set[str]] = {}
    for path in paths or ():
        path = Path(path)
        by_folder.setdefault(path.parent, set()).add(path.name)
    for folder, names in by_folder.items():
        found = _find_manifest(folder)
        if found is None:
            continue
        source, files = found
        listed = sorted(name for name in names | {"config.json"} if name in files)
        try:
            verify_files(folder, files, listed)
        except CorruptFileError as error:
            rewritten = "" if source != MANIFEST_FILE else f" If you rewrote it on purpose, delete {folder / source}."
            raise CorruptFileError(f"{error} The folder's {source} records the files as they were saved, so the file "
                                   f"was damaged since (re-copy or re-download it).{rewritten}") from None


__all__ = [
    "CHECKPOINT_MARKER",
    "FILES_KEY",
    "MANIFEST_FILE",
    "CorruptFileError",
    "file_manifest",
    "read_manifest",
    "sha256_of",
    "verify_files",
    "verify_loaded_files",
    "write_manifest",
    "write_model_manifest",
]
