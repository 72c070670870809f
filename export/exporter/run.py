"""`export` as a library call: checkpoint -> audited ONNX artifacts + manifest."""

from __future__ import annotations

import json
import platform
import resource
import shutil
import time
from pathlib import Path
from typing import Iterable

from ... import __version__
from ...artifacts import FORMAT, Artifacts, write_manifest
from ...checkpoint import Checkpoint
from ...errors import UserError
from ...fsutil import sha256_file, staged_dir
from ...specs import COMPONENTS, build_specs, spec_to_json
from ..parity.audit import audit
from .modules import build_module
from .graph import export_graph
from ..transforms.vae_chunk import export_chunk_decoder
from .vae_steps import cache_layout

DEFAULT_OPSET = 20


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def vae_layouts(ckpt: Checkpoint, components: Iterable[str]) -> dict:
    if not any(c.startswith("vae") for c in components):
        return {}
    vae = build_module(ckpt, "vae_decoder", load_weights=False).to("meta")
    return {d: [list(e) for e in cache_layout(vae, d)] for d in ("decode", "encode")}


def _weights_bytes(ckpt: Checkpoint, components: Iterable[str]) -> int:
    """Bytes of checkpoint weights behind the exported components (the VAE's counted once)."""
    return sum(p.stat().st_size for p in {p for c in components for p in ckpt.index_for(c).files})


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, height: int = 384, width: int = 640,
                      components: Iterable[str] = COMPONENTS, opset: int = DEFAULT_OPSET,
                      text_length: int = 512, max_text_length: int = 512, force: bool = False,
                      run_audit: bool = True, log=print) -> dict:
    """Export ``components`` of a checkpoint to ``out``; returns the manifest.

    Everything is written to a temporary folder beside ``out`` and moved into place only when the
    export and its audit have succeeded.
    """
    t0 = time.perf_counter()
    components = tuple(components)
    ckpt = Checkpoint(checkpoint)
    if opset < 18:
        raise UserError(f"opset {opset} is too old", expected="18 or newer (the dynamo exporter's range is 18-23)",
                        fix="pass --opset 20")
    layouts = vae_layouts(ckpt, components)
    specs = build_specs(ckpt.configs, height, width, text_length, max_text_length, components, layouts)
    manifest = {
        "format": FORMAT, "helios_deploy_version": __version__,
        "checkpoint": {"path": str(ckpt.path.resolve()), "identity": ckpt.identity,
                       "model_index": ckpt.model_index, "is_distilled": ckpt.is_distilled},
        "video": {"height": height, "width": width}, "opset": opset, "precision": "fp32",
        "text_length": text_length, "max_text_length": max_text_length,
        "scheduler_config": ckpt.configs["scheduler"], "components": {},
        "host": {"python": platform.python_version(), "machine": platform.machine()},
    }
    with staged_dir(Path(out), force=force) as tmp:
        for name, spec in specs.items():
            graphs = {}
            for g in spec.graphs:
                log(f"exporting {name}/{g.file} ...")
                if name == "vae_decoder":  # one chunk graph, composed from the first and step graphs
                    info = export_chunk_decoder(ckpt, g, tmp / name, opset, layouts["decode"], height, width)
                else:
                    info = export_graph(ckpt, name, g, tmp / name, opset)
                info["file_sha256"] = sha256_file(tmp / name / info["file"])
                info["data_sha256"] = sha256_file(tmp / name / info["data"])
                graphs[g.name] = info
            manifest["components"][name] = {"spec": spec_to_json(spec), "precision": "fp32", "graphs": graphs}
        manifest["export_peak_rss_bytes"] = peak_rss_bytes()
        manifest["weights_bytes"] = _weights_bytes(ckpt, components)
        shutil.copytree(ckpt.path / "tokenizer", tmp / "tokenizer")
        (tmp / "scheduler_config.json").write_text(json.dumps(ckpt.configs["scheduler"], indent=2) + "\n")
        manifest["timings"] = {"export_seconds": round(time.perf_counter() - t0, 2)}
        if run_audit:
            log("auditing (onnx.checker, ONNX Runtime session, parity against the reference) ...")
            t1 = time.perf_counter()
            results = audit(tmp, specs, lambda c: build_module(ckpt, c))
            manifest["audit"] = {c: {"passed": r["passed"], "cases": r["cases"]} for c, r in results.items()}
            manifest["timings"]["audit_seconds"] = round(time.perf_counter() - t1, 2)
        write_manifest(tmp, manifest)
    return manifest
