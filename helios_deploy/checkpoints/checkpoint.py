"""A Helios checkpoint in diffusers layout: where it is (a local folder or a Hub id resolved in the hub
cache), validation, configs, weight index and identity.

Nothing here loads weights into memory: shards are opened lazily, one tensor at a time, so that the
14B transformer can be exported on a host with less RAM than the checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..errors import UserError
from ..fsutil import sha256_bytes, sha256_file
from ..model.variants import PIPELINE_CLASSES, Variant, variant_of

MODEL_FOLDERS = ("transformer", "text_encoder", "vae")
CONFIG_FILES = {
    "transformer": "transformer/config.json",
    "text_encoder": "text_encoder/config.json",
    "vae": "vae/config.json",
    "scheduler": "scheduler/scheduler_config.json",
}
# which checkpoint folder holds each exported component's weights
COMPONENT_FOLDER = {"transformer": "transformer", "text_encoder": "text_encoder",
                    "vae_decoder": "vae", "vae_encoder": "vae"}
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")  # diffusers' and transformers' weight file names


def hub_file_patterns() -> list[str]:
    """The files of a Hub repository a checkpoint needs (and nothing else: no other weight formats or
    variants, no media): model_index.json, the configs, each model folder's safetensors (single or
    sharded, with the index) and the tokenizer folder."""
    patterns = ["model_index.json", *CONFIG_FILES.values(), "tokenizer/*"]
    for folder in MODEL_FOLDERS:
        for stem in WEIGHT_STEMS:
            patterns += [f"{folder}/{stem}.safetensors", f"{folder}/{stem}-*-of-*.safetensors",
                         f"{folder}/{stem}.safetensors.index.json"]
    return patterns


def resolve_checkpoint(source: str | Path, revision: str | None = None) -> tuple[Path, dict | None]:
    """A local folder as it is, or a Hub id ``org/name`` resolved to its snapshot folder in the hub cache
    (downloading the files a checkpoint needs, unless HF_HUB_OFFLINE is set). Returns the folder and, for
    a Hub id, the record {"repo_id", "revision", "commit"}; None for a local folder."""
    from .hub import looks_like_repo_id, snapshot

    path = Path(source)
    if path.is_dir():
        if revision:
            raise UserError(f"--revision {revision} was given with the local folder {path}",
                            expected="--revision only with a Hub id such as BestWishYsh/Helios-Distilled",
                            fix="drop --revision, or pass the Hub id")
        return path, None
    if isinstance(source, str) and looks_like_repo_id(source):
        return snapshot(source, revision, hub_file_patterns())
    raise UserError(f"checkpoint folder {path} does not exist",
                    expected="a Helios checkpoint folder in diffusers layout, or a Hub id such as "
                             "BestWishYsh/Helios-Distilled",
                    fix="pass the folder of a Helios checkpoint, or its Hub id (org/name)")


def revision_for(source: str | Path, recorded: dict, revision: str | None = None) -> str | None:
    """The revision at which to resolve ``source`` to check artifacts against it: ``revision`` if given;
    else, when ``source`` is the Hub id the artifacts' manifest records (``recorded`` = its "checkpoint"
    entry), the commit they were exported from; else None (a local folder, or another repository)."""
    hub = recorded.get("hub") or {}
    if revision is None and str(source) == hub.get("repo_id") and not Path(source).is_dir():
        return hub.get("commit")
    return revision


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"checkpoint is missing {what}", found=f"no file {path}",
                        expected="a Helios checkpoint in diffusers layout (model_index.json, transformer/, "
                        "text_encoder/, tokenizer/, vae/, scheduler/)",
                        fix="point to the folder that holds model_index.json of a complete download") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint file {path} is not valid JSON", found=str(e),
                        fix="re-download or re-save the checkpoint") from None


@dataclass
class WeightIndex:
    """Tensor name -> shard file for one model folder (single file or sharded with an index)."""

    folder: Path
    weight_map: dict[str, str]

    @property
    def files(self) -> list[Path]:
        return sorted({self.folder / f for f in self.weight_map.values()})

    def shapes(self) -> dict[str, tuple[int, ...]]:
        from safetensors import safe_open

        out = {}
        for f in self.files:
            with safe_open(f, framework="pt") as st:
                for k in st.keys():
                    out[k] = tuple(st.get_slice(k).get_shape())
        return out

    def load(self, name: str):
        """One tensor as a torch tensor (read from its shard, nothing else)."""
        from safetensors import safe_open

        with safe_open(self.folder / self.weight_map[name], framework="pt") as st:
            return st.get_tensor(name)


def _weight_index(folder: Path) -> WeightIndex:
    for stem in WEIGHT_STEMS:
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            wm = _read_json(index, f"{folder.name} weight index").get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise UserError(f"weight index {index} has no weight_map", fix="re-download the checkpoint")
            return WeightIndex(folder, wm)
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            keys = _safetensors_keys(single)
            return WeightIndex(folder, {k: single.name for k in keys})
    raise UserError(f"checkpoint folder {folder} has no safetensors weights",
                    found=", ".join(sorted(p.name for p in folder.iterdir())) or "an empty folder",
                    expected="model.safetensors / diffusion_pytorch_model.safetensors, or sharded files with an index",
                    fix="re-download the checkpoint (only safetensors weights are supported)")


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as st:
            return list(st.keys())
    except Exception as e:  # safetensors raises several types for a damaged header
        raise UserError(f"corrupt safetensors file {path}", found=f"{type(e).__name__}: {e}",
                        expected="a readable safetensors file", fix="re-download this file") from None


class Checkpoint:
    """A validated Helios checkpoint: a local folder, or a Hub id (``org/name``, optional ``revision``)
    resolved in the hub cache; ``hub`` is the Hub record (repo id, revision, commit) or None."""

    def __init__(self, path: str | Path, revision: str | None = None):
        self.path, self.hub = resolve_checkpoint(path, revision)
        self.model_index = _read_json(self.path / "model_index.json", "model_index.json")
        if self.model_index.get("_class_name") not in PIPELINE_CLASSES:  # before anything else is read
            variant_of(self.model_index, {})
        self.configs = {k: _read_json(self.path / f, f) for k, f in CONFIG_FILES.items()}
        self.variant: Variant = variant_of(self.model_index, self.configs["scheduler"])
        if not (self.path / "tokenizer").is_dir():
            raise UserError("checkpoint is missing tokenizer/", fix="re-download the checkpoint's tokenizer folder")
        self.indexes = {f: _weight_index(self.path / f) for f in MODEL_FOLDERS}
        self._check_shards()

    def _check_shards(self) -> None:
        """Every shard named by an index exists and has a readable header with the tensors it claims."""
        for folder, index in self.indexes.items():
            by_file: dict[str, set[str]] = {}
            for k, f in index.weight_map.items():
                by_file.setdefault(f, set()).add(k)
            for f, keys in by_file.items():
                path = index.folder / f
                if not path.is_file():
                    raise UserError(f"checkpoint is missing a weight shard of {folder}", found=f"no file {path}",
                                    fix="re-download the missing shard")
                missing = keys - set(_safetensors_keys(path))
                if missing:
                    raise UserError(f"weight shard {path} lacks tensors its index lists",
                                    found=", ".join(sorted(missing)[:5]), fix="re-download this shard")

    @classmethod
    def from_record(cls, recorded: dict) -> "Checkpoint":
        """The checkpoint a manifest's "checkpoint" entry names: its folder if it is still there, else
        (artifacts moved to another host) its Hub id at the recorded commit."""
        path, hub = Path(recorded["path"]), recorded.get("hub")
        if path.is_dir() or not hub:
            return cls(path)
        return cls(hub["repo_id"], revision=hub["commit"])

    @property
    def is_distilled(self) -> bool:
        return self.variant.is_distilled

    def index_for(self, component: str) -> WeightIndex:
        return self.indexes[COMPONENT_FOLDER[component]]

    @cached_property
    def identity(self) -> dict:
        """What makes this checkpoint this checkpoint: config hashes and weight file hashes."""
        configs = {k: sha256_bytes(json.dumps(v, sort_keys=True).encode()) for k, v in self.configs.items()}
        configs["model_index"] = sha256_bytes(json.dumps(self.model_index, sort_keys=True).encode())
        weights = {str(p.relative_to(self.path)): sha256_file(p)
                   for idx in self.indexes.values() for p in idx.files}
        tok = self.path / "tokenizer" / "tokenizer.json"
        if tok.is_file():
            weights["tokenizer/tokenizer.json"] = sha256_file(tok)
        digest = sha256_bytes(json.dumps([configs, weights], sort_keys=True).encode())
        return {"sha256": digest, "configs": configs, "files": weights}
