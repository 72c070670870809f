"""The trained tiny checkpoint: a tiny Helios-Distilled (helios_deploy.checkpoints.tiny's configs, 128 wide)
trained on CPU on procedural videos ("a {colour} {shape} moving {direction}", checkpoints.procedural) by
checkpoints.train_tiny. Its weights ship with the package (``trained_tiny/``, float32 safetensors, about
6 MB); ``write_trained_checkpoint`` writes them in the usual diffusers layout, sharded like every tiny
checkpoint, so the same export, parity, runtime and Triton code runs on it. Nothing is trained at use.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import UserError
from ..fsutil import staged_dir

PACKAGE_DIR = Path(__file__).with_name("trained_tiny")
MARKER = "helios_deploy_tiny.json"
SHARD_SIZE = "64KB"  # as the random tiny checkpoint: every component as several shards


def training_record(source: Path = PACKAGE_DIR) -> dict:
    """How the shipped weights were made (seed, steps, losses, seconds): trained_tiny/training.json."""
    path = Path(source) / "training.json"
    if not path.is_file():
        raise UserError(f"the trained tiny checkpoint is missing ({path})",
                        fix="remake it: python -m helios_deploy.checkpoints.train_tiny")
    return json.loads(path.read_text())


def write_trained_checkpoint(out_dir: str | Path, force: bool = False, source: Path = PACKAGE_DIR) -> Path:
    """The shipped trained checkpoint (or ``source``, a train_tiny output) in diffusers layout at ``out_dir``
    (written to a temporary folder, moved into place when complete)."""
    from diffusers import HeliosPyramidPipeline

    record = training_record(source)
    pipe = HeliosPyramidPipeline.from_pretrained(source)
    out = Path(out_dir)
    with staged_dir(out, force=force) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True, max_shard_size=SHARD_SIZE)
        (tmp / MARKER).write_text(json.dumps({"seed": record["seed"], "amplify_history": True,
                                              "variant": "distilled", "trained": True}, indent=2) + "\n")
        shutil.copy(Path(source) / "training.json", tmp / "training.json")
    return out


def ensure_trained_checkpoint(out_dir: str | Path) -> Path:
    """Reuse a complete trained checkpoint at ``out_dir`` (same training record) or write one."""
    out = Path(out_dir)
    marker = out / MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("trained") and \
            (out / "training.json").is_file() and json.loads((out / "training.json").read_text()) == training_record():
        return out
    if out.exists() and any(out.iterdir()) and not marker.is_file():
        raise UserError(f"{out} exists and is not a tiny checkpoint", fix="choose another folder or remove it")
    return write_trained_checkpoint(out, force=True)
