"""`hf-clip-export` and `hf_clip.export`'s functions never write into the model they export, never replace a non-empty
output folder unless asked to, write the output whole or not at all, and answer bad input with one line on stderr and
exit status 2 (`hf_clip.cli.run_cli`).

`clip` exports are used where either subcommand would do (a plain CLIP folder takes a fraction of a second; an ONNX
export of the same model several seconds); each rule is checked once with `onnx` too.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hf_clip import HFClipModel, HFClipProcessor
from hf_clip.cli import UsageError, run_cli
from hf_clip.export import export_clip, export_onnx, main

CONSOLE_SCRIPT = Path(sys.executable).parent / "hf-clip-export"
HAS_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime"))
COMMANDS = ["clip", pytest.param("onnx", marks=pytest.mark.skipif(not HAS_ONNX, reason="needs the [onnx] extra"))]
CARD = "# My model\n\nTrained for 10 epochs; zero-shot top-1 71.3%.\n"


@pytest.fixture
def model_folder(saved_checkpoint, tmp_path) -> Path:
    """A copy of the tiny saved model, with a model card of its own."""
    folder = tmp_path / "model"
    shutil.copytree(saved_checkpoint, folder)
    (folder / "README.md").write_text(CARD)
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}


def _refused(argv: list[str], capsys) -> str:
    """Runs `hf-clip-export ARGV`, which must exit with status 2; returns what it printed on stderr (one line)."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err  # progress bars of the model's loading may come first, on lines of their own
    message = err.splitlines()[-1].split("\r")[-1]
    assert err.endswith(f"{message}\n") and message.startswith("hf-clip-export: error: ") and "Traceback" not in err
    return message


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_export_into_the_models_own_folder_is_refused_and_leaves_it_untouched(model_folder, command, overwrite,
                                                                              capsys):
    """BAD 1 and 3: `hf-clip-export onnx M M` replaced the model card, `clip M M` the model's config.json."""
    before = _snapshot(model_folder)
    err = _refused([command, str(model_folder), str(model_folder), *overwrite], capsys)
    assert f"{model_folder.resolve()} is the folder of the model it exports" in err
    assert _snapshot(model_folder) == before
    assert sorted(path.name for path in model_folder.parent.iterdir()) == ["model"]
    HFClipModel.from_pretrained(model_folder)


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_export_inside_or_around_the_models_folder_is_refused(model_folder, tmp_path, overwrite, capsys):
    before = _snapshot(model_folder)
    inside = model_folder / "exported"
    err = _refused(["clip", str(model_folder), str(inside), *overwrite], capsys)
    assert f"lies inside the folder of the model it exports, {model_folder.resolve()}" in err
    err = _refused(["clip", str(model_folder), str(tmp_path), *overwrite], capsys)
    assert f"holds the folder of the model it exports, {model_folder.resolve()}" in err
    link = tmp_path / "link"
    link.symlink_to(model_folder, target_is_directory=True)
    err = _refused(["clip", str(model_folder), str(link), *overwrite], capsys)
    assert "is the folder of the model it exports" in err
    relative = os.path.relpath(model_folder, Path.cwd())
    _refused(["clip", str(model_folder), relative, *overwrite], capsys)
    assert _snapshot(model_folder) == before and not inside.exists()


def test_python_export_functions_refuse_the_models_folder_even_with_overwrite(model_folder):
    model, processor = HFClipModel.from_pretrained(model_folder), HFClipProcessor.from_pretrained(model_folder)
    before = _snapshot(model_folder)
    with pytest.raises(ValueError, match="is the folder of the model it exports"):
        export_clip(model, processor, model_folder, overwrite=True)
    with pytest.raises(ValueError, match="lies inside the folder of the model it exports"):
        export_clip(model, processor, model_folder / "plain", overwrite=True)
    if HAS_ONNX:
        with pytest.raises(ValueError, match="is the folder of the model it exports"):
            export_onnx(model, processor, model_folder, overwrite=True)
    assert _snapshot(model_folder) == before


@pytest.mark.parametrize("command", COMMANDS)
def test_export_refuses_a_non_empty_output_folder_unless_overwrite(model_folder, tmp_path, command, capsys):
    """BAD 2: `hf-clip-export onnx M OUT` silently replaced OUT/README.md."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    (out / "stale.txt").write_text("from an earlier export\n")
    err = _refused([command, str(model_folder), str(out)], capsys)
    assert f"{out.resolve()} is not empty (it holds README.md, stale.txt)" in err and "--overwrite" in err
    assert _snapshot(out) == {"README.md": b"my notes\n", "stale.txt": b"from an earlier export\n"}

    main([command, str(model_folder), str(out), "--overwrite"])
    assert not (out / "stale.txt").exists() and (out / "tokenizer.json").is_file()
    if command == "onnx":
        assert (out / "README.md").read_text().startswith("# ONNX export of an hf_clip model")
    else:
        assert not (out / "README.md").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model", "out"]  # no temporary folder left
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not the temporary folder's 0o700


def test_python_export_functions_refuse_a_non_empty_folder_unless_overwrite(model_folder, tmp_path):
    model, processor = HFClipModel.from_pretrained(model_folder), HFClipProcessor.from_pretrained(model_folder)
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    with pytest.raises(FileExistsError, match=r"is not empty \(it holds README.md\).*overwrite=True"):
        export_clip(model, processor, out)
    assert (out / "README.md").read_text() == "my notes\n"
    assert export_clip(model, processor, out, overwrite=True) == out.resolve()
    assert json.loads((out / "config.json").read_text())["model_type"] == "clip"
    assert not (out / "README.md").exists()


def test_a_failed_export_leaves_the_previous_output_intact_and_no_partial_folder(model_folder, tmp_path,
                                                                                 monkeypatch):
    """The export writes into a temporary folder beside the output and renames it into place only at the end."""
    import hf_clip.export

    out = tmp_path / "out"
    main(["clip", str(model_folder), str(out)])
    before = _snapshot(out)
    checked = []

    def fail_after_writing(folder: Path) -> None:
        checked.append(sorted(path.name for path in folder.iterdir()))
        raise OSError("No space left on device")

    monkeypatch.setattr(hf_clip.export, "_check_plain", fail_after_writing)
    with pytest.raises(OSError, match="No space left"):
        main(["clip", str(model_folder), str(out), "--overwrite"])
    assert "model.safetensors" in checked[0]  # the failure came after the weights were written
    assert _snapshot(out) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model", "out"]
    with pytest.raises(OSError, match="No space left"):
        main(["clip", str(model_folder), str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()


def test_export_from_a_missing_folder_says_the_folder_is_missing(tmp_path, capsys, monkeypatch):
    """WEAK: it said "Repo id must be in the form ..."."""
    err = _refused(["clip", str(tmp_path / "no" / "such" / "model"), str(tmp_path / "out")], capsys)
    assert f"The model folder {tmp_path / 'no' / 'such' / 'model'} does not exist." in err
    assert "Repo id" not in err
    monkeypatch.chdir(tmp_path)
    err = _refused(["onnx" if HAS_ONNX else "clip", "./missing_model", "out"], capsys)
    assert "The model folder ./missing_model does not exist." in err
    err = _refused(["clip", "missing_model", "out"], capsys)  # could be a Hub id: it says both
    assert "missing_model (no such local folder, so read as a Hub model id)" in err
    (tmp_path / "weights.txt").write_text("")
    assert "weights.txt is a file; pass the model's folder." in _refused(["clip", "weights.txt", "out"], capsys)
    assert not (tmp_path / "out").exists()


def test_export_clip_refusal_of_a_siglip_model_names_the_flag(tokenizer, tmp_path, capsys):
    from conftest import tiny_siglip_model_and_processor

    model, processor = tiny_siglip_model_and_processor(tokenizer)
    model.save_pretrained(tmp_path / "siglip")
    processor.save_pretrained(tmp_path / "siglip")
    err = _refused(["clip", str(tmp_path / "siglip"), str(tmp_path / "out")], capsys)
    assert "Pass --drop_logit_bias to export without it" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_console_script_help_and_a_bad_input(tmp_path):
    """The installed `hf-clip-export` entry point: --help exits 0; a missing model folder is one line on stderr and
    exit status 2, with no traceback."""
    helped = subprocess.run([str(CONSOLE_SCRIPT), "clip", "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "--overwrite" in helped.stdout and "--drop_logit_bias" in helped.stdout
    missing = tmp_path / "no_such_model"
    bad = subprocess.run([str(CONSOLE_SCRIPT), "clip", str(missing), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr == f"hf-clip-export: error: The model folder {missing} does not exist.\n"


def test_run_cli_turns_user_errors_into_one_line_and_exit_status_2_but_keeps_bugs(capsys):
    def refuse(argv):
        raise UsageError(f"bad {argv[0]}:\n  details on a second line")

    with pytest.raises(SystemExit) as exited:
        run_cli(refuse, ["flag"], prog="tool")
    assert exited.value.code == 2
    assert capsys.readouterr().err == "tool: error: bad flag: details on a second line\n"

    def missing(argv):
        raise FileNotFoundError("no such file: x.csv")

    with pytest.raises(SystemExit):
        run_cli(missing, [], prog="tool", user_errors=(FileNotFoundError,))
    assert capsys.readouterr().err == "tool: error: no such file: x.csv\n"
    with pytest.raises(FileNotFoundError):  # not declared a user error: a bug, with its traceback
        run_cli(missing, [], prog="tool")

    def bug(argv):
        return {}["key"]

    with pytest.raises(KeyError):
        run_cli(bug, [], prog="tool")
    assert run_cli(lambda argv: len(argv), ["a", "b"], prog="tool") == 2
