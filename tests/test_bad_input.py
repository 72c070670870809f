"""Bad input: one clear message, exit code 1, nothing half-written."""

import json
import shutil

import pytest

from .conftest import run_cli


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _export(ckpt, out, capsys, *extra):
    return run_cli(["export", ckpt, "-o", out, "--height", 64, "--width", 128, "--components", "text_encoder",
                    "--max-text-length", 16, *extra], capsys)


def _assert_clean(code, err, out, *needles):
    assert code == 1
    assert err.startswith("error: ") and "Traceback" not in err
    for n in needles:
        assert n in err, err
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))


def test_missing_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = _export(tmp_path / "nope", out, capsys)
    _assert_clean(code, err, out, "does not exist")


def test_partial_checkpoint(tiny_ckpt, tmp_path, capsys):
    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    shard = sorted((ckpt / "text_encoder").glob("model-*.safetensors"))[-1]
    shard.unlink()
    out = tmp_path / "out"
    code, _, err = _export(ckpt, out, capsys)
    _assert_clean(code, err, out, "missing a weight shard", shard.name)


def test_missing_component_folder(tiny_ckpt, tmp_path, capsys):
    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    shutil.rmtree(ckpt / "vae")
    out = tmp_path / "out"
    code, _, err = _export(ckpt, out, capsys)
    _assert_clean(code, err, out, "vae/config.json")


def test_wrong_pipeline_class(tiny_ckpt, tmp_path, capsys):
    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    index = json.loads((ckpt / "model_index.json").read_text())
    index["_class_name"] = "WanPipeline"
    (ckpt / "model_index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    code, _, err = _export(ckpt, out, capsys)
    _assert_clean(code, err, out, "wrong pipeline class", "WanPipeline", "HeliosPyramidPipeline")


def test_corrupt_safetensors(tiny_ckpt, tmp_path, capsys):
    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    shard = sorted((ckpt / "transformer").glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:50])
    out = tmp_path / "out"
    code, _, err = _export(ckpt, out, capsys)
    _assert_clean(code, err, out, "corrupt safetensors", shard.name)


@pytest.mark.parametrize("height,width", [(96, 128), (64, 100), (0, 128)])
def test_unsupported_resolution(tiny_ckpt, tmp_path, capsys, height, width):
    out = tmp_path / "out"
    code, _, err = run_cli(["export", tiny_ckpt, "-o", out, "--height", height, "--width", width], capsys)
    _assert_clean(code, err, out, "unsupported video size", "multiples of 64")


def test_existing_output_needs_force(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = _export(tiny_ckpt, out, capsys)
    assert code == 1 and "already exists" in err and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = _export(tiny_ckpt, out, capsys, "--force", "--no-audit")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()


def test_parity_refuses_artifacts_of_another_checkpoint(tiny_ckpt, artifacts, tmp_path, capsys):
    from helios_deploy.checkpoints.tiny import write_tiny_checkpoint

    other = write_tiny_checkpoint(tmp_path / "other", seed=7)
    code, _, err = run_cli(["parity", other, artifacts], capsys)
    assert code == 1 and "another checkpoint" in err


def test_parity_refuses_modified_artifacts(tiny_ckpt, artifacts, tmp_path, capsys):
    arts = _copy(artifacts, tmp_path / "arts")
    data = arts / "text_encoder" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    code, _, err = run_cli(["parity", tiny_ckpt, arts, "--components", "text_encoder"], capsys)
    assert code == 1 and "modified after export" in err


def test_parity_on_a_folder_without_manifest(tiny_ckpt, tmp_path, capsys):
    code, _, err = run_cli(["parity", tiny_ckpt, tmp_path], capsys)
    assert code == 1 and "not a helios-deploy artifact folder" in err
