"""Processes as Linux's /proc shows them: the status fields of each live process (no psutil needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator


def stat_fields(pid: int | str = "self") -> list[str]:
    """The fields of /proc/<pid>/stat after "pid (comm) ": state, ppid, pgrp, ... (``proc(5)`` numbering
    minus 3: utime is [11], stime [12])."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2:].split()


def live_processes() -> Iterator[tuple[int, list[str]]]:
    """(pid, stat fields) of every process that is running now (zombies and processes that exit while
    /proc is read are left out)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = stat_fields(entry.name)
        except OSError:
            continue
        if fields[0] != "Z":
            yield int(entry.name), fields


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (MemTotal, MemAvailable, ...)."""
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            out[name] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return out
