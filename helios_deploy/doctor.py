"""`doctor`: what this host can do with helios-deploy, and what to install for the rest.

Each probe returns a dict with what it found, ``ok`` (True, or False with a ``fix``) and never raises:
torch (build, CUDA), the GPU and TensorRT (probed in a child process, export/tensorrt/probe.py: importing
TensorRT without a driver can crash the process), ONNX Runtime's providers, the Triton server environment
(helios_deploy/serving/server.py), ffmpeg (the binary in the imageio-ffmpeg wheel), RAM and free disk. Then
each step of the deploy chain is set against this host: its peak RAM and disk written for the chosen model
(helios_deploy/measure/scale.py's STEP_NEEDS, measured at 14B, scaled by the model's parameters) and whether it
needs a GPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import UserError

MIN_TENSORRT = (10, 1)  # the TensorRT runner's oldest supported release (docs/quantize-and-build.md)


def check_torch() -> dict:
    import torch

    available = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if available else []
    found = {"version": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": available,
             "gpus": gpus}
    if available:
        return {**found, "ok": True}
    why = "a CPU build (no CUDA)" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build, no GPU visible"
    return {**found, "ok": False, "note": why,
            "fix": "on a GPU host, install torch's CUDA build before the project (PyTorch's CUDA wheel index)"}


def tensorrt_version_ok(version: str | None) -> bool:
    """``version`` is TensorRT MIN_TENSORRT or later."""
    try:
        return version is not None and tuple(int(p) for p in version.split(".")[:2]) >= MIN_TENSORRT
    except ValueError:
        return False


def check_tensorrt() -> dict:
    from .export.tensorrt.probe import probe_tensorrt

    info = probe_tensorrt()
    version_ok = tensorrt_version_ok(info["tensorrt"])
    out = {**info, "minimum": ".".join(map(str, MIN_TENSORRT)), "version_ok": version_ok,
           "ok": version_ok and info["gpu"] is not None}
    if not out["ok"]:
        missing = [m for m, bad in ((f"TensorRT >= {out['minimum']}", not version_ok),
                                    ("an NVIDIA GPU with its driver", info["gpu"] is None)) if bad]
        out["fix"] = (f"missing {' and '.join(missing)}: on a GPU host, `pip install tensorrt` (NVIDIA's index; "
                      f"10.1 or later); build, verify and --backend tensorrt need both")
    return out


def check_onnxruntime() -> dict:
    try:
        import onnxruntime
    except ImportError as e:
        return {"version": None, "providers": [], "ok": False, "fix": f"pip install onnxruntime ({e})"}
    providers = onnxruntime.get_available_providers()
    out = {"version": onnxruntime.__version__, "providers": providers, "cuda": "CUDAExecutionProvider" in providers}
    if out["cuda"]:
        return {**out, "ok": True}
    return {**out, "ok": False, "note": "CPU only (export, parity, quantize, generate on CPU work)",
            "fix": "on a GPU host: `pip install onnxruntime-gpu` in place of onnxruntime (CUDA provider: "
                   "quantize --device cuda, generate --device cuda)"}


def check_tritonserver() -> dict:
    from .serving.server import find_env

    try:
        env = find_env()
    except UserError as e:
        return {"venv": None, "ok": False, "note": e.what, "fix": e.fix}
    found = {"venv": str(env.venv), "tritonserver": str(env.tritonserver), "numpy": env.numpy}
    if not env.tritonserver.is_file():
        return {**found, "ok": False, "fix": "run `make triton-env` again (no tritonserver binary in the env)"}
    return {**found, "ok": True}


def check_ffmpeg() -> dict:
    try:
        import imageio_ffmpeg

        return {"exe": imageio_ffmpeg.get_ffmpeg_exe(), "version": imageio_ffmpeg.get_ffmpeg_version(), "ok": True}
    except Exception as e:  # noqa: BLE001 - a missing or broken binary is what this reports
        return {"exe": None, "ok": False, "note": f"{type(e).__name__}: {e}",
                "fix": "pip install imageio-ffmpeg (its wheel ships the ffmpeg binary)"}


def check_memory(path: Path) -> dict:
    from .measure.procfs import meminfo

    info = meminfo()
    usage = shutil.disk_usage(path)
    return {"ram_total_bytes": info["MemTotal"], "ram_available_bytes": info.get("MemAvailable"),
            "disk_path": str(path), "disk_free_bytes": usage.free, "ok": True}


def _existing(path: Path) -> Path:
    """The folder whose free space counts for ``path`` (it or its nearest existing parent)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def model_parts_of(checkpoint: str | Path | None, config: str | None) -> tuple[str, dict]:
    """(the model's name, its parameters per component): a checkpoint folder's configs or a built-in model."""
    from .cost.configs import load_configs
    from .measure.scale import model_parts

    if checkpoint is None and config is None:
        config = "helios-14b"
    configs = load_configs(checkpoint, config)
    return configs.source, model_parts(configs)


def judge_steps(needs: list[dict], ram_total: int, gpu_ok: bool) -> list[dict]:
    """Each step with ``here``: True (fits this host), False with ``why``, or None (its RAM is not measured)."""
    out = []
    for n in needs:
        if n["gpu"]:
            here, why = gpu_ok, None if gpu_ok else f"needs an NVIDIA GPU and TensorRT >= {'.'.join(map(str, MIN_TENSORRT))}"
        elif n["ram_bytes"] is None:
            here, why = None, "RAM not measured"
        elif n["ram_bytes"] > ram_total:
            here, why = False, f"needs {_gb(n['ram_bytes'])} of RAM, this host has {_gb(ram_total)}"
        else:
            here, why = True, None
        out.append({**n, "here": here, "why": why})
    return out


def diagnose(checkpoint: str | Path | None = None, config: str | None = None, path: str | Path = ".") -> dict:
    """Every probe, and each step of the chain for the model against this host."""
    model, parts = model_parts_of(checkpoint, config)
    from .measure.scale import step_needs

    host = {"torch": check_torch(), "tensorrt": check_tensorrt(), "onnxruntime": check_onnxruntime(),
            "tritonserver": check_tritonserver(), "ffmpeg": check_ffmpeg(), "memory": check_memory(_existing(Path(path)))}
    mem = host["memory"]
    steps = judge_steps(step_needs(parts), mem["ram_total_bytes"], host["tensorrt"]["ok"] and host["torch"]["ok"])
    disk = sum(s["disk_bytes"] or 0 for s in steps)
    artifacts = {"bytes": disk, "free_bytes": mem["disk_free_bytes"], "here": disk <= mem["disk_free_bytes"]}
    install = list(dict.fromkeys(c["fix"] for c in host.values() if not c["ok"] and c.get("fix")))
    short = [s for s in steps if not s["gpu"] and s["here"] is False]
    if short:
        most = max(s["ram_bytes"] for s in short)
        install.append(f"RAM: {', '.join(s['step'].replace('`', '') for s in short)} need up to {_gb(most)}: "
                       "run them on a host with that much memory (docs/scale.md)")
    if not artifacts["here"]:
        install.append(f"free disk: the artifacts take up to {_gb(disk)} at {mem['disk_path']}")
    return {"model": model, "host": host, "steps": steps, "artifacts": artifacts,
            "gpu": host["tensorrt"]["ok"] and host["torch"]["ok"], "install": install}


def _gb(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e9:.2f} GB" if value < 10e9 else f"{value / 1e9:.0f} GB"


def _line(check: dict, text: str) -> str:
    return f"{text}" + ("" if check["ok"] else f"  [{check.get('note') or 'missing'}]")


def render(report: dict) -> str:
    """The report as text: the host, the steps for the model, what to install."""
    h = report["host"]
    t, trt, ort, tri, ff, mem = (h[k] for k in ("torch", "tensorrt", "onnxruntime", "tritonserver", "ffmpeg", "memory"))
    gpu = ", ".join(t["gpus"]) or trt["gpu"] or "none found (no NVIDIA GPU or driver)"
    lines = [
        "this host:",
        f"  torch         {t['version']}, CUDA build {t['cuda_build'] or 'no'}, CUDA available: {t['cuda_available']}",
        f"  GPU           {gpu}" + (f" (compute capability {trt['compute_capability']})" if trt["gpu"] else ""),
        f"  TensorRT      {trt['tensorrt'] or 'not installed'} (needs >= {trt['minimum']}: "
        f"{'yes' if trt['version_ok'] else 'no'})",
        _line(ort, f"  onnxruntime   {ort['version']}, providers: {', '.join(ort['providers']) or 'none'}"),
        _line(tri, f"  tritonserver  {tri.get('tritonserver') or 'no Triton server environment'}"),
        _line(ff, f"  ffmpeg        {ff.get('version') or '-'} ({ff.get('exe') or 'not found'})"),
        f"  RAM           {_gb(mem['ram_total_bytes'])} total, {_gb(mem['ram_available_bytes'])} available",
        f"  disk          {_gb(mem['disk_free_bytes'])} free at {mem['disk_path']}",
        "",
        f"what each step needs for {report['model']} (docs/scale.md), against this host:",
    ]
    rows = [("step", "peak RAM", "disk written", "here")] + [
        (s["step"].replace("`", ""), _gb(s["ram_bytes"]), _gb(s["disk_bytes"]) if s["disk_bytes"] else "-",
         {True: "yes", None: "?"}.get(s["here"], "no") + (f": {s['why']}" if s["why"] else "")) for s in report["steps"]]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    a = report["artifacts"]
    lines.append(f"  artifacts in all: {_gb(a['bytes'])}; free: {_gb(a['free_bytes'])} ({'fits' if a['here'] else 'too little'})")
    lines += ["", "no NVIDIA GPU: the GPU steps (TensorRT build, verify, generate on engines) cannot run here"
              if not report["gpu"] else "GPU steps: this host has an NVIDIA GPU and TensorRT >= 10.1"]
    if report["install"]:
        lines += ["", "to do the rest:"] + [f"  - {fix}" for fix in report["install"]]
    return "\n".join(lines)
