"""`export` as a library call: checkpoint -> audited ONNX artifacts + manifest."""

from __future__ import annotations

import json
import platform
import shutil
import time
from pathlib import Path
from typing import Iterable, Sequence

from ... import __version__
from ...artifacts import FORMAT, file_record, write_manifest
from ...checkpoints.checkpoint import Checkpoint
from ...errors import UserError
from ...fsutil import staged_dir
from ...measure.memory import measure_peak, process_peak_bytes, release_memory
from ...model.sizes import Size, sizes_or_one
from ...model.specs import COMPONENTS, build_specs, spec_to_json
from ..parity.audit import audit
from ..parity.reference import reference_module
from .modules import build_module
from .graph import export_graph
from ..transforms.vae_chunk import export_chunk_decoder
from .vae_steps import cache_layout
from .lora import Adapter, adapter_components, fused_reference, plan_fusion

DEFAULT_OPSET = 20


def vae_layouts(ckpt: Checkpoint, components: Iterable[str]) -> dict:
    if not any(c.startswith("vae") for c in components):
        return {}
    vae = build_module(ckpt, "vae_decoder", load_weights=False).to("meta")
    return {d: [list(e) for e in cache_layout(vae, d)] for d in ("decode", "encode")}


def _weights_bytes(ckpt: Checkpoint, components: Iterable[str]) -> int:
    """Bytes of checkpoint weights behind the exported components (the VAE's counted once)."""
    return sum(p.stat().st_size for p in {p for c in components for p in ckpt.index_for(c).files})


def _export_component(ckpt: Checkpoint, name: str, spec, folder: Path, opset: int, layouts: dict, sizes, log,
                      fusion=None) -> dict:
    """Export every graph of one component into ``folder``; returns its manifest entry, with the peak memory
    of this component's export against the bytes of its checkpoint weights."""
    graphs = {}
    release_memory()
    with measure_peak() as memory:
        for g in spec.graphs:
            log(f"exporting {name}/{g.file} ...")
            if name == "vae_decoder":  # one chunk graph, composed from the first and step graphs
                info = export_chunk_decoder(ckpt, g, folder, opset, layouts["decode"], sizes)
            else:
                info = export_graph(ckpt, name, g, folder, opset, fusion)
            graphs[g.name] = {**info, **file_record(folder, info["file"], info["data"])}
    weights = _weights_bytes(ckpt, [name])
    memory.update(weights_bytes=weights, ratio=round(memory["peak_rss_bytes"] / weights, 3) if weights else None)
    entry = {"spec": spec_to_json(spec), "precision": "fp32", "graphs": graphs, "export_memory": memory}
    if fusion is not None:  # the weights the adapters changed, and which adapters (engines record the same)
        entry["lora_targets"] = fusion.targets()
        entry["lora"] = [a.record() for a in fusion.adapters]
    return entry


def lora_fusions(ckpt: Checkpoint, components: Sequence[str], adapters: Sequence[Adapter]) -> dict:
    """component -> its fusion plan for ``adapters``, for each component an adapter has weights for (the
    transformer, the text encoder); every adapter is checked against the layers before anything is exported."""
    targeted = {c for a in adapters for c in adapter_components(a)}
    missing = sorted(targeted - set(components))
    if missing:
        raise UserError(f"--lora adapters have weights for {', '.join(missing)}, which is not exported",
                        found=f"--components {','.join(components)}",
                        fix=f"add {','.join(missing)} to --components (LoRA adapters are fused into its weights)")
    return {c: plan_fusion(adapters, build_module(ckpt, c, load_weights=False), c) for c in sorted(targeted)}


def reference_loader(ckpt: Checkpoint, adapters: Sequence[Adapter] = ()):
    """component -> its reference module: the transformer / text encoder with the adapters loaded and fused the
    way diffusers does when an adapter has weights for it (parity of a fused export), else the streamed reference."""
    targeted = {c for a in adapters for c in adapter_components(a)}
    return lambda c: fused_reference(ckpt, adapters, c) if c in targeted else reference_module(ckpt, c)


def variant_record(ckpt: Checkpoint) -> dict:
    """Which Helios checkpoint this is (pipeline class, is_distilled, is_cfg_zero_star, scheduler class; the
    scheduler config is the manifest's scheduler_config): the runtime runs that variant's loop."""
    return ckpt.variant.to_json()


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, height: int = 384, width: int = 640,
                      components: Iterable[str] = COMPONENTS, opset: int = DEFAULT_OPSET,
                      text_length: int = 512, max_text_length: int = 512, force: bool = False,
                      run_audit: bool = True, revision: str | None = None, sizes: Sequence[Size] | None = None,
                      adapters: Sequence[Adapter] = (), log=print) -> dict:
    """Export ``components`` of a checkpoint (a folder, or a Hub id at ``revision``) to ``out``; returns the
    manifest. ``sizes`` (several (height, width); default the one ``height`` x ``width``) gives the graphs
    operating points for every size, and the manifest records them (the first is every request's default).
    ``adapters``: LoRA adapters fused into the transformer's weights as they are written (the manifest records
    each file's sha256 and scale under "lora").

    Everything is written to a temporary folder beside ``out`` and moved into place only when the
    export and its audit have succeeded.
    """
    t0 = time.perf_counter()
    components = tuple(components)
    ckpt = Checkpoint(checkpoint, revision)
    if opset < 18:
        raise UserError(f"opset {opset} is too old", expected="18 or newer (the dynamo exporter's range is 18-23)",
                        fix="pass --opset 20")
    fusions = lora_fusions(ckpt, components, adapters)
    layouts = vae_layouts(ckpt, components)
    sizes = sizes_or_one(height, width, sizes)
    specs = build_specs(ckpt.configs, *sizes[0], text_length, max_text_length, components, layouts,
                        ckpt.variant.name, sizes)
    manifest = {
        "format": FORMAT, "helios_deploy_version": __version__,
        "checkpoint": {"path": str(ckpt.path.resolve()), "identity": ckpt.identity,
                       "model_index": ckpt.model_index, "is_distilled": ckpt.is_distilled,
                       **({"hub": ckpt.hub} if ckpt.hub else {})},  # Hub id, revision and resolved commit
        # the first size is every request's default; "sizes" lists all (older manifests: height x width only)
        "video": {"height": sizes[0][0], "width": sizes[0][1], "sizes": [list(s) for s in sizes]},
        "opset": opset, "precision": "fp32",
        "text_length": text_length, "max_text_length": max_text_length,
        "scheduler_config": ckpt.configs["scheduler"], "variant": variant_record(ckpt), "components": {},
        "host": {"python": platform.python_version(), "machine": platform.machine()},
        "lora": [a.record() for a in adapters],
    }
    with staged_dir(Path(out), force=force) as tmp:
        for name, spec in specs.items():
            manifest["components"][name] = _export_component(ckpt, name, spec, tmp / name, opset, layouts, sizes, log,
                                                             fusions.get(name))
        manifest["export_peak_rss_bytes"] = process_peak_bytes()
        manifest["weights_bytes"] = _weights_bytes(ckpt, components)
        shutil.copytree(ckpt.path / "tokenizer", tmp / "tokenizer")
        (tmp / "scheduler_config.json").write_text(json.dumps(ckpt.configs["scheduler"], indent=2) + "\n")
        manifest["timings"] = {"export_seconds": round(time.perf_counter() - t0, 2)}
        if run_audit:
            log("auditing (onnx.checker, ONNX Runtime session, parity against the reference) ...")
            t1 = time.perf_counter()
            results = audit(tmp, specs, reference_loader(ckpt, adapters))
            manifest["audit"] = {c: {"passed": r["passed"], "cases": r["cases"], "memory": r["memory"]}
                                 for c, r in results.items()}
            manifest["timings"]["audit_seconds"] = round(time.perf_counter() - t1, 2)
        write_manifest(tmp, manifest)
    return manifest
