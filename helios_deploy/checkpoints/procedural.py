"""Procedural videos with captions, made on the fly and seeded: on a black background one shape (square or
circle) of one colour moving in one direction at a steady speed, with some variety in size, start position
and speed; caption "a {colour} {shape} moving {direction}". What the trained tiny checkpoint learned
(helios_deploy.checkpoints.train_tiny), and the vocabulary the adherence measure reads back
(helios_deploy.measure.adherence).

A video may change colour at a chunk boundary (its caption then changes too): how the checkpoint learns
that a prompt change between chunks changes the next chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLOURS = {  # RGB in [0, 1]
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "white": (1.0, 1.0, 1.0),
}
SHAPES = ("square", "circle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy) in image axes
CHUNK_FRAMES = 33


def caption(colour: str, shape: str, direction: str) -> str:
    return f"a {colour} {shape} moving {direction}"


def parse_caption(text: str) -> dict[str, str | None]:
    """The colour, shape and direction words a prompt names (None where it names none)."""
    words = text.lower().replace(",", " ").replace(".", " ").split()
    pick = lambda vocab: next((w for w in words if w in vocab), None)  # noqa: E731
    return {"colour": pick(COLOURS), "shape": pick(SHAPES), "direction": pick(DIRECTIONS)}


def all_captions() -> list[str]:
    """Every caption of the vocabulary (5 colours x 2 shapes x 4 directions = 40), in a fixed order."""
    return [caption(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]


@dataclass(frozen=True)
class Motion:
    shape: str
    direction: str
    colours: tuple[str, ...]  # per chunk
    size: float  # half the side / the radius, pixels
    start: tuple[float, float]  # centre (x, y) at frame 0
    speed: float  # pixels per frame

    def captions(self) -> list[str]:
        return [caption(c, self.shape, self.direction) for c in self.colours]


def sample_motion(rng: np.random.Generator, height: int, width: int, chunks: int = 1,
                  change_prob: float = 0.0) -> Motion:
    """A random motion that stays inside the frame for ``chunks`` chunks; each later chunk changes colour
    with probability ``change_prob``."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
    colours = [list(COLOURS)[rng.integers(len(COLOURS))]]
    for _ in range(chunks - 1):
        if rng.random() < change_prob:
            colours.append(rng.choice([c for c in COLOURS if c != colours[-1]]))
        else:
            colours.append(colours[-1])
    size = float(rng.uniform(0.10, 0.13) * height)
    dx, dy = DIRECTIONS[direction]
    extent = width if dx else height
    room = extent - 2 * size - 2
    travel = float(rng.uniform(0.75, 0.9) * room)
    frames = chunks * CHUNK_FRAMES
    # the start along the motion is near the side it moves away from (moving right starts on the left), so
    # the first chunk of a caption is nearly the same video every time: a distilled model's first chunk has
    # no history and one step per stage, and learns the mean of what its caption shows
    begin = size + 1 + rng.uniform(0, 0.3) * (room - travel)
    along = begin if (dx + dy) > 0 else extent - begin
    across_extent = height if dx else width
    across = float(across_extent / 2 + rng.uniform(-0.08, 0.08) * across_extent)
    start = (along, across) if dx else (across, along)
    return Motion(shape, direction, tuple(colours), size, start, travel / frames)


def render(motion: Motion, height: int, width: int, frames: int | None = None, start: int = 0) -> np.ndarray:
    """The video (or ``frames`` of it from frame ``start``) as float32 [T, H, W, 3] in [0, 1] (antialiased edges)."""
    frames = frames or len(motion.colours) * CHUNK_FRAMES - start
    dx, dy = DIRECTIONS[motion.direction]
    t = np.arange(start, start + frames, dtype=np.float32)
    cx = motion.start[0] + dx * motion.speed * t
    cy = motion.start[1] + dy * motion.speed * t
    ys = np.arange(height, dtype=np.float32)[None, :, None] + 0.5
    xs = np.arange(width, dtype=np.float32)[None, None, :] + 0.5
    ddx, ddy = xs - cx[:, None, None], ys - cy[:, None, None]
    if motion.shape == "square":
        dist = np.maximum(np.abs(ddx), np.abs(ddy))
    else:
        dist = np.sqrt(ddx ** 2 + ddy ** 2)
    cover = np.clip(motion.size + 0.5 - dist, 0.0, 1.0)  # [T, H, W]
    chunk = np.minimum(t.astype(int) // CHUNK_FRAMES, len(motion.colours) - 1)
    rgb = np.array([COLOURS[c] for c in motion.colours], np.float32)[chunk]  # [T, 3]
    return cover[..., None] * rgb[:, None, None, :]


def video(seed: int, height: int, width: int, chunks: int = 1, change_prob: float = 0.0):
    """(frames float32 [T, H, W, 3] in [0, 1], captions per chunk) for one seed."""
    motion = sample_motion(np.random.default_rng(seed), height, width, chunks, change_prob)
    return render(motion, height, width), motion.captions()
