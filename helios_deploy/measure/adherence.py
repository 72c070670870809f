"""What a video shows, against what its prompt asked for: plain image processing, not a model.

In each frame the bright pixels (at least half the frame's brightest, and bright at all) are the shape: its
colour is their mean colour, named after the nearest of the vocabulary's colours (red, green, blue, yellow,
white); its centre is their brightness-weighted centroid; its shape is square when it fills its bounding box,
else circle. Over the video the centroid's velocity (a line fitted per 33-frame chunk, averaged) gives the
direction (left, right, up, down; "still" when it moves less than MIN_TRAVEL pixels in all). A video matches
its prompt when the colour and the direction seen are the prompt's (the vocabulary of the trained tiny
checkpoint: "a {colour} {shape} moving {direction}", helios_deploy.checkpoints.procedural).

Library use (the FP8 report and the long-stream audit call these):
    adherence_of(frames, prompt) -> dict            one video (uint8 [T, H, W, 3] or float in [0, 1])
    adherence_share(pipe, prompts, seeds) -> dict   generate prompts x seeds through a runtime Pipeline
    share_of(results) -> dict                        the share of a list of adherence_of results
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

import numpy as np

from ..checkpoints.procedural import CHUNK_FRAMES, COLOURS, DIRECTIONS, SHAPES, caption, parse_caption

MIN_BRIGHTNESS = 0.04  # a frame whose brightest pixel is darker (about 10 of 255) shows no shape
MIN_TRAVEL = 2.0  # pixels over the video below which the shape is "still"
SQUARE_FILL = 0.88  # share of its bounding box a square fills (a disc fills pi / 4 = 0.785)
_PALETTE = np.array(list(COLOURS.values()), np.float32)


def default_prompts(n: int = 20) -> list[str]:
    """``n`` (at most 20 distinct) prompts that cover every colour, shape and direction of the vocabulary."""
    colours, directions = list(COLOURS), list(DIRECTIONS)
    return [caption(colours[i % 5], SHAPES[(i // 5) % 2], directions[i % 4]) for i in range(n)]


def to_unit_frames(frames: np.ndarray) -> np.ndarray:
    """float32 [T, H, W, 3] in [0, 1] from uint8 or float frames."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got shape {frames.shape}")
    if frames.dtype == np.uint8:
        return frames.astype(np.float32) / 255.0
    return np.clip(frames.astype(np.float32), 0.0, 1.0)


def frame_shape(frame: np.ndarray) -> dict | None:
    """The shape in one float frame [H, W, 3]: colour (RGB and name), centroid (x, y), fill; None if dark."""
    bright = frame.max(-1)
    peak = float(bright.max())
    if peak < MIN_BRIGHTNESS:
        return None
    mask = bright >= 0.5 * peak
    ys, xs = np.nonzero(mask)
    weights = bright[ys, xs]
    rgb = frame[ys, xs].mean(0)
    name = list(COLOURS)[int(np.argmin(((_PALETTE - rgb / max(rgb.max(), 1e-6)) ** 2).sum(1)))]
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return {"rgb": rgb, "colour": name, "x": float((xs * weights).sum() / weights.sum()),
            "y": float((ys * weights).sum() / weights.sum()), "fill": len(ys) / box}


def _velocity(found: list[tuple[int, dict]]) -> tuple[float, float]:
    """Pixels per frame (x, y): a line through the centroids of each chunk, the slopes averaged by frames."""
    slopes, weights = [], []
    for c in sorted({t // CHUNK_FRAMES for t, _ in found}):
        pts = [(t, s["x"], s["y"]) for t, s in found if t // CHUNK_FRAMES == c]
        if len(pts) < 3:
            continue
        t, x, y = np.array(pts, np.float64).T
        slopes.append((np.polyfit(t, x, 1)[0], np.polyfit(t, y, 1)[0]))
        weights.append(len(pts))
    if not slopes:
        return 0.0, 0.0
    vx, vy = np.average(np.array(slopes), axis=0, weights=weights)
    return float(vx), float(vy)


def analyse(frames) -> dict:
    """What the video shows: colour (the most frequent per-frame colour), colour per chunk, direction,
    shape, velocity (px/frame) and the number of frames with a shape."""
    video = to_unit_frames(frames)
    found = [(t, s) for t, s in ((t, frame_shape(f)) for t, f in enumerate(video)) if s is not None]
    if not found:
        return {"colour": None, "chunk_colours": [], "direction": None, "shape": None, "velocity": [0.0, 0.0],
                "frames_with_shape": 0, "frames": len(video)}
    chunks = Counter()
    per_chunk: dict[int, Counter] = {}
    for t, s in found:
        chunks[s["colour"]] += 1
        per_chunk.setdefault(t // CHUNK_FRAMES, Counter())[s["colour"]] += 1
    vx, vy = _velocity(found)
    travel = max(abs(vx), abs(vy)) * (len(video) - 1)
    if travel < MIN_TRAVEL:
        direction = "still"
    elif abs(vx) >= abs(vy):
        direction = "right" if vx > 0 else "left"
    else:
        direction = "down" if vy > 0 else "up"
    fill = float(np.median([s["fill"] for _, s in found]))
    return {"colour": chunks.most_common(1)[0][0],
            "chunk_colours": [per_chunk[c].most_common(1)[0][0] if c in per_chunk else None
                              for c in range((len(video) + CHUNK_FRAMES - 1) // CHUNK_FRAMES)],
            "direction": direction, "shape": "square" if fill >= SQUARE_FILL else "circle",
            "velocity": [round(vx, 4), round(vy, 4)], "frames_with_shape": len(found), "frames": len(video)}


def adherence_of(frames, prompt: str) -> dict:
    """One video against its prompt: what it shows (``analyse``), what the prompt asks (colour, shape,
    direction), and ``match``: the colour and the direction seen are the prompt's."""
    seen, asked = analyse(frames), parse_caption(prompt)
    colour_ok = asked["colour"] is not None and seen["colour"] == asked["colour"]
    direction_ok = asked["direction"] is not None and seen["direction"] == asked["direction"]
    return {"prompt": prompt, "expected": asked, "seen": seen, "colour_match": colour_ok,
            "direction_match": direction_ok, "shape_match": asked["shape"] == seen["shape"],
            "match": colour_ok and direction_ok}


def share_of(results: Sequence[dict]) -> dict:
    """The share of videos that match their prompts (and of colours, directions and shapes alone)."""
    n = len(results)
    count = lambda key: sum(bool(r[key]) for r in results)  # noqa: E731
    return {"videos": n, "matched": count("match"), "share": count("match") / n if n else 0.0,
            "colour_share": count("colour_match") / n if n else 0.0,
            "direction_share": count("direction_match") / n if n else 0.0,
            "shape_share": count("shape_match") / n if n else 0.0}


def adherence_share(pipe, prompts: Iterable[str] | None = None, seeds: Iterable[int] = (0, 1),
                    num_frames: int = 33, **settings) -> dict:
    """Generate every prompt x seed through ``pipe`` (a runtime Pipeline: any backend and precision) and
    measure each video: ``share_of`` the results, with the per-video results under "results"."""
    results = []
    for prompt in (list(prompts) if prompts is not None else default_prompts()):
        for seed in seeds:
            frames = pipe.generate(prompt, num_frames=num_frames, seed=seed, **settings)
            results.append({**adherence_of(frames, prompt), "seed": seed})
    return {**share_of(results), "results": results}


def summary_line(report: dict) -> str:
    """One line for a person: "adherence: 38 of 40 videos (95%) show the prompt's colour and direction"."""
    return (f"adherence: {report['matched']} of {report['videos']} videos ({100 * report['share']:.0f}%) show the "
            f"prompt's colour and direction (colour {100 * report['colour_share']:.0f}%, direction "
            f"{100 * report['direction_share']:.0f}%, shape {100 * report['shape_share']:.0f}%)")
