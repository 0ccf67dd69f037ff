"""An index folder on the Hub: what it publishes (index_info.json and a dataset card that name no local path), the
push as one commit, and the download that `ImageTextIndex.load` makes of a repo id, with errors that name what is
missing. Imports nothing that only training needs.

Local paths are published as the model push publishes them (`hf_clip.hub.public_name`): the model folder as
"local model NAME", the dataset as "local dataset NAME", `base_dir` as "local path NAME", and any other absolute path
(in a skipped row's error, say) as "local path NAME". A Hub id stays as it is, so an index built with a Hub model
loads back from the Hub without `model_name_or_path`.
"""

import json
import re
from pathlib import Path
from typing import Any

from hf_clip.hub import public_name, public_text

from .layout import CARD_FILE, EMBEDDINGS_DIR, FAISS_FILE, INFO_FILE, SHARDS_DIR, SKIPPED_FILE

LOCAL_MODEL = "local model "


def public_index_info(info: dict[str, Any]) -> dict[str, Any]:
    """index_info.json as it is published: the model's and the dataset's local paths, and `base_dir`, as "local
    model NAME", "local dataset NAME" and "local path NAME" (Hub ids unchanged)."""
    public = json.loads(json.dumps(info))
    public["model"]["name_or_path"] = public_name(info["model"]["name_or_path"], "model")
    source = public["source"]
    if source.get("dataset_name") is not None:
        source["dataset_name"] = public_name(source["dataset_name"], "dataset")
    if source.get("base_dir") is not None:
        source["base_dir"] = public_name(source["base_dir"], "path")
    return public


def is_local_model_name(name: str) -> bool:
    """Whether index_info.json names its model as a folder of the machine that built it ("local model NAME")."""
    return name.startswith(LOCAL_MODEL)


def dataset_card(info: dict[str, Any]) -> str:
    """The README.md of an index folder, for the Hub; it names no local path (`public_index_info`)."""
    info = public_index_info(info)
    source = info["source"]
    name = source.get("dataset_name") or "the hf_clip embedded shapes dataset"
    split = f"the `{source['split']}` split of " if source.get("split") else ""
    lines = ["---", "tags:", "- hf_clip", "- clip", "- embeddings", "- image-retrieval", "---", "",
             f"# Search index of {name}", "",
             f"CLIP embeddings of {split}{name} ({info['num_rows']} rows embedded, {info['num_skipped_rows']} "
             f"skipped), made with `{info['model']['name_or_path']}` by hf_clip {info['hf_clip_version']}: "
             "`image_embedding`" + (" and `text_embedding`" if info["text_embeddings"] else "")
             + f" ({info['dimension']} dimensions, L2-normalised), the dataset's `row_id` and the kept columns "
             + f"{info['kept_columns']}, with a {info['index_type']} index over the image embeddings.", "",
             "```python", "from hf_clip_train.search import ImageTextIndex", "",
             "index = ImageTextIndex.load(REPO_ID, model_name_or_path=MODEL)  # the model that built the index",
             'print(index.search("a photo of a dog", k=5))', "```", ""]
    return "\n".join(lines)


def _public_skipped_rows(path: Path) -> bytes:
    lines = []
    for line in path.read_text().splitlines():
        item = json.loads(line)
        item["error"] = public_text(str(item.get("error", "")))
        lines.append(json.dumps(item) + "\n")
    return "".join(lines).encode()


def push_index_to_hub(folder: str | Path, repo_id: str, *, private: bool | None = None, token: str | None = None,
                      revision: str | None = None, commit_message: str = "Upload hf_clip search index"):
    """Upload an index folder (without its shards/ working folder) to the Hub dataset repo `repo_id` in one commit,
    with index_info.json, README.md and skipped_rows.jsonl as they are published (no local path); files of an
    earlier push that the folder no longer has (embeddings/ files, image.faiss) are deleted. Returns the
    `CommitInfo`."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    from .checks import read_index_info

    folder = Path(folder)
    info = read_index_info(folder)
    published = {INFO_FILE: json.dumps(public_index_info(info), indent=2).encode(),
                 CARD_FILE: dataset_card(info).encode()}
    if (folder / SKIPPED_FILE).is_file():
        published[SKIPPED_FILE] = _public_skipped_rows(folder / SKIPPED_FILE)
    local = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()
                   and path.relative_to(folder).parts[0] != SHARDS_DIR and ".tmp-" not in path.name)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=published.get(name, str(folder / name)))
                  for name in sorted({*local, *published})]
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True).repo_id
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
    remote = api.list_repo_files(repo_id, repo_type="dataset", revision=revision)
    operations += [CommitOperationDelete(path_in_repo=name) for name in remote
                   if (name == FAISS_FILE or name.startswith(f"{EMBEDDINGS_DIR}/")) and name not in local]
    return api.create_commit(repo_id, operations, repo_type="dataset", revision=revision,
                             commit_message=commit_message)


def download_index(name: str, revision: str | None = None, token: str | None = None) -> Path:
    """The local snapshot of the Hub dataset repo `name` (at `revision`), for a name that is no local folder. Raises
    `IndexNotFoundError` saying that no such folder exists here and what the Hub answered: no such repo, no such
    branch or commit, or no answer at all."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    from .checks import IndexNotFoundError

    here = f"{name!r} is not a folder here ({Path(name).expanduser().absolute()} does not exist)"
    try:
        return Path(snapshot_download(name, repo_type="dataset", revision=revision, token=token))
    except RepositoryNotFoundError:
        raise IndexNotFoundError(f"{here}, and the Hub ({constants.ENDPOINT}) has no dataset repo {name!r} that you "
                                 "can read (check the name, or log in with `hf auth login` for a private "
                                 "repo).") from None
    except RevisionNotFoundError:
        what = "commit" if re.fullmatch(r"[0-9a-f]{40}", revision or "") else "branch or tag"
        raise IndexNotFoundError(f"The Hub dataset repo {name!r} has no {what} {revision!r} (--revision).") from None
    except (HfHubHTTPError, OSError, ValueError) as error:
        summary = " ".join(str(error).split())[:300]
        raise IndexNotFoundError(f"{here}, and fetching the Hub dataset repo {name!r} from {constants.ENDPOINT} "
                                 f"failed ({type(error).__name__}: {summary}).") from None
