"""Generate a Triton model repository from an artifact folder (``helios-deploy triton``).

    MODEL_REPO/
      README.md                       how to run it (NVIDIA's container, or tritonserver on CPU), a client example
      helios/config.pbtxt             decoupled Python-backend model streaming 33-frame chunks; its control
                                      requests (prompt change, stop, progress, capacity, drain) go to it too
      helios/1/model.py               shim: from helios_deploy.serving.model import TritonPythonModel
      helios/artifacts/               the artifact folder (copied: hard links where the file system allows)
      helios_<component>[_<graph>]/   with plan_models: one tensorrt_plan model per engine in the manifest
        config.pbtxt, 1/model.plan
      load_models.txt                 with plan_models: the models tritonserver loads at start (explicit model
                                      control); the plan models are loaded on request only

The plan models are opt-in: each loads its engine a second time next to the ``helios`` model (the 14B
transformer's weights twice on the GPU) and every profile gets its own context with its own activation memory.
With ``--backend tensorrt`` (or plan models) the engines' TensorRT decides the container (serving/containers.py):
the README pins exactly that ``tensorrt`` wheel and names a release that ships it; a combination that cannot
load is refused.

The repository is written to a staging folder and moved into place only when every config has parsed as
Triton's ModelConfig, so a failure leaves nothing behind. By default the artifacts are copied into the
repository (self-contained and relocatable); ``reference=True`` records their absolute path instead (no
copy; the repository then works only where that path exists).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..artifacts import Artifacts
from ..runtime.runners.base import graph_record
from ..errors import UserError
from ..export.tensorrt.engines import engine_mode, profiles
from ..export.tensorrt.builder import write_atomic
from ..fsutil import sha256_file, staged_dir
from ..model.specs import GraphSpec
from ..model.sizes import size_name, video_sizes
from .configs import Placement, helios_config, parse_config, plan_config, quoted
from .containers import Deployment, deployment, engines_tensorrt
from .readme import lora_line, repository_readme
from .tritonserver import STARTUP_FILE

BACKENDS = ("onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp8")
# what the helios model runs: (component, graph) of a T2V pipeline; the VAE encoder adds I2V/V2V
REQUIRED = (("text_encoder", "model"), ("transformer", "model"), ("vae_decoder", "model"))
SHIM = ('"""The {name} model: the code is helios-deploy\'s (pip install helios-deploy into the Python backend '
        'environment)."""\n\nfrom helios_deploy.serving.{module} import TritonPythonModel  # noqa: F401\n')


@dataclass(frozen=True)
class RepoOptions:
    backend: str = "onnxruntime"
    precision: str = "fp32"
    instances: int = 1  # plan models' instances per GPU; the helios model runs ONE instance per node
    gpus: tuple[int, ...] = ()  # the helios model: one LiveScheduler per GPU in one instance (KIND_MODEL)
    max_frames: int = 660
    reference: bool = False  # record the artifacts' absolute path instead of copying them
    device: str = "auto"  # cuda:<g> per GPU in gpus, else cpu; or a list, one scheduler each (e.g. "cpu,cpu")
    # live streams per instance (runtime/live.py): None -> the scheduler's defaults
    max_streams: int | None = None  # cap on real-time streams per instance (default: from the measured chunk time)
    chunk_seconds: float | None = None  # a chunk's time for admission (default: measured when the model loads)
    fps: float = 24.0  # playback rate the deadlines follow
    queue: bool = False  # over capacity: queue new streams instead of refusing them
    max_batch: int = 1  # streams whose transformer calls may share one call
    plan_models: bool = False  # a helios_<component> tensorrt_plan model per engine (loaded on request only)
    triton_release: str | None = None  # YY.MM of NVIDIA's container; default: the newest that ships the TensorRT


@dataclass
class RepoReport:
    root: Path
    models: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    artifacts: str = ""
    deployment: Deployment | None = None
    startup: list[str] = field(default_factory=list)  # what tritonserver loads at start (all, when empty)


def model_name(component: str, graph: str) -> str:
    return f"helios_{component}" if graph == "model" else f"helios_{component}_{graph}"


def check_options(arts: Artifacts, opts: RepoOptions) -> Deployment:
    """Refuse bad options with one UserError; the container and TensorRT the repository is for."""
    _check_values(arts, opts)
    uses_engines = opts.backend == "tensorrt" or opts.plan_models
    version = engines_tensorrt(arts.manifest) if uses_engines else None
    if opts.plan_models:
        _check_plan_engines(arts)
    return deployment(version, opts.plan_models, opts.triton_release)


def _check_values(arts: Artifacts, opts: RepoOptions) -> None:
    if opts.backend not in BACKENDS:
        raise UserError(f"unknown backend {opts.backend!r}", expected=" or ".join(BACKENDS))
    if opts.precision not in PRECISIONS:
        raise UserError(f"unknown precision {opts.precision!r}", expected=" or ".join(PRECISIONS))
    for name, value in (("--instances", opts.instances), ("--max-frames", opts.max_frames),
                        ("--max-batch", opts.max_batch), ("--max-streams", 1 if opts.max_streams is None else opts.max_streams)):
        if value < 1:
            raise UserError(f"{name} must be at least 1", found=str(value))
    for name, value in (("--fps", opts.fps), ("--chunk-seconds", 1.0 if opts.chunk_seconds is None else opts.chunk_seconds)):
        if not value > 0:
            raise UserError(f"{name} must be positive", found=str(value))
    if opts.instances > 1 and not opts.plan_models:
        raise UserError(f"--instances {opts.instances} applies to the tensorrt_plan models only",
                        found="no --plan-models",
                        fix="the helios model runs one instance per node with one scheduler per GPU: pass --gpus 0,1 "
                            "(several GPUs), or run more nodes")
    if any(g < 0 for g in opts.gpus):
        raise UserError("GPU indices must be >= 0", found=",".join(map(str, opts.gpus)), fix="pass --gpus 0,1")
    missing = [f"{c}/{g}" for c, g in REQUIRED if c not in arts.components or not arts.graph_path(c, g).is_file()]
    if missing:
        raise UserError(f"{arts.root} cannot serve text-to-video", found=f"missing {', '.join(missing)}",
                        fix="export with --components text_encoder,transformer,vae_decoder,vae_encoder")
    if opts.backend == "tensorrt":
        _check_engines(arts, opts.precision)
        return
    if opts.precision == "fp8" and not arts.manifest["components"]["transformer"].get("fp8"):
        raise UserError(f"--precision fp8 needs the FP8 transformer graph, which {arts.root} does not have",
                        found="no fp8 entry for the transformer in the manifest",
                        fix=f"run `helios-deploy quantize {arts.root} --precision fp8` first")
    for c in arts.components:  # the graphs the served runtime loads are there, with their recorded sizes
        for g in arts.spec(c).graphs:
            arts.require_present(c, *graph_record(arts.manifest, c, g.name, opts.precision))


def _check_engines(arts: Artifacts, precision: str) -> None:
    engines = {c: arts.manifest["components"][c].get("engines") or {} for c in arts.components}
    missing = [f"{c}/{g}" for c, g in REQUIRED if g not in engines.get(c, {})]
    if missing:
        built = ", ".join(f"{c}/{g}" for c, e in engines.items() for g in e) or "none"
        raise UserError("--backend tensorrt needs TensorRT engines the manifest does not list",
                        found=f"missing {', '.join(missing)}; built: {built}",
                        fix=f"helios-deploy build {arts.root} --precision {precision} (on the GPU that will serve), "
                            "or use --backend onnxruntime")
    built_as = engines["transformer"]["model"].get("key", {}).get("settings", {}).get("precision", "fp32")
    if built_as != precision:
        raise UserError(f"the transformer engine was built for {built_as}, not {precision}",
                        fix=f"pass --precision {built_as}, or rebuild: helios-deploy build {arts.root} --precision {precision}")
    gone = [str(arts.root / c / e["file"]) for c, es in engines.items() for e in es.values()
            if not (arts.root / c / e["file"]).is_file()]
    if gone:
        raise UserError(f"the manifest lists the engine {gone[0]} but the file is missing",
                        found=f"{len(gone)} engine file(s) missing: {', '.join(gone)}",
                        fix=f"rebuild it: helios-deploy build {arts.root}")


def _link_or_copy(src: str, dst: str) -> str:
    """Hard link (no extra space for multi-GB weights) where the file system allows it, else copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def _write_config(folder: Path, text: str) -> None:
    parse_config(text)  # raises ConfigError: never write a config Triton would reject
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(text)


def _helios_model(arts: Artifacts, root: Path, opts: RepoOptions) -> str:
    folder = root / "helios"
    (folder / "1").mkdir(parents=True)
    if opts.reference:
        where, how = str(arts.root.resolve()), f"referenced at {arts.root.resolve()}"
    else:
        shutil.copytree(arts.root, folder / "artifacts", copy_function=_link_or_copy)
        where, how = "artifacts", "copied into helios/artifacts"
    gpus = opts.gpus or ((0,) if opts.backend == "tensorrt" else ())
    params = {"artifacts": where, "backend": opts.backend, "precision": opts.precision, "device": opts.device,
              "gpus": ",".join(map(str, gpus)), "max_frames": str(opts.max_frames)}
    sizes = video_sizes(arts.manifest)
    params["sizes"] = ",".join(map(size_name, sizes))  # what clients may ask for (HeliosClient.sizes)
    live = {"max_streams": opts.max_streams, "chunk_seconds": opts.chunk_seconds, "fps": opts.fps,
            "queue": str(opts.queue).lower(), "max_batch": opts.max_batch}
    params.update({k: "auto" if v is None else str(v) for k, v in live.items()})
    params["lora"] = lora_parameter(arts.manifest)  # the adapters fused into the served weights (docs/lora.md)
    _write_config(folder, helios_config(sizes, gpus, params))
    (folder / "1" / "model.py").write_text(SHIM.format(name="helios", module="model"))
    return how


def _check_plan_engines(arts: Artifacts) -> None:
    """Refuse weight-stripped engines as plan models: Triton's tensorrt backend only deserialises a plan
    (tensorrt_backend loader.cc, LoadPlan) and never refits it, so a stripped plan would run without weights."""
    stripped = [f"{c}/{g}" for c, entry in arts.manifest["components"].items()
                for g, e in (entry.get("engines") or {}).items() if engine_mode(e) == "strip"]
    if stripped:
        raise UserError("weight-stripped engines cannot be served as tensorrt_plan models",
                        found=f"built with --strip-weights: {', '.join(stripped)}",
                        expected="engines that hold their weights (Triton's tensorrt backend loads a plan as it is, "
                                 "without a refit)",
                        fix=f"rebuild them without --strip-weights (helios-deploy build {arts.root} --rebuild), "
                            "or leave out --plan-models (the helios model refits them at load)")


def _plan_model(arts: Artifacts, root: Path, component: str, graph: GraphSpec, entry: dict, opts: RepoOptions,
                strategy: str | None) -> str:
    name = model_name(component, graph.name)
    engine = arts.root / component / entry["file"]
    if not engine.is_file():
        raise UserError(f"the manifest lists the engine {engine} but the file is missing",
                        fix=f"rebuild it: helios-deploy build {arts.root}")
    expected = profiles(graph)
    recorded = (entry.get("key") or {}).get("profiles")
    if recorded is not None and len(recorded) != len(expected):
        raise UserError(f"the {component}/{graph.name} engine has {len(recorded)} optimization profiles",
                        expected=f"{len(expected)}, one per operating point of the spec",
                        fix=f"rebuild it: helios-deploy build {arts.root} --rebuild")
    placement = Placement(opts.instances, opts.gpus or (0,))  # TensorRT plans run on GPUs only
    _write_config(root / name, plan_config(name, graph, recorded or expected, placement, strategy))
    (root / name / "1").mkdir()
    _link_or_copy(str(engine), str(root / name / "1" / "model.plan"))
    return name


def _plan_models(arts: Artifacts, root: Path, opts: RepoOptions, report: RepoReport) -> None:
    """One tensorrt_plan model per engine, and the startup list that keeps them unloaded until asked for."""
    strategy = report.deployment.allocation_strategy
    for component in arts.components:
        engines = arts.manifest["components"][component].get("engines") or {}
        for graph in arts.spec(component).graphs:
            name = model_name(component, graph.name)
            if graph.name in engines:
                report.models.append(_plan_model(arts, root, component, graph, engines[graph.name], opts, strategy))
            else:
                report.skipped.append(f"{name}: no TensorRT engine in the manifest (run helios-deploy build)")


def write_repository(artifacts: str | Path, out: str | Path, opts: RepoOptions = RepoOptions(),
                     force: bool = False, log: Callable[[str], None] = lambda m: None) -> RepoReport:
    """Write the model repository for ``artifacts`` to ``out`` (atomically); see the module docstring."""
    arts = Artifacts.open(artifacts)
    out = Path(out)
    report = RepoReport(out, deployment=check_options(arts, opts))
    with staged_dir(out, force) as tmp:
        report.artifacts = _helios_model(arts, tmp, opts)
        report.models.append("helios")
        log(f"helios: decoupled Python-backend model ({opts.backend}, {opts.precision}); artifacts {report.artifacts}")
        # explicit model control: the server loads these at start, and a model is reloaded on request
        # (`refit` + POST v2/repository/models/helios/load); plan models load only when asked for
        report.startup = list(report.models)
        (tmp / STARTUP_FILE).write_text("".join(f"{m}\n" for m in report.startup))
        if opts.plan_models:
            _plan_models(arts, tmp, opts, report)
        (tmp / "README.md").write_text(repository_readme(arts, opts, report))
    for name in report.models[1:]:
        log(f"{name}: tensorrt_plan (loaded on request: {STARTUP_FILE} lists {', '.join(report.startup)})")
    for line in report.skipped:
        log(f"skipped {line}")
    return report


def lora_parameter(manifest: dict) -> str:
    """The adapters the deployment serves, as the helios model's "lora" parameter: ``name:scale:sha256[:12]``
    per adapter in fusion order, comma-separated; "none" for the checkpoint's own weights."""
    return ",".join(f"{Path(a['file']).name}:{a['scale']}:{a['sha256'][:12]}" for a in manifest.get("lora") or []) \
        or "none"


def served_by(artifacts: Path) -> Path | None:
    """The repository whose ``helios`` model serves ``artifacts`` copied into it (``REPO/helios/artifacts``)."""
    artifacts = Path(artifacts).resolve()
    repo = artifacts.parent.parent
    if artifacts.name == "artifacts" and artifacts.parent.name == "helios" and (artifacts.parent / "config.pbtxt").is_file():
        return repo
    return None


def repository_artifacts(repo: Path) -> Path:
    """The artifacts folder the repository's ``helios`` model serves (its ``artifacts`` parameter)."""
    config = repo / "helios" / "config.pbtxt"
    if not config.is_file():
        raise UserError(f"{repo} is not a model repository written by helios-deploy", found=f"no {config}",
                        fix="pass the folder `helios-deploy triton` wrote")
    where = Path(parse_config(config.read_text()).parameters["artifacts"].string_value)
    return where if where.is_absolute() else repo / "helios" / where


def refresh_repository(repo: str | Path, artifacts: str | Path, log: Callable[[str], None] = lambda m: None) -> list[str]:
    """After ``refit`` of the artifacts a repository serves: the ``helios`` model's ``lora`` parameter and the
    README's adapter line say what the artifacts now hold, and each ``helios_<component>_<graph>`` plan model's
    ``1/model.plan`` is the artifacts' current engine (hard link or copy, moved into place). Returns what changed."""
    repo, arts = Path(repo), Artifacts.open(artifacts)
    if repository_artifacts(repo).resolve() != arts.root.resolve():
        raise UserError(f"the repository {repo} serves other artifacts",
                        found=f"its helios model serves {repository_artifacts(repo)}", expected=str(arts.root),
                        fix="pass the repository whose helios model serves these artifacts")
    changed = []
    config = repo / "helios" / "config.pbtxt"
    text, value = config.read_text(), lora_parameter(arts.manifest)
    new = re.sub(r'(key: "lora"\s*value: \{ string_value: )"[^"]*"', lambda m: m.group(1) + quoted(value), text)
    if new != text:
        parse_config(new)
        write_atomic(config, new.encode())
        changed.append(f"helios/config.pbtxt: lora {value}")
    readme = repo / "README.md"
    if readme.is_file():
        text = readme.read_text()
        new = re.sub(r"(LoRA adapters fused into the served weights: ).*?( \(the `lora` parameter)",
                     lambda m: m.group(1) + lora_line(arts.manifest) + m.group(2), text, flags=re.S)
        if new != text:
            write_atomic(readme, new.encode())
    for component in arts.components:
        for graph, entry in (arts.manifest["components"][component].get("engines") or {}).items():
            plan = repo / model_name(component, graph) / "1" / "model.plan"
            engine = arts.root / component / entry["file"]
            if plan.is_file() and engine.is_file() and not plan.samefile(engine) and \
                    sha256_file(plan) != sha256_file(engine):
                tmp = plan.with_name(f".model.plan.partial-{os.getpid()}")
                tmp.unlink(missing_ok=True)
                _link_or_copy(str(engine), str(tmp))
                os.replace(tmp, plan)
                changed.append(f"{model_name(component, graph)}/1/model.plan: {entry['file']}")
    for line in changed:
        log(f"repository {repo}: {line}")
    return changed
