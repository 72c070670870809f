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
"""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np

from ..errors import UserError

MOVFLAGS = "frag_keyframe+empty_moov+default_base_moof"


class ChunkEncoder:
    def __init__(self, fps: float = 24.0, crf: int = 23, preset: str = "ultrafast"):
        if not 0 <= crf <= 51:
            raise UserError(f"H.264 quality crf {crf} is out of range", expected="0 (best) to 51")
        self.fps, self.crf, self.preset = fps, crf, preset
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
                                    options={"preset": self.preset, "tune": "zerolatency", "crf": str(self.crf)})
            stream.height, stream.width = frames.shape[1:3]
            stream.pix_fmt = "yuv420p"
            for f in frames:
                out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
            out.mux(stream.encode(None))
            if self.codecs is None:
                self.codecs = avc_codecs(stream.codec_context.extradata)
        return buf.getvalue()


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
