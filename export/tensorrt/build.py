"""`build`: TensorRT engines for every exported graph, one optimization profile per operating point,
keyed by everything they depend on; `--dry-run` prints the plan without a GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ...artifacts import Artifacts, write_manifest
from ...model.sizes import point_size, size_name, video_sizes
from .builder import build_engine
from .engines import (BuildSettings, engine_file_problem, engine_filename, engine_record, key_digest, key_fields,
                      profiles, source_entry)
from .probe import probe_tensorrt, require_gpu_tensorrt


def _graph_file(arts: Artifacts, component: str, graph, precision: str) -> tuple[Path, Path, dict]:
    """The ONNX file this precision builds from, its external data, and the manifest's hashes for them."""
    info = source_entry(arts.manifest, component, graph.name, precision)
    if precision != "fp32":
        arts.verify_record(component, info)
    return arts.root / component / info["file"], arts.root / component / info["data"], info


def plan(artifacts, components: Iterable[str] | None = None, settings: BuildSettings = BuildSettings(),
         max_batch: int | None = None, platform: dict | None = None) -> dict:
    """Everything the build would do, per component and graph: profiles (min/opt/max per input per
    profile), precision, settings, engine file and cache key. Verifies the ONNX files against the
    manifest's hashes first (a graph modified after export is refused)."""
    arts = Artifacts.open(artifacts)
    platform = platform if platform is not None else probe_tensorrt()
    out = {"artifacts": str(arts.root), "tensorrt": platform.get("tensorrt"), "gpu": platform.get("gpu"),
           "compute_capability": platform.get("compute_capability"), "settings": settings.key(),
           "memory_budget": settings.memory_budget, "timing_cache": settings.timing_cache, "components": {}}
    for component in components or arts.components:
        arts.require(component)
        arts.verify_files(component)
        spec = arts.spec(component)
        graphs = {}
        for graph in spec.graphs:
            onnx_path, data_path, info = _graph_file(arts, component, graph, settings.precision)
            profs = profiles(graph, max_batch)
            fields = key_fields(info["file_sha256"], info["data_sha256"], profs, settings, platform.get("tensorrt"),
                                platform.get("gpu"), platform.get("compute_capability"))
            digest = key_digest(fields)
            graphs[graph.name] = {
                "onnx": str(onnx_path.relative_to(arts.root)), "precision": settings.precision,
                "profiles": [{"operating_point": p.name, "inputs": {n: {"min": s[0], "opt": s[1], "max": s[2]}
                                                                     for n, s in prof.items()}}
                             for p, prof in zip(graph.operating_points, profs)],
                "engine": engine_filename(graph.file, digest), "key": digest, "key_fields": fields,
                **profile_cost(graph, video_sizes(arts.manifest), info.get("data_bytes")),
            }
        out["components"][component] = graphs
    out["sizes"] = [size_name(s) for s in video_sizes(arts.manifest)]
    out["profiles"] = sum(len(g["profiles"]) for c in out["components"].values() for g in c.values())
    out["split_advice"] = SPLIT_ADVICE
    return out


SPLIT_ADVICE = (
    "One engine per graph holds every size's profiles: the weights are stored once and one shared activation "
    "buffer (sized by the largest profile) serves them all, so a GPU that serves every size needs one engine. "
    "Split into one engine per size (export each size to its own artifacts) when different GPUs serve different "
    "sizes (each then holds only its size's profiles and an activation buffer sized for its own largest point), "
    "when the build time, which grows about linearly with the profile count, is more than you accept, or when a "
    "size is added often (adding one rebuilds every profile of the shared engine). Never load two per-size engines "
    "of the same graph on one GPU: that stores its weights twice.")


def profile_cost(graph, sizes, weights_bytes: int | None) -> dict:
    """Profiles per size and what they cost, ESTIMATED from the profile count alone (nothing has been
    measured on a GPU): TensorRT times tactics for each profile, so the build takes about ``profiles`` times a
    one-profile build (an upper bound: the timing cache reuses layers of equal shape); the engine stores
    the weights once whatever the profile count, plus kernels per profile (not estimated); one engine per
    size would store the weights once per size."""
    per_size: dict[str, int] = {}
    for p in graph.operating_points:
        name = size_name(point_size(p.name, sizes)) if _sized(graph, p) else "any size"
        per_size[name] = per_size.get(name, 0) + 1
    n = len(graph.operating_points)
    return {"profiles_per_size": per_size, "estimate": {
        "basis": "estimate from the profile count only; no GPU measurement exists",
        "build_time_vs_one_profile": n,  # upper bound: the timing cache shares layers of equal shape
        "engine_weights_bytes": weights_bytes,
        "engine_weights_bytes_one_engine_per_size": None if weights_bytes is None or len(per_size) < 2
        else weights_bytes * len(per_size),
        "kernel_sets": n}}  # one set of tuned kernels per profile; their bytes are not estimated


def _sized(graph, point) -> bool:
    """Whether the point belongs to a video size (the text encoder's do not)."""
    return any(s in point.dims for s in ("latent_height", "stage_height"))


def build(artifacts, components: Iterable[str] | None = None, settings: BuildSettings = BuildSettings(),
          max_batch: int | None = None, rebuild: bool = False, log=print) -> dict:
    """Build every engine of the plan that is missing, stale or not the file the manifest recorded (all with
    ``rebuild``); record them in the manifest. An up-to-date engine only gets the new --memory-budget recorded
    (the budget is applied at load; only weight streaming on/off changes the engine). Needs TensorRT and an
    NVIDIA GPU: without them, one clear error."""
    platform = require_gpu_tensorrt()
    the_plan = plan(artifacts, components, settings, max_batch, platform)
    arts = Artifacts.open(artifacts)
    for component, graphs in the_plan["components"].items():
        spec = arts.spec(component)
        entries = arts.manifest["components"][component].setdefault("engines", {})
        for graph in spec.graphs:
            p = graphs[graph.name]
            path = arts.root / component / p["engine"]
            entry = entries.get(graph.name, {})
            if not rebuild and entry.get("digest") == p["key"]:
                problem = engine_file_problem(entry, path)
                if problem is None:
                    _keep(arts, entry, settings.memory_budget, f"{component}/{graph.name}", p["engine"], log)
                    continue
                log(f"{component}/{graph.name}: {p['engine']} is not the file the build recorded ({problem})")
            log(f"{component}/{graph.name}: building {p['engine']} ({len(p['profiles'])} profiles) ...")
            report = build_engine(arts.root / p["onnx"], graph, path, settings, max_batch, log=log)
            entries[graph.name] = engine_record(p["engine"], p["key_fields"], report, settings.memory_budget)
            entries[graph.name]["lora"] = arts.manifest["components"][component].get("lora") or []  # adapters in its weights
            write_manifest(arts.root, arts.manifest)  # after each engine, so a later failure keeps the rest
    return the_plan


def _keep(arts: Artifacts, entry: dict, memory_budget: int | None, name: str, file: str, log) -> None:
    """An up-to-date engine: record the budget it is now to run with, if that changed."""
    if entry.get("memory_budget") == memory_budget:
        log(f"{name}: up to date ({file})")
        return
    log(f"{name}: up to date ({file}); memory budget {entry.get('memory_budget')} -> {memory_budget}")
    entry["memory_budget"] = memory_budget
    write_manifest(arts.root, arts.manifest)
