"""training/ arguments and data: formats, validation, bad rows, sharding, determinism."""

import io
import json
from argparse import Namespace
from dataclasses import fields

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_clip import HFClipProcessor
from training.args import ARGUMENT_CLASSES, parse_args
from training.data import (
    GlobalBatchSampler,
    ImageTextCollator,
    ImageTextDataset,
    TrainBatches,
    base_directory,
    build_train_dataset,
    check_columns,
    check_usable_rows,
    image_transform_for,
    load_split,
)
from training.train import cpu_has_native_bf16, resolve_mixed_precision


def _png(color=(200, 20, 20), size=(20, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _data_args(**overrides):
    defaults = dict(dataset_name=None, dataset_config_name=None, image_column="image", caption_column="caption",
                    label_column="label", streaming=False, shuffle_buffer_size=100, max_train_samples=None,
                    embedded_num_train=64)
    return Namespace(**{**defaults, **overrides})


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
    model_args, data_args, args = parse_args([str(recipe), "--max_steps", "7"])
    assert (args.learning_rate, args.max_steps, data_args.dataset_name) == (0.5, 7, "somewhere")
    (tmp_path / "recipe.json").write_text(json.dumps({"preset": "ViT-B-32"}))
    assert parse_args([str(tmp_path / "recipe.json")])[0].preset == "ViT-B-32"
    recipe.write_text("learning_rat: 0.5\n")
    with pytest.raises(ValueError, match="unknown argument.*learning_rat"):
        parse_args([str(recipe)])


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
        check_usable_rows(split, data_args, "train")
        dataset = ImageTextDataset(split, "image", "caption", image_transform_for(processor, train=True),
                                   base_directory(name), seed=0)
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
        check_usable_rows(load_split(data_args, "train"), data_args, "train")


def test_bad_rows_are_skipped_counted_and_batches_stay_full(processor):
    rows = _rows(24, bad={3, 4, 10})
    rows["caption"][7] = [""]  # empty caption
    rows["caption"][15] = ["   ", None]  # no usable caption in the list
    split = datasets.Dataset.from_dict(rows)
    dataset = build_train_dataset(split, _data_args(), image_transform_for(processor, train=True), seed=0,
                                  num_processes=1, process_index=0)
    batches = TrainBatches(dataset, ImageTextCollator(processor.tokenizer), batch_size=8, num_workers=0,
                           num_processes=1, process_index=0, seed=0, streaming=False).iterate()
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
        dataset = build_train_dataset(split, _data_args(streaming=True), image_transform_for(processor, train=True),
                                      seed=0, num_processes=2, process_index=rank)
        samples = list(dataset)
        seen.append({int(sample["caption"].split()[-1]) for sample in samples})
        skipped += sum(sample["skipped"] for sample in samples)
    assert skipped == 1
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == set(range(40)) - {5}


def test_global_batches_are_split_between_ranks():
    single = list(GlobalBatchSampler(100, 8, 1, 0, seed=3))
    ranks = [list(GlobalBatchSampler(100, 4, 2, rank, seed=3)) for rank in range(2)]
    assert len(single) == len(ranks[0]) == 12
    for step, batch in enumerate(single):
        assert ranks[0][step] + ranks[1][step] == batch
    sampler = GlobalBatchSampler(100, 8, 1, 0, seed=3)
    sampler.set_epoch(0, start_batch=5)
    assert list(sampler) == single[5:]
    sampler.set_epoch(1)
    assert list(sampler) != single


def test_augmentation_and_caption_choice_are_deterministic(processor):
    split = datasets.Dataset.from_dict(_rows(4))
    make = lambda: ImageTextDataset(split, "image", "caption", image_transform_for(processor, train=True),  # noqa
                                    base_directory(None), seed=7)
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
    dataset = ImageTextDataset(datasets.Dataset.from_dict(rows), "image", "caption",
                               image_transform_for(processor, train=False), base_directory(None), seed=0,
                               replace_bad_rows=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=ImageTextCollator(processor.tokenizer))
    first, second = list(loader)
    assert first["row_ids"].numel() == 0 and int(first["skipped"]) == 3
    assert second["row_ids"].tolist() == [3, 4, 5] and second["pixel_values"].shape == (3, 3, 24, 24)
