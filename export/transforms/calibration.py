"""Calibration data for FP8: the inputs a component really sees in the distilled sampler loop.

The runtime Pipeline runs over the exported fp32 graphs (ONNX Runtime, CPU) on the calibration prompts,
two chunks each (so the second chunk has real history), and every call of the recorded components is
captured: for the transformer that is every step of all three pyramid stages, each at its own shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ...errors import UserError
from ...fsutil import sha256_bytes

# Built-in calibration prompts: varied subjects, motion, lighting and camera work, like real requests.
DEFAULT_PROMPTS = (
    "A cat and a dog baking a cake together in a kitchen.",
    "A drone shot flying over a snowy mountain ridge at sunrise, golden light on the peaks.",
    "Close-up of rain drops falling on a city street at night, neon reflections in the puddles.",
    "A surfer riding a large turquoise wave, slow motion, water spraying into the air.",
    "An old man reading a newspaper on a park bench while pigeons walk around him.",
    "A timelapse of clouds moving over a desert with red rock formations.",
    "A red sports car driving along a coastal road, the camera tracking beside it.",
    "A child blowing soap bubbles in a sunny garden, shallow depth of field.",
)


def read_prompts(path: str | Path | None) -> list[str]:
    """One prompt per line (blank lines skipped); the built-in set when ``path`` is None."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the calibration prompts file {path}", found=type(e).__name__ + f": {e}",
                        expected="a readable UTF-8 text file, one prompt per line",
                        fix="check the path and permissions, or omit --calibration-prompts for the built-in set") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"the calibration prompts file {path} has no prompts", found="an empty file (or only blank lines)",
                        expected="one prompt per line", fix="add prompts, or omit --calibration-prompts")
    return prompts


def calibration_hash(prompts: Sequence[str], settings: dict) -> str:
    """sha256 over the prompts and every setting that changes the recorded inputs."""
    return sha256_bytes(json.dumps({"prompts": list(prompts), "settings": settings}, sort_keys=True).encode())


def record_feeds(pipe, components: Iterable[str], prompts: Sequence[str], chunks: int, seed: int,
                 pyramid_steps=(1, 1, 1)) -> dict[str, list[dict[str, np.ndarray]]]:
    """Run the real sampler loop and return every input feed of ``components``, per component, in call
    order. The runners' ``infer`` is wrapped for the duration of the run and restored afterwards."""
    recorded: dict[str, list[dict[str, np.ndarray]]] = {c: [] for c in components}
    runners = [pipe.runner(c) for c in recorded]
    originals = [r.infer for r in runners]

    def recorder(component, infer):
        def wrapped(feeds, *args, **kwargs):
            recorded[component].append({k: v.detach().cpu().numpy().copy() for k, v in feeds.items()})
            return infer(feeds, *args, **kwargs)
        return wrapped

    try:
        for runner, component, infer in zip(runners, recorded, originals):
            runner.infer = recorder(component, infer)
        for i, prompt in enumerate(prompts):
            for _ in pipe.stream(prompt, num_frames=33 * chunks, seed=seed + i, pyramid_steps=pyramid_steps):
                pass
    finally:
        for runner, infer in zip(runners, originals):
            runner.infer = infer
    return recorded


def shape_summary(feeds: Sequence[dict[str, np.ndarray]]) -> dict[str, int]:
    """How many recorded calls per shape of the first input (the pyramid stages, for the transformer)."""
    out: dict[str, int] = {}
    for f in feeds:
        key = "x".join(str(d) for d in next(iter(f.values())).shape)
        out[key] = out.get(key, 0) + 1
    return out


def feed_reader(feeds: Sequence[dict[str, np.ndarray]]):
    """An ONNX Runtime CalibrationDataReader over recorded feeds of different shapes.

    modelopt's ``calibration_data`` takes one array per input and splits it along the batch axis, so every
    sample must have the same shape; the pyramid stages do not. ``calibration_data_reader`` takes any
    reader, and its max calibrator reduces each run on its own, so mixed shapes work through it."""
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

        def get_first(self):
            return feeds[0]

        def rewind(self):
            self._it = iter(feeds)

        def __len__(self):
            return len(feeds)

    return _Reader()
