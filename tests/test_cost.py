"""The cost model: the analytic count against FlopCounterMode over the real modules on meta (tiny and
14B configs), the 14B figures against HELIOS.md, the CLI on a tiny checkpoint, and bad input."""

import json
import shutil

import pytest

from helios_deploy.cost import PRECISIONS, estimate, estimate_configs, model_configs
from helios_deploy.checkpoints.tiny import TEXT_ENCODER_CONFIG, TRANSFORMER_CONFIG, VAE_CONFIG

from .conftest import run_cli

GPU_NAMES = ("H100 SXM", "H100 PCIe", "H200", "B200", "L40S")
CALL_KEYS = ("text_encoder/prompt", "transformer/stage0", "transformer/stage1", "transformer/stage2",
             "vae_decoder/chunk")

# HELIOS.md "Real sizes": TFLOP per call at 384x640 with 226 text tokens, and parameters in billions
HELIOS_MD_TFLOP = {
    "transformer/stage0": {"total": 68.4, "linear": 61.2, "attention": 7.2},
    "transformer/stage1": {"total": 117.4, "linear": 99.9, "attention": 17.4},
    "transformer/stage2": {"total": 356.3, "linear": 254.9, "attention": 101.5},
    "text_encoder/prompt": {"total": 2.1},
    "vae_decoder/chunk": {"total": 69.3},
}
HELIOS_MD_PARAMS_B = {"transformer": 14.31, "text_encoder": 5.68, "vae": 0.127}


def _tiny(transformer=None, text_encoder=None, vae=None):
    return model_configs({**TRANSFORMER_CONFIG, **(transformer or {})},
                         {**TEXT_ENCODER_CONFIG, "vocab_size": 300, **(text_encoder or {})},
                         {**VAE_CONFIG, **(vae or {})}, source="tiny")


def _assert_counts_agree(est, rel=1e-9):
    assert est.params["analytic"] == est.params["meta"]
    for c in est.calls:
        kinds = set(c.flops) | set(c.flops_meta)
        for kind in kinds:
            a, m = c.flops.get(kind, 0.0), c.flops_meta.get(kind, 0.0)
            assert a == pytest.approx(m, rel=rel, abs=0.5), (c.key, kind, a, m)
        assert c.total_flops > 0
    assert est.check["max_rel_diff"] <= rel


# --- analytic vs FlopCounterMode on small configs ---------------------------------------------------

@pytest.mark.parametrize("height,width,text_length", [(64, 128, 16), (192, 320, 7), (128, 64, 33)])
def test_analytic_matches_meta_count_tiny(height, width, text_length):
    est = estimate_configs(_tiny(), height=height, width=width, text_length=text_length)
    assert [c.key for c in est.calls] == list(CALL_KEYS)
    _assert_counts_agree(est)
    stage = {c.point: c for c in est.calls if c.component == "transformer"}
    # every stage has both kinds of attention, split the way they quantize
    for c in stage.values():
        assert c.flops["attention_self"] > 0 and c.flops["attention_cross"] > 0 and c.flops["linear"] > 0
    # history tokens are the same at every stage; noisy tokens x4 per stage
    assert len({c.tokens["history"] for c in stage.values()}) == 1
    assert stage["stage1"].tokens["noisy"] == 4 * stage["stage0"].tokens["noisy"]
    assert stage["stage2"].tokens["noisy"] == 4 * stage["stage1"].tokens["noisy"]


@pytest.mark.parametrize("variant", [
    dict(transformer={"guidance_cross_attn": False}),
    dict(transformer={"zero_history_timestep": False, "added_kv_proj_dim": 24}),
    dict(transformer={"is_amplify_history": True, "history_scale_mode": "scalar", "cross_attn_norm": False},
         text_encoder={"feed_forward_proj": "relu"},
         vae={"num_res_blocks": 2, "decoder_base_dim": 12, "temperal_downsample": [False, False, True]}),
], ids=["no-guidance-cross-attn", "no-zero-history-t-added-kv", "other-layouts"])
def test_analytic_matches_meta_count_config_variants(variant):
    _assert_counts_agree(estimate_configs(_tiny(**variant), height=64, width=128, text_length=9))


def test_steps_scale_transformer_work_only():
    one = estimate_configs(_tiny(), height=64, width=128, text_length=16, meta_count=False)
    two = estimate_configs(_tiny(), height=64, width=128, text_length=16, steps="2,2,2", meta_count=False)
    c1, c2 = one.per_chunk(), two.per_chunk()
    assert sum(c2["transformer"].values()) == pytest.approx(2 * sum(c1["transformer"].values()))
    assert c2["vae_decoder"] == c1["vae_decoder"]
    for gpu in GPU_NAMES:
        assert two.roofline[gpu]["bf16"]["chunk_s"] > one.roofline[gpu]["bf16"]["chunk_s"]


def test_guided_variants_count_one_batch_2_call_per_step():
    """Base and Mid with guidance: one transformer call per step at batch 2 (the meta count agrees at
    batch 2), weights read once per call; without guidance Mid's calls are the distilled sampler's."""
    tiny = dict(height=64, width=128, text_length=16)
    mid = estimate_configs(_tiny(), **tiny, steps="2,2,2", variant="mid")
    base = estimate_configs(_tiny(), **tiny, steps="3", variant="base")
    _assert_counts_agree(mid)
    _assert_counts_agree(base)
    mid_off = estimate_configs(_tiny(), **tiny, steps="2,2,2", variant="mid", guidance_scale=1.0, meta_count=False)
    distilled = estimate_configs(_tiny(), **tiny, steps="2,2,2", meta_count=False)
    assert [c.key for c in base.calls] == ["text_encoder/prompt", "transformer/full", "vae_decoder/chunk"]
    assert (base.transformer_calls_per_chunk, mid.transformer_calls_per_chunk) == (3, 6)
    assert base.guided and mid.guided and not mid_off.guided
    work = lambda e: sum(e.per_chunk()["transformer"].values())  # noqa: E731
    assert work(mid_off) == work(distilled)
    assert work(mid) == pytest.approx(2 * work(mid_off), rel=1e-3)  # the history's t=0 embedding is per call
    assert mid.call("transformer/stage2").weight_bytes == mid_off.call("transformer/stage2_unguided").weight_bytes
    assert base.call("transformer/full").tokens == mid.call("transformer/stage2").tokens
    assert work(base) == pytest.approx(3 * mid.call("transformer/stage2").total_flops, rel=1e-9)  # 3 full-size calls


# --- the real 14B configs ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def helios_14b():
    return estimate(config="helios-14b")


def test_14b_counts_agree(helios_14b):
    _assert_counts_agree(helios_14b)


def test_14b_against_helios_md(helios_14b):
    for key, ref in HELIOS_MD_TFLOP.items():
        c = helios_14b.call(key)
        got = {"total": c.total_flops / 1e12}
        if c.component == "transformer":
            got["linear"] = c.flops["linear"] / 1e12
            got["attention"] = (c.flops["attention_self"] + c.flops["attention_cross"]) / 1e12
        for kind, value in ref.items():
            assert got[kind] == pytest.approx(value, rel=0.02), (key, kind, got[kind], value)
    for name, billions in HELIOS_MD_PARAMS_B.items():
        assert helios_14b.params["analytic"][name] / 1e9 == pytest.approx(billions, rel=0.02), name
    chunk = helios_14b.per_chunk()
    assert sum(chunk["transformer"].values()) / 1e12 == pytest.approx(542, rel=0.02)
    assert sum(chunk["vae_decoder"].values()) / 1e12 == pytest.approx(69, rel=0.02)


def test_14b_roofline_h100_sxm(helios_14b):
    # HELIOS.md: at peak, fp8 linears + bf16 attention + bf16 VAE about 0.41 s per chunk (81 FPS),
    # all-bf16 about 0.62 s (53 FPS)
    r = helios_14b.roofline["H100 SXM"]
    assert r["fp8"]["chunk_s"] == pytest.approx(0.41, rel=0.03)
    assert r["bf16"]["chunk_s"] == pytest.approx(0.62, rel=0.03)
    assert r["fp8"]["fps"] == pytest.approx(81, rel=0.03) and r["bf16"]["fps"] == pytest.approx(53, rel=0.03)
    assert r["bf16"]["realtime_streams"] == pytest.approx(r["bf16"]["fps"] / 24)
    # the distilled 14B transformer is compute-bound at every stage on H100
    assert all(r["bf16"]["calls"][f"transformer/stage{s}"]["bound"] == "compute" for s in range(3))
    # fp8 halves the transformer's linear weights: 14.31B params -> about 28.6 GB bf16, 14.5 GB fp8
    w16, w8 = (helios_14b.call("transformer/stage0").weight_bytes[p] / 1e9 for p in ("bf16", "fp8"))
    assert w16 == pytest.approx(28.6, rel=0.01) and 14.0 < w8 < 15.0
    assert r["fp8"]["memory"]["weights_gb"] < r["bf16"]["memory"]["weights_gb"]
    seconds = helios_14b.predicted_seconds("H100 SXM", "fp8")
    assert set(seconds) == set(CALL_KEYS) and all(s > 0 for s in seconds.values())


# --- the CLI ----------------------------------------------------------------------------------------

def _positive_numbers(obj, path="$"):
    if isinstance(obj, dict):
        for k, v in obj.items():
            _positive_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _positive_numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        assert obj >= 0, path


def test_cli_on_tiny_checkpoint(tiny_ckpt, tmp_path, capsys):
    out_json, out_png = tmp_path / "cost.json", tmp_path / "cost.png"
    code, out, err = run_cli(["cost", tiny_ckpt, "--height", 64, "--width", 128, "--text-length", 16,
                              "--json", out_json, "--plot", out_png], capsys)
    assert code == 0, err
    assert "H100 SXM" in out and "transformer stage2" in out and "real time" in out
    assert all(f"H100 SXM   {p} " in out for p in ("bf16", "fp8", "fp8+attn", "fp8+attn+vae"))  # three FP8 variants
    d = json.loads(out_json.read_text())
    assert {"source", "calls", "params", "check", "roofline", "gpus", "per_chunk", "per_prompt", "steps"} <= set(d)
    assert [c["key"] for c in d["calls"]] == list(CALL_KEYS)
    for c in d["calls"]:
        assert c["total_flops"] > 0 and c["bytes_moved"]["bf16"] > 0 and c["live_bytes"] > 0
    assert d["check"]["max_rel_diff"] < 1e-9
    assert set(d["roofline"]) == set(GPU_NAMES)
    for gpu in GPU_NAMES:
        for p in PRECISIONS:
            r = d["roofline"][gpu][p]
            assert r["chunk_s"] > 0 and r["fps"] > 0 and r["realtime_streams"] > 0
            assert r["memory"]["weights_gb"] > 0 and r["memory"]["activations_gb"] > 0
    assert d["per_chunk"]["total_flops"] > 0
    _positive_numbers(d)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_on_configs_only_folder(tiny_ckpt, tmp_path, capsys):
    """Capacity planning needs the three config.json files, not the weights."""
    for folder in ("transformer", "text_encoder", "vae"):
        (tmp_path / "cfg" / folder).mkdir(parents=True)
        shutil.copy(tiny_ckpt / folder / "config.json", tmp_path / "cfg" / folder / "config.json")
    code, out, err = run_cli(["cost", tmp_path / "cfg", "--height", 64, "--width", 128, "--no-meta-count"], capsys)
    assert code == 0, err
    assert "transformer stage0" in out


@pytest.mark.parametrize("args,needles", [
    (["--config", "helios-14b", "--steps", "1,x"], ["bad --steps", "1,x"]),
    (["--config", "helios-14b", "--steps", "0,1,1"], ["bad --steps", ">= 1"]),
    (["--config", "helios-14b", "--steps", "1,1"], ["bad --steps"]),
    (["--config", "helios-14b", "--variant", "base", "--steps", "1,1,1"], ["bad --steps", "one stage"]),
    (["--config", "helios-14b", "--guidance-scale", "5"], ["Helios-Distilled runs without guidance"]),
    (["--config", "helios-14b", "--height", "400"], ["unsupported video size", "multiples of 64"]),
    (["--config", "helios-14b", "--width", "96"], ["unsupported video size"]),
    (["--config", "helios-14b", "--text-length", "0"], ["bad --text-length"]),
    (["--config", "helios-15b"], ["unknown built-in config", "helios-14b"]),
    ([], ["say which model", "neither"]),
    (["MISSING"], ["does not exist"]),
    (["--config", "helios-14b", "--json", "NODIR/cost.json"], ["cannot write", "does not exist"]),
])
def test_bad_input(args, needles, tmp_path, capsys):
    args = [str(tmp_path / "nope") if a == "MISSING" else a.replace("NODIR", str(tmp_path / "nodir")) for a in args]
    code, _, err = run_cli(["cost", *args], capsys)
    assert code == 1
    assert err.startswith("error: ") and "Traceback" not in err
    for n in needles:
        assert n in err, err


def test_cli_reads_the_variant_from_the_checkpoint(base_ckpt, capsys):
    code, out, err = run_cli(["cost", base_ckpt, "--height", 64, "--width", 128, "--text-length", 16,
                              "--no-meta-count"], capsys)
    assert code == 0, err
    assert "(base)" in out and "50 transformer calls per chunk" in out and "transformer full" in out
    code, _, err = run_cli(["cost", base_ckpt, "--variant", "mid", "--no-meta-count"], capsys)
    assert code == 1 and "Helios-Base checkpoint" in err


def test_missing_config_file(tiny_ckpt, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    for folder in ("transformer", "text_encoder"):
        (ckpt / folder).mkdir(parents=True)
        shutil.copy(tiny_ckpt / folder / "config.json", ckpt / folder / "config.json")
    code, _, err = run_cli(["cost", ckpt, "--height", 64, "--width", 128], capsys)
    assert code == 1 and "vae/config.json" in err and "Traceback" not in err


def test_14b_fp8_attention_and_vae_variants(helios_14b):
    """Issue 30: FP8 attention runs both attention matmuls at the FP8 peak, FP8 VAE the decoder's convolutions;
    each variant is faster than the one before on every GPU, by exactly the work it moves to FP8."""
    for gpu in GPU_NAMES:
        r = helios_14b.roofline[gpu]
        fps = [r[p]["fps"] for p in ("bf16", "fp8", "fp8+attn", "fp8+attn+vae")]
        assert fps == sorted(fps) and fps[1] < fps[2] < fps[3], (gpu, fps)
    h100 = next(g for g in helios_14b.gpus if g["name"] == "H100 SXM")
    stage2 = helios_14b.call("transformer/stage2")
    attn = stage2.flops["attention_self"] + stage2.flops["attention_cross"]
    rest = stage2.total_flops - stage2.flops["linear"] - attn
    expected = (stage2.flops["linear"] + attn) / (h100["fp8_tflops"] * 1e12) + rest / (h100["bf16_tflops"] * 1e12)
    got = helios_14b.roofline["H100 SXM"]["fp8+attn"]["calls"]["transformer/stage2"]
    assert got["bound"] == "compute" and got["compute_s"] == pytest.approx(expected, rel=1e-9)
    vae = {p: helios_14b.roofline["H100 SXM"][p]["calls"]["vae_decoder/chunk"] for p in ("fp8+attn", "fp8+attn+vae")}
    assert vae["fp8+attn+vae"]["seconds"] < vae["fp8+attn"]["seconds"]
    # the README's line: whole real-time streams per H100 SXM, linears only -> + attention -> + VAE
    r = helios_14b.roofline["H100 SXM"]
    # (fp8+attn: 96.0 FPS is 3.999 streams, just short of a fourth whole one)
    assert [r[p]["realtime_streams_whole"] for p in ("fp8", "fp8+attn", "fp8+attn+vae")] == [3, 3, 4]
    assert r["fp8+attn"]["fps"] == pytest.approx(96, rel=0.03) and r["fp8+attn+vae"]["fps"] == pytest.approx(107, rel=0.03)
