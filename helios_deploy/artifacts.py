"""The artifact folder and its manifest.json: what was exported, from which checkpoint, with which specs.

Layout (see engines/README.md):
    ARTIFACTS/manifest.json
    ARTIFACTS/<component>/<graph file>.onnx (+ .onnx.data external weights)
    ARTIFACTS/tokenizer/            copied from the checkpoint
    ARTIFACTS/scheduler_config.json copied from the checkpoint
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .fsutil import sha256_file
from .specs import ComponentSpec, spec_from_json

MANIFEST = "manifest.json"
FORMAT = 2  # 2: the VAE decoder is one chunk graph (was first + step)


@dataclass
class Artifacts:
    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: str | Path) -> "Artifacts":
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise UserError(f"{root} is not a helios-deploy artifact folder", found=f"no {MANIFEST}",
                            fix="run `helios-deploy export CHECKPOINT -o ARTIFACTS` first")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON", found=str(e), fix="re-run the export") from None
        if manifest.get("format") != FORMAT:
            raise UserError(f"unsupported manifest format in {path}", found=str(manifest.get("format")),
                            expected=str(FORMAT), fix="re-export with this version of helios-deploy")
        return cls(root, manifest)

    @property
    def components(self) -> list[str]:
        return list(self.manifest["components"])

    def spec(self, component: str) -> ComponentSpec:
        self.require(component)
        return spec_from_json(self.manifest["components"][component]["spec"])

    def require(self, component: str) -> None:
        if component not in self.manifest["components"]:
            raise UserError(f"artifacts in {self.root} have no {component}",
                            found=", ".join(self.components) or "no components",
                            fix=f"re-export with --components including {component}")

    def graph_path(self, component: str, graph: str) -> Path:
        return self.root / component / self.spec(component).graph(graph).file

    def verify_files(self, component: str) -> None:
        """Every file of the component exists and has the sha256 recorded at export."""
        problems = [p for g in self.manifest["components"][component]["graphs"].values()
                    for p in self._file_problems(component, g, "export")]
        if problems:
            raise UserError(f"{component} artifacts do not match the manifest", found="; ".join(problems),
                            fix="re-run the export (or restore the files)")

    def verify_record(self, component: str, record: dict, written_by: str = "it was written") -> None:
        """A derived graph (bf16, fp8) exists and has the sha256s recorded when it was written."""
        problems = self._file_problems(component, record, written_by)
        if problems:
            raise UserError(f"{component} graphs do not match the manifest", found="; ".join(problems),
                            fix="re-run `helios-deploy quantize` (or restore the files)")

    def _file_problems(self, component: str, record: dict, written_by: str) -> list[str]:
        problems = []
        for key in ("file", "data"):
            path = self.root / component / record[key]
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif sha256_file(path) != record[f"{key}_sha256"]:
                problems.append(f"{path}: modified after {written_by} (sha256 differs)")
        return problems

    def check_checkpoint(self, identity: dict) -> None:
        """Refuse a manifest made from another checkpoint."""
        ours = self.manifest["checkpoint"]["identity"]["sha256"]
        if ours != identity["sha256"]:
            changed = sorted(k for k, v in identity["files"].items() if self.manifest["checkpoint"]["identity"]["files"].get(k) != v)
            changed += sorted(k for k, v in identity["configs"].items() if self.manifest["checkpoint"]["identity"]["configs"].get(k) != v)
            raise UserError("these artifacts were exported from another checkpoint",
                            found=f"checkpoint identity {identity['sha256'][:12]}, manifest {ours[:12]}; "
                            f"differs in {', '.join(changed[:6]) or 'its file set'}",
                            fix="pass the checkpoint the artifacts were exported from, or re-export")


def write_manifest(root: Path, manifest: dict) -> None:
    """Write manifest.json atomically (a temporary file beside it, then a rename)."""
    tmp = root / f".{MANIFEST}.partial-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, root / MANIFEST)
