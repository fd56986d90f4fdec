"""Save, load and publish models: ``config.json`` + ``model.safetensors`` + ``README.md`` (a Hub model card).

``HubMixin`` gives a ``torch.nn.Module`` whose ``self.config`` is a dataclass (``to_dict()``/``from_dict()``,
class in ``cls.config_class``) three methods: ``save_pretrained``, ``from_pretrained`` and ``push_to_hub``.
Nothing is ever unpickled: weights are safetensors, everything else JSON. ``config.json`` is
``{"model_config", "framework": {name, version, format_version}, "files": {name: sha256}, "model_info",
"metrics", "datasets", ...}``; loading verifies the checksum, refuses a newer ``format_version`` and loads
strictly (a missing, unexpected or mis-shaped weight is an error naming the file).

Card inputs (kept in ``config.json`` and re-rendered on every save):
``metrics``: ``{dataset: {metric_name: value}}`` as measured by ``foundation evaluate`` (metric names carry
their unit, e.g. ``"energy_mae_meV_per_atom"``); ``datasets``: ``[{"name", "structures", "level_of_theory",
"license"?}]``. Absent metrics are rendered as "not evaluated", never invented.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .card import is_repo_id, render_card

FORMAT_VERSION = 1
CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _framework() -> dict:
    from . import __version__
    return {"name": "foundation", "version": __version__, "format_version": FORMAT_VERSION}


def read_config(model_dir: str | Path, verify: bool = True) -> dict:
    """Parsed ``config.json`` of a saved model; checks framework, format version and (``verify``) checksums."""
    model_dir = Path(model_dir)
    path = model_dir / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a saved model directory holds {', '.join(MODEL_FILES)} "
                                "(write one with model.save_pretrained(dir))")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); the file is corrupted, download or save it again") from exc
    fw = cfg.get("framework") if isinstance(cfg, dict) else None
    if not isinstance(fw, dict) or fw.get("name") != "foundation" or "model_config" not in cfg:
        raise ValueError(f"{path} was not written by foundation's save_pretrained (no 'framework'/'model_config')")
    if int(fw.get("format_version", 0)) > FORMAT_VERSION:
        ours = _framework()["version"]
        raise ValueError(f"{path} was written by foundation {fw.get('version')} with checkpoint format "
                         f"{fw.get('format_version')}, newer than this foundation {ours} supports (format "
                         f"{FORMAT_VERSION}); upgrade foundation (pip install -U foundation-mlip) to load it")
    if verify:
        files = cfg.get("files") or {}
        if WEIGHTS_NAME not in files:
            raise ValueError(f"{path} lists no checksum for {WEIGHTS_NAME}; save the model again")
        for name in files:
            _check_listed_name(name, path)
        for name, expected in files.items():
            f = model_dir / name
            if not f.is_file():
                raise FileNotFoundError(f"{f} is missing (listed in {path}); download or save the model again")
            if sha256_file(f) != expected:
                raise ValueError(f"{f} is corrupted or was modified: its SHA-256 does not match the one recorded in "
                                 f"{path}; delete it (and its cache entry) and download or save the model again")
    return cfg


def _check_listed_name(name, config_path: Path) -> None:
    """``ValueError`` unless ``name`` (a key of config.json's ``files``) is a plain relative path inside the model
    folder: checked on the text alone, before any file is opened, so the refusal says nothing about what exists."""
    from pathlib import PurePosixPath
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if (not parts or name.startswith("/") or any(p in ("", ".", "..") for p in parts)
            or any(c in name for c in ("\\", ":", "\0"))):
        raise ValueError(f"{config_path} lists a checksummed file {str(name)[:80]!r} that is not a plain relative "
                         f"path inside the model folder; refusing to load this model: it was not written by "
                         f"save_pretrained (re-download it from a trusted source, or save it again)")


def resolve_model_dir(id_or_dir: str | Path, revision: str | None = None, cache_dir: str | Path | None = None,
                      local_files_only: bool = False, token: str | None = None) -> Path:
    """A local directory holding a saved model: ``id_or_dir`` itself, or a Hub snapshot in the standard cache.

    Honours ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE=1`` (then only the cache is used). Errors name the repo/revision.
    """
    path = Path(id_or_dir)
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} was given but {path} is a local directory; drop revision")
        return path
    name = str(id_or_dir)
    if path.exists():
        raise FileNotFoundError(f"{path} is a file; pass the directory that holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    if not is_repo_id(name):
        raise FileNotFoundError(f"{name!r} is neither an existing directory nor a Hub repo id 'namespace/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    where = f"{name}" + (f" at revision {revision!r}" if revision else "")
    try:
        snap = snapshot_download(name, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                 token=token, allow_patterns=list(MODEL_FILES))
    except RevisionNotFoundError as exc:
        raise ValueError(f"Hub repo {name} has no revision {revision!r} (branch, tag or commit); "
                         "list them with huggingface_hub.HfApi().list_repo_refs") from exc
    except RepositoryNotFoundError as exc:
        raise FileNotFoundError(f"{name!r} is not a local directory and no Hub repo of that name was found (or it "
                                f"is private: pass token=...); check the path or id, HF_ENDPOINT "
                                f"({os.environ.get('HF_ENDPOINT', 'default')}) and your access") from exc
    except (LocalEntryNotFoundError, EntryNotFoundError) as exc:
        raise FileNotFoundError(f"{where} is not in the local Hub cache and the Hub is unreachable or offline "
                                f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {exc}") from exc
    snap = Path(snap)
    for f in (CONFIG_NAME, WEIGHTS_NAME):
        if not (snap / f).is_file():
            raise FileNotFoundError(f"Hub repo {where} has no {f}; it is not a foundation model repository")
    return snap


def load_state_dict_strict(module: torch.nn.Module, weights: str | Path) -> None:
    """Load safetensors ``weights`` into ``module``; every key must match in name and shape (ValueError otherwise)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{weights} is not a readable safetensors file ({exc}); download or save it again") from exc
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"{weights} does not match the architecture in config.json: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}, shape mismatches {shapes[:5]}")
    module.load_state_dict(state, strict=True)


# Model classes a config.json may name (``model_info.class``) besides the one ``from_pretrained`` is called on:
# ``FoundationModel.from_pretrained`` of a saved committee returns the ``CommitteeModel`` (module to import it from).
SAVED_CLASSES = {"CommitteeModel": "foundation.learn.committee"}


def _saved_class(cls: type, cfg: dict, model_dir: Path) -> type:
    """The class to load ``cfg`` with: ``cls``, or the committee class it names when ``cls`` is ``FoundationModel``."""
    import importlib
    name = (cfg.get("model_info") or {}).get("class") or cls.__name__
    if name == cls.__name__ or (name not in SAVED_CLASSES and cls.__name__ not in SAVED_CLASSES):
        return cls
    if name in SAVED_CLASSES and cls.__name__ == "FoundationModel":
        return getattr(importlib.import_module(SAVED_CLASSES[name]), name)
    raise ValueError(f"{model_dir / CONFIG_NAME} holds a {name}, not a {cls.__name__}; load it with "
                     f"{name}.from_pretrained (FoundationModel.from_pretrained loads either)")


class HubMixin:
    """Adds ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` to an ``nn.Module`` with ``self.config``."""

    config_class: type
    hub_metadata: dict  # metrics / datasets / license / description carried from load to the next save

    def _card_inputs(self, metrics, datasets, license, description) -> dict:
        meta = dict(getattr(self, "hub_metadata", None) or {})
        for key, value in (("metrics", metrics), ("datasets", datasets), ("license", license),
                           ("description", description)):
            if value is not None:
                meta[key] = value
        return meta

    def save_pretrained(self, save_directory: str | Path, *, metrics: dict | None = None,
                        datasets: list[dict] | None = None, license: str | None = None,
                        description: str | None = None, repo_id: str | None = None) -> Path:
        """Write config.json, model.safetensors and README.md into ``save_directory``; returns its path.

        ``metrics``/``datasets`` (see module doc) feed the card; ``repo_id`` is used in the card's load example.
        """
        from safetensors.torch import save_file
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").clone().contiguous() for k, v in self.state_dict().items()}
        # One metadata key: safetensors serialises the metadata map in a per-process random order, so several
        # keys would make the bytes (and a re-push) differ for identical weights. Provenance is in config.json.
        save_file(state, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        meta = self._card_inputs(metrics, datasets, license, description)
        n_params = sum(p.numel() for p in self.parameters())
        cfg = {"model_config": self.config.to_dict(), "framework": _framework(),
               "files": {WEIGHTS_NAME: sha256_file(out / WEIGHTS_NAME)},
               "model_info": {"parameters": int(n_params), "class": type(self).__name__}, **meta}
        (out / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=False) + "\n")
        (out / CARD_NAME).write_text(render_card(cfg, repo_id or str(out)))
        return out

    @classmethod
    def from_pretrained(cls, id_or_dir: str | Path, revision: str | None = None, cache_dir: str | Path | None = None,
                        local_files_only: bool = False, token: str | None = None, device: str | torch.device = "cpu"):
        """A model from a saved directory or a Hub repo id (snapshot in the standard HF cache), in eval mode."""
        model_dir = resolve_model_dir(id_or_dir, revision, cache_dir, local_files_only, token)
        cfg = read_config(model_dir, verify=True)
        cls = _saved_class(cls, cfg, model_dir)
        try:
            config = cls.config_class.from_dict(cfg["model_config"])
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"{model_dir / CONFIG_NAME}: model_config written by foundation "
                             f"{cfg['framework'].get('version')} is not understood by this version ({exc}); "
                             "upgrade foundation") from exc
        model = cls(config)
        load_state_dict_strict(model, model_dir / WEIGHTS_NAME)
        model.hub_metadata = {k: cfg[k] for k in ("metrics", "datasets", "license", "description", "citation",
                                                  "provenance") if k in cfg}
        return model.to(device).eval()

    def push_to_hub(self, repo_id: str, revision: str | None = None, private: bool = False,
                    commit_message: str = "Upload foundation model", token: str | None = None,
                    metrics: dict | None = None, datasets: list[dict] | None = None) -> str:
        """Save into a temporary directory and push it to ``repo_id`` (branch ``revision``); returns the commit sha."""
        tmp = Path(tempfile.mkdtemp(prefix="foundation-push-"))
        try:
            self.save_pretrained(tmp, metrics=metrics, datasets=datasets, repo_id=repo_id)
            return push_folder(tmp, repo_id, revision=revision, private=private, commit_message=commit_message,
                               token=token)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def push_folder(model_dir: str | Path, repo_id: str, revision: str | None = None, private: bool = False,
                commit_message: str | None = None, token: str | None = None) -> str:
    """Upload a saved model directory (checksums verified first) to the Hub; returns the new commit sha.

    Creates the repo if needed and the branch ``revision`` (from main) if it does not exist.
    """
    cfg = read_config(model_dir, verify=True)
    if not is_repo_id(repo_id):
        raise ValueError(f"repo id {repo_id!r} must look like 'namespace/name'")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        message = commit_message or f"Upload foundation model ({cfg['framework']['version']})"
        info = api.create_commit(repo_id=repo_id, operations=_commit_files(model_dir, cfg, repo_id),
                                 revision=revision, repo_type="model", commit_message=message)
    except Exception as exc:  # network and HTTP errors -> one clear line; anything else propagates unchanged
        network = type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3")
        if not (network or isinstance(exc, (HfHubHTTPError, ConnectionError))):
            raise
        raise ValueError(f"pushing {model_dir} to {repo_id} on {api.endpoint} failed: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''} (check the network, HF_ENDPOINT, the repo "
                         "id and that your token (HF_TOKEN or --token) can write to it)") from exc
    return info.oid


def _commit_files(model_dir: str | Path, cfg: dict, repo_id: str) -> list:
    """The files of a saved model as Hub commit operations, the card re-rendered for ``repo_id`` (its load example
    names the repo, not the local directory the model was saved in)."""
    from huggingface_hub import CommitOperationAdd
    model_dir = Path(model_dir)
    ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(model_dir / name))
           for name in MODEL_FILES if name != CARD_NAME]
    card = render_card(cfg, repo_id).encode()
    return ops + [CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card)]


def update_card(model_dir: str | Path, *, metrics: dict | None = None, datasets: list[dict] | None = None,
                repo_id: str | None = None, merge: bool = True) -> Path:
    """Record ``metrics`` / ``datasets`` in a saved model's config.json and re-render its README.md.

    For ``foundation evaluate`` after training: the weights (and their checksum) are untouched. With ``merge``
    new metric groups are added to (or replace same-named groups of) the recorded ones.
    """
    model_dir = Path(model_dir)
    cfg = read_config(model_dir, verify=True)
    if metrics is not None:
        cfg["metrics"] = {**(cfg.get("metrics") or {}), **metrics} if merge else metrics
    if datasets is not None:
        cfg["datasets"] = datasets
    (model_dir / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    (model_dir / CARD_NAME).write_text(render_card(cfg, repo_id or str(model_dir)))
    return model_dir / CARD_NAME
