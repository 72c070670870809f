"""Probing TensorRT and the GPU in a child process: without a GPU, importing TensorRT or its lean runtime
can crash the importing process (segfault), so the process that must report a clean error never imports
it before the probe says it is safe."""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import sys

from ...errors import UserError

# weight_streaming_budget_v2, set_device_memory(ptr, size), get_device_memory_size_for_profile_v2,
# device_memory_size_v2 and streamable_weights_size, which the runner and the build use, first exist in 10.1
MIN_TENSORRT = (10, 1)


def tensorrt_version(version: str | None) -> tuple[int, ...]:
    """``"10.8.0.43"`` -> (10, 8, 0, 43); () for None or a version that does not start with numbers."""
    parts = []
    for piece in str(version or "").split("."):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


def supported_tensorrt(version: str | None) -> bool:
    return tensorrt_version(version)[:2] >= MIN_TENSORRT


def require_supported_tensorrt(version: str | None, where: str = "here") -> None:
    """One UserError for a TensorRT older than 10.1 (or one whose version cannot be read)."""
    if not supported_tensorrt(version):
        raise UserError(f"TensorRT {version} {where} is too old for helios-deploy",
                        found=f"tensorrt {version}",
                        expected="TensorRT 10.1 or newer (10.x or 11.x): set_device_memory, weight_streaming_budget_v2 "
                                 "and the per-profile memory queries the runner uses first exist in 10.1",
                        fix="on the GPU host, `pip install 'tensorrt>=10.1'` (wheels come from NVIDIA's index) and "
                            "rebuild the engines with it")


# Prints "HELIOS_PROBE {json}" after each step, so a crash part-way still tells what was found.
PROBE_CODE = r'''
import json, sys
index = int(sys.argv[1]) if len(sys.argv) > 1 else 0
out = {"tensorrt": None, "gpu": None, "compute_capability": None, "errors": [], "step": "tensorrt"}
def report():
    print("HELIOS_PROBE " + json.dumps(out), flush=True)
try:
    import tensorrt
    out["tensorrt"] = tensorrt.__version__
except BaseException as e:
    out["errors"].append(f"no tensorrt package ({type(e).__name__}: {e})")
out["step"] = "gpu"
report()
def from_torch():
    import torch
    if not torch.cuda.is_available() or torch.cuda.device_count() <= index:
        raise RuntimeError(f"torch {torch.__version__} sees no CUDA device {index}")
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"
def from_driver():
    import ctypes
    lib = ctypes.CDLL("libcuda.so.1")
    def call(fn, *args):
        rc = getattr(lib, fn)(*args)
        if rc != 0:
            raise RuntimeError(f"{fn} returned CUDA error {rc}")
    dev, major, minor, name = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.create_string_buffer(256)
    call("cuInit", 0)
    call("cuDeviceGet", ctypes.byref(dev), index)
    call("cuDeviceGetName", name, 256, dev)
    call("cuDeviceGetAttribute", ctypes.byref(major), 75, dev)  # COMPUTE_CAPABILITY_MAJOR
    call("cuDeviceGetAttribute", ctypes.byref(minor), 76, dev)  # COMPUTE_CAPABILITY_MINOR
    return name.value.decode(), f"{major.value}.{minor.value}"
gpu_errors = []
for source in (from_torch, from_driver):
    try:
        out["gpu"], out["compute_capability"] = source()
        break
    except BaseException as e:
        gpu_errors.append(f"{source.__name__[5:]}: {type(e).__name__}: {e}")
else:
    out["errors"].append("no NVIDIA GPU or driver (" + "; ".join(gpu_errors) + ")")
out["step"] = "done"
report()
'''


def _signal_name(number: int) -> str:
    return signal.Signals(number).name if number in signal.Signals._value2member_map_ else f"signal {number}"


def _last_report(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("HELIOS_PROBE ")]
    try:
        return json.loads(lines[-1][len("HELIOS_PROBE "):]) if lines else {}
    except json.JSONDecodeError:
        return {}


def probe_tensorrt(device_index: int = 0, code: str = PROBE_CODE, timeout: float = 120.0) -> dict:
    """TensorRT version, GPU name and compute capability, found by a child process (never raises).

    Returns {"tensorrt": version|None, "gpu": name|None, "compute_capability": "9.0"|None,
    "error": what went wrong|None}; a child that crashes, hangs or fails is reported in "error".
    """
    empty = {"tensorrt": None, "gpu": None, "compute_capability": None}
    try:
        proc = subprocess.run([sys.executable, "-c", code, str(device_index)], capture_output=True, text=True,
                              errors="replace", timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {**empty, "error": f"the TensorRT probe did not finish within {timeout:.0f} s"}
    except OSError as e:
        return {**empty, "error": f"could not start the TensorRT probe: {e}"}
    found = _last_report(proc.stdout)
    result = {k: found.get(k) for k in empty}
    errors = list(found.get("errors", []))
    if proc.returncode < 0:
        step = found.get("step", "tensorrt")
        errors.append(f"the TensorRT probe crashed with {_signal_name(-proc.returncode)} "
                      f"while checking {'the GPU' if step == 'gpu' else 'TensorRT'}")
    elif proc.returncode != 0 or found.get("step") != "done":
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        errors.append(f"the TensorRT probe failed (exit code {proc.returncode}): {tail}")
    return {**result, "error": "; ".join(errors) or None}


@functools.lru_cache(maxsize=None)
def current_platform(device_index: int = 0) -> dict:
    """probe_tensorrt(), once per process and device."""
    return probe_tensorrt(device_index)


def require_gpu_tensorrt(device_index: int = 0) -> dict:
    """The probe's findings, or one UserError naming what is missing (TensorRT, the GPU, or both)."""
    info = current_platform(device_index)
    missing = []
    if info["tensorrt"] is None:
        missing.append("the tensorrt Python package")
    if info["gpu"] is None:
        missing.append("an NVIDIA GPU with its driver")
    if missing:
        raise UserError(f"the tensorrt backend cannot run here: missing {' and '.join(missing)}",
                        found=info["error"] or "nothing",
                        expected="TensorRT 10.1+ or 11.x and an NVIDIA GPU (H100 first) with its driver",
                        fix="on a GPU host, `pip install 'tensorrt>=10.1'` (wheels come from NVIDIA's index); "
                            "elsewhere use --backend onnxruntime")
    require_supported_tensorrt(info["tensorrt"])
    return info
