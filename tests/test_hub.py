"""Checkpoints by Hub id, offline: tiny checkpoints placed in a Hugging Face hub cache layout
(models--org--name/blobs, snapshots/<commit>/... as symlinks to the blobs, refs/<branch or tag>) in a
temporary HF_HUB_CACHE, with HF_HUB_OFFLINE=1. Nothing here touches the network."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from .conftest import HEIGHT, MAX_TEXT_LENGTH, TEXT_LENGTH, WIDTH, run_cli

REPO = "org/tiny-helios"
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40  # main -> A (seed 0), tag v1 -> B (seed 1)


def place_in_hub_cache(cache: Path, repo_id: str, src: Path, commit: str, refs=("main",), extra=()) -> Path:
    """Put the files of ``src`` into the hub cache layout huggingface_hub writes; returns the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    files = [(f.relative_to(src).as_posix(), f.read_bytes()) for f in sorted(src.rglob("*")) if f.is_file()]
    for rel, data in [*files, *extra]:
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def other_ckpt(tmp_path_factory) -> Path:
    from helios_deploy.checkpoints.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt-b") / "tiny", seed=1)


@pytest.fixture(scope="module")
def hub_cache(tiny_ckpt, other_ckpt, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hf") / "hub"
    place_in_hub_cache(cache, REPO, tiny_ckpt, COMMIT_A, refs=("main",))
    place_in_hub_cache(cache, REPO, other_ckpt, COMMIT_B, refs=("v1",))
    return cache


@pytest.fixture
def offline(hub_cache, monkeypatch) -> Path:
    """HF_HUB_CACHE at the test cache and HF_HUB_OFFLINE=1, set after huggingface_hub was imported."""
    for var in ("HF_HOME", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_cache


EXPORT_ARGS = ["--height", HEIGHT, "--width", WIDTH, "--components", "text_encoder", "--no-audit",
               "--text-length", TEXT_LENGTH, "--max-text-length", MAX_TEXT_LENGTH]


@pytest.fixture(scope="module")
def hub_artifacts(hub_cache, tmp_path_factory) -> Path:
    """`helios-deploy export org/tiny-helios --revision v1` (text encoder only, to stay quick), offline."""
    from helios_deploy.cli import main

    out = tmp_path_factory.mktemp("hub-arts") / "onnx"
    with pytest.MonkeyPatch.context() as mp:
        for var in ("HF_HOME", "HUGGINGFACE_HUB_CACHE"):
            mp.delenv(var, raising=False)
        mp.setenv("HF_HUB_CACHE", str(hub_cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        assert main([str(a) for a in ["export", REPO, "--revision", "v1", "-o", out, *EXPORT_ARGS]]) == 0
    return out


def test_export_by_hub_id_offline_records_repo_and_commit(hub_artifacts, hub_cache, other_ckpt):
    from helios_deploy.checkpoints.checkpoint import Checkpoint

    out = hub_artifacts
    recorded = json.loads((out / "manifest.json").read_text())["checkpoint"]
    assert recorded["hub"] == {"repo_id": REPO, "revision": "v1", "commit": COMMIT_B}
    assert Path(recorded["path"]) == hub_cache / "models--org--tiny-helios" / "snapshots" / COMMIT_B
    assert recorded["identity"] == Checkpoint(other_ckpt).identity  # the tag's weights, not main's
    tokenizer = "tokenizer/tokenizer.json"
    assert (out / tokenizer).read_bytes() == (other_ckpt / tokenizer).read_bytes()
    assert not (out / tokenizer).is_symlink()  # copied out of the cache, not linked


def test_hub_id_resolves_main_by_default(offline, tiny_ckpt):
    from helios_deploy.checkpoints.checkpoint import Checkpoint

    ckpt = Checkpoint(REPO)
    assert ckpt.hub == {"repo_id": REPO, "revision": "main", "commit": COMMIT_A}
    assert ckpt.identity == Checkpoint(tiny_ckpt).identity
    assert Checkpoint(REPO, revision=COMMIT_B).hub["commit"] == COMMIT_B  # a commit resolves without refs


def test_parity_resolves_the_revision_the_artifacts_came_from(hub_artifacts, offline, capsys):
    arts = hub_artifacts
    code, out, err = run_cli(["parity", REPO, arts], capsys)  # main is A, the artifacts are from B (v1)
    assert code == 0, err
    assert "text_encoder (fp32): PASS" in out and "parity passed" in out
    code, _, err = run_cli(["parity", REPO, arts, "--revision", "main"], capsys)
    assert code == 1 and "exported from another checkpoint" in err and "Traceback" not in err


def test_torch_backend_resolves_the_recorded_commit_when_the_folder_is_gone(hub_artifacts, offline, tmp_path):
    """Artifacts moved to a host where the snapshot folder they recorded does not exist: the torch
    backend finds the checkpoint by Hub id at the recorded commit in this host's cache."""
    import numpy as np
    import torch

    from helios_deploy.artifacts import Artifacts, write_manifest
    from helios_deploy.runtime.runners import make_runner

    arts = Artifacts.open(shutil.copytree(hub_artifacts, tmp_path / "arts"))
    arts.manifest["checkpoint"]["path"] = str(tmp_path / "elsewhere" / "snapshot")
    write_manifest(arts.root, arts.manifest)
    graph = arts.spec("text_encoder").graph("model")
    runner = make_runner("torch", arts.root, arts.manifest, "text_encoder", graph, "cpu").activate()
    assert runner.checkpoint == offline / "models--org--tiny-helios" / "snapshots" / COMMIT_B
    ids = torch.randint(0, 64, (1, TEXT_LENGTH), generator=torch.Generator().manual_seed(0))
    feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ort = make_runner("onnxruntime", arts.root, arts.manifest, "text_encoder", graph, "cpu").activate()
    np.testing.assert_allclose(runner.infer(feeds)["last_hidden_state"].numpy(),
                               ort.infer(feeds)["last_hidden_state"].numpy(), atol=1e-4, rtol=0)


def test_missing_hub_id_offline_is_one_clear_error_naming_the_cache(offline, tmp_path, capsys):
    out = tmp_path / "arts"
    code, stdout, err = run_cli(["export", "org/not-cached", "-o", out, *EXPORT_ARGS], capsys)
    assert code == 1 and "Traceback" not in err
    assert "checkpoint org/not-cached is not available" in err and "HF_HUB_OFFLINE" in err
    assert f"in the hub cache {offline}" in err
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a staging folder
    code, _, err = run_cli(["export", REPO, "--revision", "v9", "-o", out, *EXPORT_ARGS], capsys)
    assert code == 1 and "revision 'v9'" in err and str(offline) in err


def test_hf_home_names_the_cache_when_hf_hub_cache_is_unset(offline, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    code, _, err = run_cli(["export", REPO, "-o", tmp_path / "arts", *EXPORT_ARGS], capsys)
    assert code == 1 and f"in the hub cache {tmp_path / 'home' / 'hub'}" in err


def test_revision_with_a_local_folder_is_refused(tiny_ckpt, tmp_path, capsys):
    code, _, err = run_cli(["export", tiny_ckpt, "--revision", "v1", "-o", tmp_path / "arts", *EXPORT_ARGS], capsys)
    assert code == 1 and "--revision only with a Hub id" in err
    code, _, err = run_cli(["export", tmp_path / "nope", "-o", tmp_path / "arts", *EXPORT_ARGS], capsys)
    assert code == 1 and "does not exist" in err
    assert list(tmp_path.iterdir()) == []


def test_download_patterns_select_exactly_what_a_checkpoint_needs(tiny_ckpt, tmp_path):
    """The files snapshot_download is allowed to fetch, applied to a repository listing with decoys:
    every file a checkpoint reads is selected (a copy of only those is the same checkpoint), other
    weight formats, dtype variants and media are not."""
    from huggingface_hub.utils import filter_repo_objects

    from helios_deploy.checkpoints.checkpoint import Checkpoint, hub_file_patterns
    from helios_deploy.runtime.text import PromptTokenizer

    files = [f.relative_to(tiny_ckpt).as_posix() for f in tiny_ckpt.rglob("*") if f.is_file()]
    decoys = ["README.md", "assets/demo.mp4", "transformer/diffusion_pytorch_model.bin",
              "transformer/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.ckpt",
              "text_encoder/model.fp16-00001-of-00002.safetensors", "text_encoder/pytorch_model.bin",
              "other_model/model.safetensors", "helios_deploy_tiny.json"]
    chosen = set(filter_repo_objects(files + decoys, allow_patterns=hub_file_patterns()))
    assert chosen == set(files) - {"helios_deploy_tiny.json"}
    for rel in chosen:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tiny_ckpt / rel, tmp_path / rel)
    assert Checkpoint(tmp_path).identity == Checkpoint(tiny_ckpt).identity
    PromptTokenizer(tmp_path / "tokenizer", TEXT_LENGTH)(["a cat"])
