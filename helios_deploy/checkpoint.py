"""A Helios checkpoint in diffusers layout: validation, configs, weight index and identity.

Nothing here loads weights into memory: shards are opened lazily, one tensor at a time, so that the
14B transformer can be exported on a host with less RAM than the checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .errors import UserError
from .fsutil import sha256_bytes, sha256_file
from .variants import PIPELINE_CLASSES, Variant, variant_of

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
    stems = ("diffusion_pytorch_model", "model")
    for stem in stems:
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
    """A validated Helios checkpoint folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"checkpoint folder {self.path} does not exist",
                            fix="pass the folder of a Helios checkpoint in diffusers layout")
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
