"""The embedded default job, on CPU: the tiny Helios-Distilled trained here on procedural videos (shipped
with the package, helios_deploy.checkpoints.trained), exported to audited ONNX, a two-chunk video of the
demo prompt generated from it by the runtime and written as mp4 with a strip of a few of its frames as PNG,
what the video shows measured against the prompt (and over 20 prompts), and the whole pipeline checked against
diffusers' HeliosPyramidPipeline. The model is tiny and knows only its procedural videos, and the demo says so.
Third-party warnings and progress bars go to ``demo.log`` beside the video, not to the terminal.
Re-running reuses the checkpoint and replaces the rest."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from .errors import UserError
from .quiet import third_party_to_log
from .checkpoints.trained import ensure_trained_checkpoint

DEMO_PROMPT = "a yellow circle moving right"
SHARE_SEEDS = (0,)  # the adherence line over the 20 default prompts: one 33-frame video each
STRIP_FRAMES = 6  # frames shown side by side in demo-strip.png
STRIP_GAP = 2  # white pixel columns between them
LOG_NAME = "demo.log"  # the libraries' output

NOTICE = ("helios-deploy demo: the checkpoint is a TINY Helios-Distilled (2 blocks, 64x128 video) trained on CPU on\n"
          "procedural videos (\"a {red|green|blue|yellow|white} {square|circle} moving {left|right|up|down}\"); nothing\n"
          "is downloaded. It knows only those videos: the demo shows that the chain runs (export, audit, runtime, mp4),\n"
          "makes what the prompt asks and matches diffusers, not Helios's quality. A real checkpoint: docs/export.md.")


def strip_layout(num_frames: int, count: int = STRIP_FRAMES) -> list[int]:
    """The frame indices the strip shows: ``count`` frames evenly spaced from the first to the last."""
    return np.linspace(0, num_frames - 1, min(count, num_frames)).round().astype(int).tolist()


def write_strip(path: Path, frames: np.ndarray, count: int = STRIP_FRAMES, gap: int = STRIP_GAP) -> list[int]:
    """A PNG of frames (uint8 [T, H, W, 3]) side by side, ``gap`` white columns apart, written atomically;
    returns the frame indices it shows (``strip_layout``)."""
    from PIL import Image

    indices = strip_layout(len(frames), count)
    h, w = frames.shape[1:3]
    strip = np.full((h, len(indices) * (w + gap) - gap, 3), 255, np.uint8)
    for i, f in enumerate(indices):
        strip[:, i * (w + gap):i * (w + gap) + w] = frames[f]
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}.png")
    try:
        Image.fromarray(strip).save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return indices


def run_demo(out: str | Path, height: int = 64, width: int = 128) -> dict:
    """The demo; its own lines go to the terminal, everything the libraries print to ``out/demo.log``."""
    out = Path(out)
    log_path = out / LOG_NAME
    log_path.unlink(missing_ok=True)
    with third_party_to_log(log_path) as say:
        say(NOTICE)
        say(f"third-party warnings and progress bars go to {log_path}")
        try:
            return _run(out, height, width, say)
        except Exception:
            say(f"the demo failed; the libraries' output is in {log_path}")
            raise


def _run(out: Path, height: int, width: int, say) -> dict:
    from .export.exporter.run import export_checkpoint
    from .export.parity.pipeline import run_pipeline_parity
    from .runtime import Pipeline
    from .runtime.video_io import write_mp4

    timings = {}
    t = time.perf_counter()
    ckpt = ensure_trained_checkpoint(out / "checkpoint")
    timings["checkpoint_s"] = time.perf_counter() - t
    say(f"tiny checkpoint (trained on procedural videos, docs/model.md): {ckpt}")
    t = time.perf_counter()
    arts = out / "artifacts"
    manifest = export_checkpoint(ckpt, arts, height=height, width=width, text_length=64, max_text_length=128,
                                 force=True, log=say)  # audited: checker, session, parity per component
    timings["export_and_audit_s"] = time.perf_counter() - t
    for name, result in manifest["audit"].items():
        say(f"  {name:13s} audit passed, worst rel_l2 {max(c['rel_l2'] for c in result['cases']):.2e}")
    pipe = Pipeline.from_artifacts(arts)
    t = time.perf_counter()
    video, chunks = out / "demo.mp4", []
    frames = write_mp4(video, _kept(pipe.stream(DEMO_PROMPT, num_frames=66, seed=0), chunks))
    timings["generate_s"] = time.perf_counter() - t
    strip = out / "demo-strip.png"
    shown = write_strip(strip, np.concatenate(chunks))
    say(f"generated {frames} frames (two chunks) of {DEMO_PROMPT!r} in {timings['generate_s']:.2f}s -> {video}")
    say(f"strip of frames {', '.join(map(str, shown))} side by side -> {strip}")
    t = time.perf_counter()
    adherence = _adherence(pipe, np.concatenate(chunks), say)
    timings["adherence_s"] = time.perf_counter() - t
    t = time.perf_counter()
    report = {"pipeline": run_pipeline_parity(ckpt, pipe), "timings": timings,
              "strip": {"path": str(strip), "frames": shown}, "adherence": adherence}
    timings["pipeline_parity_s"] = time.perf_counter() - t
    for c in report["pipeline"]["cases"]:
        say(f"  pipeline {c['name']:16s} max_abs_err {c['max_abs_err']:.2e} {'ok' if c['passed'] else 'FAIL'}")
    report_path = out / "parity.json"
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    if not report["pipeline"]["passed"]:
        raise UserError("demo pipeline parity failed", found=f"see {report_path}")
    say(f"video:     {video} ({DEMO_PROMPT}; a tiny model)\nstrip:     {strip}\nartifacts: {arts}\n"
        f"manifest:  {arts / 'manifest.json'}\nparity:    {report_path}\nlog:       {out / LOG_NAME}")
    say("timings:   " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return report


def _adherence(pipe, frames: np.ndarray, say) -> dict:
    """What the demo video shows against its prompt, and the share of the 20 default prompts that match."""
    from .measure.adherence import adherence_of, adherence_share, summary_line

    one = adherence_of(frames, DEMO_PROMPT)
    seen = one["seen"]
    say(f"adherence: the video shows a {seen['colour']} {seen['shape']} moving {seen['direction']} "
        f"(asked: {DEMO_PROMPT}): {'match' if one['match'] else 'NO MATCH'}")
    share = adherence_share(pipe, seeds=SHARE_SEEDS)
    say(summary_line(share) + " over 20 prompts (a tiny model: simple shapes, not Helios's quality)")
    return {"demo": one, "share": {k: v for k, v in share.items() if k != "results"}}


def _kept(stream, chunks: list):
    """Each chunk's frames, passed on to the mp4 writer and kept for the strip (two tiny chunks)."""
    for chunk in stream:
        chunks.append(chunk.frames)
        yield chunk.frames
