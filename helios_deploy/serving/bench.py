"""Latency through Triton against the in-process runtime, for the same request, measured in one run.

For each repeat the same request runs in-process (Pipeline.stream) and through the server (gRPC stream),
alternating, after one warm-up of each; the numbers are medians over the repeats:
- first_chunk_s: request sent -> first chunk in hand (for Triton: received and decoded by the client)
- chunk_s[k]: arrival of chunk k minus arrival of chunk k-1 (k >= 1)
- total_s: request -> last chunk
The frames of every run are compared too: both paths run the same code, so they must be equal.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Iterator

import numpy as np


def _timed(chunks: Iterator) -> tuple[list[float], list[np.ndarray]]:
    t0 = time.perf_counter()
    times, frames = [], []
    for chunk in chunks:
        times.append(time.perf_counter() - t0)
        frames.append(chunk.frames)
    return times, frames


def _summary(runs: list[list[float]]) -> dict:
    n = min(len(r) for r in runs)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    return {"first_chunk_s": med([r[0] for r in runs]),
            "chunk_s": [med([r[k] - r[k - 1] for r in runs]) for k in range(1, n)],
            "total_s": med([r[n - 1] for r in runs]), "runs": len(runs)}


def _pct(triton: float, local: float) -> float:
    return 100.0 * (triton - local) / local


def compare_latency(pipe, client, prompt: str = "a red fox running through snow", repeats: int = 3,
                    log: Callable[[str], None] = lambda m: None, **request) -> dict:
    """Time ``request`` in-process on ``pipe`` and through ``client`` (a HeliosClient); see the docstring."""
    run_local = lambda: _timed(pipe.stream(prompt, **request))  # noqa: E731
    run_triton = lambda: _timed(client.stream(prompt, realtime=False, **request))  # noqa: E731 - as fast as in-process
    run_local(), run_triton()  # warm-up: sessions, prompt cache, server connection
    local, triton = [], []
    for _ in range(repeats):
        for runs, run in ((local, run_local), (triton, run_triton)):
            times, frames = run()
            runs.append((times, frames))
    reference = local[0][1]
    equal = all(len(f) == len(reference) and all(np.array_equal(a, b) for a, b in zip(f, reference))
                for _, f in local + triton)
    result = {"in_process": _summary([t for t, _ in local]), "triton": _summary([t for t, _ in triton]),
              "frames_equal": equal, "request": {"prompt": prompt, **request}}
    a, b = result["in_process"], result["triton"]
    result["overhead_pct"] = {
        "first_chunk": _pct(b["first_chunk_s"], a["first_chunk_s"]),
        "per_chunk": [_pct(t, l) for t, l in zip(b["chunk_s"], a["chunk_s"])],
        "total": _pct(b["total_s"], a["total_s"]),
    }
    log(format_latency(result))
    return result


def format_latency(r: dict) -> str:
    a, b, o = r["in_process"], r["triton"], r["overhead_pct"]
    lines = [f"latency, median of {a['runs']} runs ({r['request']}):",
             f"  first chunk: in-process {a['first_chunk_s'] * 1e3:.0f} ms, Triton {b['first_chunk_s'] * 1e3:.0f} ms "
             f"({o['first_chunk']:+.1f}%)"]
    for k, (x, y, p) in enumerate(zip(a["chunk_s"], b["chunk_s"], o["per_chunk"]), start=1):
        lines.append(f"  chunk {k}: in-process {x * 1e3:.0f} ms, Triton {y * 1e3:.0f} ms ({p:+.1f}%)")
    lines.append(f"  total: in-process {a['total_s'] * 1e3:.0f} ms, Triton {b['total_s'] * 1e3:.0f} ms ({o['total']:+.1f}%)"
                 f"; frames equal: {r['frames_equal']}")
    return "\n".join(lines)
