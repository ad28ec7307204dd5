"""A local stand-in for the Hugging Face Hub, spoken to by the real ``huggingface_hub`` client over HTTP.

Tests point the client at it (``point_client_at``, used by the ``hub_server`` fixture in conftest.py, sets
``huggingface_hub.constants.ENDPOINT``, which ``HfApi``, ``hf_hub_download`` and transformers'
``from_pretrained`` read at call time, and ``HF_ENDPOINT`` for child processes), so push, pull, the gallery
and a base model fetched on first use are tested through the client's own requests, never by replacing its
functions.
No PyPI package serves these endpoints without a separate binary, hence this file.

It speaks the part of the Hub API our code uses (model repos only; one branch, ``main``):

====================================================  =========================================================
``GET  /api/models``                                  listing: ``author``, ``search`` (substring of the id),
                                                      ``filter`` (every value must be a tag), ``limit``,
                                                      ``cardData``/``full``; pages through a ``Link`` header
``GET  /api/models/{repo}[/revision/{rev}]``          model info: sha, siblings, tags, cardData
``GET  /api/models/{repo}/tree/{rev}[/{path}]``       the file list ``snapshot_download`` asks for
``HEAD|GET /{repo}/resolve/{rev}/{path}``             a file, with ``ETag``, ``X-Repo-Commit``,
                                                      ``Content-Length``; ``*.bin``/``*.safetensors`` answer as
                                                      the Hub answers LFS files: a 302 whose ``Location`` is
                                                      on another origin (the "CDN": a second port, where
                                                      ``GET /blobs/{sha256}`` serves it), the metadata on
                                                      the redirect itself (``X-Linked-Etag``/``-Size``)
``POST /api/repos/create``                            a new repo (409 if it exists); needs a token
``POST /api/validate-yaml``                           a README.md's front matter must be a YAML mapping
``POST /api/models/{repo}/preupload/{rev}``           every file is uploaded "regular" (inline, base64)
``POST /api/models/{repo}/commit/{rev}``              the NDJSON commit: header, file, deletedFile lines
====================================================  =========================================================

Tags are derived from a repo's README.md front matter as the Hub derives them: its ``tags``, its
``library_name``, each ``language`` code, and ``base_model:{id}``. Anything else answers 404 with the
``X-Error-Code`` the client turns into its exceptions, so a request our code starts to make and this server
does not know fails loudly instead of passing by accident. Every request is recorded in ``requests``.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".bin", ".safetensors")  # served through a redirect, as the Hub serves LFS files
PAGE_SIZE = 50  # listing page size when no limit is given: more repos than this exercise the Link header


@dataclass
class Repo:
    """One model repo: its files at its single commit."""

    repo_id: str
    files: dict[str, bytes] = field(default_factory=dict)
    sha: str = "0" * 40
    private: bool = False
    commits: int = 0

    def commit(self, files: dict[str, bytes], deleted: tuple[str, ...] = ()) -> str:
        """Apply a commit; the sha is a digest of the content, so the same files give the same sha."""
        for path in deleted:
            self.files.pop(path, None)
        self.files.update(files)
        self.commits += 1
        digest = hashlib.sha1(f"{self.repo_id}:{self.commits}".encode())
        for path in sorted(self.files):
            digest.update(path.encode() + b"\0" + hashlib.sha1(self.files[path]).digest())
        self.sha = digest.hexdigest()
        return self.sha

    def card(self) -> dict:
        """The README.md front matter (the Hub's cardData), {} without one."""
        data = front_matter(self.files.get("README.md", b"").decode("utf-8", "replace"))
        return data if isinstance(data, dict) else {}

    def tags(self) -> list[str]:
        card = self.card()
        tags = [str(t) for t in card.get("tags") or []]
        if card.get("library_name"):
            tags.append(str(card["library_name"]))
        langs = card.get("language") or []
        tags += [str(x) for x in ([langs] if isinstance(langs, str) else langs)]
        if card.get("base_model"):
            tags.append(f"base_model:{card['base_model']}")
        return list(dict.fromkeys(tags))

    def info(self, *, card: bool) -> dict:
        author = self.repo_id.split("/")[0]
        out = {"id": self.repo_id, "modelId": self.repo_id, "author": author, "sha": self.sha,
               "private": self.private, "tags": self.tags(), "lastModified": "2025-01-01T00:00:00.000Z",
               "siblings": [{"rfilename": p} for p in sorted(self.files)]}
        if card:
            out["cardData"] = self.card()
        return out


def front_matter(text: str):
    """The YAML between a README.md's leading ``---`` lines, parsed ({} when there is none)."""
    m = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    return yaml.safe_load(m.group(1)) if m else {}


def point_client_at(mp, hub: HubServer, cache_dir: str | Path) -> None:
    """Point the ``huggingface_hub`` client at ``hub`` with the ``pytest.MonkeyPatch`` ``mp`` (undone with it):
    this process through the client's constants (read at call time; ``HF_ENDPOINT`` itself is read once, at
    import), child processes through ``HF_ENDPOINT``; a fresh download cache, ``hub``'s token."""
    from huggingface_hub import constants

    mp.setattr(constants, "ENDPOINT", hub.url)
    mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    mp.setattr(constants, "HF_HUB_OFFLINE", False)
    mp.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    mp.setenv("HF_ENDPOINT", hub.url)
    mp.setenv("HF_HUB_OFFLINE", "0")
    mp.setenv("HF_TOKEN", hub.token)


def git_blob_sha1(data: bytes) -> str:
    """The ETag the Hub gives a regular file: the git blob id."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """The server, on 127.0.0.1 at a free port, in a daemon thread. Use as a context manager::

        with HubServer() as hub:
            hub.add_repo("cambridgeltl/xlmr-lang-sft-jav-small", folder)
            ...  # huggingface_hub pointed at hub.url

    ``token``: the one token accepted for writes (repo creation, commits); reads need none.
    """

    def __init__(self, token: str = "hf_test_token"):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.delay = 0.0  # seconds each request waits before answering: a Hub too slow to wait for
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []  # the Hub, then its "CDN" (another origin)

    # ---- set-up ------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self._origin(0)

    @property
    def cdn_url(self) -> str:
        return self._origin(1)

    def _origin(self, i: int) -> str:
        assert self._servers, "the server is not running"
        host, port = self._servers[i].server_address[:2]
        return f"http://{host}:{port}"

    def add_repo(self, repo_id: str, files: dict[str, bytes] | Path, private: bool = False) -> Repo:
        """A repo holding ``files`` (a {path: bytes} dict, or every file of a folder, by relative path)."""
        if isinstance(files, Path):
            files = {p.relative_to(files).as_posix(): p.read_bytes() for p in sorted(files.rglob("*"))
                     if p.is_file()}
        with self._lock:
            repo = self.repos[repo_id] = Repo(repo_id, private=private)
            repo.commit(dict(files))
        return repo

    def __enter__(self) -> HubServer:
        server = self

        class Handler(_Handler):
            hub = server

        for name in ("hub-server", "hub-cdn"):
            httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            httpd.daemon_threads = True
            threading.Thread(target=httpd.serve_forever, name=name, daemon=True).start()
            self._servers.append(httpd)
        return self

    def __exit__(self, *exc) -> None:
        for httpd in self._servers:
            httpd.shutdown()
            httpd.server_close()
        self._servers.clear()


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # the test output stays quiet; ``hub.requests`` records each request
        pass

    # ---- answers -----------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, *, head: bool = False,
              length: int | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: dict | None = None) -> None:
        # a HEAD answer has no body (its Content-Length is the GET's): a body would be read as the next answer
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})},
                   head=self.command == "HEAD")

    def _error(self, status: int, message: str, code: str = "") -> None:
        self._json({"error": message}, status, {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})})

    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.hub.token}"

    def _unauthorized(self) -> None:
        """401, quoting the credentials received, as careless servers and proxies do: whatever shows the
        error must hide them."""
        self._error(401, f"Invalid credentials in Authorization header {self.headers.get('Authorization')!r}")

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    # ---- routing -----------------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _route(self, method: str) -> None:
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        self.hub.requests.append((method, self.path))
        if self.hub.delay:
            time.sleep(self.hub.delay)
        routes = [
            ("GET", r"/api/models", self._list),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", self._info),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", self._tree),
            ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self._resolve),
            ("GET", r"/blobs/(?P<sha>[0-9a-f]{64})", self._blob),
            ("POST", r"/api/repos/create", self._create),
            ("POST", r"/api/validate-yaml", self._validate_yaml),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", self._commit),
        ]
        for verb, pattern, handler in routes:
            m = re.fullmatch(pattern, path)
            if verb == method and m:
                handler(method=method, query=query, **{k: v for k, v in m.groupdict().items()})
                return
        if method == "POST":
            self._body()
        self._error(404, f"the test Hub does not serve {method} {path}")

    def _repo(self, repo_id: str, rev: str | None = None) -> Repo | None:
        """The repo, or None after answering 404 (the client maps X-Error-Code to its exceptions)."""
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, f"Repository Not Found for url: {self.path}", "RepoNotFound")
            return None
        if repo.private and not self._authorized():
            self._unauthorized()
            return None
        if rev not in (None, "main", repo.sha):
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return None
        return repo

    # ---- reading -----------------------------------------------------------------------------------
    def _list(self, method, query) -> None:
        author = (query.get("author") or [""])[0]
        search = (query.get("search") or [""])[0].lower()
        wanted = query.get("filter") or []
        card = (query.get("cardData") or query.get("full") or ["false"])[0].lower() in ("true", "1")
        limit = int((query.get("limit") or [0])[0]) or None
        offset = int((query.get("offset") or [0])[0])
        with self.hub._lock:
            found = [r.info(card=card) for _, r in sorted(self.hub.repos.items())
                     if not r.private and (not author or r.repo_id.split("/")[0] == author)
                     and search in r.repo_id.lower() and all(t in r.tags() for t in wanted)]
        size = limit or PAGE_SIZE
        page, headers = found[offset:offset + size], {}
        if limit is None and offset + size < len(found):
            rest = "&".join(f"{quote(k)}={quote(v)}" for k, vs in query.items() if k != "offset" for v in vs)
            headers["Link"] = f'<{self.hub.url}/api/models?{rest}&offset={offset + size}>; rel="next"'
        self._json(page, headers=headers)

    def _info(self, method, query, repo, rev) -> None:
        r = self._repo(repo, rev)
        if r is not None:
            self._json(r.info(card=True))

    def _tree(self, method, query, repo, rev, sub) -> None:
        r = self._repo(repo, rev)
        if r is None:
            return
        prefix = f"{sub.strip('/')}/" if sub else ""
        recursive = (query.get("recursive") or ["false"])[0].lower() in ("true", "1")
        entries = []
        for path, data in sorted(r.files.items()):
            if path.startswith(prefix) and (recursive or "/" not in path[len(prefix):]):
                entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
                if path.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(entry)
        self._json(entries)

    def _resolve(self, method, query, repo, rev, file) -> None:
        r = self._repo(repo, rev)
        if r is None:
            return
        data = r.files.get(file)
        if data is None:
            self._error(404, f"Entry not found: {file}", "EntryNotFound")
            return
        head = method == "HEAD"
        common = {"X-Repo-Commit": r.sha, "Accept-Ranges": "bytes"}
        if file.endswith(LFS_SUFFIXES):
            sha256 = hashlib.sha256(data).hexdigest()
            self.hub.blobs[sha256] = data
            self._send(302, b"", {**common, "Location": f"{self.hub.cdn_url}/blobs/{sha256}",
                                  "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": len(data),
                                  "ETag": f'"{git_blob_sha1(data)}"'}, head=head)
            return
        self._send(200, data, {**common, "ETag": f'"{git_blob_sha1(data)}"',
                               "Content-Type": "application/octet-stream"}, head=head)

    def _blob(self, method, query, sha) -> None:
        data = self.hub.blobs.get(sha)
        if data is None:
            self._error(404, "blob not found")
            return
        self._send(200, data, {"ETag": f'"{sha}"', "Content-Type": "application/octet-stream"},
                   head=method == "HEAD")

    # ---- writing -----------------------------------------------------------------------------------
    def _create(self, method, query) -> None:
        body = json.loads(self._body() or b"{}")
        if not self._authorized():
            self._unauthorized()
            return
        if body.get("type", "model") != "model":
            self._error(400, "the test Hub holds model repos only")
            return
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body.get("name", "")
        if "/" not in repo_id:
            self._error(400, f"give a namespace: {repo_id!r}")
            return
        with self.hub._lock:
            if repo_id in self.hub.repos:  # the Hub's 409 names the repo's url too
                message = "You already created this model repo"
                self._json({"error": message, "url": f"{self.hub.url}/{repo_id}"}, 409, {"X-Error-Message": message})
                return
            private = body.get("visibility", "private" if body.get("private") else "public") == "private"
            self.hub.repos[repo_id] = Repo(repo_id, private=private)
        self._json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, method, query) -> None:
        content = json.loads(self._body() or b"{}").get("content", "")
        try:
            data = front_matter(content)
        except yaml.YAMLError as e:
            data = f"not YAML: {e}"
        if isinstance(data, dict):
            self._json({"errors": [], "warnings": []})
        else:
            self._json({"errors": [{"message": f"the metadata must be a YAML mapping, found {data!r:.200}"}]}, 400)

    def _preupload(self, method, query, repo, rev) -> None:
        body = json.loads(self._body() or b"{}")
        if self._write_target(repo, rev) is None:
            return
        self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                              for f in body.get("files", [])], "commitOid": self.hub.repos[repo].sha})

    def _commit(self, method, query, repo, rev) -> None:
        lines = [json.loads(line) for line in self._body().decode().splitlines() if line.strip()]
        r = self._write_target(repo, rev)
        if r is None:
            return
        files: dict[str, bytes] = {}
        deleted: list[str] = []
        for line in lines:
            key, value = line.get("key"), line.get("value") or {}
            if key == "file" and value.get("encoding") == "base64":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deleted.append(value["path"])
            elif key != "header":  # lfsFile, deletedFolder, copies: this server never asks for them
                self._error(400, f"the test Hub does not take commit lines of key {key!r}")
                return
        with self.hub._lock:
            sha = r.commit(files, tuple(deleted))
        self._json({"success": True, "commitOid": sha, "commitUrl": f"{self.hub.url}/{repo}/commit/{sha}"})

    def _write_target(self, repo: str, rev: str) -> Repo | None:
        if not self._authorized():
            self._unauthorized()
            return None
        return self._repo(repo, rev)
