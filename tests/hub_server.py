"""A small Hub-protocol HTTP server on 127.0.0.1: the part of the Hugging Face Hub API that `huggingface_hub` uses to
create a repo, push a commit and download files, for model repos and dataset repos (stored as "datasets/ns/name").

Repos live in memory as git-like commit chains (every commit holds the full file tree), so tests can count
commits, read branches and check privacy. Files are always "regular" (base64 inline in the commit); there is no
LFS or Xet. Faults can be injected to test retries: `server.inject("commit", "drop")` closes the connection of the
next commit request without an answer.

Run it on its own to try the README's "Share your model" section offline:

    python tests/hub_server.py --port 8765 --user me --token hf_local_token
"""

import argparse
import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import yaml


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def commit(self, branch: str, message: str, files: dict[str, bytes]) -> Commit:
        parent = self.branches.get(branch)
        digest = hashlib.sha1(f"{parent}\n{message}\n{time.time_ns()}".encode())
        for path in sorted(files):
            digest.update(path.encode() + git_blob_sha1(files[path]).encode())
        new = Commit(digest.hexdigest(), parent, message, files)
        self.commits[new.oid] = new
        self.branches[branch] = new.oid
        return new

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        return self.commits.get(revision)

    def history(self, branch: str) -> list[Commit]:
        chain, oid = [], self.branches.get(branch)
        while oid is not None:
            chain.append(self.commits[oid])
            oid = self.commits[oid].parent
        return chain


class HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code


class LocalHub:
    """Repo store, users and injected faults, shared by the request handlers of one server."""

    def __init__(self, tokens: dict[str, str]):
        self.tokens = dict(tokens)
        self.repos: dict[str, Repo] = {}
        self.faults: list[tuple[str, str]] = []
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.RLock()
        self.url = ""

    def inject(self, route: str, fault: str) -> None:
        """Fail the next request to `route` ("commit", "preupload", "resolve", ...) with `fault`: "drop" (close
        the connection without an answer), "drop_after" (apply it, then close without an answer) or an HTTP status
        such as "503"."""
        with self.lock:
            self.faults.append((route, fault))

    def take_fault(self, route: str) -> str | None:
        with self.lock:
            for index, (fault_route, fault) in enumerate(self.faults):
                if fault_route == route:
                    del self.faults[index]
                    return fault
        return None

    def user_for(self, authorization: str | None) -> str | None:
        if not authorization:
            return None
        token = authorization.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def repo(self, repo_id: str, user: str | None, *, write: bool = False) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            raise HubError(401 if user is None else 404, f"Repository not found: {repo_id}", "RepoNotFound")
        if write and user != repo.owner:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def commit_of(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit


REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
REV = r"(?P<rev>[^/]+)"
KIND = r"(?P<kind>models|datasets)"  # /api/models/... and /api/datasets/...
PREFIX = r"(?P<prefix>datasets/)?"  # /ns/name/resolve/... and /datasets/ns/name/resolve/...


def repo_key(repo_id: str, repo_type: str | None) -> str:
    """Where a repo is stored: models under their id ("alice/x"), datasets as "datasets/alice/x"."""
    return f"datasets/{repo_id}" if repo_type == "dataset" else repo_id


class HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: LocalHub

    def log_message(self, format: str, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.dispatch("GET")

    def do_HEAD(self) -> None:
        self.dispatch("HEAD")

    def do_POST(self) -> None:
        self.dispatch("POST")

    def dispatch(self, method: str) -> None:
        parsed = urlparse(self.path)
        path, query = unquote(parsed.path), parse_qs(parsed.query)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        routes = [
            ("GET", r"/api/whoami-v2", "whoami", self.whoami),
            ("POST", r"/api/repos/create", "create", self.create_repo),
            ("POST", r"/api/validate-yaml", "validate-yaml", self.validate_yaml),
            ("POST", rf"/api/{KIND}/{REPO}/branch/{REV}", "branch", self.create_branch),
            ("POST", rf"/api/{KIND}/{REPO}/preupload/{REV}", "preupload", self.preupload),
            ("POST", rf"/api/{KIND}/{REPO}/commit/{REV}", "commit", self.commit),
            ("POST", rf"/api/{KIND}/{REPO}/paths-info/{REV}", "paths-info", self.paths_info),
            ("GET", rf"/api/{KIND}/{REPO}/tree/{REV}(?:/(?P<path>.*))?", "tree", self.tree),
            ("GET", rf"/api/{KIND}/{REPO}/commits/{REV}", "commits", self.list_commits),
            ("GET", rf"/api/{KIND}/{REPO}/refs", "refs", self.refs),
            ("GET", rf"/api/{KIND}/{REPO}(?:/revision/{REV})?", "info", self.model_info),
            ("GET", rf"/{PREFIX}{REPO}/resolve/{REV}/(?P<path>.+)", "resolve", self.resolve),
            ("HEAD", rf"/{PREFIX}{REPO}/resolve/{REV}/(?P<path>.+)", "resolve", self.resolve),
        ]
        for route_method, pattern, name, handler in routes:
            match = re.fullmatch(pattern, path)
            if route_method != method or match is None:
                continue
            self.hub.requests.append((method, path))
            groups = match.groupdict()
            kind, prefix = groups.pop("kind", None), groups.pop("prefix", None)
            if "repo" in groups and (kind == "datasets" or prefix):
                groups["repo"] = repo_key(groups["repo"], "dataset")
            fault = self.hub.take_fault(name)
            if fault == "drop":
                self.close_connection = True
                return
            try:
                with self.hub.lock:
                    user = self.hub.user_for(self.headers.get("Authorization"))
                    status, payload, headers = handler(user=user, body=body, query=query, **groups)
            except HubError as error:
                status, payload = error.status, {"error": error.message}
                headers = {"X-Error-Code": error.error_code} if error.error_code else {}
                headers["X-Error-Message"] = error.message
            if fault == "drop_after":
                self.close_connection = True
                return
            if fault is not None:
                status, payload, headers = int(fault), {"error": "injected fault"}, {}
            self.reply(status, payload, headers, send_body=method != "HEAD")
            return
        self.reply(404, {"error": f"no route for {method} {path}"}, {}, send_body=method != "HEAD")

    def reply(self, status: int, payload, headers: dict[str, str], send_body: bool) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        if not isinstance(payload, bytes):
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if send_body:
            self.wfile.write(data)

    def whoami(self, user: str | None, **_):
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return 200, {"type": "user", "name": user, "orgs": [],
                     "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}}, {}

    def create_repo(self, user: str | None, body: bytes, **_):
        request = json.loads(body)
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        namespace = request.get("organization") or user
        repo_type = request.get("type") or "model"
        repo_id = f"{namespace}/{request['name']}"
        key = repo_key(repo_id, repo_type)
        url = f"{self.hub.url}/{key}"
        if key in self.hub.repos:
            return 409, {"error": f"You already created this {repo_type} repo", "url": url}, {}
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
        repo = Repo(repo_id, user, bool(request.get("private")) or request.get("visibility") == "private")
        repo.commit("main", "initial commit", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs\n"})
        self.hub.repos[key] = repo
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def validate_yaml(self, body: bytes, **_):
        content = json.loads(body)["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, flags=re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as error:
            return 400, {"error": f"Invalid YAML in README.md: {error}"}, {}
        if not isinstance(metadata, dict):
            return 400, {"error": "README.md metadata must be a mapping"}, {}
        return 200, {"errors": [], "warnings": []}, {}

    def create_branch(self, user: str | None, repo: str, rev: str, body: bytes, **_):
        hub_repo = self.hub.repo(repo, user, write=True)
        if rev in hub_repo.branches:
            return 409, {"error": f"Reference already exists: refs/heads/{rev}"}, {}
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        hub_repo.branches[rev] = self.hub.commit_of(hub_repo, start).oid
        return 200, {}, {}

    def preupload(self, user: str | None, repo: str, rev: str, body: bytes, **_):
        commit = self.hub.commit_of(self.hub.repo(repo, user, write=True), rev)
        files = []
        for entry in json.loads(body)["files"]:
            existing = commit.files.get(entry["path"])
            files.append({"path": entry["path"], "uploadMode": "regular", "shouldIgnore": False,
                          "oid": None if existing is None else git_blob_sha1(existing)})
        return 200, {"files": files, "commitOid": commit.oid}, {}

    def commit(self, user: str | None, repo: str, rev: str, body: bytes, **_):
        hub_repo = self.hub.repo(repo, user, write=True)
        files = dict(self.hub.commit_of(hub_repo, rev).files)
        message = ""
        for line in body.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value["summary"]
                parent = value.get("parentCommit")
                if parent is not None and parent != hub_repo.branches.get(rev):
                    return 412, {"error": "A commit has happened since. Please refresh and try again."}, {}
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                files = {p: c for p, c in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                error = f"unsupported commit operation {key!r} (this server only takes regular files)"
                return 400, {"error": error}, {}
        new = hub_repo.commit(rev, message, files)
        return 200, {"success": True, "commitOid": new.oid, "commitUrl": f"{self.hub.url}/{repo}/commit/{new.oid}"}, {}

    @staticmethod
    def entry(path: str, content: bytes | None) -> dict:
        if content is None:
            return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}
        return {"type": "file", "oid": git_blob_sha1(content), "size": len(content), "path": path}

    def paths_info(self, user: str | None, repo: str, rev: str, body: bytes, **_):
        commit = self.hub.commit_of(self.hub.repo(repo, user), rev)
        paths = parse_qs(body.decode()).get("paths", [])
        folders = {str(p).rsplit("/", 1)[0] for p in commit.files if "/" in p}
        return 200, [self.entry(p, commit.files.get(p)) for p in paths if p in commit.files or p in folders], {}

    def tree(self, user: str | None, repo: str, rev: str, query: dict, path: str | None = None, **_):
        commit = self.hub.commit_of(self.hub.repo(repo, user), rev)
        prefix = f"{path.strip('/')}/" if path else ""
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries, folders = [], set()
        for file_path in sorted(commit.files):
            if not file_path.startswith(prefix):
                continue
            rest = file_path[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/", 1)[0])
                continue
            entries.append(self.entry(file_path, commit.files[file_path]))
        if prefix and not entries and not folders:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        return 200, [self.entry(f, None) for f in sorted(folders)] + entries, {}

    def list_commits(self, user: str | None, repo: str, rev: str, **_):
        hub_repo = self.hub.repo(repo, user)
        self.hub.commit_of(hub_repo, rev)
        return 200, [{"id": c.oid, "title": c.message, "message": c.message, "authors": [],
                      "date": "2026-01-01T00:00:00.000Z"} for c in hub_repo.history(rev)], {}

    def refs(self, user: str | None, repo: str, **_):
        hub_repo = self.hub.repo(repo, user)
        branches = [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
                    for name, oid in hub_repo.branches.items()]
        return 200, {"branches": branches, "tags": [], "converts": []}, {}

    def model_info(self, user: str | None, repo: str, rev: str | None = None, **_):
        hub_repo = self.hub.repo(repo, user)
        commit = self.hub.commit_of(hub_repo, rev or "main")
        return 200, {"id": hub_repo.repo_id, "modelId": hub_repo.repo_id, "author": hub_repo.owner, "sha": commit.oid,
                     "private": hub_repo.private, "disabled": False, "gated": False, "tags": [],
                     "siblings": [{"rfilename": p} for p in sorted(commit.files)]}, {}

    def resolve(self, user: str | None, repo: str, rev: str, path: str, **_):
        commit = self.hub.commit_of(self.hub.repo(repo, user), rev)
        headers = {"X-Repo-Commit": commit.oid}
        if path not in commit.files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        content = commit.files[path]
        headers["ETag"] = f'"{git_blob_sha1(content)}"'
        return 200, content, headers


class HubServer:
    """`LocalHub` behind a threaded HTTP server on 127.0.0.1 (port 0 picks a free one)."""

    def __init__(self, tokens: dict[str, str], port: int = 0):
        self.hub = LocalHub(tokens)
        handler = type("BoundHubRequestHandler", (HubRequestHandler,), {"hub": self.hub})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.hub.url = self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8765, help="Port on 127.0.0.1.")
    parser.add_argument("--user", default="me", help="User name the token belongs to.")
    parser.add_argument("--token", default="hf_local_token", help="Token that authenticates as --user.")
    args = parser.parse_args()
    with HubServer({args.token: args.user}, port=args.port) as server:
        print(f"Hub-protocol server at {server.url} (Ctrl-C stops it)", flush=True)
        try:
            server.thread.join()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
