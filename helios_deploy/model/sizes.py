"""Video sizes: one set of artifacts may serve several (``export --sizes 384x640,640x384``). The manifest
records them (``video.sizes``, the first is the default of every request); artifacts from before that record
the one ``video.height`` x ``video.width``."""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from ..errors import UserError

Size = tuple[int, int]  # (height, width) of the video in pixels


def size_name(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


def sizes_or_one(height: int, width: int, sizes: Sequence[Size] | None = None) -> tuple[Size, ...]:
    """``sizes`` as a tuple of (height, width), or the one ``height`` x ``width`` when none are given."""
    return tuple((int(h), int(w)) for h, w in sizes) if sizes else ((height, width),)


def parse_sizes(text: str) -> tuple[Size, ...]:
    """``"384x640,640x384"`` -> ((384, 640), (640, 384)): HEIGHTxWIDTH, comma-separated, no repeats."""
    sizes = []
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(\d+)x(\d+)", part)
        if not m:
            raise UserError(f"bad video size {part!r}", expected="HEIGHTxWIDTH, comma-separated, e.g. 384x640,640x384",
                            fix="pass --sizes 384x640,640x384")
        sizes.append((int(m.group(1)), int(m.group(2))))
    if len(set(sizes)) != len(sizes):
        raise UserError(f"video size listed twice in {text!r}", fix="list each size once")
    return tuple(sizes)


def check_size_exported(height: int, width: int, sizes: Sequence[Size]) -> Size:
    """The requested size if it is one of ``sizes`` (what the artifacts were exported for), else one UserError."""
    if (height, width) not in [tuple(s) for s in sizes]:
        names = ", ".join(size_name(s) for s in sizes)
        raise UserError(f"video size {height}x{width} was not exported", found=f"{height}x{width}",
                        expected=f"one of the exported sizes: {names}",
                        fix=f"ask for one of {names}, or re-export with --sizes including {height}x{width}")
    return height, width


def largest(sizes: Sequence[Size]) -> Size:
    """Height and width the symbol ranges must reach: the largest of each over the sizes."""
    return max(h for h, _ in sizes), max(w for _, w in sizes)


def point_size(point_name: str, sizes: Sequence[Size]) -> Size:
    """The video size an operating point belongs to (the only one when its name has no ``@HxW``)."""
    _, _, name = point_name.partition("@")
    return tuple(int(v) for v in name.split("x")) if name else tuple(sizes[0])


def video_sizes(manifest: Mapping) -> tuple[Size, ...]:
    """The sizes artifacts were exported for, the default first."""
    video = manifest["video"]
    return tuple(tuple(s) for s in video.get("sizes") or [[video["height"], video["width"]]])
