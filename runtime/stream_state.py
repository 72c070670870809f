"""A stream's state between chunks, as an object: what one request needs to make its next chunk (history
latents, the random generator, the prompt schedule, the chunk index, its settings and size). The runtime
holds any number of them and runs their chunks in any order (runtime/live.py); each stream gets the frames
it would get alone, because nothing a chunk reads or draws belongs to another stream."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UserError
from .sampler import ChunkState
from .settings import Sampling

CHUNK_FRAMES = 33


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
        self.schedule = {k: p for k, p in self.schedule.items() if k < from_chunk}
        self.schedule[from_chunk] = prompt
