"""The helios model's live-stream metrics as Triton custom metrics (Python backend MetricFamily), served by
tritonserver on its metrics port (8002, /metrics) next to Triton's own, so an autoscaler reads them there.

| metric | kind | meaning |
|---|---|---|
| helios_live_streams{state="active"/"queued"} | gauge | streams being made / waiting for capacity |
| helios_live_capacity | gauge | real-time streams this node holds at the default settings (sum over its GPUs) |
| helios_live_demand | gauge | (active + queued + refused in the last 60 s) / capacity: passes 1 when more is asked than fits; the autoscaler's metric |
| helios_live_draining | gauge | 1 while the node drains (shutting down: it takes no new streams) |
| helios_live_load | gauge | the runners' share the active streams take (1 = full; mean over the node's GPUs) |
| helios_live_chunk_seconds | gauge | time of one chunk at the default settings (the slowest GPU's; measured at start) |
| helios_live_chunks_total | counter | chunks made |
| helios_live_deadline_misses_total | counter | chunks decoded after their playback deadline |
| helios_live_lateness_seconds_total | counter | sum over chunks of max(0, decoded - deadline) |
| helios_live_chunk_run_seconds_total | counter | sum of the chunk jobs' run times |
| helios_live_first_chunk_seconds_total, helios_live_first_chunks_total | counter | first-chunk latency sum, count |
| helios_live_streams_total, helios_live_streams_refused_total | counter | streams opened, refused over capacity |

Every metric carries the labels model="helios" and instance=<model instance name> (one instance per node:
these are the node's figures, its schedulers' summed: serving/node.py).
"""

from __future__ import annotations

import threading
import urllib.request

GAUGES = {"helios_live_capacity": ("capacity", "real-time streams this node holds at the default settings"),
          "helios_live_demand": ("demand", "(active + queued + refused in the last 60 s) / capacity; above 1: more "
                                           "is asked than fits"),
          "helios_live_draining": ("draining", "1 while the node drains (takes no new streams)"),
          "helios_live_load": ("load", "share of the runners the active streams take (1 = full)"),
          "helios_live_chunk_seconds": ("chunk_seconds", "time of one chunk at the default settings")}
COUNTERS = {"helios_live_chunks_total": ("chunks", "chunks made"),
            "helios_live_deadline_misses_total": ("misses", "chunks decoded after their playback deadline"),
            "helios_live_lateness_seconds_total": ("late_seconds", "sum of max(0, decoded - deadline) over chunks"),
            "helios_live_chunk_run_seconds_total": ("chunk_seconds_sum", "sum of chunk job run times"),
            "helios_live_first_chunk_seconds_total": ("first_chunk_latency_sum", "sum of first-chunk latencies"),
            "helios_live_first_chunks_total": ("first_chunks", "streams that got their first chunk"),
            "helios_live_streams_total": ("streams", "streams opened"),
            "helios_live_streams_refused_total": ("refused", "streams refused over capacity")}


class LiveMetrics:
    """Publishes ``node.metrics()`` (serving/node.py: the node's schedulers summed, with demand) every
    ``interval`` seconds through ``pb_utils``'s metric families."""

    def __init__(self, pb_utils, node, labels: dict, interval: float = 1.0):
        kind = pb_utils.MetricFamily
        self._node, self._interval = node, interval
        streams = kind(name="helios_live_streams", description="live streams by state", kind=kind.GAUGE)
        self._streams = {state: streams.Metric(labels={**labels, "state": state}) for state in ("active", "queued")}
        self._families = [streams]
        self._gauges, self._counters, self._last = {}, {}, {}
        for table, kind_value, out in ((GAUGES, kind.GAUGE, self._gauges), (COUNTERS, kind.COUNTER, self._counters)):
            for name, (key, doc) in table.items():
                family = kind(name=name, description=doc, kind=kind_value)
                self._families.append(family)
                out[key] = family.Metric(labels=labels)
        self.publish()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="helios-metrics", daemon=True)
        self._thread.start()

    def publish(self) -> None:
        m = self._node.metrics()
        self._streams["active"].set(m["active_streams"])
        self._streams["queued"].set(m["queued_streams"])
        for key, metric in self._gauges.items():
            metric.set(float(m[key] or 0.0))
        for key, metric in self._counters.items():
            delta = float(m[key]) - self._last.get(key, 0.0)
            if delta > 0:
                metric.increment(delta)
            self._last[key] = float(m[key])

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.publish()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def read_metrics(url: str, prefix: str = "helios_live_") -> dict[str, float]:
    """The ``prefix`` metrics of a Prometheus text endpoint (Triton's :8002/metrics), summed over their
    label sets (several instances), by name; ``helios_live_streams`` per state as ``helios_live_streams{state}``."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        name_labels, value = line.rsplit(" ", 1)
        name = name_labels.split("{", 1)[0]
        if name == "helios_live_streams" and 'state="' in name_labels:
            name += "{" + name_labels.split('state="', 1)[1].split('"', 1)[0] + "}"
        out[name] = out.get(name, 0.0) + float(value)
    return out
