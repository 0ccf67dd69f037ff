"""hf_clip_train arguments and data: formats, validation, bad rows, sharding, determinism."""

import io
import json
import logging
from dataclasses import fields

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_clip import ContrastiveDataCollator, HFClipProcessor
from hf_clip_train import evaluate, finetune_trainer, synthetic
from hf_clip_train.args import DatasetArguments
from hf_clip_train.checkpointing import STATE_FILE, read_state, resolve_checkpoint
from hf_clip_train.data import (
    GlobalBatchSampler,
    ImageTextColumns,
    ImageTextDataset,
    ProcessShare,
    TrainBatches,
    base_directory,
    build_train_dataset,
    check_columns,
    check_usable_rows,
    columns_of,
    image_transform_for,
    load_split,
)
from hf_clip_train.train import ARGUMENT_CLASSES, cpu_has_native_bf16, parse_args, resolve_mixed_precision


def _png(color=(200, 20, 20), size=(20, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _data_args(**overrides) -> DatasetArguments:
    return DatasetArguments(**{"shuffle_buffer_size": 100, "embedded_num_train": 64, **overrides})


def _columns(dataset_name: str | None = None) -> ImageTextColumns:
    return ImageTextColumns(base_dir=base_directory(dataset_name))


@pytest.fixture(scope="module")
def processor(tokenizer):
    return HFClipProcessor.from_tokenizer(tokenizer, image_size=24)


def test_every_argument_has_help():
    for cls in ARGUMENT_CLASSES:
        for field in fields(cls):
            assert field.metadata.get("help", "").strip(), f"{cls.__name__}.{field.name} has no help text"


def test_config_file_with_command_line_override(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("learning_rate: 0.5\nmax_steps: 3\ndataset_name: somewhere\n")
    args = parse_args([str(recipe), "--max_steps", "7"])
    assert (args.run.learning_rate, args.run.max_steps, args.data.dataset_name) == (0.5, 7, "somewhere")
    (tmp_path / "recipe.json").write_text(json.dumps({"preset": "ViT-B-32"}))
    assert parse_args([str(tmp_path / "recipe.json")]).scratch.preset == "ViT-B-32"
    recipe.write_text("learning_rat: 0.5\n")
    with pytest.raises(ValueError, match="unknown argument.*learning_rat"):
        parse_args([str(recipe)])


def test_old_flag_spellings_still_work_with_a_deprecation_message(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="hf_clip_train.args")
    args = parse_args(["--checkpointing_steps", "5", "--checkpoints_total_limit=3", "--gradient_checkpointing",
                       "--num_workers", "0"])
    assert (args.run.save_steps, args.run.save_total_limit, args.run.activation_checkpointing) == (5, 3, True)
    assert args.loader.dataloader_num_workers == 0
    for old, new in (("checkpointing_steps", "save_steps"), ("checkpoints_total_limit", "save_total_limit"),
                     ("gradient_checkpointing", "activation_checkpointing"), ("num_workers", "dataloader_num_workers")):
        assert f"--{old} is deprecated and will be removed in the next release; use --{new}." in caplog.text

    recipe = tmp_path / "old.yaml"
    recipe.write_text("checkpointing_steps: 4\n")
    assert parse_args([str(recipe)]).run.save_steps == 4
    assert "'checkpointing_steps' is deprecated" in caplog.text

    model_args, data_args, eval_args, loader_args, _ = evaluate.parse_args(
        ["--model", "some/model", "--dataset", "data", "--splits", "test", "val", "--batch_size", "8"])
    assert (model_args.model_name_or_path, data_args.dataset_name, eval_args.eval_splits,
            loader_args.per_device_eval_batch_size) == ("some/model", "data", ["test", "val"], 8)
    assert "--splits is deprecated and will be removed in the next release; use --eval_splits." in caplog.text


def test_the_scripts_share_one_argument_vocabulary():
    """The same flag names the same thing in train, evaluate and finetune_trainer."""
    flags = ["--model_name_or_path", "m", "--dataset_name", "d", "--image_column", "img", "--caption_column", "txt",
             "--label_column", "lbl", "--eval_splits", "a", "b", "--max_eval_samples", "9",
             "--per_device_eval_batch_size", "7", "--dataloader_num_workers", "1", "--templates", "a {}."]
    locks = ["--lock_image", "--lock_image_unlocked_layers", "2", "--lock_text"]
    train = parse_args([*flags, *locks])
    evaluated = evaluate.parse_args(flags)
    finetune = finetune_trainer.parse_args([*flags, *locks, "--output_dir", "out"])
    expected = {"model_name_or_path": "m", "dataset_name": "d", "image_column": "img", "caption_column": "txt",
                "label_column": "lbl", "eval_splits": ["a", "b"], "max_eval_samples": 9, "templates": ["a {}."]}
    for model_args, data_args, eval_args in ((train.model, train.data, train.eval), evaluated[:3],
                                             (finetune.model, finetune.data, finetune.eval)):
        parsed = {**vars(model_args), **vars(data_args), **vars(eval_args)}
        assert {key: parsed[key] for key in expected} == expected
    for loader in (train.loader, evaluated[3], finetune.training):
        assert (loader.per_device_eval_batch_size, loader.dataloader_num_workers) == (7, 1)
    for lock_args in (train.locks, finetune.locks):
        assert (lock_args.lock_image, lock_args.lock_image_unlocked_layers, lock_args.lock_text) == (True, 2, True)


@pytest.mark.parametrize("flags, message", [
    (["--max_steps", "0"], "--max_steps must be at least 1, got 0"),
    (["--max_steps", "-5"], "--max_steps must be at least 1, got -5"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1"),
    (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size must be at least 1"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1"),
    (["--model_name_or_path", "/no/such/checkpoint/dir"], "--model_name_or_path '/no/such/checkpoint/dir': no such"),
    (["--model_name_or_path", "./missing-run"], "--model_name_or_path './missing-run': no such directory"),
])
def test_arguments_that_cannot_train_are_refused_naming_the_flag(flags, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        parse_args(flags)


def test_evaluation_and_fine_tuning_refuse_a_missing_model_directory():
    message = "--model_name_or_path '/no/such/dir': no such directory"
    with pytest.raises(FileNotFoundError, match=message):
        finetune_trainer.parse_args(["--model_name_or_path", "/no/such/dir", "--output_dir", "/tmp/unused"])
    with pytest.raises(FileNotFoundError, match=message):
        evaluate.parse_args(["--model_name_or_path", "/no/such/dir"])


def test_a_file_glob_matching_nothing_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "shards" / "*.parquet")
    with pytest.raises(FileNotFoundError, match=r"--dataset_name '.*shards/\*\.parquet' matches no file"):
        load_split(_data_args(dataset_name=pattern), "train")


def test_mixed_precision_defaults_to_native_bf16():
    assert resolve_mixed_precision("auto") == ("bf16" if cpu_has_native_bf16() else "no")
    assert resolve_mixed_precision("no") == "no"
    with pytest.raises(ValueError, match="--mixed_precision"):
        resolve_mixed_precision("fp8")


def _rows(n, bad=()):
    images = [{"bytes": b"not an image" if i in bad else _png((i * 20 % 255, 30, 30)), "path": None}
              for i in range(n)]
    captions = [[f"a shape number {i}", f"another caption {i}"] for i in range(n)]
    return {"image": images, "caption": captions}


def _formats(tmp_path):
    """The same 6 image-caption rows as every dataset format training accepts."""
    root = tmp_path / "formats"
    (root / "folder" / "train").mkdir(parents=True)
    (root / "files").mkdir()
    metadata, csv_lines, jsonl_lines = [], ["image,caption"], []
    for i in range(6):
        name = f"img{i}.png"
        (root / "folder" / "train" / name).write_bytes(_png())
        (root / "files" / name).write_bytes(_png())
        metadata.append(json.dumps({"file_name": name, "caption": f"a red square {i}"}))
        csv_lines.append(f"{name},a red square {i}")
        jsonl_lines.append(json.dumps({"image": name, "caption": [f"a red square {i}", "red"]}))
    (root / "folder" / "train" / "metadata.jsonl").write_text("\n".join(metadata))
    (root / "files" / "data.csv").write_text("\n".join(csv_lines))
    (root / "files" / "data.jsonl").write_text("\n".join(jsonl_lines))
    parquet = datasets.Dataset.from_dict({"image": [_png()] * 6, "caption": ["a red square"] * 6})
    parquet.to_parquet(str(root / "files" / "data.parquet"))
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [{"bytes": _png(), "path": None}] * 6, "caption": ["a red square"] * 6},
                               features=features).save_to_disk(str(root / "saved"))
    return {
        "imagefolder": str(root / "folder"),
        "csv of relative paths": str(root / "files" / "data.csv"),
        "jsonl with caption lists": str(root / "files" / "data.jsonl"),
        "parquet of bytes": str(root / "files" / "data.parquet"),
        "save_to_disk": str(root / "saved"),
    }


def test_dataset_formats(tmp_path, processor):
    for kind, name in _formats(tmp_path).items():
        data_args = _data_args(dataset_name=name)
        split = load_split(data_args, "train")
        assert split is not None and len(split) == 6, kind
        check_columns(split, name, "train", {"image_column": "image", "caption_column": "caption"})
        check_usable_rows(split, data_args.dataset_name, "train", columns_of(data_args))
        dataset = ImageTextDataset(split, image_transform_for(processor, train=True), _columns(name), seed=0)
        sample = dataset[0]
        assert sample["pixel_values"].shape == (3, 24, 24) and sample["skipped"] == 0, kind
        assert sample["caption"].startswith("a red square") or sample["caption"] == "red", kind
        assert load_split(data_args, "no_such_split") is None


def test_embedded_dataset_splits():
    data_args = _data_args()
    train, test, unseen = (load_split(data_args, s) for s in ("train", "test", "test_unseen"))
    assert len(train) == 64 and len(test) > 0 and len(unseen) > 0
    names = train.features["label"].names
    unseen_labels = {names[i] for i in set(unseen["label"])}
    assert unseen_labels.isdisjoint({names[i] for i in set(train["label"])})
    assert unseen_labels == {"red triangle", "green cross", "blue circle", "yellow square"}


def test_embedded_dataset_is_rendered_once_into_the_datasets_cache(monkeypatch):
    """A second build of the same splits reads `datasets`' cache (HF_DATASETS_CACHE); an edit of synthetic.py's
    source renders them anew (into another cache entry), with the same rows."""
    first = synthetic.build_shapes_dataset(num_train=6, num_test=5, num_unseen=4, seed=11)
    files = [entry["filename"] for entry in first["train"].cache_files]
    assert files and all(name.startswith(str(datasets.config.HF_DATASETS_CACHE)) for name in files)
    again = synthetic.build_shapes_dataset(num_train=6, num_test=5, num_unseen=4, seed=11)
    assert [entry["filename"] for entry in again["train"].cache_files] == files
    monkeypatch.setattr(synthetic, "SOURCE_SHA", "0" * 64)
    edited = synthetic.build_shapes_dataset(num_train=6, num_test=5, num_unseen=4, seed=11)
    assert [entry["filename"] for entry in edited["train"].cache_files] != files
    for split in ("train", "test", "test_unseen"):
        assert edited[split].to_dict() == again[split].to_dict() == first[split].to_dict(), split


def test_missing_column_names_dataset_column_and_found(tmp_path):
    name = str(tmp_path / "no_caption")
    datasets.Dataset.from_dict({"image": [_png()], "text": ["x"]}).save_to_disk(name)
    split = load_split(_data_args(dataset_name=name), "train")
    with pytest.raises(ValueError, match=r"no_caption.*no column 'caption'.*--caption_column.*\['image', 'text'\]"):
        check_columns(split, name, "train", {"image_column": "image", "caption_column": "caption"})


def test_no_usable_rows_stops_at_start_up(tmp_path):
    name = str(tmp_path / "all_bad")
    datasets.Dataset.from_dict({"image": [b"garbage"] * 4, "caption": ["", "ok", None, "fine"]}).save_to_disk(name)
    data_args = _data_args(dataset_name=name)
    with pytest.raises(ValueError, match=r"all_bad.*no usable rows.*'image'.*'caption'"):
        check_usable_rows(load_split(data_args, "train"), name, "train", columns_of(data_args))


def test_image_columns_other_than_the_trained_one_are_never_decoded(processor):
    features = datasets.Features({"image": datasets.Image(), "thumbnail": datasets.Image(),
                                  "caption": datasets.Value("string")})
    garbage = {"bytes": b"not an image", "path": None}
    all_bad = datasets.Dataset.from_dict({"image": [garbage] * 3, "thumbnail": [garbage] * 3,
                                          "caption": ["a", "b", "c"]}, features=features)
    with pytest.raises(ValueError, match=r"no usable rows.*'image'.*cannot identify image file"):
        check_usable_rows(all_bad, None, "train", columns_of(_data_args()))
    rows = _rows(12, bad={4})
    rows["thumbnail"] = [garbage] * 12
    rows["caption"] = [captions[0] for captions in rows["caption"]]
    split = datasets.Dataset.from_dict(rows, features=features)
    check_usable_rows(split, None, "train", columns_of(_data_args()))
    streamed = build_train_dataset(split.to_iterable_dataset(num_shards=2), columns_of(_data_args(streaming=True)),
                                   image_transform_for(processor, train=True), seed=0)
    samples = list(streamed)
    assert len(samples) == 11 and sum(sample["skipped"] for sample in samples) == 1


def test_the_end_of_run_pipeline_demo_skips_a_corrupt_first_image(saved_checkpoint):
    from hf_clip_train.evaluation import pipeline_demo

    features = datasets.Features({"image": datasets.Image(), "thumbnail": datasets.Image(),
                                  "label": datasets.ClassLabel(names=["red", "green"])})
    garbage = {"bytes": b"not an image", "path": None}
    split = datasets.Dataset.from_dict({"image": [garbage, {"bytes": _png(), "path": None}],
                                        "thumbnail": [garbage, garbage], "label": [1, 0]}, features=features)
    line = pipeline_demo(saved_checkpoint, {"test": split}, columns_of(_data_args(dataset_name="local")))
    assert line.startswith("pipeline on one image of a 'red': ")


def test_bad_rows_are_skipped_counted_and_batches_stay_full(processor):
    rows = _rows(24, bad={3, 4, 10})
    rows["caption"][7] = [""]  # empty caption
    rows["caption"][15] = ["   ", None]  # no usable caption in the list
    split = datasets.Dataset.from_dict(rows)
    dataset = build_train_dataset(split, columns_of(_data_args()), image_transform_for(processor, train=True), seed=0)
    batches = TrainBatches(dataset, ContrastiveDataCollator(processor), batch_size=8, seed=0).iterate()
    first_epoch = [next(batches)[1] for _ in range(3)]
    assert all(len(batch["row_ids"]) == 8 for batch in first_epoch)
    assert sum(int(batch["skipped"]) for batch in first_epoch) >= 5
    used = torch.cat([batch["row_ids"] for batch in first_epoch]).tolist()
    assert not {3, 4, 7, 10, 15} & set(used)


def test_streaming_is_split_across_processes_and_skips_bad_rows(processor):
    rows = _rows(40, bad={5})
    split = datasets.Dataset.from_dict(rows).to_iterable_dataset(num_shards=4)
    seen, skipped = [], 0
    for rank in range(2):
        dataset = build_train_dataset(split, columns_of(_data_args(streaming=True)),
                                      image_transform_for(processor, train=True), seed=0,
                                      process=ProcessShare(index=rank, count=2))
        samples = list(dataset)
        seen.append({int(sample["caption"].split()[-1]) for sample in samples})
        skipped += sum(sample["skipped"] for sample in samples)
    assert skipped == 1
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == set(range(40)) - {5}


def test_global_batches_are_split_between_ranks():
    single = list(GlobalBatchSampler(100, 8, ProcessShare(), seed=3))
    ranks = [list(GlobalBatchSampler(100, 4, ProcessShare(rank, 2), seed=3)) for rank in range(2)]
    assert len(single) == len(ranks[0]) == 12
    for step, batch in enumerate(single):
        assert ranks[0][step] + ranks[1][step] == batch
    sampler = GlobalBatchSampler(100, 8, ProcessShare(), seed=3)
    sampler.set_epoch(0, start_batch=5)
    assert list(sampler) == single[5:]
    sampler.set_epoch(1)
    assert list(sampler) != single


def test_augmentation_and_caption_choice_are_deterministic(processor):
    split = datasets.Dataset.from_dict(_rows(4))
    make = lambda: ImageTextDataset(split, image_transform_for(processor, train=True), _columns(), seed=7)  # noqa
    first, second = make(), make()
    assert torch.equal(first[2]["pixel_values"], second[2]["pixel_values"])
    captions = set()
    for epoch in range(8):
        first.set_epoch(epoch)
        captions.add(first[2]["caption"])
    assert captions == {"a shape number 2", "another caption 2"}  # one caption sampled per step from the list


def test_eval_transform_matches_the_image_processor(processor):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    ours = image_transform_for(processor, train=False)(image)
    reference = processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == reference.shape
    assert (ours - reference).abs().mean() < 0.05


def test_evaluation_drops_and_counts_bad_rows_even_whole_batches(processor):
    rows = _rows(6, bad={0, 1, 2})
    dataset = ImageTextDataset(datasets.Dataset.from_dict(rows), image_transform_for(processor, train=False),
                               _columns(), replace_bad_rows=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=ContrastiveDataCollator(processor))
    first, second = list(loader)
    assert first["row_ids"].numel() == 0 and int(first["skipped"]) == 3
    assert second["row_ids"].tolist() == [3, 4, 5] and second["pixel_values"].shape == (3, 3, 24, 24)


def test_checkpoints_of_the_previous_release_still_resume(tmp_path):
    """Their completion marker was called trainer_state.json; it is read, and run_state.json is written now."""
    old = tmp_path / "checkpoint-3"
    old.mkdir()
    (old / "trainer_state.json").write_text(json.dumps({"step": 3, "micro_step": 6, "skipped_samples": 1}))
    assert resolve_checkpoint(tmp_path, "latest") == old
    assert read_state(old) == {"step": 3, "micro_step": 6, "skipped_samples": 1}
    assert STATE_FILE == "run_state.json"
