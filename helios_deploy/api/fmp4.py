"""H.264 in fragmented MP4, one self-contained piece per chunk, through PyAV (its wheels ship FFmpeg with
libx264; nothing is downloaded at run time).

Each chunk becomes init segment (ftyp + moov) + its fragment (moof + mdat), starting with a keyframe, so it
decodes on its own (a Python client opens each message as an mp4) and a browser appends every message to
one MediaSource SourceBuffer in ``"sequence"`` mode, which plays the chunks one after the other. A fragmented
MP4 muxer holds its last frame until the next one arrives (it needs the frame's duration); closing one
muxer per chunk is what sends the chunk whole as soon as it is decoded, without waiting for the next.

    enc = ChunkEncoder(fps=24, crf=23)
    data = enc.encode(frames)          # bytes: uint8 [T, H, W, 3] -> a playable fMP4 piece
    enc.mime                           # 'video/mp4; codecs="avc1.42c00d"' once a chunk was encoded

The API host encodes every live stream's chunks (about 0.2 s of CPU per 384x640 chunk): EncodeMeter runs the
encodes on its own threads (one core each: x264 with one thread, so a chunk's wall time is its CPU time),
measures the seconds per chunk as they run, and admits a new stream only while all the streams' encodes fit
in a chunk period on those threads (else 429 encode_over_capacity).
"""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import numpy as np

from ..errors import UserError

MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"


class ChunkEncoder:
    def __init__(self, fps: float = 24.0, crf: int = 23, preset: str = "ultrafast", threads: int = 1):
        if not 0 <= crf <= 51:
            raise UserError(f"H.264 quality crf {crf} is out of range", expected="0 (best) to 51")
        self.fps, self.crf, self.preset, self.threads = fps, crf, preset, threads
        self.codecs: str | None = None  # the RFC 6381 codecs string, from the first chunk's SPS

    @property
    def mime(self) -> str:
        return f'video/mp4; codecs="{self.codecs or "avc1.42e01e"}"'

    def encode(self, frames: np.ndarray) -> bytes:
        """uint8 [T, H, W, 3] (H, W even) -> ftyp + moov + moof + mdat."""
        import av

        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or len(frames) == 0:
            raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
        buf = io.BytesIO()
        with av.open(buf, mode="w", format="mp4", options={"movflags": MOVFLAGS}) as out:
            stream = out.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1001),
                                    options={"preset": self.preset, "tune": "zerolatency", "crf": str(self.crf),
                                             "threads": str(self.threads)})
            stream.height, stream.width = frames.shape[1:3]
            stream.pix_fmt = "yuv420p"
            for f in frames:
                out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
            out.mux(stream.encode(None))
            if self.codecs is None:
                self.codecs = avc_codecs(stream.codec_context.extradata)
        return buf.getvalue()


class EncodeMeter:
    """The API host's H.264 encode capacity: ``workers`` encoder threads; seconds per chunk measured (a warm-up
    chunk at the first admission, then a moving average of the real encodes, per pixel-frame so one figure
    serves every size) unless ``seconds_per_chunk`` fixes it (at ``size``). ``headroom``: the share of the
    workers' time the streams may take."""

    def __init__(self, workers: int | None = None, seconds_per_chunk: float | None = None,
                 size: tuple[int, int] | None = None, headroom: float = 0.8):
        self.workers = workers or max(1, len(os.sched_getaffinity(0)))
        self.headroom = headroom
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="helios-encode")
        self._fixed = seconds_per_chunk is not None
        self._per_pixel = None if seconds_per_chunk is None else seconds_per_chunk / _pixels(size or (64, 128))
        self._active: dict[object, int] = {}  # reservation token -> pixel-frames of one of its chunks
        self._lock = threading.Lock()

    def seconds(self, size: tuple[int, int]) -> float | None:
        return None if self._per_pixel is None else self._per_pixel * _pixels(size)

    def metrics(self, fps: float) -> dict:
        period = 33 / fps
        with self._lock:
            busy = sum(self._active.values()) * (self._per_pixel or 0.0)
        return {"encode_workers": self.workers, "encode_load": busy / (self.workers * period),
                "encode_seconds_per_pixel_frame": self._per_pixel or 0.0}  # _pixels() counts pixel-frames

    def admit(self, token, size: tuple[int, int], fps: float) -> None:
        """Count one stream of ``size`` (height, width); StreamError over_capacity if its encodes would not keep
        up. Blocking (the first call measures): call it off the event loop."""
        if self._per_pixel is None:
            self._measure(size, fps)
        need, period = _pixels(size), 33 / fps
        with self._lock:
            busy = (sum(self._active.values()) + need) * self._per_pixel
            if self._active and busy > self.workers * period * self.headroom:
                from ..runtime.live import StreamError

                raise StreamError("over_capacity", "over capacity: this API host cannot H.264-encode another "
                                  "live stream in real time", found=f"{len(self._active)} streams take "
                                  f"{busy - need * self._per_pixel:.2f} s of encoding per {period:.3f} s chunk on "
                                  f"{self.workers} encoder thread(s)", fix="retry later, or add an API replica / CPUs")
            self._active[token] = need

    def release(self, token) -> None:
        with self._lock:
            self._active.pop(token, None)

    def rename(self, token, new) -> None:
        with self._lock:
            if token in self._active:
                self._active[new] = self._active.pop(token)

    def _measure(self, size: tuple[int, int], fps: float) -> None:
        frames = np.random.default_rng(0).integers(0, 256, (33, *size, 3), dtype=np.uint8)  # worst case: noise
        encoder = ChunkEncoder(fps=fps)
        encoder.encode(frames[:2])  # loads the codec
        t = time.perf_counter()
        encoder.encode(frames)
        with self._lock:
            if self._per_pixel is None:
                self._per_pixel = (time.perf_counter() - t) / _pixels(size)

    def timed(self, encoder: ChunkEncoder, frames: np.ndarray) -> bytes:
        t = time.perf_counter()
        data = encoder.encode(frames)
        per_pixel = (time.perf_counter() - t) / (_pixels(frames.shape[1:3]) * len(frames) / 33)
        with self._lock:
            if not self._fixed:
                self._per_pixel = per_pixel if self._per_pixel is None else 0.8 * self._per_pixel + 0.2 * per_pixel
        return data

    async def encode(self, encoder: ChunkEncoder, frames: np.ndarray) -> bytes:
        """One chunk on the encoder threads (off the event loop), timed."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.timed, encoder, frames)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _pixels(size) -> int:
    """Pixel-frames of one 33-frame chunk of ``size`` (height, width)."""
    return 33 * int(size[0]) * int(size[1])


def avc_codecs(extradata: bytes | None) -> str | None:
    """'avc1.PPCCLL' from the SPS in the encoder's extradata (Annex B start codes or avcC)."""
    if not extradata:
        return None
    if extradata[0] == 1 and len(extradata) > 4:  # avcC: version, profile, compatibility, level
        sps = extradata[1:4]
    else:
        start = extradata.find(b"\x00\x00\x01")
        if start < 0 or len(extradata) < start + 7:
            return None
        sps = extradata[start + 4:start + 7]  # after the start code and the NAL header
    return "avc1." + sps.hex()


def decode(data: bytes) -> np.ndarray:
    """All frames of an mp4 piece as uint8 [T, H, W, 3] (clients and tests)."""
    import av

    with av.open(io.BytesIO(data), mode="r") as src:
        return np.stack([f.to_ndarray(format="rgb24") for f in src.decode(video=0)])
