"""scale-report's extrapolation to Helios-14B: linear in blocks (and text-encoder layers), a phase only in its
own component's size, negative slopes (noise on a flat step) dropped, a step's peak the largest of its phases;
and --refit recomputes a saved report (hand-made numbers, so every expected value is known)."""

from __future__ import annotations

import json

import pytest

from .conftest import run_cli

GB = 1e9


def _run(blocks: int, te: int, export: float, parity_tr: float, parity_te: float) -> dict:
    steps = [{"step": "export", "passed": True, "peak_rss_bytes": export, "seconds": 10.0 * blocks,
              "written_bytes": 1.4 * GB * blocks, "phases": {}},
             {"step": "parity", "passed": True, "peak_rss_bytes": max(parity_tr, parity_te), "seconds": 5.0,
              "written_bytes": 0.0,
              "phases": {"parity transformer": parity_tr, "parity text_encoder": parity_te}}]
    return {"blocks": blocks, "text_encoder_layers": te, "steps": steps}


@pytest.fixture()
def saved(tmp_path):
    # transformer parity: 1 + 1.5/block; text-encoder parity: 2 + 0.8/layer; export flat with noise
    runs = [_run(1, 1, 1.02 * GB, 2.5 * GB, 2.8 * GB), _run(2, 1, 1.00 * GB, 4.0 * GB, 2.8 * GB),
            _run(4, 1, 0.99 * GB, 7.0 * GB, 2.8 * GB), _run(1, 2, 0.95 * GB, 2.5 * GB, 3.6 * GB)]
    (tmp_path / "scale_report.json").write_text(json.dumps({"runs": runs}))
    return tmp_path


def test_fits_per_component_and_flat_steps(saved):
    from helios_deploy.measure.scale import fits_of

    result = fits_of(json.loads((saved / "scale_report.json").read_text()))
    tr, te = result["phase_fits"]["parity transformer"], result["phase_fits"]["parity text_encoder"]
    assert tr["terms"] == ["blocks"] and tr["per_block"] == pytest.approx(1.5 * GB)
    assert tr["helios_14b"] == pytest.approx((1 + 1.5 * 40) * GB)
    assert te["terms"] == ["te"] and te["per_text_encoder_layer"] == pytest.approx(0.8 * GB)
    assert te["helios_14b"] == pytest.approx((2 + 0.8 * 24) * GB)
    export = result["fits"]["export"]["peak_rss_bytes"]  # shrinks with blocks: noise, so flat at its largest
    assert export["terms"] == [] and export["helios_14b"] == pytest.approx(1.02 * GB)
    assert result["fits"]["export"]["written_bytes"]["helios_14b"] == pytest.approx(1.4 * GB * 40)
    # parity's phases run one after another: its 14B peak is the transformer's, not both added up
    assert result["fits"]["parity"]["peak_rss_bytes"]["helios_14b"] == pytest.approx(tr["helios_14b"])


def test_refit_rewrites_the_table_and_refuses_a_missing_report(saved, tmp_path, capsys):
    code, out, err = run_cli(["scale-report", "--refit", "-o", saved], capsys)
    assert code == 0, err
    assert "61.0 GB" in out and "61.0 GB" in (saved / "table.txt").read_text()
    assert "fits" in json.loads((saved / "scale_report.json").read_text())
    code, _, err = run_cli(["scale-report", "--refit", "-o", tmp_path / "none"], capsys)
    assert code == 1 and "cannot read the scale report" in err and "Traceback" not in err
