"""Push to and pull from a real Hub-protocol HTTP server on 127.0.0.1 (tests/hub_server.py).

Every push and pull runs in a fresh process with `HF_ENDPOINT` set before `huggingface_hub` is imported, and a
fresh `HF_HOME`, so nothing is served from a cache. Outputs after the round trip must be bit-identical.
"""

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import ALICE_TOKEN, BOB_TOKEN, FAST_TRAINING_ARGS, hub_env, write_pickle_bomb
from hub_workers import LABELS, model_outputs, probe_image
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from preloaded import run_python
from safetensors.torch import load_file
from transformers import pipeline

import hf_clip
from hf_clip import HFClipModel, HFClipProcessor, ModelCardInfo, render_model_card

WORKERS = Path(__file__).with_name("hub_workers.py")
REPO = Path(__file__).resolve().parents[1]
METRICS = {
    "test": {"num_samples": 96, "zero_shot_top1": 0.96875, "zero_shot_top5": 1.0, "image_to_text_R@1": 0.5,
             "image_to_text_R@5": 0.75, "image_to_text_R@10": 0.875, "text_to_image_R@1": 0.4375,
             "text_to_image_R@5": 0.8125, "text_to_image_R@10": 0.90625},
    "test_unseen": {"num_samples": 48, "zero_shot_top1": 0.75, "zero_shot_top5": 0.9375},
}
HYPERPARAMETERS = {"learning_rate": 1e-3, "max_steps": 600, "per_device_train_batch_size": 128, "seed": 42,
                   "lock_image": False, "max_train_samples": None, "hub_token": ALICE_TOKEN}
CARD_DATA = {"dataset": "me/shapes", "dataset_split": "train", "base_model": "openai/clip-vit-base-patch32"}
# Keys a user or a tool may add to its arguments: credentials, which are never published, and a local path.
PRIVATE_ARGS = {"api_key": "sk-live-0001", "wandb_api_key": "wandb-0002", "aws_access_key_id": "AKIA0003",
                "private_key": "-----BEGIN KEY 0004", "passwd": "hunter0005", "credentials": "cred-0006",
                "logging_dir": "/home/me/x/runs"}
PUSHED_ARGS = {**HYPERPARAMETERS, **PRIVATE_ARGS, "model_name_or_path": "/home/me/checkpoints/base-clip"}


def run_worker(command: str, job: dict, env: dict, *flags: str, expect_ok: bool = True) -> dict:
    result = run_python([str(WORKERS), command, json.dumps(job), *flags], env=env, cwd=REPO, timeout=300)
    lines = result.stdout.strip().splitlines()
    report = json.loads(lines[-1]) if lines else {}
    assert (result.returncode == 0) == expect_ok, (report, result.stderr[-4000:])
    return {**report, "stderr": result.stderr}


def local_outputs(checkpoint, logit_scale_shift: float = 0.0, reshard_to: Path | None = None,
                  max_shard_size: str | None = None) -> dict[str, torch.Tensor]:
    """Outputs and weights of the local model. With `reshard_to`, of that model saved there in `max_shard_size`
    shards and loaded back: CPU kernels can round differently when tensors sit at other memory alignments, which
    depend on the file layout, so a sharded download is compared with the same sharded files loaded locally."""
    model = HFClipModel.from_pretrained(checkpoint)
    with torch.no_grad():
        model.logit_scale.add_(logit_scale_shift)
    if reshard_to is not None:
        model.save_pretrained(reshard_to, max_shard_size=max_shard_size)
        model = HFClipModel.from_pretrained(reshard_to)
    outputs = model_outputs(model, HFClipProcessor.from_pretrained(checkpoint))
    outputs.update({f"state.{k}": v for k, v in model.state_dict().items()})
    return outputs


def assert_bit_identical(expected: dict[str, torch.Tensor], path: Path) -> None:
    pulled = load_file(path)
    assert set(pulled) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(pulled[name], tensor), name


def pull(hub_server, tmp_path, name: str, job: dict, *flags: str, token: str | None = ALICE_TOKEN,
         expect_ok: bool = True) -> dict:
    return run_worker("pull", {**job, "out": str(tmp_path / f"{name}.safetensors")},
                      hub_env(hub_server, tmp_path / f"hf_home_{name}", token), *flags, expect_ok=expect_ok)


@pytest.fixture(scope="module")
def pushed_repo(hub_server, saved_checkpoint, tmp_path_factory):
    """alice/round-trip-clip, pushed once with metrics and training arguments."""
    env = hub_env(hub_server, tmp_path_factory.mktemp("hf_home_push"))
    job = {"checkpoint": str(saved_checkpoint), "repo_id": "round-trip-clip",
           "card": {"metrics": METRICS, "hyperparameters": PUSHED_ARGS, "extra_hyperparameters": [*PRIVATE_ARGS]},
           "kwargs": {"commit_message": "First model"}}
    report = run_worker("push", job, env)
    return {"repo_id": "alice/round-trip-clip", "oid": report["oid"], "stderr": report["stderr"]}


def test_model_card_front_matter_is_valid_and_carries_the_metrics(saved_checkpoint):
    model = HFClipModel.from_pretrained(saved_checkpoint)
    card = render_model_card(model, "alice/round-trip-clip",
                             ModelCardInfo(metrics=METRICS, hyperparameters=HYPERPARAMETERS, **CARD_DATA))
    parsed = ModelCard(str(card))  # parses and validates the YAML front matter with ModelCardData
    data = parsed.data
    assert data.library_name == "transformers" and data.pipeline_tag == "zero-shot-image-classification"
    assert data.license == "apache-2.0" and "hf_clip" in data.tags
    assert data.base_model == "openai/clip-vit-base-patch32" and data.datasets == ["me/shapes"]
    model_name, eval_results = model_index_to_eval_results(data.to_dict()["model-index"])
    assert model_name == "round-trip-clip"
    values = {(r.dataset_split, r.metric_name): r.metric_value for r in eval_results}
    assert values[("test", "Zero-shot top-1 accuracy")] == 96.88
    assert values[("test_unseen", "Zero-shot top-1 accuracy")] == 75.0
    assert values[("test", "Text-to-image recall@10")] == 90.62
    assert len(values) == 8 + 2
    assert {r.task_type for r in eval_results} == {"zero-shot-image-classification", "image-to-text-retrieval",
                                                   "text-to-image-retrieval"}
    body = parsed.text
    assert "| test | 96.9 | 100.0 | 50.0 |" in body and "Trained on **me/shapes** (split `train`)." in body
    table = [line for line in body.splitlines() if line.startswith("| `")]
    assert table == ["| `learning_rate` | 0.001 |", "| `max_steps` | 600 |", "| `per_device_train_batch_size` | 128 |",
                     "| `seed` | 42 |", "| `lock_image` | False |"]  # in the order given; None and the token left out
    assert f"{model.config.vision_config.hidden_size} × {model.config.vision_config.num_hidden_layers}" in body
    assert 'AutoModel.from_pretrained("alice/round-trip-clip", trust_remote_code=True)' in body
    assert ALICE_TOKEN not in str(card)


def test_local_directory_is_not_a_base_model(saved_checkpoint):
    model = HFClipModel.from_pretrained(saved_checkpoint)
    info = ModelCardInfo(base_model=str(saved_checkpoint), dataset=str(saved_checkpoint))
    card = render_model_card(model, "me/m", info)
    assert ModelCard(str(card)).data.base_model is None
    assert ModelCard(str(card)).data.datasets == [saved_checkpoint.name]  # a local dataset path shows by its name
    assert "No training data or hyper-parameters were recorded" in str(render_model_card(model, "me/m"))
    with pytest.raises(TypeError, match="split names"):
        render_model_card(model, "me/m", ModelCardInfo(metrics={"zero_shot_top1": 0.5}))


def test_card_publishes_known_hyperparameters_no_credential_and_no_local_path(saved_checkpoint, caplog):
    model = HFClipModel.from_pretrained(saved_checkpoint)
    hyperparameters = {**PRIVATE_ARGS, "learning_rate": 1e-3, "my_schedule": "cosine-restarts"}
    with caplog.at_level(logging.WARNING, logger="hf_clip.hub"):
        default = str(render_model_card(model, "me/m", ModelCardInfo(hyperparameters=hyperparameters)))
    assert "| `learning_rate` | 0.001 |" in default
    assert "my_schedule" not in default and "logging_dir" not in default
    assert "['api_key', 'aws_access_key_id', 'credentials', 'logging_dir', 'my_schedule', 'passwd', 'private_key', " \
           "'wandb_api_key']" in caplog.text
    for value in PRIVATE_ARGS.values():
        assert value not in caplog.text, value
    text = str(render_model_card(model, "me/m", ModelCardInfo(
        hyperparameters=hyperparameters, extra_hyperparameters=[*PRIVATE_ARGS, "my_schedule"],
        dataset="/home/me/datasets/laion-subset", base_model=str(saved_checkpoint))))
    assert "Trained on **local dataset laion-subset**" in text and "| `my_schedule` | cosine-restarts |" in text
    assert "| `logging_dir` | local path runs |" in text
    assert ModelCard(text).data.datasets == ["laion-subset"]
    for value in (*PRIVATE_ARGS.values(), "/home/me", str(saved_checkpoint)):
        assert value not in text, value
    hub_dataset = render_model_card(model, "me/m", ModelCardInfo(dataset="laion/laion400m"))
    assert "Trained on **laion/laion400m**" in str(hub_dataset)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_metrics_are_refused(saved_checkpoint, value):
    model = HFClipModel.from_pretrained(saved_checkpoint)
    metrics = {"test": {"zero_shot_top1": 0.5, "image_to_text_R@1": value}}
    with pytest.raises(ValueError, match=r"metrics\['test'\]\['image_to_text_R@1'\] is (nan|inf)"):
        render_model_card(model, "me/m", ModelCardInfo(metrics=metrics))
    with pytest.raises(ValueError, match="NaN or infinite"):
        hf_clip.push_to_hub(model, HFClipProcessor.from_pretrained(saved_checkpoint), "me/m",
                            ModelCardInfo(metrics=metrics))


def test_card_fields_as_keywords_still_work_with_a_deprecation_warning(saved_checkpoint):
    """The former call form `render_model_card(model, repo_id, metrics=..., ...)` renders the same card and warns."""
    model = HFClipModel.from_pretrained(saved_checkpoint)
    expected = str(render_model_card(model, "me/m", ModelCardInfo(metrics=METRICS, hyperparameters=HYPERPARAMETERS,
                                                                  **CARD_DATA)))
    with pytest.warns(FutureWarning, match=r"pass card=hf_clip.ModelCardInfo\(...\) instead"):
        legacy = render_model_card(model, "me/m", metrics=METRICS, hyperparameters=HYPERPARAMETERS, **CARD_DATA)
    assert str(legacy) == expected
    with pytest.raises(TypeError, match="not both"):
        render_model_card(model, "me/m", ModelCardInfo(), metrics=METRICS)
    with pytest.raises(TypeError, match="unexpected keyword argument.*'metric'"):
        hf_clip.push_to_hub(model, HFClipProcessor.from_pretrained(saved_checkpoint), "me/m", metric=METRICS)


@pytest.mark.slow
def test_push_makes_one_commit_with_every_file(hub_server, pushed_repo, saved_checkpoint):
    repo = hub_server.hub.repos[pushed_repo["repo_id"]]
    history = repo.history("main")
    assert [c.message for c in history] == ["First model", "initial commit"]
    files = history[0].files
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "processor_config.json",
            "preprocessor_config.json", "configuration_hf_clip.py", "modeling_hf_clip.py", "loss.py",
            "processing_hf_clip.py", "README.md", "eval_results.json", "hyperparameters.json"} <= set(files)
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pkl"))]
    config = json.loads(files["config.json"])
    assert config["auto_map"]["AutoModel"] == "modeling_hf_clip.HFClipModel"
    assert config["auto_map"]["AutoModelForZeroShotImageClassification"] == "modeling_hf_clip.HFClipModel"
    assert json.loads(files["eval_results.json"]) == METRICS
    published = json.loads(files["hyperparameters.json"])
    assert published == {**{k: v for k, v in HYPERPARAMETERS.items() if k != "hub_token"},
                         "logging_dir": "local path runs", "model_name_or_path": "local path base-clip"}
    for name, content in files.items():
        for value in (*PRIVATE_ARGS.values(), ALICE_TOKEN, "/home/me"):
            assert value.encode() not in content, (name, value)
    assert files["model.safetensors"] == (saved_checkpoint / "model.safetensors").read_bytes()
    card = ModelCard(files["README.md"].decode())
    assert card.data.eval_results[0].metric_value == 96.88
    assert ALICE_TOKEN not in pushed_repo["stderr"]


@pytest.mark.slow
def test_pull_with_hf_clip_installed_is_bit_identical(hub_server, pushed_repo, saved_checkpoint, tmp_path):
    report = pull(hub_server, tmp_path, "installed", {"repo_id": pushed_repo["repo_id"], "pipeline": True})
    assert report["model_class"] == "hf_clip.modeling_hf_clip.HFClipModel"
    assert report["processor_class"] == "HFClipProcessor"
    assert_bit_identical(local_outputs(saved_checkpoint), tmp_path / "installed.safetensors")
    local = pipeline("zero-shot-image-classification", model=str(saved_checkpoint))
    assert report["pipeline"] == local(probe_image(), candidate_labels=LABELS)


@pytest.mark.slow
def test_pull_with_remote_code_and_no_hf_clip(hub_server, pushed_repo, saved_checkpoint, tmp_path):
    report = pull(hub_server, tmp_path, "remote", {"repo_id": pushed_repo["repo_id"], "trust_remote_code": True,
                                                   "pipeline": True}, "--without-hf-clip")
    assert report["model_class"].startswith("transformers_modules.")
    assert_bit_identical(local_outputs(saved_checkpoint), tmp_path / "remote.safetensors")
    local = pipeline("zero-shot-image-classification", model=str(saved_checkpoint))(probe_image(),
                                                                                    candidate_labels=LABELS)
    assert [r["label"] for r in report["pipeline"]] == [r["label"] for r in local]
    assert [r["score"] for r in report["pipeline"]] == pytest.approx([r["score"] for r in local], abs=1e-6)


@pytest.mark.slow
def test_repush_without_changes_makes_no_commit(hub_server, pushed_repo, saved_checkpoint, tmp_path):
    job = {"checkpoint": str(saved_checkpoint), "repo_id": pushed_repo["repo_id"],
           "card": {"metrics": METRICS, "hyperparameters": PUSHED_ARGS, "extra_hyperparameters": [*PRIVATE_ARGS]}}
    report = run_worker("push", job, hub_env(hub_server, tmp_path / "hf_home"))
    repo = hub_server.hub.repos[pushed_repo["repo_id"]]
    assert report["oid"] == pushed_repo["oid"] == repo.branches["main"]
    assert len(repo.history("main")) == 2


@pytest.mark.slow
def test_push_to_a_revision_branch(hub_server, pushed_repo, saved_checkpoint, tmp_path):
    repo = hub_server.hub.repos[pushed_repo["repo_id"]]
    main_head = repo.branches["main"]
    job = {"checkpoint": str(saved_checkpoint), "repo_id": pushed_repo["repo_id"], "logit_scale_shift": 0.5,
           "kwargs": {"revision": "experiment"}}
    report = run_worker("push", job, hub_env(hub_server, tmp_path / "hf_home"))
    assert repo.branches["experiment"] == report["oid"] and repo.branches["main"] == main_head
    pull(hub_server, tmp_path, "branch", {"repo_id": pushed_repo["repo_id"], "revision": "experiment"})
    assert_bit_identical(local_outputs(saved_checkpoint, 0.5), tmp_path / "branch.safetensors")


@pytest.mark.slow
def test_private_repo(hub_server, saved_checkpoint, tmp_path):
    job = {"checkpoint": str(saved_checkpoint), "repo_id": "alice/private-clip", "kwargs": {"private": True}}
    run_worker("push", job, hub_env(hub_server, tmp_path / "hf_home_push"))
    assert hub_server.hub.repos["alice/private-clip"].private
    anonymous = pull(hub_server, tmp_path, "anonymous", {"repo_id": "alice/private-clip"}, token=None,
                     expect_ok=False)
    assert "alice/private-clip" in anonymous["message"]
    other_user = pull(hub_server, tmp_path, "bob", {"repo_id": "alice/private-clip"}, token=BOB_TOKEN,
                      expect_ok=False)
    assert BOB_TOKEN not in other_user["message"] + other_user["stderr"]
    pull(hub_server, tmp_path, "owner", {"repo_id": "alice/private-clip"})
    assert_bit_identical(local_outputs(saved_checkpoint), tmp_path / "owner.safetensors")


@pytest.mark.slow
def test_transient_failures_are_retried_without_duplicate_commits(hub_server, saved_checkpoint, tmp_path):
    env = hub_env(hub_server, tmp_path / "hf_home")
    job = {"checkpoint": str(saved_checkpoint), "repo_id": "alice/flaky-clip"}
    hub_server.hub.inject("create", "503")
    hub_server.hub.inject("commit", "drop")  # connection reset before the commit lands
    report = run_worker("push", job, env)
    repo = hub_server.hub.repos["alice/flaky-clip"]
    assert len(repo.history("main")) == 2 and repo.branches["main"] == report["oid"]
    assert "retry 1/5" in report["stderr"]

    hub_server.hub.inject("commit", "drop_after")  # the commit lands, its answer is lost
    report = run_worker("push", {**job, "logit_scale_shift": 0.25}, env)
    assert len(repo.history("main")) == 3 and repo.branches["main"] == report["oid"]
    assert not hub_server.hub.faults


@pytest.mark.slow
def test_auth_errors_are_clear_and_never_echo_the_token(hub_server, saved_checkpoint, tmp_path):
    wrong_token = "hf_wrong_secret_token_42"
    job = {"checkpoint": str(saved_checkpoint), "repo_id": "alice/denied-clip"}
    report = run_worker("push", job, hub_env(hub_server, tmp_path / "a", token=wrong_token), expect_ok=False)
    assert report["error"] == "PermissionError" and "HTTP 401" in report["message"]
    assert "HF_TOKEN" in report["message"] and wrong_token not in report["message"] + report["stderr"]

    report = run_worker("push", {**job, "repo_id": "bob/not-yours"}, hub_env(hub_server, tmp_path / "b"),
                        expect_ok=False)
    assert report["error"] == "PermissionError" and "'bob/not-yours'" in report["message"]
    assert ALICE_TOKEN not in report["message"] + report["stderr"]
    assert "bob/not-yours" not in hub_server.hub.repos

    bob = {**job, "repo_id": "bob/bobs-private", "kwargs": {"private": True}}
    run_worker("push", bob, hub_env(hub_server, tmp_path / "c", token=BOB_TOKEN))
    report = run_worker("push", bob, hub_env(hub_server, tmp_path / "d"), expect_ok=False)
    assert report["error"] == "FileNotFoundError" and "'bob/bobs-private' was not found" in report["message"]
    assert ALICE_TOKEN not in report["message"] + report["stderr"]
    assert len(hub_server.hub.repos["bob/bobs-private"].history("main")) == 2


@pytest.mark.slow
def test_sharded_push_and_stale_shards_removed_on_repush(hub_server, saved_checkpoint, tmp_path):
    env = hub_env(hub_server, tmp_path / "hf_home")
    job = {"checkpoint": str(saved_checkpoint), "repo_id": "alice/sharded-clip", "kwargs": {"max_shard_size": "60KB"}}
    run_worker("push", job, env)
    repo = hub_server.hub.repos["alice/sharded-clip"]
    shards = [name for name in repo.history("main")[0].files if name.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in repo.history("main")[0].files
    pull(hub_server, tmp_path, "sharded", {"repo_id": "alice/sharded-clip"})
    local = local_outputs(saved_checkpoint, reshard_to=tmp_path / "local_shards", max_shard_size="60KB")
    assert sorted(p.name for p in (tmp_path / "local_shards").glob("*.safetensors")) == sorted(shards)
    assert_bit_identical(local, tmp_path / "sharded.safetensors")

    run_worker("push", {**job, "kwargs": {}}, env)
    files = repo.history("main")[0].files
    assert [name for name in files if "safetensors" in name] == ["model.safetensors"]


@pytest.mark.slow
def test_transformers_clip_repo_loads_into_hf_clip(hub_server, tokenizer, tmp_path):
    """A repo laid out like openai/clip-vit-base-patch32 (Transformers CLIPModel, CLIPProcessor and a pickled
    pytorch_model.bin beside model.safetensors) loads with HFClipModel.from_pretrained(repo_id), never unpickling."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    layer = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
    text = {**layer, "vocab_size": len(tokenizer), "max_position_embeddings": tokenizer.model_max_length,
            "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config={**layer, "image_size": 32, "patch_size": 8},
                                projection_dim=32)).eval()
    checkpoint = tmp_path / "clip"
    clip.save_pretrained(checkpoint)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(checkpoint)
    marker = tmp_path / "UNPICKLED"
    write_pickle_bomb(tmp_path / "pytorch_model.bin", marker)

    env = hub_env(hub_server, tmp_path / "hf_home_push")
    run_worker("push_transformers_clip", {"checkpoint": str(checkpoint), "repo_id": "alice/clip-vit-tiny",
                                          "pickle": str(tmp_path / "pytorch_model.bin")}, env)
    files = hub_server.hub.repos["alice/clip-vit-tiny"].history("main")[0].files
    assert json.loads(files["config.json"])["model_type"] == "clip" and "pytorch_model.bin" in files

    report = pull(hub_server, tmp_path, "clip", {"repo_id": "alice/clip-vit-tiny", "hf_clip_model_class": True})
    assert report["model_class"] == "hf_clip.modeling_hf_clip.HFClipModel"
    pulled = load_file(tmp_path / "clip.safetensors")
    for name, tensor in clip.state_dict().items():
        assert torch.equal(pulled[f"state.{name}"], tensor), name
    expected = model_outputs(clip, processor)
    for name in ("logits_per_image", "image_embeds", "text_embeds"):
        torch.testing.assert_close(pulled[name], expected[name], rtol=1e-5, atol=1e-5)
    assert not marker.exists()


@pytest.mark.slow
def test_training_run_pushes_model_card_and_results(hub_server, tmp_path):
    out = tmp_path / "run"
    env = {**hub_env(hub_server, tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}
    command = ["-m", "hf_clip_train.train", "--output_dir", str(out), *FAST_TRAINING_ARGS,
               "--max_steps", "2", "--eval_splits", "test", "--push_to_hub", "--hub_model_id", "shapes-run",
               "--hub_private_repo", "--save_steps", "1", "--hub_push_checkpoints"]
    result = run_python(command, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Pushed to the Hub: " in result.stdout and ALICE_TOKEN not in result.stdout + result.stderr
    repo = hub_server.hub.repos["alice/shapes-run"]
    assert repo.private and len(repo.history("main")) == 2
    files = repo.history("main")[0].files
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    results = json.loads((out / "eval_results.json").read_text())
    assert json.loads(files["eval_results.json"]) == results
    for card in (ModelCard(files["README.md"].decode()), ModelCard.load(out / "README.md")):
        top1 = [r for r in card.data.eval_results if r.metric_name == "Zero-shot top-1 accuracy"]
        assert [(r.dataset_split, r.metric_value) for r in top1] == [
            ("test", round(100 * results["test"]["zero_shot_top1"], 2))]
        assert "| `max_steps` | 2 |" in card.text and "never appear in training" in card.text
        assert str(tmp_path) not in card.text and "hub_model_id" not in card.text  # the recipe, no paths or Hub setup
    assert json.loads(files["hyperparameters.json"])["max_steps"] == 2
    checkpoints = repo.history("checkpoints")
    assert [c.message for c in checkpoints[:2]] == ["Checkpoint at step 2", "Checkpoint at step 1"]
    assert checkpoints[0].files["model.safetensors"] == files["model.safetensors"]
    assert checkpoints[1].files["model.safetensors"] != files["model.safetensors"]


@pytest.mark.slow
def test_transformers_push_to_hub_method_still_works(hub_server, saved_checkpoint, tmp_path):
    job = {"checkpoint": str(saved_checkpoint), "repo_id": "alice/method-clip", "transformers_method": True}
    run_worker("push", job, hub_env(hub_server, tmp_path / "hf_home_push"))
    files = hub_server.hub.repos["alice/method-clip"].history("main")[0].files
    assert "modeling_hf_clip.py" in files and not [name for name in files if name.endswith(".bin")]
    pull(hub_server, tmp_path, "method", {"repo_id": "alice/method-clip", "trust_remote_code": True},
         "--without-hf-clip")
    assert_bit_identical(local_outputs(saved_checkpoint), tmp_path / "method.safetensors")


def test_committed_example_card_is_valid_and_self_consistent():
    """model_cards/examples/ holds the card a `make demo` run wrote; its model-index matches its results table."""
    for path in sorted((REPO / "model_cards" / "examples").glob("*.md")):
        card = ModelCard.load(path)
        assert card.data.pipeline_tag == "zero-shot-image-classification" and card.data.eval_results, path
        for result in card.data.eval_results:
            if result.metric_name == "Zero-shot top-1 accuracy":
                assert f"| {result.dataset_split} | {result.metric_value:.1f} |" in card.text, path
