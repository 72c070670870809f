"""Which NVIDIA Triton container can serve engines built with which TensorRT (``triton --backend tensorrt``).

An engine loads only on the TensorRT that built it. In a generated repository two TensorRTs may load the engines:
- the ``helios`` Python-backend model imports the ``tensorrt`` Python package of the container's Python
  environment: the repository README pins exactly the version the engines' key records (``pip install
  tensorrt==V``; the wheel brings its own libnvinfer);
- ``helios_<component>`` tensorrt_plan models (``--plan-models``) are loaded by Triton's tensorrt backend, i.e. by
  the container's own libnvinfer, which pip cannot change: the container release must ship TensorRT V.

RELEASES is the one per-release TensorRT table that could be read from this project's machines (no network but
package registries): Triton's Release Compatibility Matrix, ``docs/introduction/compatibility.md`` of
github.com/triton-inference-server/server (commit 0f963c9a8c6913aa4cd9b57ee04f9c2b76ee8d2a), section "Container
Name: trtllm-python-py3": the TensorRT of the ``YY.MM-trtllm-python-py3`` images. Those images hold the Python
backend (and TensorRT-LLM's) but not Triton's tensorrt backend (tensorrtllm_backend's docs: "The Triton container
includes TensorRT-LLM, along with the TensorRT-LLM backend and the Python backend").

The plain ``YY.MM-py3`` images, which hold the tensorrt backend, ship another CUDA and TensorRT (Triton's release
notes: 25.10 "is based on CUDA 13.0.2.006", 25.08 on CUDA 13.0.0.044, while the 25.10 trtllm image has CUDA
12.9.1.010 and TensorRT 10.11.0.33). Their TensorRT is listed only in NVIDIA's Frameworks Support Matrix, which
could not be read here, so no ``-py3`` row is claimed and nothing is guessed: plan models (``--plan-models``) need
``--triton-release YY.MM`` named by the user (the ``-py3`` release that ships the engines' TensorRT), and the
README's command first checks the container's libnvinfer (``python -m helios_deploy.serving.containers
check-libnvinfer V``), so a wrong release stops the container with one message before any model loads.

ALLOCATION_STRATEGY_SINCE: the tensorrt backend's ``execution_context_allocation_strategy`` model parameter
(STATIC default, ON_PROFILE_CHANGE) came with tensorrt_backend pull request #108 (merged April 2025); the first
release branch after it is r25.05 (not checked on a container). Older backends do not read it (every context then
gets STATIC memory sized for the largest profile); the configs set it only for a named release 25.05 or newer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Mapping

from ..errors import UserError
from ..export.tensorrt.probe import MIN_TENSORRT, tensorrt_version

# Triton release -> TensorRT of nvcr.io/nvidia/tritonserver:<release>-trtllm-python-py3 (source: module docstring);
# NOT the TensorRT of <release>-py3 (not known here: see the module docstring)
RELEASES = {
    "24.07": "10.1.0", "24.08": "10.3.0", "24.09": "10.4.0", "24.10": "10.4.0", "24.11": "10.6.0", "24.12": "10.7.0",
    "25.01": "10.8.0.43", "25.02": "10.8.0.43", "25.03": "10.9.0.34", "25.04": "10.9.0.34", "25.05": "10.9.0.34",
    "25.06": "10.10.0.31", "25.07": "10.10.0.31", "25.08": "10.11.0.33", "25.09": "10.11.0.33",
    "25.10": "10.11.0.33", "25.11": "10.13.3.9", "25.12": "10.13.3.9", "26.01": "10.13.3.9", "26.02": "10.13.3.9",
    "26.03": "10.14.1.48", "26.04": "10.14.1.48", "26.05": "10.14.1.48", "26.06": "10.14.1.48",
    "26.07": "10.14.1.48",
}
ALLOCATION_STRATEGY_SINCE = "25.05"
DEFAULT_RELEASE = "24.10"  # tritonserver 2.51, the server the CPU tests run (nvidia-pytriton 0.7.0)


@dataclass(frozen=True)
class Deployment:
    """What the repository README runs: the engines' TensorRT, the container and what it may set."""

    tensorrt: str | None  # None: the onnxruntime backend without plan models (no TensorRT involved)
    release: str
    releases: tuple[str, ...]  # every listed release whose TensorRT is the engines'
    plan_models: bool

    @property
    def image(self) -> str:
        tag = "py3" if self.plan_models or self.tensorrt is None or not self.releases else "trtllm-python-py3"
        return f"nvcr.io/nvidia/tritonserver:{self.release}-{tag}"

    @property
    def allocation_strategy(self) -> str | None:
        """ON_PROFILE_CHANGE (each profile's context allocates what its own profile needs, instead of the largest
        profile's for every context) where the tensorrt backend reads the parameter."""
        return "ON_PROFILE_CHANGE" if _release(self.release) >= _release(ALLOCATION_STRATEGY_SINCE) else None


def _release(name: str) -> tuple[int, int]:
    year, month = name.split(".")
    return int(year), int(month)


def ships(release: str, version: str) -> bool:
    """Whether the release's TensorRT is ``version`` (as many components as the table gives must agree)."""
    row = tensorrt_version(RELEASES[release])
    return tensorrt_version(version)[:len(row)] == row


def engines_tensorrt(manifest: Mapping) -> str:
    """The one TensorRT version every engine in the manifest was built with; one UserError otherwise."""
    found: dict[str, list[str]] = {}
    for component, entry in manifest.get("components", {}).items():
        for graph, record in (entry.get("engines") or {}).items():
            found.setdefault(str((record.get("key") or {}).get("tensorrt")), []).append(f"{component}/{graph}")
    if not found:
        raise UserError("the manifest lists no TensorRT engines", fix="helios-deploy build ARTIFACTS (on a GPU host)")
    if len(found) != 1:
        raise UserError("the engines were built with different TensorRT versions: no container can load them all",
                        found="; ".join(f"TensorRT {v}: {', '.join(e)}" for v, e in found.items()) or "no engines",
                        expected="every engine built by one TensorRT",
                        fix="rebuild them all with one TensorRT: helios-deploy build ARTIFACTS --rebuild")
    version = next(iter(found))
    if tensorrt_version(version)[:2] < MIN_TENSORRT:
        raise UserError(f"the engines were built with TensorRT {version}, which helios-deploy cannot run",
                        expected="TensorRT 10.1 or newer",
                        fix="rebuild them with TensorRT >= 10.1: helios-deploy build ARTIFACTS --rebuild")
    return version


def deployment(version: str | None, plan_models: bool, release: str | None = None) -> Deployment:
    """The container for engines of TensorRT ``version`` (None: no engines are served). Without plan models:
    ``release`` (YY.MM) is the user's choice, refused unless its ``-trtllm-python-py3`` image ships ``version``;
    otherwise the newest listed release that ships it. Plan models run in the ``-py3`` image, whose TensorRT no
    table here gives: ``release`` must be named (checked at container start by check-libnvinfer), never guessed."""
    if plan_models and version is not None:
        return _plan_deployment(version, release)
    if release is not None and release not in RELEASES:
        raise UserError(f"unknown Triton release {release!r}", expected=", ".join(RELEASES),
                        fix="pass a listed --triton-release, or leave it out to pick one")
    if version is None:
        return Deployment(None, release or DEFAULT_RELEASE, (), plan_models)
    matching = tuple(r for r in RELEASES if ships(r, version))
    if release is not None and release not in matching:
        raise UserError(f"Triton {release} cannot load these engines: it ships TensorRT {RELEASES[release]}, the "
                        f"engines were built with TensorRT {version}",
                        expected=f"a release that ships TensorRT {version}: {', '.join(matching) or 'none listed'}",
                        fix="pass one of those with --triton-release, or rebuild the engines with the release's "
                            "TensorRT: helios-deploy build ARTIFACTS --rebuild")
    chosen = release or (matching[-1] if matching else DEFAULT_RELEASE)
    return Deployment(version, chosen, matching, plan_models)


def _plan_deployment(version: str, release: str | None) -> Deployment:
    """Plan models: the ``<release>-py3`` image the user names (its TensorRT is checked when the container starts)."""
    if release is None:
        raise UserError(f"the tensorrt_plan models need a Triton -py3 release that ships TensorRT {version}, and "
                        "helios-deploy has no table of the -py3 images' TensorRT (its table is of the "
                        "-trtllm-python-py3 images, which ship another TensorRT and have no tensorrt backend)",
                        expected=f"--triton-release YY.MM of a -py3 image with TensorRT {version} (NVIDIA's Frameworks "
                                 "Support Matrix lists them)",
                        fix="pass --triton-release (the container's command checks its libnvinfer before loading "
                            "anything), or leave out --plan-models")
    parts = release.split(".")
    if len(parts) != 2 or not all(p.isdigit() and len(p) == 2 for p in parts):
        raise UserError(f"unknown Triton release {release!r}", expected="YY.MM, e.g. 25.10")
    return Deployment(version, release, tuple(r for r in RELEASES if ships(r, version)), True)


def pip_line(backend: str, version: str | None) -> str:
    """The install line of the repository README: exactly the engines' TensorRT for --backend tensorrt."""
    extra = f" tensorrt=={version}" if backend == "tensorrt" else " onnxruntime-gpu"
    return f'pip install torch "numpy<2"{extra} /opt/helios-deploy'


def libnvinfer_version(lib_version: int) -> tuple[int, int, int]:
    """getInferLibVersion()'s integer (TensorRT 10+: major * 10000 + minor * 100 + patch) as (major, minor, patch)."""
    return lib_version // 10000, lib_version // 100 % 100, lib_version % 100


def check_libnvinfer(version: str, loaded: int | None = None) -> str:
    """Refuse (UserError) a container whose libnvinfer is not TensorRT ``version`` (major.minor.patch: the library
    does not report its build number); ``loaded`` is getInferLibVersion(), read from the library when None."""
    want = tensorrt_version(version)[:3]
    if loaded is None:
        loaded = _load_libnvinfer_version(want[0])
    have = libnvinfer_version(loaded)
    if have != want:
        found = ".".join(map(str, have))
        raise UserError(f"this container's TensorRT {found} cannot load engines built with TensorRT {version}",
                        found=f"libnvinfer {found}", expected=f"libnvinfer {'.'.join(map(str, want))}",
                        fix="run the container release that ships it (see the repository README), or rebuild the "
                            "engines with this container's TensorRT")
    return ".".join(map(str, have))


def _load_libnvinfer_version(major: int) -> int:
    import ctypes

    try:
        lib = ctypes.CDLL(f"libnvinfer.so.{major}")
    except OSError as e:
        raise UserError(f"no libnvinfer.so.{major} (TensorRT {major}) in this environment", found=str(e),
                        fix="run this check inside the Triton container that is to load the plan models") from None
    return int(lib.getInferLibVersion())


def main(argv: list[str]) -> int:
    """``python -m helios_deploy.serving.containers check-libnvinfer VERSION``: exit 1 with one message on a
    mismatch (the repository README runs it before tritonserver when it has plan models)."""
    if len(argv) != 2 or argv[0] != "check-libnvinfer":
        print("usage: python -m helios_deploy.serving.containers check-libnvinfer TENSORRT_VERSION", file=sys.stderr)
        return 2
    try:
        print(f"libnvinfer {check_libnvinfer(argv[1])}: loads engines built with TensorRT {argv[1]}")
    except UserError as e:
        print(f"error: {e.render()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
