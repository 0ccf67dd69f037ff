"""FSDP through Accelerate (`accelerate launch --use_fsdp --fsdp_version 2 ...`), on GPUs and on CPUs.

Two things stand between an `HFClipModel` and Accelerate's FSDP, and this module removes both:
- Accelerate (1.15) switches to FSDP only on GPU-family devices. On CPUs (`Accelerator(cpu=True)`, gloo) it
  ignores `--use_fsdp` and trains with DDP, silently. `enable_fsdp_on_cpu` switches such a run to FSDP2, which
  torch runs on CPUs over gloo.
- FSDP shards parameters along their first dimension and refuses 0-dim ones ("fully_shard doesn't support scalar
  parameters. Change logit_scale to a 1D tensor with numel equal to 1."), and CLIP's `logit_scale` is one.
  `shardable_logit_scale_` stores it as a (1,) tensor for training (the model's forward and `clamped_logit_scale()`
  take either shape); `scalar_logit_scale` puts a gathered state dict back into the layout `from_pretrained` reads.
"""

import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from hf_clip import HFClipModel


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (`accelerate launch --use_fsdp` sets ACCELERATE_USE_FSDP)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def enable_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Turn a multi-process CPU run that asked for FSDP into an FSDP2 run (Accelerate would run DDP instead)."""
    if not fsdp_requested() or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ValueError("FSDP on CPUs needs FSDP2: launch with `accelerate launch --use_fsdp --fsdp_version 2`.")
    accelerator.state.fsdp_plugin = plugin
    # AcceleratorState copies PartialState's fields whenever it is constructed again: switch both, as Accelerate
    # itself does on GPUs.
    accelerator.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP


def shardable_logit_scale_(model: HFClipModel) -> None:
    """Store `model.logit_scale` as a (1,) parameter, which FSDP can shard; call before `accelerator.prepare`."""
    if model.logit_scale.dim() == 0:
        model.logit_scale = torch.nn.Parameter(model.logit_scale.detach().reshape(1),
                                               requires_grad=model.logit_scale.requires_grad)


def scalar_logit_scale(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` with `logit_scale` as the 0-dim tensor that `HFClipModel` checkpoints hold."""
    if "logit_scale" in state_dict and state_dict["logit_scale"].dim() != 0:
        state_dict = {**state_dict, "logit_scale": state_dict["logit_scale"].reshape(())}
    return state_dict


def register_feature_methods(model: HFClipModel) -> None:
    """Let `get_text_features` / `get_image_features` (zero-shot evaluation calls them) gather the sharded
    parameters as `forward` does; call after `accelerator.prepare`."""
    for method in ("get_text_features", "get_image_features"):
        register_fsdp_forward_method(model, method)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2: a gradient norm, a sharded scalar) as the plain tensor it stands for, gathered where it is
    not replicated (every process must call it then); any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_pieces(parameters) -> list[torch.Tensor]:
    """The detached tensors of `parameters` that this process holds: under FSDP2 its local shards, without the empty
    ones some processes hold."""
    pieces = [p.detach().to_local() if isinstance(p, DTensor) else p.detach() for p in parameters]
    return [piece for piece in pieces if piece.numel()]


def unsharded_model(accelerator: Accelerator, model, state_dict: dict[str, torch.Tensor]) -> HFClipModel:
    """The trained model as one plain `HFClipModel` on the main process: the unwrapped model, or under FSDP a copy
    built from the gathered `state_dict` (whose sharded parameters only the collective calls could read)."""
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.distributed_type != DistributedType.FSDP:
        return unwrapped
    copy = HFClipModel(unwrapped.config)
    copy.load_state_dict(scalar_logit_scale(state_dict))
    return copy
