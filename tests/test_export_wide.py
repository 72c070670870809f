"""The streaming export on a real-width (dim 5120) transformer stored in bf16 shards: the path a real
Helios checkpoint takes (bf16 -> fp32 per tensor, several 2 GB shards), checked against the reference."""

import pytest

from .conftest import HEIGHT, WIDTH


@pytest.mark.slow
def test_real_width_bf16_transformer_matches_reference(tmp_path):
    from helios_deploy.export.parity.audit import open_sessions
    from helios_deploy.export.exporter.modules import build_module
    from helios_deploy.export.parity.compare import compare_component
    from helios_deploy.export.exporter.run import export_checkpoint
    from helios_deploy.artifacts import Artifacts
    from helios_deploy.checkpoint import Checkpoint
    from helios_deploy.synthetic import write_wide_checkpoint

    info = write_wide_checkpoint(tmp_path / "wide", layers=1)
    assert info["transformer"]["weights_bytes"] > 0.7e9
    manifest = export_checkpoint(tmp_path / "wide", tmp_path / "onnx", height=HEIGHT, width=WIDTH,
                                 components=["transformer"], text_length=8, max_text_length=16,
                                 run_audit=False, log=lambda m: None)
    # fp32 external data holds every weight (twice the bf16 bytes)
    data = (tmp_path / "onnx" / "transformer" / "model.onnx.data").stat().st_size
    assert data >= 2 * info["transformer"]["weights_bytes"] * 0.99
    spec = Artifacts.open(tmp_path / "onnx").spec("transformer")
    rows = []
    sessions = open_sessions(tmp_path / "onnx", spec, rows)
    assert sessions is not None, rows
    module = build_module(Checkpoint(tmp_path / "wide"), "transformer")
    result = compare_component("transformer", spec, sessions, module)
    assert result["passed"], result["cases"]
    assert manifest["export_peak_rss_bytes"] > 0
