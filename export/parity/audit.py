"""Audit exported artifacts against their specs and the reference: onnx.checker, an ONNX Runtime
session whose inputs and outputs match the spec, and parity against the reference module. Every
problem is collected; a failure raises once with the whole table."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ...errors import AuditError
from ...model.specs import ComponentSpec
from ...measure.memory import measure_peak
from .compare import OrtGraph, compare_component


def _check_io(session: OrtGraph) -> list[str]:
    """Session inputs/outputs against the spec: names, order, dtypes, ranks."""
    problems = []
    to_ort = {"float32": "tensor(float)", "int64": "tensor(int64)", "uint8": "tensor(uint8)"}
    for kind, actual, declared in (("input", session.session.get_inputs(), session.graph.inputs),
                                   ("output", session.session.get_outputs(), session.graph.outputs)):
        if [a.name for a in actual] != [t.name for t in declared]:
            problems.append(f"{kind} names {[a.name for a in actual]} != spec {[t.name for t in declared]}")
            continue
        for a, t in zip(actual, declared):
            if a.type != to_ort[t.dtype] or len(a.shape) != len(t.dims):
                problems.append(f"{kind} {t.name}: {a.type} rank {len(a.shape)}, spec {t.dtype} rank {len(t.dims)}")
    return problems


def open_sessions(root: Path, spec: ComponentSpec, rows: list[tuple]) -> dict[str, OrtGraph] | None:
    """Checker + session + I/O check per graph; appends failures to ``rows``; None if any failed."""
    import onnx

    sessions = {}
    for g in spec.graphs:
        path = root / spec.name / g.file
        try:
            onnx.checker.check_model(str(path))
        except Exception as e:  # the checker raises several types
            rows.append((spec.name, g.name, "onnx.checker", str(e).splitlines()[0][:120]))
            continue
        try:
            sessions[g.name] = OrtGraph(path, g)
        except Exception as e:
            rows.append((spec.name, g.name, "onnxruntime session", str(e).splitlines()[0][:120]))
            continue
        for p in _check_io(sessions[g.name]):
            rows.append((spec.name, g.name, "spec", p))
    return sessions if len(sessions) == len(spec.graphs) and not rows else None


def parity_rows(component: str, result: dict) -> list[tuple]:
    return [(component, c["name"], "parity", f"rel_l2 {c['rel_l2']:.2e} > {result['threshold_rel_l2']:.0e} "
             f"(max_abs_err {c['max_abs_err']:.2e}, cosine {c['cosine']:.6f})")
            for c in result["cases"] if not c["passed"]]


def format_table(rows: Iterable[tuple]) -> str:
    rows = [("component", "graph/case", "check", "problem"), *rows]
    widths = [max(len(str(r[i])) for r in rows) for i in range(3)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r[:3], widths)) + "  " + str(r[3]) for r in rows)


def audit(root: Path, specs: dict[str, ComponentSpec], reference_loader, seed: int = 0) -> dict:
    """Audit every component; returns parity results by component, raises AuditError on any failure.

    ``reference_loader(component)`` returns the reference module (loaded lazily, one at a time).
    """
    rows: list[tuple] = []
    results = {}
    for name, spec in specs.items():
        local: list[tuple] = []
        with measure_peak() as memory:
            results[name] = compare_component(name, spec, lambda: open_sessions(root, spec, local),
                                              lambda: reference_loader(name), seed=seed)
        results[name]["memory"] = memory
        local += parity_rows(name, results[name])
        rows += local
    if rows:
        raise AuditError(f"{len(rows)} audit check(s) failed", format_table(rows),
                         fix="see the table; run with HELIOS_DEPLOY_DEBUG=1 for details")
    return results
