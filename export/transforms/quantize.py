"""`quantize --precision fp8` as a library call: exported fp32 graphs -> FP8 E4M3 Q/DQ graphs with FP8 weights,
at any model size.

Recipe (NVIDIA Model Optimizer's ONNX FP8 recipe, reproduced on streamed graphs: export/transforms/qdq.py):
- Q/DQ on the linear layers only (MatMul from ``nn.Linear``: attention projections, FFN, cross-attention);
  attention's own matmuls, convolutions and everything else stay in high precision (fp32 in this graph; the
  TensorRT build takes bf16 from ``model.fp8.bf16.onnx``). Weights are FP8 initializers + DequantizeLinear,
  per output channel; activations per tensor, max calibration (amax over every call of the calibration run).
  A layer whose activation has a single row in some call (a GEMV, which FP8 cannot speed up) stays in high
  precision, as Model Optimizer decides.
- Layers kept in high precision by regex over module-qualified node names (``blocks.0.attn1.to_q/...``):
  see ``default_keep``.

The steps, each holding at most one copy of the weights: calibration runs the real sampler loop over the
exported fp32 graphs with range-recording outputs (export/transforms/calibration.py; ONNX Runtime on
``--device cpu`` or ``cuda``); the Q/DQ rewrite is a weightless graph whose FP8 weights are quantized one
tensor at a time as they are written (export/graphio.py); the bf16 lowering of the result for TensorRT is
the same (export/transforms/lowering.py). Outputs are written in a work folder inside each component's folder
and moved into place, with the manifest, only when every component is done.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ...artifacts import Artifacts, file_record, install
from ...errors import UserError
from ...fsutil import staging
from ...measure.memory import measure_peak, release_memory
from ...model.variants import Variant
from ...model.sizes import video_sizes
from ..graphio import Graph
from .attention import SOFTMAX_SCALE, Attention, attention_problems, find_attention, head_size_ok, insert_attention_qdq
from .calibration import RangeRunner, calibration_graph, calibration_hash, read_prompts, run_calibration
from .lowering import write_lowered
from .prepare import LINEAR_OPS, block_count, linear_nodes, precision_map, prepare, weight_bytes
from .qdq import insert_qdq
from .vae import COMPONENT as VAE, MIN_CHANNELS as VAE_MIN_CHANNELS, plan_vae, quantize_vae, vae_recipe

FP8_FILE = "model.fp8.onnx"
FP8_BF16_FILE = "model.fp8.bf16.onnx"
QUANTIZABLE = ("transformer", "text_encoder")
DEVICES = ("cpu", "cuda")
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


@dataclass
class Plan:
    """One component's prepared fp32 graph and which of its linear layers become FP8."""

    component: str
    graph: Graph
    linear: list[str]
    layers: list[str]  # linear + conv nodes: what the manifest's layer_precision lists
    targets: list[str]
    excluded: list[str]
    patterns: list[str]
    warnings: list[str] = field(default_factory=list)
    attention: list[Attention] = field(default_factory=list)  # --fp8-attention: candidates (not kept)

    def activation(self, node_name: str) -> str:
        return next(n.input[0] for n in self.graph.proto.graph.node if n.name == node_name)

    def calibrated_rows(self) -> dict[str, int]:
        """Activation -> K of the weight it multiplies (the GEMV rule counts rows); Q, K, V of FP8 attentions."""
        inits, rows_of = self.graph.initializers(), {}
        for t in self.targets:
            node = next(n for n in self.graph.proto.graph.node if n.name == t)
            rows_of[node.input[0]] = int(inits[node.input[1]].dims[0])  # K of the weight [K, N]
        for a in self.attention:  # Q, K, V: a range each (rows are not used: the GEMV rule is for linears)
            rows_of.update({x: 1 for x in a.calibrated})
        return rows_of


def plan_component(arts: Artifacts, component: str, keep: Sequence[str] | None, log: Callable[[str], None],
                   attention: bool = False) -> Plan:
    graph = prepare(Graph.load(arts.graph_path(component, "model")))
    linear = linear_nodes(graph.proto)
    layers = linear + [n.name for n in graph.proto.graph.node if n.op_type == "Conv"]
    blocks = block_count(linear)
    patterns = list(keep) if keep is not None else default_keep(component, blocks)
    matched, warnings = resolve_keep(patterns, [n.name for n in graph.proto.graph.node])
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
    kept = set(matched)
    mha = [a for a in find_attention(graph.proto, linear) if a.bmm1 not in kept] if attention else []
    if attention and not mha:
        raise UserError(f"--fp8-attention: no attention of {component} can be FP8",
                        found="no MatMul -> Softmax -> MatMul outside the layers kept in high precision",
                        fix="leave some blocks in FP8 (--keep-high-precision) or drop --fp8-attention")
    return Plan(component, graph, linear, layers, targets, excluded, patterns, warnings, mha)


def calibrate(arts: Artifacts, plans: Sequence[Plan], prompts: Sequence[str], chunks: int, seed: int,
              device: str, work: dict[str, Path]) -> dict[str, RangeRunner]:
    """Run the sampler loop once with every planned component's range-recording graph in place."""
    from ...runtime import Pipeline

    pipe = Pipeline.from_artifacts(arts.root, device=device, low_memory=True)
    runners = {}
    for plan in plans:
        rows_of = plan.calibrated_rows()
        folder = work[plan.component] / "calibration"
        folder.mkdir()
        path, outputs = calibration_graph(arts.graph_path(plan.component, "model"), sorted(rows_of), folder,
                                          shapes=[a.value for a in plan.attention])
        runners[plan.component] = RangeRunner(path, arts.spec(plan.component).graph("model"), plan.component,
                                              device, outputs, rows_of)
    run_calibration(pipe, runners, prompts, chunks, seed)
    return runners


def quantize_component(plan: Plan, runner: RangeRunner, out: Path, log: Callable[[str], None]) -> dict:
    """Q/DQ on the planned layers with the calibrated ranges, written to ``out`` (FP8 graph and its bf16
    lowering); returns the component's manifest entry."""
    gemv = [t for t in plan.targets if runner.min_rows[plan.activation(t)] == 1]
    targets = [t for t in plan.targets if t not in gemv]
    if gemv:
        plan.warnings.append(f"{len(gemv)} layers read a single row in some call (GEMV) and stay in high precision")
        log(f"warning: {plan.warnings[-1]}")
    log(f"{plan.component}: {len(targets)} of {len(plan.linear)} linear layers to FP8 ...")
    fp32_bytes = weight_bytes(plan.graph.proto, plan.linear)
    attention = _fp8_attention(plan, runner, set(targets), log)
    with measure_peak() as memory:
        insert_qdq(plan.graph, targets, runner.amax)
        if attention:
            attention["scales"] = insert_attention_qdq(plan.graph, plan.attention, runner.amax)
            problems = attention_problems(plan.graph.proto, attention["nodes"])
            if problems:
                raise RuntimeError(f"{plan.component}: FP8 attention misplaced: {problems[:3]}")
        plan.graph.save(out / FP8_FILE)
    precision = precision_map(plan.graph.proto, plan.layers)
    if sum(v == "fp8" for v in precision.values()) != len(targets):
        raise RuntimeError(f"{plan.component}: {len(targets)} layers planned for FP8, the graph has "
                           f"{sum(v == 'fp8' for v in precision.values())}")
    log(f"{plan.component}: lowering {FP8_FILE} to bf16 outside the FP8 layers for TensorRT ...")
    with measure_peak() as lowering_memory:
        lowered = write_lowered(out / FP8_FILE, out, FP8_BF16_FILE)
    return {**file_record(out, FP8_FILE, FP8_FILE + ".data"), "keep_high_precision": plan.patterns,
            "excluded_nodes": sorted(plan.excluded + gemv), "layer_precision": precision, "warnings": plan.warnings,
            "weight_bytes": {"fp32_graph": fp32_bytes, "fp8_graph": weight_bytes(plan.graph.proto, plan.linear)},
            "bf16": {**lowered, "memory": lowering_memory}, "memory": {"qdq": memory},
            **({"attention": attention} if attention else {})}


def _fp8_attention(plan: Plan, runner: RangeRunner, targets: set[str], log: Callable[[str], None]) -> dict | None:
    """Which of the planned attentions become FP8 (their out projection FP8, head size in Model Optimizer's
    range); narrows ``plan.attention`` to them and returns the manifest record (None without --fp8-attention)."""
    if not plan.attention:
        return None
    fp8, kept = [], []
    for a in plan.attention:
        head = runner.last_dim.get(a.value)
        if a.out_proj not in targets:
            kept.append({"bmm1": a.bmm1, "reason": f"its out projection {a.out_proj} is not FP8"})
        elif not head_size_ok(head):
            kept.append({"bmm1": a.bmm1, "reason": f"head size {head} outside (8, 256]"})
        else:
            fp8.append(a)
    for k in kept:
        plan.warnings.append(f"attention {k['bmm1']} stays in high precision: {k['reason']}")
        log(f"warning: {plan.warnings[-1]}")
    plan.attention = fp8
    log(f"{plan.component}: {len(fp8)} of {len(fp8) + len(kept)} attentions to FP8 ...")
    return {"nodes": [{"bmm1": a.bmm1, "softmax": a.softmax, "bmm2": a.bmm2, "head_size": runner.last_dim[a.value]}
                      for a in fp8], "kept": kept, "softmax_scale": float(SOFTMAX_SCALE),
            "placement": "Q->DQ on both inputs of BMM1 and BMM2 (softmax output at 1/448), TensorRT FP8 MHA fusion "
                         "(Model Optimizer 0.47 fp8_exporter / match_fp8_mha_pattern)"} if fp8 else None


def _settings(arts: Artifacts, chunks: int, seed: int, attention: bool, vae: bool) -> dict:
    """What the calibration ran (recorded, and hashed with the prompts)."""
    variant = Variant.from_manifest(arts.manifest)  # calibration runs its sampler with its default settings
    settings = {"chunks": chunks, "seed": seed, "variant": variant.name,
                "sampling": {k: list(v) if isinstance(v, tuple) else v for k, v in variant.defaults.items()},
                "method": CALIBRATION_METHOD,
                "video": arts.manifest["video"], "text_length": arts.manifest["text_length"],
                "checkpoint": arts.manifest["checkpoint"]["identity"]["sha256"]}
    if attention:
        settings["fp8_attention"] = True  # its calibration records Q, K and V too
    if vae:
        settings["fp8_vae"] = True  # the decoder's convolution inputs are recorded in the same run
    return settings


def _write_plan(arts: Artifacts, plan, runner: RangeRunner, out: Path, log: Callable[[str], None]) -> dict:
    """One planned component's FP8 graphs written to ``out``; its manifest entry (calibration settings aside)."""
    t1 = time.perf_counter()
    if plan.component == VAE:
        entry = quantize_vae(plan, runner, out, arts.spec(VAE).graph("model"), (FP8_FILE, FP8_BF16_FILE), log)
    else:
        entry = quantize_component(plan, runner, out, log)
    recipe = vae_recipe() if plan.component == VAE else _recipe(attention="attention" in entry)
    entry.update(recipe=recipe, calibration={"calls": sum(runner.shapes.values()), "shapes": dict(runner.shapes)},
                 seconds={"quantize": round(time.perf_counter() - t1, 2)})
    return entry


def _recipe(attention: bool = False) -> dict:
    import modelopt

    return {"tool": "helios-deploy streamed Q/DQ (Model Optimizer's FP8 recipe)",
            "modelopt_version": modelopt.__version__, "quantize_mode": "fp8", "format": "float8e4m3fn",
            "calibration_method": CALIBRATION_METHOD, "high_precision_dtype": "fp32",
            "quantized_ops": list(LINEAR_OPS), "attention_matmuls": "fp8" if attention else "high precision"}


def _check_request(arts: Artifacts, components: list[str], chunks: int, device: str) -> None:
    for c in components:
        if c not in QUANTIZABLE:
            raise UserError(f"cannot quantize {c}", expected=f"one of {', '.join(QUANTIZABLE)}",
                            fix="pass --components transformer or transformer,text_encoder")
    for c in ("text_encoder", "transformer", "vae_decoder"):
        arts.require(c)
        arts.verify_files(c)
    if chunks < 1:
        raise UserError(f"--calibration-chunks must be at least 1, got {chunks}")
    if device not in DEVICES:
        raise UserError(f"unknown calibration device {device!r}", expected=" or ".join(DEVICES))
    if device == "cuda":
        from ...runtime.runners.onnxruntime import require_cuda

        require_cuda()


def quantize_artifacts(artifacts: str | Path, components: Iterable[str] = ("transformer",),
                       prompts_file: str | Path | None = None, keep: Sequence[str] | None = None,
                       chunks: int = 2, seed: int = 0, prompts: Sequence[str] | None = None, device: str = "cpu",
                       log: Callable[[str], None] = print, attention: bool = False, vae: bool = False,
                       vae_min_channels: int = VAE_MIN_CHANNELS) -> dict:
    """Calibrate on the real sampler loop, quantize each component and record it in the manifest. Nothing in
    ARTIFACTS changes unless every component succeeds. ``attention``: FP8 attention matmuls in the transformer
    too (export/transforms/attention.py); ``vae``: FP8 convolutions in the VAE decoder, calibrated in the same
    run (export/transforms/vae.py; ``vae_min_channels``: its channel rule)."""
    t0 = time.perf_counter()
    arts = Artifacts.open(artifacts)
    components = list(components)
    _check_request(arts, components, chunks, device)
    prompts = list(prompts) if prompts is not None else read_prompts(prompts_file)
    settings = _settings(arts, chunks, seed, attention, vae)
    manifest = json.loads(json.dumps(arts.manifest))
    with contextlib.ExitStack() as stack:
        work = {c: stack.enter_context(staging(arts.root / c, "fp8")) for c in components + [VAE] * vae}
        plans = [plan_component(arts, c, keep if c == "transformer" else None, log,
                                attention=attention and c == "transformer") for c in components]
        if vae:
            plans.append(plan_vae(prepare(Graph.load(arts.graph_path(VAE, "model"))), vae_min_channels, log))
        sizes = len(video_sizes(arts.manifest))  # every prompt at every exported size
        log(f"calibrating: {len(prompts)} prompts x {chunks} chunks x {sizes} size(s) through the fp32 pipeline "
            f"on {device} ...")
        with measure_peak() as calibration_memory:
            runners = calibrate(arts, plans, prompts, chunks, seed, device, work)
        release_memory()  # the sessions are closed: the rewrite starts from the process's own baseline
        t_cal = time.perf_counter() - t0
        moves = []
        for plan in plans:
            out = work[plan.component] / "out"
            out.mkdir()
            entry = _write_plan(arts, plan, runners[plan.component], out, log)
            entry["calibration"] = {"sha256": calibration_hash(prompts, {**settings, "device": device}),
                                    "prompts": len(prompts), **entry["calibration"], "device": device, **settings}
            entry["memory"]["calibration"] = calibration_memory
            entry["seconds"]["calibration"] = round(t_cal, 2)
            manifest["components"][plan.component]["fp8"] = entry
            folder = arts.root / plan.component
            moves += [(out / f, folder / f) for f in (entry["bf16"]["data"], entry["bf16"]["file"],
                                                      entry["data"], entry["file"])]
        if not vae:  # quantized again without --fp8-vae: the decoder runs in high precision again
            manifest["components"][VAE].pop("fp8", None)
        install(arts.root, moves, manifest)
    return {"components": {c: manifest["components"][c]["fp8"] for c in components + [VAE] * vae},
            "seconds": round(time.perf_counter() - t0, 2)}
