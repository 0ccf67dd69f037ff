"""Atomic, rotating, verifiable training checkpoints on top of `Accelerator.save_state`.

A checkpoint is written to `.tmp-checkpoint-N`, completed with `run_state.json` (the loop's step, data position and
counters), then renamed to `checkpoint-N`. A run killed mid-save leaves only a temporary folder, which is never resumed
from, so the previous checkpoint stays usable. `run_state.json` (the completion marker) records the size and SHA-256
of every other file of the checkpoint (the manifest format of `hf_clip.integrity`, which `from_pretrained` checks too),
so a file truncated or altered later (a full disk, a bad copy) is found before Accelerate reads it:
`--resume_from_checkpoint latest` then falls back to the newest checkpoint that verifies.
"""

import json
import logging
import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

from hf_clip.integrity import CHECKPOINT_MARKER, FILES_KEY, CorruptFileError, file_manifest, verify_files

logger = logging.getLogger(__name__)

STATE_FILE = CHECKPOINT_MARKER
LEGACY_STATE_FILE = "trainer_state.json"  # the marker's name in checkpoints of the previous release: read, not written
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class DamagedCheckpointError(CorruptFileError):
    """A checkpoint whose files do not match its completion marker. The message names the checkpoint and the file."""


def _marker(checkpoint: Path) -> Path:
    """The completion marker of `checkpoint`: `run_state.json`, or the previous release's name when only it exists."""
    legacy = checkpoint / LEGACY_STATE_FILE
    return legacy if legacy.is_file() and not (checkpoint / STATE_FILE).is_file() else checkpoint / STATE_FILE


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in output_dir.iterdir()
             if (m := _CHECKPOINT.match(path.name)) and _marker(path).is_file()]
    return [path for _, path in sorted(found)]


def verify_checkpoint(checkpoint: str | Path) -> dict:
    """The training state of `checkpoint` after checking each file against the completion marker's sizes and hashes.

    Raises `DamagedCheckpointError` naming the first file that is missing, truncated or altered (or the marker itself
    when it is not valid JSON). A checkpoint written before manifests existed is only checked for a readable marker.
    """
    checkpoint = Path(checkpoint)
    marker = _marker(checkpoint)
    if not marker.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint (no {STATE_FILE}).")
    try:
        state = json.loads(marker.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedCheckpointError(f"Checkpoint {checkpoint}: {marker.name} is damaged ({error}).") from None
    if not isinstance(state, dict) or not {"step", "micro_step"} <= set(state):
        raise DamagedCheckpointError(f"Checkpoint {checkpoint}: {marker.name} holds no training state.")
    try:
        verify_files(checkpoint, state.get(FILES_KEY, {}), label=f"Checkpoint {checkpoint}")
    except CorruptFileError as error:
        raise DamagedCheckpointError(str(error)) from None
    return state


def resolve_checkpoint(output_dir: str | Path, requested: str) -> Path:
    """`requested` is "latest" (the newest checkpoint in `output_dir` that verifies; damaged newer ones are logged
    and skipped) or a checkpoint directory, which must verify (see `verify_checkpoint`)."""
    if requested != "latest":
        verify_checkpoint(requested)
        return Path(requested)
    checkpoints = complete_checkpoints(output_dir)
    if not checkpoints:
        raise FileNotFoundError(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}.")
    damaged = []
    for checkpoint in reversed(checkpoints):
        try:
            verify_checkpoint(checkpoint)
        except DamagedCheckpointError as error:
            logger.warning("%s Falling back to an older checkpoint.", error)
            damaged.append(str(error))
            continue
        return checkpoint
    raise DamagedCheckpointError(
        f"--resume_from_checkpoint latest: every checkpoint in {output_dir} is damaged: " + " ".join(damaged))


def read_state(checkpoint: Path) -> dict:
    """The training state saved with `checkpoint` (without the file manifest)."""
    state = json.loads(_marker(checkpoint).read_text())
    state.pop(FILES_KEY, None)
    return state


def truncate_step_log(path: Path, step: int) -> None:
    """Keep only the lines of a JSON-lines log (`{"step": ...}` per line) up to `step`, dropping lines that a killed
    run left past it (and a half-written last line), so a resumed run logs each step exactly once."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(kept))
    os.replace(temporary, path)


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, state: dict, keep: int) -> Path:
    """Save model, optimizer, scheduler and RNG states plus `state` atomically; keep the last `keep` checkpoints.
    All processes must call this."""
    output_dir = Path(output_dir)
    final, temporary = output_dir / f"checkpoint-{step}", output_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state_path = temporary / STATE_FILE
        with open(state_path, "w") as handle:
            json.dump({**state, FILES_KEY: file_manifest(temporary, exclude=[STATE_FILE])}, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        for old in complete_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
