"""A small Hugging Face Hub-protocol HTTP server on 127.0.0.1, for tests and offline demos.

It speaks just enough of the Hub's HTTP API for the real ``huggingface_hub`` client to create model repos,
commit files (``"uploadMode": "regular"``: files come inline, base64, in the NDJSON commit), create branches
and tags, and download snapshots (``repo_info``, ``list_repo_tree``, ``HEAD``/``GET .../resolve/...``).
Point the client at it with ``HF_ENDPOINT=http://127.0.0.1:PORT`` set before ``huggingface_hub`` is imported.

Storage under ``--root``: ``{namespace}/{name}/`` holds ``refs.json`` (branches, tags, visibility),
``commits/{sha1}.json`` (parent, message, date, tree = path -> blob oid and size) and ``blobs/{oid}``
(content-addressed by git blob sha1, the oid the Hub reports for regular files). Commits are immutable, so an
old revision keeps serving the files it had.

Access: with ``--token`` every write needs ``Authorization: Bearer TOKEN``, and so does every read of a private
repo (info, tree, refs, commits, file downloads); without it a private repo is answered exactly like a missing one
(404 ``RepoNotFound``), so its existence is not revealed. A server without ``--token`` refuses to create private
repos.

Run: ``python -m foundation.hubserver --port 8765 --root /tmp/hub [--token SECRET]``.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

_REPO = r"(?P<repo>[\w.\-]+(?:/[\w.\-]+)?)"
_ROUTES = [  # (method, regex over the raw (quoted) URL path, handler name)
    ("POST", r"/api/repos/create", "create_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", rf"/api/models/{_REPO}/revision/(?P<rev>[^/]+)", "repo_info"),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ("GET", rf"/api/models/{_REPO}/refs", "refs"),
    ("GET", rf"/api/models/{_REPO}/commits/(?P<rev>[^/]+)", "commits"),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", "create_branch"),
    ("POST", rf"/api/models/{_REPO}/tag/(?P<rev>[^/]+)", "create_tag"),
    ("GET", rf"/api/models/{_REPO}", "repo_info"),
    ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1 of ``data`` (what ``git hash-object`` prints; the Hub's oid of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    """An HTTP error with the Hub's ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound ...)."""

    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


class HubStore:
    """Repositories, commits, refs and blobs in a directory; every write holds one lock (thread safe)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()

    # --- reading --------------------------------------------------------------------------------------
    def repo_dir(self, repo: str, must_exist: bool = True) -> Path:
        if repo.count("/") != 1 or any(p in ("", ".", "..") for p in repo.split("/")):
            raise HubError(400, f"invalid repo id {repo!r}; expected 'namespace/name'")
        d = self.root / repo
        if must_exist and not (d / "refs.json").is_file():
            raise HubError(404, f"Repository {repo} not found", "RepoNotFound")
        return d

    def refs(self, repo: str) -> dict:
        return json.loads((self.repo_dir(repo) / "refs.json").read_text())

    def resolve(self, repo: str, rev: str) -> str:
        """Commit sha1 of a branch, tag or (full) commit id in ``repo``."""
        refs = self.refs(repo)
        if rev in refs["branches"]:
            return refs["branches"][rev]
        if rev in refs["tags"]:
            return refs["tags"][rev]
        if _COMMIT_RE.fullmatch(rev) and (self.repo_dir(repo) / "commits" / f"{rev}.json").is_file():
            return rev
        raise HubError(404, f"Invalid rev id: {rev} (no such branch, tag or commit in {repo})", "RevisionNotFound")

    def commit(self, repo: str, sha: str) -> dict:
        return json.loads((self.repo_dir(repo) / "commits" / f"{sha}.json").read_text())

    def blob(self, repo: str, oid: str) -> Path:
        return self.repo_dir(repo) / "blobs" / oid

    # --- writing --------------------------------------------------------------------------------------
    def create_repo(self, repo: str, private: bool) -> None:
        with self.lock:
            d = self.repo_dir(repo, must_exist=False)
            if (d / "refs.json").is_file():
                raise HubError(409, f"You already created this model repo: {repo}", extra={"name": repo})
            (d / "commits").mkdir(parents=True, exist_ok=True)
            (d / "blobs").mkdir(exist_ok=True)
            attributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            sha = self._write_commit(d, None, "initial commit", {}, {".gitattributes": attributes})
            self._write_refs(d, {"branches": {"main": sha}, "tags": {}, "private": bool(private)})

    def add_commit(self, repo: str, branch: str, message: str, files: dict[str, bytes], deleted: list[str],
                   deleted_folders: list[str], parent: str | None = None) -> str:
        """Commit on ``branch``: add/replace ``files``, remove ``deleted`` paths and folders; returns the sha1."""
        with self.lock:
            d = self.repo_dir(repo)
            refs = self.refs(repo)
            if branch not in refs["branches"]:
                raise HubError(404, f"Invalid rev id: {branch} (commits go to an existing branch; "
                                    "create it first)", "RevisionNotFound")
            head = refs["branches"][branch]
            if parent is not None and parent != head:
                raise HubError(412, f"parent commit {parent} is not the head of {branch} ({head})")
            tree = dict(self.commit(repo, head)["tree"])
            for path in deleted:
                if path not in tree:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del tree[path]
            for folder in deleted_folders:
                tree = {p: v for p, v in tree.items() if not p.startswith(folder.rstrip("/") + "/")}
            sha = self._write_commit(d, head, message, tree, files)
            refs["branches"][branch] = sha
            self._write_refs(d, refs)
            return sha

    def add_ref(self, repo: str, kind: str, name: str, target: str) -> None:
        """Create branch or tag ``name`` at commit ``target``; 409 if it exists."""
        with self.lock:
            refs = self.refs(repo)
            if name in refs["branches"] or name in refs["tags"]:
                raise HubError(409, f"Reference {name} already exists in {repo}")
            refs[kind][name] = target
            self._write_refs(self.repo_dir(repo), refs)

    def _write_commit(self, d: Path, parent: str | None, message: str, tree: dict, files: dict[str, bytes]) -> str:
        for path, data in files.items():
            oid = git_blob_oid(data)
            blob = d / "blobs" / oid
            if not blob.exists():
                _atomic_write(blob, data)
            tree[path] = {"oid": oid, "size": len(data)}
        record = {"parent": parent, "message": message, "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
                  "tree": dict(sorted(tree.items()))}
        body = json.dumps(record, sort_keys=True).encode()
        sha = hashlib.sha1(body + str(time.time_ns()).encode()).hexdigest()
        _atomic_write(d / "commits" / f"{sha}.json", body)
        return sha

    @staticmethod
    def _write_refs(d: Path, refs: dict) -> None:
        _atomic_write(d / "refs.json", json.dumps(refs, indent=1).encode())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{threading.get_ident()}")
    tmp.write_bytes(data)
    tmp.replace(path)


class HubHandler(BaseHTTPRequestHandler):
    """Routes requests to ``_h_*`` methods; answers JSON, Hub error headers on failure."""

    server_version = "foundation-hubserver/1"
    protocol_version = "HTTP/1.1"
    store: HubStore
    token: str | None = None

    def log_message(self, fmt, *args):  # quiet by default; --verbose turns it on
        if getattr(self.server, "verbose", False):
            super().log_message(fmt, *args)

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else b""
        try:
            for m, pattern, name in _ROUTES:
                match = re.fullmatch(pattern, url.path)  # still quoted: a %2F in a revision stays one segment
                if match and (m == method or (m == "GET" and method == "HEAD")):
                    groups = {k: unquote(v) if v else v for k, v in match.groupdict().items()}
                    if m == "POST" and name not in ("validate_yaml",):
                        self._check_token()
                    elif groups.get("repo") and self._hidden(groups["repo"]):  # a private repo, no valid token
                        raise HubError(404, f"Repository {groups['repo']} not found", "RepoNotFound")
                    return getattr(self, f"_h_{name}")(**groups)
            raise HubError(404, f"no route for {method} {url.path}")
        except HubError as exc:
            headers = {"X-Error-Code": exc.code} if exc.code else {}
            self._send_json({"error": exc.message, **exc.extra}, exc.status, headers, error=exc.message)

    def _authorized(self) -> bool:
        given = self.headers.get("Authorization") or ""
        return bool(self.token) and hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode())

    def _check_token(self) -> None:
        if self.token and not self._authorized():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _hidden(self, repo: str) -> bool:
        """True for a private repo read without the server's token: answered exactly like a missing repo."""
        refs = self.store.repo_dir(repo, must_exist=False) / "refs.json"
        return refs.is_file() and json.loads(refs.read_text()).get("private", False) and not self._authorized()

    def _send_json(self, obj, status: int = 200, headers: dict | None = None, error: str | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if error:
            self.send_header("X-Error-Message", error.encode("ascii", "replace").decode())
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    # --- handlers -------------------------------------------------------------------------------------
    def _h_create_repo(self):
        payload = json.loads(self.body or b"{}")
        if payload.get("type", "model") != "model":
            raise HubError(400, "this server stores model repositories only")
        repo = f"{payload.get('organization') or 'user'}/{payload['name']}"
        private = payload.get("private", payload.get("visibility") == "private")
        if private and not self.token:
            raise HubError(400, "this server has no --token, so a private repo could not be protected; start it "
                                "with --token SECRET to host private repos")
        try:
            self.store.create_repo(repo, bool(private))
        except HubError as exc:
            exc.extra["url"] = f"{self._base()}/{repo}"  # the Hub answers 409 with the existing repo's url
            raise
        self._send_json({"url": f"{self._base()}/{repo}", "name": repo, "id": repo})

    def _h_validate_yaml(self):
        content = json.loads(self.body or b"{}").get("content", "")
        errors = []
        if content.startswith("---"):
            header = content.split("---", 2)[1] if content.count("---") >= 2 else None
            try:
                meta = yaml.safe_load(header) if header is not None else None
                if header is None or not isinstance(meta, (dict, type(None))):
                    errors.append({"message": "YAML front matter must be a mapping closed by '---'"})
            except yaml.YAMLError as exc:
                errors.append({"message": f"invalid YAML front matter: {exc}"})
        self._send_json({"errors": errors, "warnings": []}, 400 if errors else 200)

    def _h_repo_info(self, repo, rev="main"):
        sha = self.store.resolve(repo, rev)
        commit = self.store.commit(repo, sha)
        refs = self.store.refs(repo)
        self._send_json({"id": repo, "modelId": repo, "sha": sha, "private": refs["private"],
                         "lastModified": commit["date"], "author": repo.split("/")[0], "tags": [],
                         "siblings": [{"rfilename": p} for p in commit["tree"]]})

    def _h_tree(self, repo, rev, path=None):
        sha = self.store.resolve(repo, rev)
        prefix = (path.strip("/") + "/") if path else ""
        recursive = self.query.get("recursive", "false").lower() in ("1", "true")
        entries, folders = [], set()
        for p, info in self.store.commit(repo, sha)["tree"].items():
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):]
            if not recursive and "/" in rest:
                folders.add(prefix + rest.split("/")[0])
                continue
            entries.append({"type": "file", "path": p, "size": info["size"], "oid": info["oid"]})
        entries += [{"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in sorted(folders)]
        if prefix and not entries:
            raise HubError(404, f"{path} does not exist at {rev}", "EntryNotFound")
        self._send_json(entries)

    def _h_refs(self, repo):
        refs = self.store.refs(repo)
        fmt = lambda kind, prefix: [{"name": n, "ref": f"refs/{prefix}/{n}", "targetCommit": s}  # noqa: E731
                                    for n, s in refs[kind].items()]
        self._send_json({"branches": fmt("branches", "heads"), "tags": fmt("tags", "tags"), "converts": []})

    def _h_commits(self, repo, rev):
        sha, history = self.store.resolve(repo, rev), []
        while sha is not None:
            c = self.store.commit(repo, sha)
            history.append({"id": sha, "title": c["message"], "message": c.get("description", ""), "date": c["date"],
                            "authors": [{"user": repo.split("/")[0]}]})
            sha = c["parent"]
        self._send_json(history)

    def _h_preupload(self, repo, rev):
        sha = self.store.resolve(repo, rev)
        tree = self.store.commit(repo, sha)["tree"]
        files = json.loads(self.body or b"{}").get("files", [])
        self._send_json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                    "oid": tree.get(f["path"], {}).get("oid")} for f in files]})

    def _h_commit(self, repo, rev):
        if self.query.get("create_pr") in ("1", "true"):
            raise HubError(400, "pull requests are not supported by this server; commit to a branch")
        header, files, deleted, folders = {}, {}, [], []
        for line in self.body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r} for {value['path']}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deleted.append(value["path"])
            elif key == "deletedFolder":
                folders.append(value["path"])
            else:
                raise HubError(400, f"unsupported commit operation {key!r} (this server asks for 'regular' uploads)")
        self.store.refs(repo)  # 404 RepoNotFound before anything else
        sha = self.store.add_commit(repo, rev, header.get("summary", ""), files, deleted, folders,
                                    header.get("parentCommit"))
        self._send_json({"commitUrl": f"{self._base()}/{repo}/commit/{sha}", "commitOid": sha,
                         "pullRequestUrl": None, "success": True})

    def _h_create_branch(self, repo, branch):
        start = json.loads(self.body or b"{}").get("startingPoint") or "main"
        self.store.add_ref(repo, "branches", branch, self.store.resolve(repo, start))
        self._send_json({})

    def _h_create_tag(self, repo, rev):
        tag = json.loads(self.body or b"{}")["tag"]
        self.store.add_ref(repo, "tags", tag, self.store.resolve(repo, rev))
        self._send_json({})

    def _h_resolve(self, repo, rev, path):
        sha = self.store.resolve(repo, rev)
        info = self.store.commit(repo, sha)["tree"].get(path)
        if info is None:
            raise HubError(404, f"Entry not found: {path} at {rev}", "EntryNotFound")
        data = self.store.blob(repo, info["oid"]).read_bytes()
        start = 0
        rng = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if rng and self.command == "GET" and int(rng.group(1)) < len(data):
            start = int(rng.group(1))
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("ETag", f'"{info["oid"]}"')
        self.send_header("X-Repo-Commit", sha)
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(data[start:])

    def _base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"


def make_server(root: str | Path, port: int = 0, token: str | None = None,
                verbose: bool = False) -> ThreadingHTTPServer:
    """A server bound to 127.0.0.1:``port`` (0 = any free port) storing repos under ``root``; not started."""
    handler = type("BoundHubHandler", (HubHandler,), {"store": HubStore(root), "token": token})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    server.verbose = verbose
    return server


def serve_in_thread(root: str | Path, port: int = 0, token: str | None = None) -> tuple[ThreadingHTTPServer, str]:
    """Start a server in a daemon thread; returns (server, endpoint URL). Stop with ``server.shutdown()``."""
    server = make_server(root, port, token)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m foundation.hubserver", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0 = pick a free one)")
    p.add_argument("--root", required=True, help="directory holding the repositories")
    p.add_argument("--token", default=None,
                   help="if set, writes and reads of private repos need 'Authorization: Bearer TOKEN'")
    p.add_argument("--verbose", action="store_true", help="log every request")
    args = p.parse_args(argv)
    server = make_server(args.root, args.port, args.token, args.verbose)
    print(f"serving Hub API at http://127.0.0.1:{server.server_address[1]} (root {args.root})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
