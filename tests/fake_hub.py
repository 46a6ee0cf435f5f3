"""A fake Hugging Face Hub on 127.0.0.1 for the tests: the endpoints huggingface_hub calls to look up and download
model repos, answered from bytes and files on disk, every request recorded.

- GET /api/models/{repo} and /api/models/{repo}/revision/{rev}: model info, with the commit `sha` and `siblings`
- GET /api/models/{repo}/tree/{rev}: the recursive file listing (huggingface_hub 1.x and later list it)
- HEAD and GET /{repo}/resolve/{rev}/{file}: a small file itself (ETag: its git blob id, X-Repo-Commit,
  Content-Length); a large one (LFS: .safetensors, .gguf) redirects to a second server standing for the CDN
  (reached as localhost) with Location, X-Linked-Etag (its sha256) and X-Linked-Size, as the Hub does
- errors with the X-Error-Code header huggingface_hub reads: 404 RepoNotFound / RevisionNotFound / EntryNotFound,
  and 401 GatedRepo for a gated repo's files without its token
"""

import hashlib
import json
import threading
from dataclasses import dataclass, field
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf")


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes | Path]]  # commit sha (40 hex) -> {path in the repo: content or file on disk}
    refs: dict[str, str]  # branch or tag -> commit sha
    token: str | None = None  # gated: files are served only with "Authorization: Bearer <token>"

    def commit(self, revision: str) -> str | None:
        return self.refs.get(revision) or (revision if revision in self.commits else None)


@dataclass(frozen=True)
class Blob:
    size: int
    git_oid: str  # sha1 of the git blob
    sha256: str


@cache
def blob(content: bytes | Path) -> Blob:
    data = content.read_bytes() if isinstance(content, Path) else content
    git_oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return Blob(len(data), git_oid, hashlib.sha256(data).hexdigest())


def is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


@dataclass
class FakeHub:
    repos: dict[str, Repo]  # "ORG/NAME" -> repo
    requests: list[str] = field(default_factory=list)  # "METHOD /path" of every request, to the hub or its CDN

    def __enter__(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hub.answer(self, body=True)

            def do_HEAD(self):
                hub.answer(self, body=False)

            def log_message(self, *args):
                pass

        self.servers = [ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2)]  # the hub, the CDN
        for server in self.servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        for server in self.servers:
            server.shutdown()
            server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.servers[0].server_port}"

    @property
    def cdn_url(self) -> str:
        """The second server under another host name, as huggingface_hub tells the Hub from its CDN by host."""
        return f"http://localhost:{self.servers[1].server_port}"

    def answer(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append(f"{request.command} {request.path}")
        parts = [unquote(p) for p in urlsplit(request.path).path.strip("/").split("/")]  # a revision may hold %2F
        if request.server is self.servers[1] and len(parts) == 2 and parts[0] == "cdn":
            return self.serve_cdn(request, parts[1], body)
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            return self.serve_api(request, f"{parts[2]}/{parts[3]}", parts[4:])
        if len(parts) >= 5 and parts[2] == "resolve":
            return self.serve_file(request, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), body)
        send(request, 404, b"not found")

    def find(self, request, repo_id: str, revision: str) -> tuple[Repo, str] | None:
        """The repo and the commit that revision names, or None after answering 404 as the Hub does."""
        repo = self.repos.get(repo_id)
        if repo is None:
            send(request, 404, b"", {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
            return None
        commit = repo.commit(revision)
        if commit is None:
            send(request, 404, b"", {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"})
            return None
        return repo, commit

    def serve_api(self, request, repo_id: str, tail: list[str]) -> None:
        kind, revision = (tail[0], "/".join(tail[1:]) or "main") if tail else ("revision", "main")
        found = self.find(request, repo_id, revision)
        if found is None:
            return
        repo, commit = found
        files = repo.commits[commit]
        if kind == "tree":
            listing = []
            for path, content in files.items():
                b = blob(content)
                entry = {"type": "file", "oid": b.git_oid, "size": b.size, "path": path}
                if is_lfs(path):
                    entry["lfs"] = {"oid": b.sha256, "size": b.size, "pointerSize": 134}
                listing.append(entry)
            return send_json(request, listing)
        info = {"_id": commit[:24], "id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                "gated": "manual" if repo.token else False, "disabled": False, "tags": [],
                "siblings": [{"rfilename": p} for p in sorted(files)]}
        send_json(request, info)

    def serve_file(self, request, repo_id: str, revision: str, path: str, body: bool) -> None:
        found = self.find(request, repo_id, revision)
        if found is None:
            return
        repo, commit = found
        if repo.token and request.headers.get("Authorization") != f"Bearer {repo.token}":
            return send(request, 401, b"", {"X-Error-Code": "GatedRepo",
                                            "X-Error-Message": f"Access to model {repo_id} is restricted."})
        content = repo.commits[commit].get(path)
        if content is None:
            return send(request, 404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
        b = blob(content)
        if is_lfs(path):
            return send(request, 302, b"", {"Location": f"{self.cdn_url}/cdn/{b.sha256}", "X-Repo-Commit": commit,
                                            "X-Linked-Etag": f'"{b.sha256}"', "X-Linked-Size": str(b.size)})
        send(request, 200, content if body else None, {"ETag": f'"{b.git_oid}"', "X-Repo-Commit": commit}, b.size)

    def serve_cdn(self, request, sha256: str, body: bool) -> None:
        for repo in self.repos.values():
            for files in repo.commits.values():
                for content in files.values():
                    if blob(content).sha256 == sha256:
                        size = blob(content).size
                        return send(request, 200, content if body else None, {"ETag": f'"{sha256}"'}, size)
        send(request, 404, b"no such blob")


def send(request, status: int, content: bytes | Path | None, headers: dict | None = None, size: int | None = None):
    """Answer with status, headers and content (None: a HEAD answer, headers only)."""
    request.send_response(status)
    for key, value in (headers or {}).items():
        request.send_header(key, value)
    length = size if size is not None else len(content) if isinstance(content, bytes) else 0
    request.send_header("Content-Length", str(length))
    request.end_headers()
    if isinstance(content, Path):
        with open(content, "rb") as f:
            while chunk := f.read(1 << 20):
                request.wfile.write(chunk)
    elif content:
        request.wfile.write(content)


def send_json(request, value) -> None:
    send(request, 200, json.dumps(value).encode(), {"Content-Type": "application/json"})
