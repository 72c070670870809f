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
from .fsutil import PARTIAL, clean_stale_partials, deferred_signals, sha256_file
from .model.specs import ComponentSpec, spec_from_json

MANIFEST = "manifest.json"
FORMAT = 3  # 3: every graph record has its files' sizes; 2: the VAE decoder is one chunk graph


def file_record(folder: Path, file: str, data: str) -> dict:
    """What the manifest records of a graph's two files: names, sizes (checked on every open, cheap at any
    size) and sha256 (checked where a command reads the whole file anyway)."""
    folder = Path(folder)
    return {"file": file, "data": data,
            "file_bytes": (folder / file).stat().st_size, "data_bytes": (folder / data).stat().st_size,
            "file_sha256": sha256_file(folder / file), "data_sha256": sha256_file(folder / data)}


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
        arts = cls(root, manifest)
        arts.check_sizes()
        return arts

    def records(self):
        """(component, file record, the step that wrote it) for every graph the manifest lists."""
        for c, entry in self.manifest["components"].items():
            for g in entry["graphs"].values():
                yield c, g, "export"
            fp8 = entry.get("fp8")
            if fp8:
                yield c, fp8, "quantize"
                if fp8.get("bf16"):
                    yield c, fp8["bf16"], "quantize"
            for r in (entry.get("bf16") or {}).values():
                yield c, r, "quantize --precision bf16"

    def check_sizes(self) -> None:
        """Every file the manifest lists that is present has the size recorded when it was written: a truncated
        or replaced file is refused before anything reads it. A missing one is refused where it is used
        (``require_present``): a deployment may delete graphs it no longer needs (docs/scale.md)."""
        problems = [p for c, r, by in self.records() for p in self._file_problems(c, r, by, hashes=False,
                                                                                  missing_ok=True)]
        self._refuse(problems)

    def require_present(self, component: str, record: dict, written_by: str = "export") -> None:
        """The graph's two files exist with their recorded sizes (for a command about to load them)."""
        self._refuse(self._file_problems(component, record, written_by, hashes=False))

    def _refuse(self, problems: list[str]) -> None:
        if problems:
            raise UserError(f"the artifacts in {self.root} do not match their manifest", found="; ".join(problems),
                            fix="re-run the step that wrote them (export or quantize), or restore the files")

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
        """Every exported file of the component exists and has the size and sha256 recorded at export (for
        commands that read the whole files anyway)."""
        problems = [p for g in self.manifest["components"][component]["graphs"].values()
                    for p in self._file_problems(component, g, "export")]
        if problems:
            raise UserError(f"the artifacts in {self.root} do not match their manifest ({component})",
                            found="; ".join(problems),
                            fix="re-run the export (or restore the files)")

    def verify_record(self, component: str, record: dict, written_by: str = "it was written") -> None:
        """A derived graph (bf16, fp8) exists and has the size and sha256 recorded when it was written."""
        problems = self._file_problems(component, record, written_by)
        if problems:
            raise UserError(f"the artifacts in {self.root} do not match their manifest ({component})",
                            found="; ".join(problems),
                            fix="re-run `helios-deploy quantize` (or restore the files)")

    def _file_problems(self, component: str, record: dict, written_by: str, hashes: bool = True,
                       missing_ok: bool = False) -> list[str]:
        problems = []
        for key in ("file", "data"):
            path = self.root / component / record[key]
            size = record.get(f"{key}_bytes")
            if not path.is_file():
                if not missing_ok:
                    problems.append(f"{path}: missing")
            elif size is not None and path.stat().st_size != size:
                actual = path.stat().st_size
                problems.append(f"{path}: {actual} bytes, {written_by} wrote {size} "
                                f"({'truncated' if actual < size else 'changed'} since)")
            elif hashes and sha256_file(path) != record[f"{key}_sha256"]:
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
    clean_stale_partials(root, MANIFEST)
    tmp = root / f".{MANIFEST}{PARTIAL}{os.getpid()}-w"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, root / MANIFEST)


def install(root: Path, moves: list[tuple[Path, Path]], manifest: dict) -> None:
    """Move a step's finished files into place (each (staged, destination); data files before the graphs
    that name them) and write the manifest that records them, with SIGINT/SIGTERM held off until done."""
    with deferred_signals():
        for src, dst in moves:
            os.replace(src, dst)
        write_manifest(root, manifest)
