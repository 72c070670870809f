"""A stream's state between chunks, as an object: what one request needs to make its next chunk (history
latents, the random generator, the prompt schedule, the chunk index, its settings and size). The runtime
holds any number of them and runs their chunks in any order (runtime/live.py); each stream gets the frames
it would get alone, because nothing a chunk reads or draws belongs to another stream.

A state between two chunks can be written out and read back (failover, drain: docs/cluster.md):

    data = state.snapshot({"id": "..."})      # bytes: safetensors tensors + JSON metadata, never pickle
    meta = snapshot_meta(data)                # the JSON part (checked), without reading the tensors
    state = StreamState.restore(data, device) # the same state: the next chunk is made exactly as it would be

The snapshot holds everything the next chunk depends on: the history latents and first-frame prefix (float32,
bit for bit), the noise generator's state, the prompt schedule and the prompt in force, the next chunk index,
the sampler settings, size, frame count and output kind. Prompt embeddings are not in it: they are a pure
function of the prompt text and are encoded again where the stream resumes. The VAE decoder keeps no state
between chunks (each chunk's latents are decoded alone), so there is no decoder cache to carry."""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import UserError
from .guidance import Guidance
from .sampler import ChunkState
from .settings import Sampling

CHUNK_FRAMES = 33
SNAPSHOT_FORMAT = "helios-stream-state/1"
MAX_SNAPSHOT_BYTES = 1 << 30  # a header or tensor beyond this is not a stream state


@dataclass
class StreamState:
    schedule: dict[int, str]  # chunk index -> the prompt from that chunk on
    sampling: Sampling
    size: tuple[int, int]  # (height, width), one of the exported sizes
    num_frames: int
    output: str  # uint8 | float
    generator: torch.Generator  # the stream's own draws, in the reference's order
    chunk_state: ChunkState  # history latents and the first-frame prefix
    indices: dict[str, torch.Tensor]  # the transformer's frame indices
    next_index: int = 0  # the chunk to make next
    prompt_now: str = field(default="", init=False)

    @property
    def num_chunks(self) -> int:
        return max(1, (self.num_frames + CHUNK_FRAMES - 1) // CHUNK_FRAMES)

    @property
    def total_frames(self) -> int:
        """Frames the reference outputs for num_chunks chunks (4k + 1: the last chunk is trimmed)."""
        return ((self.num_chunks * CHUNK_FRAMES) - 1) // 4 * 4 + 1

    @property
    def done(self) -> bool:
        return self.next_index >= self.num_chunks

    def set_prompt(self, prompt: str, from_chunk: int) -> None:
        """The prompt from chunk ``from_chunk`` on (a later schedule entry is replaced by it), as the official
        interactive mode switches at a chunk boundary."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError("empty prompt", expected="a non-empty text prompt")
        if not isinstance(from_chunk, int) or from_chunk < 0:
            raise UserError(f"prompt change from chunk {from_chunk!r}", expected="a chunk index >= 0")
        self.schedule = {k: p for k, p in self.schedule.items() if k < from_chunk}
        self.schedule[from_chunk] = prompt

    # -- failover state --------------------------------------------------------------------------
    def snapshot(self, extra: dict | None = None) -> bytes:
        """This state as bytes (safetensors: tensors + a JSON ``__metadata__`` entry "helios"). ``extra``:
        JSON-able fields kept beside it (the scheduler's stream id, model identity, ...); read them back
        with snapshot_meta. Take it between chunks only (not while a chunk job of this state runs)."""
        s = self.sampling
        meta = {"format": SNAPSHOT_FORMAT, "schedule": {str(k): p for k, p in sorted(self.schedule.items())},
                "prompt_now": self.prompt_now, "next_index": self.next_index, "num_frames": self.num_frames,
                "size": list(self.size), "output": self.output, "generator_device": self.generator.device.type,
                "sampling": {"steps": list(s.steps), "sampler": s.sampler, "guidance_scale": s.guidance_scale,
                             "negative_prompt": s.negative_prompt, "amplify_first_chunk": s.amplify_first_chunk,
                             "guidance": None if s.guidance is None else asdict(s.guidance)},
                "extra": dict(extra or {})}
        tensors = {"history": self.chunk_state.history.detach().to("cpu").contiguous(),
                   "generator": self.generator.get_state().contiguous()}
        if self.chunk_state.image_latents is not None:
            tensors["image_latents"] = self.chunk_state.image_latents.detach().to("cpu").contiguous()
        for name, t in self.indices.items():
            tensors[f"indices.{name}"] = t.detach().to("cpu").contiguous()
        return st_save(tensors, metadata={"helios": json.dumps(meta)})

    @classmethod
    def restore(cls, data: bytes, device: str | torch.device = "cpu") -> "StreamState":
        """The state a snapshot holds, its tensors on ``device`` (the generator on a generator of the device
        type it was saved from: noise drawn on a CPU and on a GPU differ, so the two must match). A
        UserError for bytes that are not a stream state."""
        meta = snapshot_meta(data)
        device = torch.device(device)
        if device.type != meta["generator_device"]:
            raise UserError(f"stream state was made on a {meta['generator_device']} generator; this runtime draws "
                            f"noise on {device.type}", fix="resume it on a node of the same device type")
        try:
            tensors = st_load(bytes(data))
            g = meta["sampling"]
            sampling = Sampling(tuple(int(x) for x in g["steps"]), str(g["sampler"]), float(g["guidance_scale"]),
                                g["negative_prompt"], bool(g["amplify_first_chunk"]),
                                None if g["guidance"] is None else Guidance(**g["guidance"]))
            generator = torch.Generator(device)
            generator.set_state(tensors["generator"])
            image = tensors.get("image_latents")
            chunk_state = ChunkState(tensors["history"].to(device),
                                     None if image is None else image.to(device))
            indices = {k[len("indices."):]: v.to(device) for k, v in tensors.items() if k.startswith("indices.")}
            state = cls({int(k): p for k, p in meta["schedule"].items()}, sampling, tuple(meta["size"]),
                        int(meta["num_frames"]), meta["output"], generator, chunk_state, indices,
                        int(meta["next_index"]))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UserError("stream state is damaged", found=f"{type(e).__name__}: {e}",
                            fix="resume from the state the last chunk response carried") from None
        state.prompt_now = str(meta["prompt_now"])
        return state


def snapshot_meta(data: bytes) -> dict:
    """The JSON metadata of a snapshot (format, schedule, next_index, ..., ``extra``), read from the
    safetensors header only; a UserError for anything else."""
    bad = UserError("not a stream state", expected=f"the bytes of StreamState.snapshot ({SNAPSHOT_FORMAT})",
                    fix="resume from the state the last chunk response carried")
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < 8:
        raise bad
    data = bytes(data)
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(len(data) - 8, MAX_SNAPSHOT_BYTES):
        raise bad
    try:
        meta = json.loads(json.loads(data[8:8 + n])["__metadata__"]["helios"])
    except (ValueError, KeyError, TypeError):
        raise bad from None
    if not isinstance(meta, dict) or meta.get("format") != SNAPSHOT_FORMAT:
        raise bad
    return meta
