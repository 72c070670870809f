"""mp4 in and out through the ffmpeg binary shipped in the imageio-ffmpeg wheel (nothing is
downloaded at run time). Writing streams frames as chunks arrive, to a temporary file moved into place
when complete."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import UserError


def write_mp4(path: str | Path, chunks: Iterable[np.ndarray], fps: int = 24) -> int:
    """Write uint8 [T, H, W, 3] chunks to an H.264 mp4; returns the frame count."""
    import imageio_ffmpeg

    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise UserError(f"output must be an .mp4 file, got {path.name}", fix="pass -o video.mp4")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}.mp4")
    writer = None
    count = 0
    try:
        for frames in chunks:
            if writer is None:
                h, w = frames.shape[1:3]
                writer = imageio_ffmpeg.write_frames(str(tmp), (w, h), fps=fps, codec="libx264",
                                                     pix_fmt_out="yuv420p", macro_block_size=1, quality=8)
                writer.send(None)
            for f in frames:
                writer.send(np.ascontiguousarray(f))
                count += 1
        if writer is None:
            raise UserError(f"no frames to write to {path.name}", fix="generate at least one chunk (--frames 1 or more)")
        writer.close()
        writer = None
        os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        if tmp.exists():
            tmp.unlink()
    return count


def read_video(path: str | Path) -> np.ndarray:
    """All frames of a video file as uint8 [T, H, W, 3]."""
    import imageio_ffmpeg

    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        meta = next(reader)
        w, h = meta["size"]
        frames = [np.frombuffer(f, dtype=np.uint8).reshape(h, w, 3) for f in reader]
    except (OSError, RuntimeError, StopIteration) as e:
        raise UserError(f"cannot read video {path}", found=str(e).splitlines()[0] if str(e) else type(e).__name__,
                        expected="a video file ffmpeg can decode (e.g. mp4)") from None
    if not frames:
        raise UserError(f"video {path} has no frames")
    return np.stack(frames)
