"""`scale-report`: the deploy chain on real-width checkpoints of a few sizes, each step in its own process,
with peak memory, wall time and disk written per step, fitted per transformer block and per text-encoder
layer and extrapolated to Helios-14B (40 blocks, UMT5-XXL's 24 layers).

Each step runs as ``python -m helios_deploy.measure.scale STEP.json -- <helios-deploy arguments>``: the child runs
the CLI and records its own peak resident memory (the whole process, resets of the per-phase high-water
mark included: helios_deploy/measure/memory.py), the bytes it wrote to storage (/proc/self/io) and its exit code.
The artifacts folder's growth is measured from outside (what stays on disk after the step).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..checkpoints.checkpoint import Checkpoint
from ..errors import UserError

HELIOS_14B = {"blocks": 40, "text_encoder_layers": 24}
KEEP_ALL_BLOCKS = (r"^patch_", r"^condition_embedder\.", r"^proj_out/")  # FP8 on every block (few-block models)
PROMPT = "A red sports car driving along a coastal road at sunset."


GB = 1e9


@dataclass(frozen=True)
class StepNeed:
    """What one step of the deploy chain needs, from the scale report's runs on real-width checkpoints (1, 2
    and 4 blocks; 1 and 2 UMT5-XXL layers): peak RAM = ``ram_fixed`` + bytes per parameter of each component
    it holds (the per-block growth over the block's parameters, e.g. parity's 1.12x the fp32 bytes); disk
    written = bytes per parameter of what it writes. At Helios-14B these give the table in docs/scale.md
    ('What each step needs at 14B'), and at one real-width block what was measured there
    (tests/test_doctor.py checks both)."""

    step: str  # the row of the docs' table
    command: str  # helios-deploy arguments
    ram_fixed: float | None  # bytes that do not grow with the model (the Python process); None: not measured
    ram_per_param: tuple[tuple[str, float], ...] = ()  # (component of model_parts, bytes per parameter)
    disk_per_param: tuple[tuple[str, float], ...] = ()
    gpu: bool = False  # runs on an NVIDIA GPU with TensorRT


STEP_NEEDS = (
    StepNeed("`export`", "export", 1.1 * GB, disk_per_param=(("transformer", 4), ("text_encoder", 4))),  # fp32
    StepNeed("`parity` (fp32)", "parity", 1.2 * GB, (("transformer", 4.46),)),  # 1.57 GB / 0.35 G params a block
    StepNeed("`quantize --precision fp8`: calibration", "quantize --precision fp8", 1.1 * GB,
             (("transformer", 4.75),)),  # +1.67 GB a block
    StepNeed("`quantize --precision fp8`: Q/DQ, bf16 lowering", "quantize --precision fp8", 1.1 * GB,
             disk_per_param=(("transformer", 2.1),)),  # FP8 weights twice (fp32 and bf16 graphs) and the rest
    StepNeed("`parity --precision fp8`", "parity --precision fp8", 1.2 * GB, (("transformer", 4.03),)),  # +1.41 GB
    StepNeed("`quantize --precision bf16` (all components)", "quantize --precision bf16", 1.0 * GB,
             disk_per_param=(("transformer", 2), ("text_encoder", 2), ("vae", 2))),
    StepNeed("`build --dry-run`", "build --dry-run", 0.05 * GB),
    # ONNX Runtime's prepacked weights: +2.36 GB a block (1.7x fp32) and 1.1x fp32 per UMT5 layer; the fixed
    # part is fitted to the 1-block run (5.21 GB) with the 14B extrapolation (118 GB)
    StepNeed("`generate --precision fp8` (ONNX Runtime, CPU)", "generate --precision fp8", 0.2 * GB,
             (("transformer", 6.72), ("text_encoder_layers", 4.67))),
    StepNeed("`build` (TensorRT engines)", "build --precision fp8", None, gpu=True),
    StepNeed("`verify`", "verify", None, gpu=True),
    StepNeed("`generate --backend tensorrt`", "generate --backend tensorrt --device cuda", None, gpu=True),
)


def model_parts(configs) -> dict[str, int]:
    """Parameters per component of a model (cost.configs.ModelConfigs), as the needs count them."""
    from ..cost.estimate import analytic_params
    from ..cost.flops import text_encoder_params

    params = analytic_params(configs)
    te = text_encoder_params(configs.text_encoder)
    return {"transformer": params["transformer"], "text_encoder": params["text_encoder"],
            "text_encoder_layers": te["linear_weights"] + te["other"], "vae": params["vae"]}


def step_needs(parts: dict[str, int]) -> list[dict]:
    """Each step's peak RAM and disk written in bytes (None where not measured) for a model of ``parts``."""
    def total(per_param):
        return sum(parts[c] * b for c, b in per_param)

    return [{"step": n.step, "command": n.command, "gpu": n.gpu,
             "ram_bytes": None if n.ram_fixed is None else n.ram_fixed + total(n.ram_per_param),
             "disk_bytes": None if n.gpu else total(n.disk_per_param)} for n in STEP_NEEDS]


@dataclass(frozen=True)
class Step:
    name: str
    args: tuple[str, ...]  # helios-deploy arguments; {ckpt}, {arts}, {out} are filled in


def chain(height: int, width: int, keep: Sequence[str] = KEEP_ALL_BLOCKS, prompts: str | None = None) -> list[Step]:
    """The chain of the issue, in order: export, parity, quantize fp8, parity fp8, quantize bf16, build --dry-run,
    generate fp8."""
    keep_args = tuple(a for k in keep for a in ("--keep-high-precision", k))
    prompt_args = ("--calibration-prompts", prompts) if prompts else ()
    return [
        Step("export", ("export", "{ckpt}", "-o", "{arts}", "--height", str(height), "--width", str(width),
                        "--no-audit", "--force")),
        Step("parity", ("parity", "{ckpt}", "{arts}", "--json", "{out}/parity.json")),
        Step("quantize_fp8", ("quantize", "{arts}", "--precision", "fp8", *keep_args, *prompt_args)),
        Step("parity_fp8", ("parity", "{ckpt}", "{arts}", "--precision", "fp8", "--json", "{out}/parity_fp8.json")),
        Step("quantize_bf16", ("quantize", "{arts}", "--precision", "bf16")),
        Step("build_dry_run", ("build", "{arts}", "--precision", "fp8", "--dry-run")),
        Step("generate_fp8", ("generate", "{arts}", "--precision", "fp8", "--prompt", PROMPT, "--frames", "33",
                              "-o", "{out}/video.mp4")),
    ]


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).exists() else 0


def run_step(step: Step, ckpt: Path, arts: Path, out: Path, log) -> dict:
    """One step in a child process; returns its measurements."""
    fill = {"ckpt": str(ckpt), "arts": str(arts), "out": str(out)}
    args = [a.format(**fill) for a in step.args]
    record = out / f"{step.name}.step.json"
    before = folder_bytes(arts)
    t0 = time.perf_counter()
    with open(out / f"{step.name}.log", "w") as logfile:
        code = subprocess.call([sys.executable, "-m", "helios_deploy.measure.scale", str(record), "--", *args],
                               stdout=logfile, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    child = json.loads(record.read_text()) if record.is_file() else {}
    result = {"step": step.name, "command": "helios-deploy " + " ".join(args), "exit_code": code,
              "passed": code == 0 and child.get("exit_code") == 0, "seconds": round(seconds, 1),
              "peak_rss_bytes": child.get("peak_rss_bytes"), "written_bytes": child.get("write_bytes"),
              "artifacts_growth_bytes": folder_bytes(arts) - before}
    log(f"  {step.name:14s} {'ok' if result['passed'] else 'FAILED':6s} {seconds:7.1f} s  "
        f"peak {(result['peak_rss_bytes'] or 0) / 1e9:6.2f} GB  wrote {(result['written_bytes'] or 0) / 1e9:6.2f} GB")
    return result


def phases(step: str, arts: Path, out: Path) -> dict[str, int]:
    """Peak memory of the phases inside a step, as the step recorded them (manifest, parity report)."""
    def read(path: Path) -> dict:
        return json.loads(path.read_text()) if path.is_file() else {}

    comps = read(arts / "manifest.json").get("components", {})
    found: dict[str, int | None] = {}
    if step == "export":
        found = {f"export {c}": e.get("export_memory", {}).get("peak_rss_bytes") for c, e in comps.items()}
    elif step in ("parity", "parity_fp8"):
        report = read(out / f"{step}.json").get("components", {})
        found = {f"{step} {c}": e.get("memory", {}).get("peak_rss_bytes") for c, e in report.items()}
    elif step == "quantize_fp8":
        for c, e in comps.items():
            fp8 = e.get("fp8") or {}
            for phase, record in {**fp8.get("memory", {}), "lowering": fp8.get("bf16", {}).get("memory", {})}.items():
                found[f"quantize_fp8 {c} {phase}"] = record.get("peak_rss_bytes")
    elif step == "quantize_bf16":
        found = {f"quantize_bf16 {c}/{g}": r.get("memory", {}).get("peak_rss_bytes")
                 for c, e in comps.items() for g, r in (e.get("bf16") or {}).items()}
    return {k: int(v) for k, v in found.items() if v is not None}


def sizes(ckpt: Checkpoint) -> dict:
    """What the fit is over: transformer blocks, text-encoder layers, and the checkpoint's bf16 weight bytes."""
    return {"blocks": int(ckpt.configs["transformer"]["num_layers"]),
            "text_encoder_layers": int(ckpt.configs["text_encoder"]["num_layers"]),
            "weights_bytes": {c: sum(p.stat().st_size for p in ckpt.index_for(c).files)
                              for c in ("transformer", "text_encoder", "vae_decoder")}}


def fit(rows: list[dict], key: str, over: str = "both") -> dict | None:
    """Least-squares ``value = fixed + per_block * blocks (+ per_te_layer * text encoder layers)`` over the
    checkpoints where the step passed, and its value at Helios-14B. ``over`` names what the value can grow
    with: "both" (a whole step), "blocks" (a transformer phase), "te" (a text-encoder phase) or "none" (the
    VAE: its largest value). The text-encoder term is fitted only when the checkpoints vary in text-encoder
    layers. Memory, time and bytes do not shrink as a model grows: a negative coefficient is noise (a flat
    step measured on a shared host), so its term is dropped and the rest refitted."""
    pts = [(r["blocks"], r["text_encoder_layers"], r[key]) for r in rows if r.get(key) is not None and r["passed"]]
    if len({(b, t) for b, t, _ in pts}) < 2:
        return None
    terms = {"both": ["blocks", "te"], "blocks": ["blocks"], "te": ["te"], "none": []}[over]
    if len({t for _, t, _ in pts}) < 2 or len({(b, t) for b, t, _ in pts}) < 3:
        terms = [t for t in terms if t != "te"]
    values = np.array([v for *_, v in pts], dtype=float)
    while True:
        design = np.array([[1.0] + [b if t == "blocks" else te for t in terms] for b, te, _ in pts])
        coef, *_ = np.linalg.lstsq(design, values, rcond=None)
        negative = [t for t, c in zip(terms, coef[1:]) if c < 0]
        if not negative:
            break
        terms = [t for t in terms if t not in negative]
    per = dict(zip(terms, (float(c) for c in coef[1:])))
    fixed = float(coef[0]) if terms else float(values.max())
    out = {"fixed": fixed, "per_block": per.get("blocks", 0.0), "per_text_encoder_layer": per.get("te"),
           "terms": terms}
    with_te = "te" in terms
    out["helios_14b"] = fixed + out["per_block"] * HELIOS_14B["blocks"] + \
        (per["te"] * HELIOS_14B["text_encoder_layers"] if with_te else 0.0)
    out["helios_14b_note"] = ("40 blocks, 24 text-encoder layers" if with_te else
                              "40 blocks, text encoder as measured" if "blocks" in terms else "as measured (flat)")
    return out


def phase_dependence(phase: str) -> str:
    """What a phase's memory can grow with: its component's size only (calibration runs the whole pipeline)."""
    if "calibration" in phase:
        return "both"
    if "text_encoder" in phase:
        return "te"
    if "transformer" in phase:
        return "blocks"
    if "vae" in phase:
        return "none"
    return "both"


def fits_of(result: dict) -> dict:
    """The fits of a report's runs (the chain's steps and the phases inside them), recomputed from its JSON."""
    rows = [{"blocks": r["blocks"], "text_encoder_layers": r["text_encoder_layers"], **s}
            for r in result["runs"] for s in r["steps"]]
    steps = list(dict.fromkeys(r["step"] for r in rows))
    result["fits"] = {s: {k: fit([r for r in rows if r["step"] == s], k)
                          for k in ("peak_rss_bytes", "seconds", "written_bytes", "artifacts_growth_bytes")}
                      for s in steps}
    names = sorted({p for r in rows for p in r.get("phases", {})})
    result["phase_fits"] = {p: fit([{**r, "value": r["phases"].get(p)} for r in rows if "phases" in r], "value",
                                   phase_dependence(p)) for p in names}
    for step, fits in result["fits"].items():  # phases run one after another: the step's peak is its largest
        inside = [f["helios_14b"] for p, f in result["phase_fits"].items() if p.startswith(step + " ") and f]
        if inside and fits["peak_rss_bytes"]:
            fits["peak_rss_bytes"].update(helios_14b=max(inside), helios_14b_note="the largest of its phases at 14B")
    return result


def report(checkpoints: Sequence[str | Path], out: str | Path, height: int = 128, width: int = 128,
           keep: Sequence[str] = KEEP_ALL_BLOCKS, prompts: str | None = None, keep_artifacts: bool = False,
           log=print) -> dict:
    """Run the chain on every checkpoint and fit the growth; writes ``out/scale_report.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpts = [Checkpoint(c) for c in checkpoints]
    runs = []
    for ckpt in ckpts:
        info = sizes(ckpt)
        name = f"{ckpt.path.name}"
        work, arts = out / name, out / name / "artifacts"
        work.mkdir(exist_ok=True)
        log(f"{ckpt.path}: {info['blocks']} blocks, {info['text_encoder_layers']} text-encoder layers")
        results = []
        for step in chain(height, width, keep, prompts):
            results.append(run_step(step, ckpt.path, arts, work, log))
            results[-1]["phases"] = phases(step.name, arts, work)
            if not results[-1]["passed"]:
                break
        runs.append({"checkpoint": str(ckpt.path), **info, "steps": results,
                     "artifacts_bytes": folder_bytes(arts)})
        if not keep_artifacts:
            import shutil

            shutil.rmtree(arts, ignore_errors=True)
    result = fits_of({"video": {"height": height, "width": width}, "helios_14b": HELIOS_14B, "runs": runs,
                      "host": {"cpus": os.cpu_count(),
                               "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}})
    (out / "scale_report.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def table(result: dict) -> str:
    """The report as a plain-text table: per step, peak RSS per checkpoint, growth per block, 14B estimate."""
    runs = result["runs"]
    head = ["step"] + [f"{r['blocks']}b/{r['text_encoder_layers']}te" for r in runs] + \
        ["per block", "per TE layer", "14B peak", "14B time", "14B written"]
    lines = [head]
    for step, fits in result["fits"].items():
        cells = [step]
        for r in runs:
            s = next((x for x in r["steps"] if x["step"] == step), None)
            cells.append("-" if s is None else (f"{s['peak_rss_bytes'] / 1e9:.2f} GB" if s["passed"] else "FAILED"))
        peak, secs, wrote = fits["peak_rss_bytes"], fits["seconds"], fits["written_bytes"]
        cells += [f"{peak['per_block'] / 1e9:+.3f} GB" if peak else "-",
                  f"{peak['per_text_encoder_layer'] / 1e9:+.3f} GB" if peak and peak["per_text_encoder_layer"] is not None else "-",
                  f"{peak['helios_14b'] / 1e9:.1f} GB" if peak else "-",
                  f"{secs['helios_14b'] / 60:.0f} min" if secs else "-",
                  f"{wrote['helios_14b'] / 1e9:.0f} GB" if wrote else "-"]
        lines.append(cells)
    for phase, peak in result.get("phase_fits", {}).items():
        cells = [f"  {phase}"]
        for r in runs:
            value = next((x["phases"].get(phase) for x in r["steps"] if phase in x.get("phases", {})), None)
            cells.append("-" if value is None else f"{value / 1e9:.2f} GB")
        cells += [f"{peak['per_block'] / 1e9:+.3f} GB" if peak else "-",
                  f"{peak['per_text_encoder_layer'] / 1e9:+.3f} GB" if peak and peak["per_text_encoder_layer"] is not None
                  else "-", f"{peak['helios_14b'] / 1e9:.1f} GB" if peak else "-", "", ""]
        lines.append(cells)
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in lines)


def _io_write_bytes() -> int | None:
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("write_bytes:"))
    except (OSError, StopIteration):
        return None


def _step_main(argv: list[str]) -> int:
    """Child side of ``run_step``: run the CLI, then record peak memory, bytes written and the exit code."""
    from ..cli import main
    from .memory import process_peak_bytes

    record, args = Path(argv[0]), argv[argv.index("--") + 1:]
    code = main(args)
    record.write_text(json.dumps({"exit_code": code, "peak_rss_bytes": process_peak_bytes(),
                                  "write_bytes": _io_write_bytes()}) + "\n")
    return code


def check_checkpoints(checkpoints: Sequence[str | Path]) -> None:
    if not checkpoints:
        raise UserError("scale-report needs at least one checkpoint",
                        fix="make some: helios-deploy tiny-checkpoint engines/w1 --real-width-layers 1")


if __name__ == "__main__":
    sys.exit(_step_main(sys.argv[1:]))
