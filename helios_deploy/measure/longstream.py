"""Long streams stay flat: memory and time per chunk over N chunks, through the Python API (the runtime in
this process) and through Triton (the local tritonserver of .venv-triton; the memory is that of the
server and its Python backend stub, where the runtime runs).

    helios-deploy long-stream ARTIFACTS --chunks 100 --via api,triton --json long.json

Each path first streams one chunk (sessions, prompt cache, connection), then N chunks in one request;
after every chunk it records the resident set size (RSS, /proc/<pid>/statm) and the chunk's arrival time.
Reported per path: RSS after chunk `early` (10) and after the last chunk and their difference in % (target:
within 5%); time per chunk as the median of chunks 2..`early` and of the last `early` chunks, their ratio,
and the least-squares slope over chunks 2..N (ms per chunk, per chunk). Chunk 1 (first-chunk latency)
is reported on its own. Numbers only: the targets are judged by whoever reads them, not asserted here.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..errors import UserError
from .procfs import live_processes, stat_fields

PROMPT = "A drone shot following a river through a forest, seen from above, golden hour."


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of one process now (not its peak)."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU time of one process so far (all its threads), from /proc/<pid>/stat."""
    fields = stat_fields(pid)  # fields[11], [12]: utime, stime in clock ticks
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def usage(pids) -> tuple[int, float]:
    """(RSS bytes, CPU seconds) summed over processes (one that has exited counts 0)."""
    rss, cpu = 0, 0.0
    for pid in pids:
        try:
            rss, cpu = rss + rss_bytes(pid), cpu + cpu_seconds(pid)
        except (OSError, ValueError):
            pass
    return rss, cpu


def process_tree(root: int) -> list[int]:
    """``root`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for pid, fields in live_processes():
        children.setdefault(int(fields[1]), []).append(pid)
    tree, todo = [root], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        tree += kids
        todo += kids
    return tree


@dataclass
class Trace:
    arrivals: list[float] = field(default_factory=list)  # seconds from the request to each chunk
    rss: dict[str, list[int]] = field(default_factory=dict)  # bytes per process, right after each chunk
    cpu: dict[str, list[float]] = field(default_factory=dict)  # CPU seconds per process so far, idem


def trace_stream(chunks: Iterable, probe: Callable[[], dict[str, tuple[int, float]]]) -> Trace:
    """Consume a stream of chunks, recording arrival time and (RSS, CPU time) of the processes ``probe``
    names after each; frames are dropped at once."""
    tr = Trace()
    for name, (rss, cpu) in probe().items():  # before the request: CPU time is counted from here
        tr.cpu[name] = [cpu]
    t0 = time.perf_counter()
    for chunk in chunks:
        tr.arrivals.append(time.perf_counter() - t0)
        del chunk
        for name, (rss, cpu) in probe().items():
            tr.rss.setdefault(name, []).append(rss)
            tr.cpu.setdefault(name, []).append(cpu)
    return tr


def _steps(values: list[float]) -> list[float]:
    return [b - a for a, b in zip(values, values[1:])]


def _timing(per_chunk: list[float], early: int) -> dict:
    """Chunk 1 alone; the median of chunks 2..early and of the last ``early``; the slope over 2..N."""
    head, tail = statistics.median(per_chunk[1:early]), statistics.median(per_chunk[-early:])
    slope = float(np.polyfit(np.arange(1, len(per_chunk)), per_chunk[1:], 1)[0])
    return {"first_s": per_chunk[0], "median_early_s": head, "median_last_s": tail,
            "ratio_last_to_early": tail / head if head else float("nan"), "slope_ms_per_chunk": 1e3 * slope,
            "per_chunk_s": per_chunk}


def summarize(tr: Trace, early: int = 10) -> dict:
    n = len(tr.arrivals)
    if n < 3:
        raise UserError(f"a long stream needs at least 3 chunks, got {n}", fix="pass --chunks 100")
    early = max(2, min(early, n // 2))
    memory = {name: {"rss_mb_after_early": v[early - 1] / 2**20, "rss_mb_after_last": v[-1] / 2**20,
                     "rss_growth_pct": 100.0 * (v[-1] - v[early - 1]) / v[early - 1],
                     "rss_growth_kb_per_chunk": (v[-1] - v[early - 1]) / (n - early) / 1024,
                     "rss_mb_per_chunk": [x / 2**20 for x in v]} for name, v in tr.rss.items()}
    cpu = {name: _timing(_steps(v), early) for name, v in tr.cpu.items()}
    wall = _timing(_steps([0.0, *tr.arrivals]), early)
    return {"chunks": n, "early": early, "memory": memory, "wall": wall, "cpu": cpu}


def api_stream(artifacts, chunks: int, prompt: str = PROMPT, seed: int = 0, steps=(1, 1, 1), early: int = 10) -> dict:
    """``chunks`` chunks in one stream of the in-process runtime; RSS of this process."""
    from ..runtime import Pipeline

    pipe = Pipeline.from_artifacts(artifacts)
    list(pipe.stream(prompt, num_frames=33, seed=seed, pyramid_steps=steps))  # warm-up
    tr = trace_stream(pipe.stream(prompt, num_frames=33 * chunks, seed=seed, pyramid_steps=steps),
                      lambda: {"runtime (this process)": usage(["self"])})
    return {"via": "api", **summarize(tr, early)}


def served_usage(server_pid: int) -> dict[str, tuple[int, float]]:
    """(RSS, CPU seconds) of tritonserver, of its Python backend stubs (where the runtime runs) and of
    this client."""
    return {"tritonserver": usage([server_pid]), "backend stub (runtime)": usage(process_tree(server_pid)[1:]),
            "client (this process)": usage(["self"])}


def triton_stream(artifacts, chunks: int, prompt: str = PROMPT, seed: int = 0, steps=(1, 1, 1), early: int = 10,
                  env=None) -> dict:
    """The same through a local tritonserver (a repository written from ``artifacts`` into a temporary
    folder); RSS of the server, of its backend stub and of this client."""
    from ..serving.client import HeliosClient
    from ..serving.repository import RepoOptions, write_repository
    from ..serving.server import LocalServer, find_env

    env = env or find_env()
    with tempfile.TemporaryDirectory(prefix="helios-long-stream-") as tmp:
        repo = Path(tmp) / "repo"
        # the artifacts referenced, not copied: nothing to copy, and no hard links to them left behind
        write_repository(artifacts, repo, RepoOptions(max_frames=33 * chunks, reference=True), log=lambda m: None)
        with LocalServer(env, repo, Path(tmp) / "tritonserver.log") as server, \
                HeliosClient(server.grpc_url, timeout=600) as client:
            list(client.stream(prompt, num_frames=33, seed=seed, pyramid_steps=steps))  # warm-up
            tr = trace_stream(client.stream(prompt, num_frames=33 * chunks, seed=seed, pyramid_steps=steps),
                              lambda: served_usage(server.proc.pid))
    return {"via": "triton", **summarize(tr, early)}


def drift_audit(checkpoint, artifacts, chunks: int = 12, precision: str = "fp8", prompt: str | None = None,
                seed: int = 0) -> dict:
    """The quantized runtime over one ``chunks``-chunk stream against diffusers' fp32 pipeline on ``checkpoint``:
    PSNR per chunk, its slope and last - first (targets: export.parity.pipeline's PSNR_THRESHOLD and DRIFT_DB), and
    per chunk whether each video still shows the prompt's colour and motion (helios_deploy.measure.adherence;
    meaningful on the trained tiny checkpoint, whose prompts name a colour and a direction)."""
    from ..export.parity.pipeline import (CHUNK_FRAMES, DRIFT_DB, PSNR_THRESHOLD, PipelineCase, _runtime_kwargs,
                                          compare_psnr, conditioning_inputs, reference_pipeline, reference_video)
    from ..runtime import Pipeline
    from .adherence import adherence_of, default_prompts

    pipe = Pipeline.from_artifacts(artifacts, precision=precision)
    prompt = prompt or default_prompts(1)[0]
    case = PipelineCase("long", frames=chunks * CHUNK_FRAMES)
    ref = reference_pipeline(checkpoint, pipe.variant.name)
    expected = reference_video(ref, case, pipe.variant.name, pipe.height, pipe.width, pipe.text_length, seed,
                               prompts=[prompt] * chunks)
    inputs = conditioning_inputs(pipe.height, pipe.width, seed)  # the same settings as the reference's call
    got = pipe.generate(prompt, num_frames=case.frames, seed=seed, output="float",
                        **_runtime_kwargs(case, inputs, pipe.variant.name))
    r = compare_psnr(case, expected, got)
    per_chunk = [{"chunk": k // CHUNK_FRAMES + 1, "reference": adherence_of(expected[k:k + CHUNK_FRAMES], prompt)["match"],
                  precision: adherence_of(got[k:k + CHUNK_FRAMES], prompt)["match"]}
                 for k in range(0, expected.shape[0], CHUNK_FRAMES)]
    return {"precision": precision, "prompt": prompt, "chunks": len(r["psnr_db"]), "psnr_db": r["psnr_db"],
            "slope_db_per_chunk": r["slope_db_per_chunk"], "drift_db": r["drift_db"], "threshold_psnr_db": PSNR_THRESHOLD,
            "max_drift_db": DRIFT_DB, "psnr_passed": r["passed"], "adherence_per_chunk": per_chunk,
            "adherence_kept": all(c[precision] for c in per_chunk if c["reference"])}


def format_drift(r: dict) -> str:
    kept = sum(c[r["precision"]] for c in r["adherence_per_chunk"])
    ref = sum(c["reference"] for c in r["adherence_per_chunk"])
    return (f"{r['precision']} drift over {r['chunks']} chunks of {r['prompt']!r}: PSNR per chunk "
            f"{', '.join(f'{v:.2f}' for v in r['psnr_db'])} dB (>= {r['threshold_psnr_db']}), slope "
            f"{r['slope_db_per_chunk']:+.3f} dB/chunk, last - first {r['drift_db']:+.2f} dB (>= -{r['max_drift_db']}); "
            f"adherence: {kept} of {r['chunks']} chunks show the prompt (reference {ref})")


def format_summary(r: dict) -> str:
    lines = [f"{r['via']}: {r['chunks']} chunks"]
    for name, m in r["memory"].items():
        lines.append(f"  RSS {name}: after chunk {r['early']} {m['rss_mb_after_early']:.1f} MB, after chunk "
                     f"{r['chunks']} {m['rss_mb_after_last']:.1f} MB ({m['rss_growth_pct']:+.2f}%, "
                     f"{m['rss_growth_kb_per_chunk']:+.0f} KB per chunk)")
    busy = [(f"CPU time {k}", v) for k, v in r["cpu"].items() if max(v["median_early_s"], v["median_last_s"]) >= 0.02]
    for name, t in [("wall time", r["wall"]), *busy]:  # CPU time only of the processes doing the work
        lines.append(f"  {name} per chunk: first {t['first_s'] * 1e3:.0f} ms; median of chunks 2-{r['early']} "
                     f"{t['median_early_s'] * 1e3:.1f} ms, of the last {r['early']} {t['median_last_s'] * 1e3:.1f} ms "
                     f"(ratio {t['ratio_last_to_early']:.3f}); slope {t['slope_ms_per_chunk']:+.3f} ms per chunk")
    return "\n".join(lines)
