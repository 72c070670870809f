"""Run the next chunks of several streams together: each stream's chunk job (Pipeline.chunk_job, a generator
of transformer feeds) is advanced one step at a time, and the feeds of equal shapes go to the transformer as
one call along the batch axis. With one stream this is exactly Pipeline.stream's loop."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .stream_state import StreamState


def _shape_key(feeds: dict[str, torch.Tensor]) -> tuple:
    return tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in sorted(feeds.items()))


def run_lockstep(pipe, jobs: Sequence[tuple[StreamState, Callable[[], bool]]], stopped: type[Exception]) -> list:
    """Make the next chunk of every (state, cancelled) job; returns (Chunk, None) or (None, error) per job. A
    job whose ``cancelled()`` turns true is dropped before its next step with ``stopped()`` as its error; a
    failing job (or transformer call) fails only the jobs it concerns."""
    gens = [pipe.chunk_job(state) for state, _ in jobs]
    results: list = [None] * len(jobs)
    feeds: dict[int, dict] = {}

    def advance(i: int, value) -> None:
        try:
            feeds[i] = gens[i].send(value)
        except StopIteration as done:
            results[i] = (done.value, None)
        except Exception as e:  # noqa: BLE001 - this stream fails, the others go on
            results[i] = (None, e)

    for i in range(len(jobs)):
        advance(i, None)
    while feeds:
        for i in [i for i in feeds if jobs[i][1]()]:
            gens[i].close()
            del feeds[i]
            results[i] = (None, stopped())
        pending, feeds = feeds, {}  # advance() fills the next round's
        groups: dict[tuple, list[int]] = {}
        for i, f in pending.items():
            groups.setdefault(_shape_key(f), []).append(i)
        for members in groups.values():
            try:
                outs = pipe.transformer_batched([pending[i] for i in members])
            except Exception as e:  # noqa: BLE001
                for i in members:
                    gens[i].close()
                    results[i] = (None, e)
                continue
            for i, out in zip(members, outs):
                advance(i, out)
    return results
