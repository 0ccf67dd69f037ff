"""Every code block of docs/towers.md runs as written, in order, in one namespace, in a folder that holds tiny local
stand-ins of the checkpoints it names (each Hub id is replaced by the folder of a tiny model of its family)."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_towers import save_text_folder, save_vision_folder, text_config, vision_config
from transformers import AutoTokenizer, SiglipConfig, SiglipModel, VisionTextDualEncoderModel

DOC = Path(__file__).resolve().parents[1] / "docs" / "towers.md"
STAND_INS = {
    "google/vit-base-patch16-224-in21k": "vision-vit",
    "FacebookAI/roberta-base": "text-roberta",
    "facebook/dinov2-small": "vision-dinov2",
    "answerdotai/ModernBERT-base": "text-modernbert",
    "google/siglip-base-patch16-224": "siglip",
}


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL)


def _stand_ins(root: Path, clip_tokenizer) -> None:
    for family in ("vit", "dinov2"):
        save_vision_folder(root, family)
    for family in ("roberta", "modernbert", "xlm-roberta", "siglip_text_model"):
        save_text_folder(root, family, clip_tokenizer)
    torch.manual_seed(0)
    run_clip = VisionTextDualEncoderModel.from_vision_text_pretrained(
        str(root / "vision-vit"), str(root / "text-roberta"), projection_dim=16)
    run_clip.save_pretrained(root / "vit-roberta-run_clip")
    AutoTokenizer.from_pretrained(root / "text-roberta").save_pretrained(root / "vit-roberta-run_clip")
    (root / "vit-roberta-run_clip" / "preprocessor_config.json").write_text(
        (root / "vision-vit" / "preprocessor_config.json").read_text())
    siglip_text = AutoTokenizer.from_pretrained(root / "text-siglip_text_model")
    siglip = SiglipModel(SiglipConfig(text_config=text_config("siglip_text_model", siglip_text).to_dict(),
                                      vision_config=vision_config("siglip_vision_model").to_dict()))
    siglip.save_pretrained(root / "siglip")

    open_clip = pytest.importorskip("open_clip")
    text_cfg = {"hf_model_name": str(root / "text-xlm-roberta"), "hf_tokenizer_name": str(root / "text-xlm-roberta"),
                "hf_model_pretrained": False, "hf_pooler_type": "mean_pooler", "hf_proj_type": "mlp"}
    model_cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 64, "patch_size": 8},
                 "text_cfg": text_cfg}
    (root / "configs").mkdir()
    (root / "configs" / "tiny-xlm-roberta.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(root / "configs")
    folder = root / "xlm-roberta-base-ViT-B-32"
    folder.mkdir()
    save_file(open_clip.create_model("tiny-xlm-roberta", pretrained=None).state_dict(),
              folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))


@pytest.mark.slow
def test_every_docs_towers_code_block_runs(tmp_path, tokenizer):
    _stand_ins(tmp_path, tokenizer)
    blocks = _python_blocks()
    assert len(blocks) >= 6
    namespace = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for block in blocks:
            for hub_id, folder in STAND_INS.items():
                block = block.replace(f'"{hub_id}"', f'"{tmp_path / folder}"')
            exec(compile(block, str(DOC), "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert (tmp_path / "vit-roberta-clip" / "config.json").is_file()
    assert json.loads((tmp_path / "vit-roberta-dual-encoder" / "config.json").read_text())["model_type"] == (
        "vision-text-dual-encoder")
    assert namespace["siglip"].config.loss_type == "siglip"
    assert namespace["model"].config.text_config.model_type == "roberta"
