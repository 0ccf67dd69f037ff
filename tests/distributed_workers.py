"""Worker functions for multi-process tests; `torch.multiprocessing.spawn` imports them by name."""

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel

from hf_clip import HFClipConfig, HFClipModel, contrastive_loss, grad_cache_backward, image_text_loss


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
        loss = ddp_model(**local, return_loss=True, gather_distributed=True).loss
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world_size

        # The loss alone, on leaf features: each rank's feature gradient is W x the single-process one.
        features = load_file(os.path.join(work_dir, "features.safetensors"))
        image = features["image"].chunk(world_size)[rank].clone().requires_grad_()
        text = features["text"].chunk(world_size)[rank].clone().requires_grad_()
        feature_loss = contrastive_loss(image, text, features["scale"], label_smoothing=0.1, gather_distributed=True)
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


# Loss settings scored by `loss_variants_step`: name -> image_text_loss keyword arguments (chunk 3 splits a rank's
# 8 rows into 3 + 3 + 2; 0 is dense).
LOSS_VARIANTS = {
    "clip_dense": {"loss_type": "clip", "label_smoothing": 0.1, "chunk_size": 0},
    "clip_chunked": {"loss_type": "clip", "label_smoothing": 0.1, "chunk_size": 3},
    "siglip_dense": {"loss_type": "siglip", "chunk_size": 0},
    "siglip_chunked": {"loss_type": "siglip", "chunk_size": 3},
}


def loss_variants_step(rank: int, world_size: int, port: int, work_dir: str, config_json: str) -> None:
    """Each loss variant on this rank's rows of features.safetensors, gathered across ranks; then one DDP step of
    the SigLIP HFClipModel in `config_json`. Rank 0 saves the mean loss, the gradients of the global batch's
    features (each rank's, concatenated, divided by W: the gradient of the mean loss), the summed scale and bias
    gradients divided by W, and the DDP parameter gradients."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
    try:
        features = load_file(os.path.join(work_dir, "features.safetensors"))
        tensors = {}
        for name, settings in LOSS_VARIANTS.items():
            image = features["image"].chunk(world_size)[rank].clone().requires_grad_()
            text = features["text"].chunk(world_size)[rank].clone().requires_grad_()
            scale = features["scale"].clone().requires_grad_()
            bias = features["bias"].clone().requires_grad_()
            loss = image_text_loss(image, text, scale, bias, **settings, gather_distributed=True)
            loss.backward()
            for key, value in (("image_grad", image.grad), ("text_grad", text.grad)):
                parts = [torch.empty_like(value) for _ in range(world_size)]
                dist.all_gather(parts, value)
                tensors[f"{name}.{key}"] = torch.cat(parts) / world_size
            for key, value in (("loss", loss.detach()), ("scale_grad", scale.grad),
                               ("bias_grad", bias.grad if bias.grad is not None else torch.zeros(()))):
                value = value.clone()
                dist.all_reduce(value)
                tensors[f"{name}.{key}"] = value / world_size

        model = HFClipModel(HFClipConfig.from_json_file(config_json))
        model.load_state_dict(load_file(os.path.join(work_dir, "weights.safetensors")))
        batch = load_file(os.path.join(work_dir, "batch.safetensors"))
        local = {key: value.chunk(world_size)[rank] for key, value in batch.items()}
        ddp_model = DistributedDataParallel(model)  # keep a reference: its hooks average the gradients
        loss = ddp_model(**local, return_loss=True, gather_distributed=True).loss
        loss.backward()
        dist.all_reduce(loss := loss.detach().clone())
        tensors["model.loss"] = loss / world_size
        tensors.update({f"model.grad.{name}": p.grad.contiguous() for name, p in model.named_parameters()})
        if rank == 0:
            save_file(tensors, os.path.join(work_dir, "variants_result.safetensors"))
    finally:
        dist.destroy_process_group()


def rank_zero_loss_alone(rank: int, world_size: int, port: int, work_dir: str, config_json: str) -> None:
    """Only rank 0 runs the model with return_loss=True (as a rank-0 evaluation would); rank 1 goes straight to the
    barrier. With a hidden collective in the loss, rank 0 would wait for rank 1 until the group's timeout."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        if rank == 0:
            model = HFClipModel(HFClipConfig.from_json_file(config_json))
            model.load_state_dict(load_file(os.path.join(work_dir, "weights.safetensors")))
            batch = load_file(os.path.join(work_dir, "batch.safetensors"))
            with torch.no_grad():
                loss = model(**batch, return_loss=True).loss
            save_file({"loss": loss}, os.path.join(work_dir, "rank0_result.safetensors"))
        dist.barrier()
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


def streamed_rows_of_each_rank(rank: int, world_size: int, port: int, work_dir: str, checkpoint: str,
                               cases: list[str], batch_size: int, batches: int) -> None:
    """For each WebDataset folder `work_dir/<case>`: `batches` training batches of this rank (its place from the gloo
    group, as the trainer takes it from Accelerate), read by 2 DataLoader workers; writes [epoch, captions] per
    batch to `work_dir/<case>-rank<rank>.json`."""
    import json

    from hf_clip import ContrastiveDataCollator, HFClipProcessor
    from hf_clip_train.args import DatasetArguments
    from hf_clip_train.data import (
        ProcessShare,
        TrainBatches,
        build_train_dataset,
        columns_of,
        image_transform_for,
        load_train_split,
    )

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.multiprocessing.set_start_method("fork", force=True)  # DataLoader workers fork, as under torchrun
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        process = ProcessShare(dist.get_rank(), dist.get_world_size())
        processor = HFClipProcessor.from_pretrained(checkpoint)
        for case in cases:
            data_args = DatasetArguments(dataset_name=os.path.join(work_dir, case), streaming=True,
                                         image_column="jpg", caption_column="txt", shuffle_buffer_size=16)
            split = load_train_split(data_args, {"image_column": "jpg", "caption_column": "txt"})
            dataset = build_train_dataset(split, columns_of(data_args), image_transform_for(processor, train=True),
                                          seed=3, process=process, shuffle_buffer_size=data_args.shuffle_buffer_size)
            collator = ContrastiveDataCollator(processor, "jpg", "txt")
            iterator = TrainBatches(dataset, collator, batch_size, seed=3, num_workers=2, process=process).iterate()
            found = []
            for _ in range(batches):
                epoch, batch = next(iterator)
                found.append([epoch, processor.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)])
            iterator.close()
            with open(os.path.join(work_dir, f"{case}-rank{rank}.json"), "w") as handle:
                json.dump(found, handle)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def lit_ddp_step(rank: int, world_size: int, port: int, work_dir: str, vision_folder: str) -> None:
    """One step of `hf_clip_train.train`'s LiT set-up (its model building, locking, optimiser, `accelerator.prepare`
    into DDP and `train_step`) on this rank's 4 rows; rank 0 writes `lit_report.json`: the parameters DDP's gradient
    buckets all-reduced (recorded by a comm hook), the trainable ones, those with optimiser state, the towers' modes,
    whether image features carry a graph and whether the locked tower changed."""
    import json

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from transformers import get_constant_schedule

    from hf_clip_train.common import lock_towers
    from hf_clip_train.train import build_model_and_processor, build_optimizer, parse_args, train_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    try:
        args = parse_args(["--output_dir", work_dir, "--vision_model_name_or_path", vision_folder, "--lock_image",
                           "--projection_dim", "16", "--context_length", "24", "--tokenizer_vocab_size", "700",
                           "--per_device_train_batch_size", "4"])
        model, processor = build_model_and_processor(args, None, None, accelerator, resuming=False)
        lock_towers(model, args.locks)
        names = {id(parameter): name for name, parameter in model.named_parameters()}
        trainable = sorted(name for name, parameter in model.named_parameters() if parameter.requires_grad)
        vision_before = {name: tensor.clone() for name, tensor in model.vision_model.state_dict().items()}
        optimizer = build_optimizer(model, args.run)
        scheduler = get_constant_schedule(optimizer)
        ddp_model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        all_reduced = set()

        def recording_allreduce(state, bucket):
            all_reduced.update(names[id(parameter)] for parameter in bucket.parameters())
            return default_hooks.allreduce_hook(state, bucket)

        ddp_model.register_comm_hook(None, recording_allreduce)
        ddp_model.train()
        generator = torch.Generator().manual_seed(rank)
        captions = [f"a {color} circle" for color in ("red", "green", "blue", "yellow")]
        inputs = {**processor(text=captions, padding=True, return_tensors="pt"),
                  "pixel_values": torch.randn(4, 3, 16, 16, generator=generator)}
        train_step(accelerator, ddp_model, optimizer, scheduler, inputs, args.run)
        unwrapped = accelerator.unwrap_model(ddp_model)
        image_features = unwrapped.get_image_features(inputs["pixel_values"]).pooler_output
        report = {
            "all_reduced": sorted(all_reduced), "trainable": trainable,
            "optimiser_state": sorted(names[id(parameter)] for parameter in optimizer.optimizer.state),
            "vision_training": unwrapped.vision_model.training, "text_training": unwrapped.text_model.training,
            "image_features_require_grad": image_features.requires_grad,
            "vision_unchanged": all(torch.equal(tensor, vision_before[name])
                                    for name, tensor in unwrapped.vision_model.state_dict().items()),
        }
        if rank == 0:
            with open(os.path.join(work_dir, "lit_report.json"), "w") as handle:
                json.dump(report, handle)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
