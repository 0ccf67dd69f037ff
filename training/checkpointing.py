"""Atomic, rotating training checkpoints on top of `Accelerator.save_state`.

A checkpoint is written to `.tmp-checkpoint-N`, completed with `run_state.json` (the loop's step, data position
and counters), then renamed to `checkpoint-N`. A run killed mid-save leaves only a temporary folder, which is never
resumed from, so the previous checkpoint stays usable.
"""

import json
import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

STATE_FILE = "run_state.json"
LEGACY_STATE_FILE = "trainer_state.json"  # checkpoints of the previous release; read, never written
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _state_file(checkpoint: Path) -> Path | None:
    for name in (STATE_FILE, LEGACY_STATE_FILE):
        if (checkpoint / name).is_file():
            return checkpoint / name
    return None


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in output_dir.iterdir()
             if (m := _CHECKPOINT.match(path.name)) and _state_file(path) is not None]
    return [path for _, path in sorted(found)]


def resolve_checkpoint(output_dir: str | Path, requested: str) -> Path:
    """`requested` is "latest" or a checkpoint directory."""
    if requested == "latest":
        checkpoints = complete_checkpoints(output_dir)
        if not checkpoints:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}.")
        return checkpoints[-1]
    path = Path(requested)
    if _state_file(path) is None:
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE}).")
    return path


def read_state(checkpoint: Path) -> dict:
    return json.loads(_state_file(checkpoint).read_text())


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
            json.dump(state, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        for old in complete_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
