"""`quantize` as a library call: exported fp32 graphs -> FP8 E4M3 Q/DQ graphs with FP8 weights.

Recipe (NVIDIA Model Optimizer's ONNX quantizer, ``quantize_mode="fp8"``):
- Q/DQ on the linear layers only (MatMul/Gemm from ``nn.Linear``: attention projections, FFN,
  cross-attention); attention's own matmuls (``disable_mha_qdq``), convolutions and everything else stay
  in high precision. Weights are stored as FP8 initializers + DequantizeLinear (``dq_only``), per output
  channel; activations per tensor, calibrated with max calibration (amax over every recorded call).
- ``high_precision_dtype="fp32"``: modelopt's default (fp16) would convert the rest of the graph, which
  ONNX Runtime on CPU runs poorly or not at all; fp32 keeps the graph checkable here. TensorRT's strongly
  typed build decides the precision of the non-FP8 layers from this graph.
- Layers kept in high precision by regex over module-qualified node names (``blocks.0.attn1.to_q/...``):
  see ``default_keep``.

Calibration runs the real sampler loop over the exported fp32 graphs (export/transforms/calibration.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ...artifacts import Artifacts, write_manifest
from ...errors import UserError
from ...fsutil import sha256_file
from . import prepare as fp8_graph
from .lowering import write_lowered
from .calibration import calibration_hash, feed_reader, read_prompts, record_feeds, shape_summary

FP8_FILE = "model.fp8.onnx"
QUANTIZABLE = ("transformer", "text_encoder")
KEEP_EDGE_BLOCKS = 3
CALIBRATION_METHOD = "max"


def default_keep(component: str, num_blocks: int) -> list[str]:
    """The default high-precision layers (the recipe Model Optimizer uses for Wan 2.x video transformers):
    the four patch embeddings, the condition embedder, proj_out, and the first and last three blocks.

    The block rule is literal: a model with at most 6 blocks keeps all of them, and then only layers
    outside the blocks could be quantized (none, with the rest of this list): ``quantize`` then stops
    with a message rather than writing an "FP8" graph without FP8 layers. Pass --keep-high-precision
    to choose for such (test-sized) models. The text encoder keeps nothing by default."""
    if component != "transformer":
        return []
    edge = sorted(set(range(min(KEEP_EDGE_BLOCKS, num_blocks))) | set(range(max(0, num_blocks - KEEP_EDGE_BLOCKS), num_blocks)))
    keep = [r"^patch_(embedding|short|mid|long)/", r"^condition_embedder\.", r"^proj_out/"]
    if edge:
        keep.append(r"^blocks\.(" + "|".join(str(b) for b in edge) + r")\.")
    return keep


def resolve_keep(patterns: Sequence[str], names: Sequence[str]) -> tuple[list[str], list[str]]:
    """Node names matched (``re.search``) by any pattern, and a warning for each pattern matching no node."""
    matched, warnings = [], []
    for p in patterns:
        try:
            rx = re.compile(p)
        except re.error as e:
            raise UserError(f"--keep-high-precision {p!r} is not a valid regular expression", found=str(e),
                            fix=r"quote it for your shell, e.g. --keep-high-precision '^blocks\.(0|1)\.'") from None
        hits = [n for n in names if rx.search(n)]
        if not hits:
            warnings.append(f"--keep-high-precision {p!r} matches no node of the graph")
        matched += [h for h in hits if h not in matched]
    return matched, warnings


def prepare_graph(src: Path, dst: Path) -> "fp8_graph.onnx.ModelProto":
    """Load the fp32 graph, name/fold/split it for modelopt (see fp8_graph) and save it to ``dst``."""
    import onnx

    model = onnx.load(str(src))
    fp8_graph.name_nodes_by_module(model)
    fp8_graph.fold_weight_transposes(model)
    fp8_graph.split_sequences(model)
    onnx.save_model(model, str(dst), save_as_external_data=True, location=dst.name + ".data")
    return model


def run_modelopt(src: Path, out: Path, feeds, quantize_nodes: list[str], exclude: list[str]) -> None:
    from modelopt.onnx.quantization import quantize

    quantize(str(src), quantize_mode="fp8", calibration_data_reader=feed_reader(feeds),
             calibration_method=CALIBRATION_METHOD, calibration_eps=["cpu"], high_precision_dtype="fp32",
             op_types_to_quantize=list(fp8_graph.LINEAR_OPS), nodes_to_quantize=[re.escape(n) + "$" for n in quantize_nodes],
             nodes_to_exclude=[re.escape(n) + "$" for n in exclude], disable_mha_qdq=True, dq_only=True,
             use_external_data_format=True, output_path=str(out), log_level="WARNING")


def quantize_component(arts: Artifacts, component: str, feeds, keep: Sequence[str] | None, work: Path,
                       log: Callable[[str], None]) -> dict:
    """Quantize one component into ``work``; returns its manifest entry (files not yet in place)."""
    import onnx

    src = work / "fp32" / "model.onnx"
    src.parent.mkdir()
    model = prepare_graph(arts.graph_path(component, "model"), src)
    linear = fp8_graph.linear_nodes(model)
    layers = linear + [n.name for n in model.graph.node if n.op_type == "Conv"]
    blocks = fp8_graph.block_count(linear)
    patterns = list(keep) if keep is not None else default_keep(component, blocks)
    matched, warnings = resolve_keep(patterns, [n.name for n in model.graph.node])
    excluded = [n for n in linear if n in set(matched)]
    if keep is None and component == "transformer" and blocks <= 2 * KEEP_EDGE_BLOCKS:
        warnings.append(f"the default recipe keeps the first and last {KEEP_EDGE_BLOCKS} blocks; this model has "
                        f"{blocks}, so every block stays in high precision")
    for w in warnings:
        log(f"warning: {w}")
    targets = [n for n in linear if n not in excluded]
    if not targets:
        raise UserError(f"nothing to quantize in {component}: every linear layer is kept in high precision",
                        found=f"{len(linear)} linear layers, all matched by {patterns}",
                        fix=r"choose the layers with --keep-high-precision, e.g. --keep-high-precision '^patch_' "
                            r"--keep-high-precision '^condition_embedder\.' --keep-high-precision '^proj_out/'")
    log(f"{component}: quantizing {len(targets)} of {len(linear)} linear layers, calibrating on {len(feeds)} calls "
        f"({shape_summary(feeds)}) ...")
    raw = work / "modelopt" / FP8_FILE
    raw.parent.mkdir()
    run_modelopt(src, raw, feeds, targets, excluded)
    final = onnx.load(str(raw))
    out = work / "out" / FP8_FILE
    out.parent.mkdir()
    onnx.save_model(final, str(out), save_as_external_data=True, location=FP8_FILE + ".data")
    precision = fp8_graph.precision_map(final, layers)
    if not any(v == "fp8" for v in precision.values()):
        raise RuntimeError(f"modelopt quantized none of the {len(targets)} selected layers of {component}")
    return {"file": FP8_FILE, "data": FP8_FILE + ".data", "keep_high_precision": patterns,
            "excluded_nodes": sorted(excluded), "layer_precision": precision, "warnings": warnings,
            "weight_bytes": {"fp32_graph": fp8_graph.weight_bytes(model, linear),
                             "fp8_graph": fp8_graph.weight_bytes(final, linear)}}


FP8_BF16_FILE = "model.fp8.bf16.onnx"


def _install(work_out: Path, dest: Path, entry: dict) -> None:
    """Hash the finished files and move them into place (data first: the graph names it)."""
    entry["file_sha256"] = sha256_file(work_out / entry["file"])
    entry["data_sha256"] = sha256_file(work_out / entry["data"])
    entry["file_bytes"] = (work_out / entry["file"]).stat().st_size
    entry["data_bytes"] = (work_out / entry["data"]).stat().st_size
    lowered = entry.get("bf16")
    if lowered:  # its hashes were taken when it was written
        os.replace(work_out / lowered["data"], dest / lowered["data"])
        os.replace(work_out / lowered["file"], dest / lowered["file"])
    os.replace(work_out / entry["data"], dest / entry["data"])
    os.replace(work_out / entry["file"], dest / entry["file"])


def quantize_artifacts(artifacts: str | Path, components: Iterable[str] = ("transformer",),
                       prompts_file: str | Path | None = None, keep: Sequence[str] | None = None,
                       chunks: int = 2, seed: int = 0, prompts: Sequence[str] | None = None,
                       log: Callable[[str], None] = print) -> dict:
    """Calibrate on the real sampler loop, quantize each component and record it in the manifest.

    Every output is produced in a temporary folder first; nothing in ARTIFACTS changes unless all
    components succeed."""
    import modelopt

    from ...runtime import Pipeline

    t0 = time.perf_counter()
    arts = Artifacts.open(artifacts)
    components = list(components)
    for c in components:
        if c not in QUANTIZABLE:
            raise UserError(f"cannot quantize {c}", expected=f"one of {', '.join(QUANTIZABLE)}",
                            fix="pass --components transformer or transformer,text_encoder")
        arts.require(c)
    for c in ("text_encoder", "transformer", "vae_decoder"):
        arts.require(c)
        arts.verify_files(c)
    if chunks < 1:
        raise UserError(f"--calibration-chunks must be at least 1, got {chunks}")
    prompts = list(prompts) if prompts is not None else read_prompts(prompts_file)
    settings = {"chunks": chunks, "seed": seed, "pyramid_steps": [1, 1, 1], "method": CALIBRATION_METHOD,
                "video": arts.manifest["video"], "text_length": arts.manifest["text_length"],
                "checkpoint": arts.manifest["checkpoint"]["identity"]["sha256"]}
    log(f"calibrating: {len(prompts)} prompts x {chunks} chunks through the fp32 pipeline ...")
    feeds = record_feeds(Pipeline.from_artifacts(arts.root), components, prompts, chunks, seed)
    t_cal = time.perf_counter() - t0
    entries = {}
    staging = [Path(tempfile.mkdtemp(prefix=".fp8-partial-", dir=arts.root / c)) for c in components]
    try:
        for c, work in zip(components, staging):
            t1 = time.perf_counter()
            entries[c] = quantize_component(arts, c, feeds[c], keep if c == "transformer" else None, work, log)
            entries[c].update(recipe={"tool": "nvidia-modelopt", "modelopt_version": modelopt.__version__,
                                      "quantize_mode": "fp8", "format": "float8e4m3fn", "calibration_method": CALIBRATION_METHOD,
                                      "high_precision_dtype": "fp32", "quantized_ops": list(fp8_graph.LINEAR_OPS),
                                      "attention_matmuls": "high precision"},
                              calibration={"sha256": calibration_hash(prompts, settings), "prompts": len(prompts),
                                           "calls": len(feeds[c]), "shapes": shape_summary(feeds[c]), **settings},
                              seconds={"calibration": round(t_cal, 2), "quantize": round(time.perf_counter() - t1, 2)})
            # what TensorRT builds from: the same Q/DQ graph, bf16 outside its FP8 layers (export/transforms/lowering.py)
            log(f"{c}: lowering {FP8_FILE} to bf16 outside the FP8 layers for TensorRT ...")
            entries[c]["bf16"] = write_lowered(work / "out" / FP8_FILE, work / "out", FP8_BF16_FILE)
        manifest = json.loads(json.dumps(arts.manifest))
        for c, work in zip(components, staging):
            _install(work / "out", arts.root / c, entries[c])
            manifest["components"][c]["fp8"] = entries[c]
        write_manifest(arts.root, manifest)
    finally:
        for work in staging:
            shutil.rmtree(work, ignore_errors=True)
    return {"components": entries, "seconds": round(time.perf_counter() - t0, 2)}
