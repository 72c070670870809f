"""Peak memory of a stretch of work inside one process (Linux).

``VmHWM`` (the kernel's high-water mark of resident memory, what ``ru_maxrss`` reports) can be reset by
writing 5 to ``/proc/self/clear_refs``, so each component's export or each step of a command can report
its own peak. Elsewhere (no /proc), ``peak_rss_bytes`` falls back to ``ru_maxrss`` and ``reset_peak`` does
nothing: peaks are then process-wide."""

from __future__ import annotations

import contextlib
import resource
import sys
from typing import Iterator

_STATUS = "/proc/self/status"
_earlier_peak = 0  # the highest mark before the last reset: the process's own peak survives resets


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    """Resident-memory high-water mark since the process started or the last ``reset_peak``."""
    kib = _status_kib("VmHWM")
    if kib is None:
        scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return kib * 1024


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return (kib or 0) * 1024


def process_peak_bytes() -> int:
    """The whole process's peak, resets or not (what a caller measuring this process from outside needs)."""
    return max(_earlier_peak, peak_rss_bytes())


def reset_peak() -> bool:
    """Start a new high-water mark at the current resident size; False where the kernel does not allow it."""
    global _earlier_peak
    _earlier_peak = process_peak_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc's ``malloc_trim``; elsewhere only the
    collection): between two phases that each hold a model's weights, the second starts from the first's
    baseline instead of on top of its freed but still mapped heap."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    libc = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(libc).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


@contextlib.contextmanager
def measure_peak() -> Iterator[dict]:
    """``with measure_peak() as m: ...`` leaves ``m["peak_rss_bytes"]``: the peak of that block (of the whole
    process where the high-water mark cannot be reset, said by ``m["scope"]``) and ``m["start_rss_bytes"]``:
    the resident size it started from (the interpreter, libraries and what earlier work left mapped), so the
    block's own growth is ``peak_rss_bytes - start_rss_bytes``."""
    record: dict = {"scope": "block" if reset_peak() else "process", "start_rss_bytes": rss_bytes()}
    try:
        yield record
    finally:
        record["peak_rss_bytes"] = peak_rss_bytes()
