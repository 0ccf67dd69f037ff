"""Dataset-level evaluation (hf_clip_train.evaluation.evaluate_split) and hf_clip.metrics against naive formulas and a
row-by-row reference computation."""

import io

import datasets
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hf_clip import HFClipModel, HFClipProcessor, retrieval_recall, top_k_accuracy, zero_shot_classifier
from hf_clip_train.data import evaluate_split, image_transform_for
from hf_clip_train.synthetic import CLASS_NAMES, TEMPLATES, build_shapes_dataset


def _naive_top_k(scores: torch.Tensor, targets: list[int], k: int) -> float:
    hits = 0
    for row, target in zip(scores.tolist(), targets):
        ranked = sorted(range(len(row)), key=lambda column: -row[column])
        hits += target in ranked[:k]
    return hits / len(targets)


def test_top_k_accuracy_and_retrieval_recall_match_naive_ranking():
    generator = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(50, 7, generator=generator), torch.randint(7, (50,), generator=generator)
    assert top_k_accuracy(logits, labels, ks=(1, 3)) == pytest.approx(
        {"top1": _naive_top_k(logits, labels.tolist(), 1), "top3": _naive_top_k(logits, labels.tolist(), 3)})

    image_embeds = F.normalize(torch.randn(30, 8, generator=generator), dim=-1)
    text_embeds = F.normalize(image_embeds + 0.8 * torch.randn(30, 8, generator=generator), dim=-1)
    similarity = image_embeds @ text_embeds.T
    expected = {}
    for direction, scores in (("image_to_text", similarity), ("text_to_image", similarity.T)):
        expected.update({f"{direction}_R@{k}": _naive_top_k(scores, list(range(30)), k) for k in (1, 5, 10)})
    recall = retrieval_recall(image_embeds, text_embeds)
    assert recall == pytest.approx(expected)
    assert 0 < recall["image_to_text_R@1"] < recall["image_to_text_R@10"] < 1  # the case is not degenerate


def test_evaluate_split_matches_a_row_by_row_reference_and_skips_bad_rows(saved_checkpoint):
    model = HFClipModel.from_pretrained(saved_checkpoint).eval()
    processor = HFClipProcessor.from_pretrained(saved_checkpoint)
    split = build_shapes_dataset(num_train=0, num_test=24, num_unseen=0)["test"]
    raw = split.cast_column("image", datasets.Image(decode=False))
    images = list(raw["image"])
    images[5] = {"bytes": b"not an image", "path": None}
    captions = [[f"{caption[0]} {row}", "another caption"] for row, caption in enumerate(raw["caption"])]  # no ties
    data = datasets.Dataset.from_dict({"image": images, "caption": captions, "label": list(raw["label"])},
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "caption": raw.features["caption"],
                                                                  "label": raw.features["label"]}))

    results = evaluate_split(model, processor, data, templates=TEMPLATES, batch_size=5)

    usable = [row for row in range(24) if row != 5]
    transform = image_transform_for(processor, train=False)
    pixels = torch.stack([transform(Image.open(io.BytesIO(images[row]["bytes"])).convert("RGB")) for row in usable])
    text = processor.tokenizer([captions[row][0] for row in usable], padding=True, return_tensors="pt")
    with torch.no_grad():
        outputs = model(pixel_values=pixels, **text)
    classes = zero_shot_classifier(model, processor.tokenizer, list(CLASS_NAMES), list(TEMPLATES))
    labels = [data["label"][row] for row in usable]
    expected = {"num_samples": 23, "skipped_samples": 1,
                "zero_shot_top1": _naive_top_k(outputs.image_embeds @ classes.T, labels, 1),
                "zero_shot_top5": _naive_top_k(outputs.image_embeds @ classes.T, labels, 5)}
    similarity = outputs.image_embeds @ outputs.text_embeds.T
    for direction, scores in (("image_to_text", similarity), ("text_to_image", similarity.T)):
        expected.update({f"{direction}_R@{k}": _naive_top_k(scores, list(range(23)), k) for k in (1, 5, 10)})
    assert results == pytest.approx(expected, abs=1e-6)
    assert model.training is False


@pytest.mark.parametrize("name", ["evaluate_split", "embed_split", "ImageTextColumns"])
def test_names_moved_to_the_training_package_still_import_from_hf_clip_with_a_warning(name):
    import hf_clip
    import hf_clip_train.data

    with pytest.warns(FutureWarning, match=rf"hf_clip\.{name} moved to hf_clip_train\.data\.{name}"):
        alias = getattr(hf_clip, name)
    assert alias is getattr(hf_clip_train.data, name)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        hf_clip.no_such_name  # noqa: B018
