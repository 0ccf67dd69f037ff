"""Worker functions for multi-process tests; `torch.multiprocessing.spawn` imports them by name."""

import os

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from hf_clip import HFClipConfig, HFClipModel, contrastive_loss, grad_cache_backward


def ddp_contrastive_step(rank: int, world_size: int, port: int, work_dir: str, config_json: str) -> None:
    """One DDP step of HFClipModel on this rank's slice of the global batch; rank 0 saves loss and gradients."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = HFClipModel(HFClipConfig.from_json_file(config_json))
        model.load_state_dict(load_file(os.path.join(work_dir, "weights.safetensors")))
        batch = load_file(os.path.join(work_dir, "batch.safetensors"))
        local = {key: value.chunk(world_size)[rank] for key, value in batch.items()}
        ddp_model = DistributedDataParallel(model)
        loss = ddp_model(**local, return_loss=True).loss
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world_size

        # The loss alone, on leaf features: each rank's feature gradient is W x the single-process one.
        features = load_file(os.path.join(work_dir, "features.safetensors"))
        image = features["image"].chunk(world_size)[rank].clone().requires_grad_()
        text = features["text"].chunk(world_size)[rank].clone().requires_grad_()
        feature_loss = contrastive_loss(image, text, features["scale"], label_smoothing=0.1)
        feature_loss.backward()
        image_grads = [torch.empty_like(image) for _ in range(world_size)]
        dist.all_gather(image_grads, image.grad)
        summed_feature_loss = feature_loss.detach().clone()
        dist.all_reduce(summed_feature_loss)

        if rank == 0:
            tensors = {f"grad.{name}": p.grad.contiguous() for name, p in model.named_parameters()}
            tensors["loss"] = mean_loss
            tensors["feature_loss"] = summed_feature_loss / world_size
            tensors["image_grad"] = torch.cat(image_grads) / world_size
            save_file(tensors, os.path.join(work_dir, "ddp_result.safetensors"))
    finally:
        dist.destroy_process_group()


def ddp_grad_cache_step(rank: int, world_size: int, port: int, work_dir: str, config_json: str,
                        num_micro_batches: int) -> None:
    """One DDP GradCache step on this rank's slice of the global batch; rank 0 saves the mean loss and gradients."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = HFClipModel(HFClipConfig.from_json_file(config_json)).train()
        model.load_state_dict(load_file(os.path.join(work_dir, "weights.safetensors")))
        batch = load_file(os.path.join(work_dir, "batch.safetensors"))
        local = {key: value.chunk(world_size)[rank] for key, value in batch.items()}
        loss = grad_cache_backward(DistributedDataParallel(model), local, num_micro_batches)
        dist.all_reduce(loss)
        if rank == 0:
            tensors = {f"grad.{name}": p.grad.contiguous() for name, p in model.named_parameters()}
            tensors["loss"] = loss / world_size
            save_file(tensors, os.path.join(work_dir, "ddp_result.safetensors"))
    finally:
        dist.destroy_process_group()
