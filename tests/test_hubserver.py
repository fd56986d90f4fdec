"""The local Hub-protocol server, exercised with the real huggingface_hub client (endpoint passed explicitly)."""
from __future__ import annotations

import subprocess
import sys

import pytest

hf = pytest.importorskip("huggingface_hub")
from huggingface_hub import HfApi, hf_hub_download, snapshot_download  # noqa: E402
from huggingface_hub.errors import (  # noqa: E402
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from foundation.hubserver import git_blob_oid, serve_in_thread  # noqa: E402


@pytest.fixture
def hub(tmp_path):
    server, url = serve_in_thread(tmp_path / "hub")
    yield url, tmp_path
    server.shutdown()
    server.server_close()


def _folder(path, **files):
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def test_push_branches_tags_and_pinned_downloads(hub):
    url, tmp = hub
    api = HfApi(endpoint=url, token="t")
    assert api.create_repo("org/model").endswith("/org/model")
    api.create_repo("org/model", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo("org/model")
    assert exc.value.response.status_code == 409
    v1_dir = _folder(tmp / "v1", **{"w.txt": "one", "sub/x.txt": "x"})
    v1 = api.upload_folder(repo_id="org/model", folder_path=str(v1_dir),
                           commit_message="v1").oid
    api.create_tag("org/model", tag="release-1", revision=v1)
    api.create_branch("org/model", branch="stable", revision=v1)
    v2 = api.upload_folder(repo_id="org/model", folder_path=str(_folder(tmp / "v2", **{"w.txt": "two"})),
                           commit_message="v2").oid
    assert v1 != v2 and len(v2) == 40
    refs = api.list_repo_refs("org/model")
    assert {b.name: b.target_commit for b in refs.branches} == {"main": v2, "stable": v1}
    assert [(t.name, t.target_commit) for t in refs.tags] == [("release-1", v1)]
    assert api.model_info("org/model").sha == v2
    history = api.list_repo_commits("org/model")
    assert [c.commit_id for c in history[:2]] == [v2, v1]
    assert [c.title for c in history] == ["v2", "v1", "initial commit"]
    cache = tmp / "cache"
    for rev, text in ((None, "two"), (v1, "one"), ("stable", "one"), ("release-1", "one"), ("main", "two")):
        snap = snapshot_download("org/model", revision=rev, cache_dir=cache, endpoint=url)
        assert open(f"{snap}/w.txt").read() == text
        assert open(f"{snap}/sub/x.txt").read() == "x"  # v2 did not delete it
    files = {f.path: f for f in api.list_repo_tree("org/model", recursive=True)}
    assert files["w.txt"].blob_id == git_blob_oid(b"two") and files["w.txt"].size == 3
    # an unchanged file is not committed again (the server reports the oid it has)
    again = api.upload_folder(repo_id="org/model", folder_path=str(tmp / "v2"), commit_message="no-op").oid
    assert again == v2
    api.delete_file("sub/x.txt", repo_id="org/model")
    assert "sub/x.txt" not in api.list_repo_files("org/model")
    assert "sub/x.txt" in api.list_repo_files("org/model", revision=v1)  # history is immutable


def test_errors_are_the_hubs(hub):
    url, tmp = hub
    api = HfApi(endpoint=url, token="t")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/absent", cache_dir=tmp / "c", endpoint=url)
    api.create_repo("org/m")
    with pytest.raises(RevisionNotFoundError):
        snapshot_download("org/m", revision="nope", cache_dir=tmp / "c", endpoint=url)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("org/m", "missing.bin", cache_dir=tmp / "c", endpoint=url)
    with pytest.raises(ValueError, match="Invalid metadata"):
        api.upload_file(path_or_fileobj=b"---\nkey: [unclosed\n---\n# card\n", path_in_repo="README.md",
                        repo_id="org/m")
    with pytest.raises(HfHubHTTPError):  # commits go to existing branches only
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id="org/m", revision="no-such-branch")


def test_token_protects_writes(tmp_path):
    server, url = serve_in_thread(tmp_path / "hub", token="secret")
    try:
        with pytest.raises(HfHubHTTPError) as exc:
            HfApi(endpoint=url, token="wrong").create_repo("org/m")
        assert exc.value.response.status_code == 401
        HfApi(endpoint=url, token="secret").create_repo("org/m")
        assert HfApi(endpoint=url, token=False).model_info("org/m").sha  # reads are open
    finally:
        server.shutdown()
        server.server_close()


def test_command_line_server_starts_and_serves(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "foundation.hubserver", "--port", "0", "--root", str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving Hub API at http://127.0.0.1:")
        url = line.split()[4]
        HfApi(endpoint=url, token="t").create_repo("org/cli")
        assert (tmp_path / "org" / "cli" / "refs.json").is_file()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_private_repos_need_the_token_for_every_read(tmp_path):
    """Regression (issue 18.13): repo info, tree and file downloads of a private repo were served without a token."""
    server, url = serve_in_thread(tmp_path / "hub", token="s3cret")
    try:
        api = HfApi(endpoint=url, token="s3cret")
        api.create_repo("org/secret", private=True)
        api.upload_folder(repo_id="org/secret", folder_path=str(_folder(tmp_path / "m", **{"w.txt": "weights"})))
        api.create_repo("org/open")
        api.upload_folder(repo_id="org/open", folder_path=str(_folder(tmp_path / "o", **{"w.txt": "open"})))
        for token in (False, "wrong"):  # no token, a wrong token: the private repo looks like a missing one
            anon = HfApi(endpoint=url, token=token)
            with pytest.raises(RepositoryNotFoundError) as exc:
                hf_hub_download("org/secret", "w.txt", endpoint=url, token=token, cache_dir=tmp_path / f"c{token}")
            assert exc.value.response.status_code in (401, 404)
            for read in ("repo_info", "list_repo_files", "list_repo_refs", "list_repo_commits"):
                with pytest.raises(RepositoryNotFoundError):
                    getattr(anon, read)("org/secret")
            with pytest.raises(RepositoryNotFoundError) as missing:
                anon.repo_info("org/never-created")
            assert str(exc.value.response.status_code) == str(missing.value.response.status_code)
            path = hf_hub_download("org/open", "w.txt", endpoint=url, token=token, cache_dir=tmp_path / f"o{token}")
            assert open(path).read() == "open"  # public repos stay readable
        path = hf_hub_download("org/secret", "w.txt", endpoint=url, token="s3cret", cache_dir=tmp_path / "ok")
        assert open(path).read() == "weights" and api.repo_info("org/secret").private
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_without_token_refuses_private_repos(hub):
    url, _ = hub
    with pytest.raises(HfHubHTTPError, match="no --token") as exc:
        HfApi(endpoint=url, token="t").create_repo("org/p", private=True)
    assert exc.value.response.status_code == 400
