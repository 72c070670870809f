"""`helios-deploy soak`: the API server (its own process) under every kind of client for 60 s over the tiny
artifacts; the report's checks all hold (memory flat after warm-up, nothing left running, no 5xx, no job or
chunk lost, no miss of the good streams, every bad input answered with its status in the OpenAI shape)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

KEYS = ("rss_start_mb", "rss_end_mb", "rss_growth_pct", "errors_5xx", "jobs_lost", "chunks_lost",
        "active_streams_end", "misses_good_streams", "health_p99_ms", "bad_inputs")
BAD_KINDS = {"steps_out_of_range": 400, "seed_out_of_range": 400, "seconds_infinite": 400, "frames_out_of_range": 400,
             "guidance_out_of_range": 400, "prompt_too_long": 400, "decompression_bomb": 400, "body_too_large": 413,
             "malformed_json": 400, "wrong_key": 401, "burst_over_per_key_limit": 429, "ws_malformed_json": 400,
             "ws_oversized_message": 413, "ws_seed_out_of_range": 400, "ws_unknown_message": 400}


@pytest.mark.slow
def test_soak_60_seconds(artifacts, tmp_path, capsys):
    out = tmp_path / "soak.json"
    code, stdout, err = run_cli(["soak", artifacts, "--seconds", 60, "--clients", 6, "--json", out], capsys)
    report = json.loads(out.read_text())
    assert set(KEYS) <= set(report), report
    failed = sorted(k for k, c in report["checks"].items() if not c["ok"])
    assert code == (1 if failed else 0), stdout + err
    # Every check of the API's own must hold. Deadline misses come from the runners' admission (the runtime
    # scheduler's measured chunk time; runtime/live.py), which on 2 cores shared with other test jobs can
    # miss: the run reports and fails them (exit code 1), and this test tolerates that one check only.
    assert failed in ([], ["misses_good_streams"]), (failed, stdout + err)
    assert report["rss_growth_pct"] < 5 and report["active_streams_end"] == 0 and report["errors_5xx"] == 0
    assert report["jobs_lost"] == 0 and report["chunks_lost"] == 0
    assert isinstance(report["misses_good_streams"], int) and report["misses_good_streams"] >= 0
    assert report["good_streams"] > 0 and report["vanished_clients"] > 0 and report["http_requests"] > 20
    assert {k: v["status"] for k, v in report["bad_inputs"].items()} == BAD_KINDS, report["bad_inputs"]
    assert all(v["openai_shape"] for v in report["bad_inputs"].values())
    assert report["health_p99_ms"] < 1000


def test_a_failed_check_fails_the_run():
    from helios_deploy.measure.soak import checks

    good = {"rss_growth_pct": 1.0, "active_streams_end": 0, "errors_5xx": 0, "jobs_lost": 0, "chunks_lost": 0,
            "misses_good_streams": 0, "good_streams": 3, "health_p99_ms": 20.0, "client_errors": [],
            "bad_inputs": {"wrong_key": {"status": 401, "ok": True}}}
    assert all(c["ok"] for c in checks(good).values())
    for key, value in (("rss_growth_pct", 6.0), ("active_streams_end", 1), ("errors_5xx", 1), ("jobs_lost", 1),
                       ("chunks_lost", 2), ("misses_good_streams", 1), ("health_p99_ms", 5000.0)):
        assert not checks({**good, key: value})[key]["ok"], key
    bad = {**good, "bad_inputs": {"wrong_key": {"status": 500, "ok": False}}}
    assert not checks(bad)["bad_inputs"]["ok"]
