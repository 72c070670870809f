"""/metrics in the Prometheus text format (prometheus_client), one registry per app.

    helios_api_jobs{status}                  jobs in the store by status (gauge)
    helios_api_active_streams                streams being generated: jobs and live streams (gauge)
    helios_api_stream_capacity               real-time streams the backend holds (gauge)
    helios_api_load                          active streams against capacity, 1 = full (gauge): the
                                             HorizontalPodAutoscaler in deploy/ scales the API on it
    helios_api_first_chunk_latency_seconds   request to first decoded chunk (histogram), jobs and streams
    helios_api_chunks_total                  chunks delivered (counter)
    helios_api_refused_total{reason}         requests refused or streams dropped: over_capacity,
                                             per_key_limit, slow_consumer (counter)
    helios_api_send_backlog_chunks           chunks made and not yet sent to a viewer, per chunk (histogram)
    helios_api_encode_load                   live streams' H.264 encode time against the encoder threads'
                                             (gauge; new streams are refused near 1)
    helios_api_encode_workers                encoder threads (gauge)
    helios_cluster_demand                    with --triton: (active + queued + recently refused) / capacity over
                                             all nodes, from their capacity answers (gauge; above 1 when more is
                                             asked than the cluster holds)
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

JOB_STATUSES = ("queued", "in_progress", "completed", "failed")
LOAD_METRIC = "helios_api_load"
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)


class _Live:
    """Gauges read from the job store and the backend at scrape time."""

    def __init__(self, store, backend, encode=None, fps: float = 24.0):
        self.store, self.backend, self.encode, self.fps = store, backend, encode, fps

    def collect(self):
        jobs = GaugeMetricFamily("helios_api_jobs", "Video jobs in the store by status", labels=["status"])
        counts = self.store.counts()
        for status in JOB_STATUSES:
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs
        m = self.backend.metrics()
        yield GaugeMetricFamily("helios_api_active_streams", "Streams being generated (jobs and live streams)",
                                value=m["active_streams"])
        yield GaugeMetricFamily("helios_api_stream_capacity", "Real-time streams the backend holds",
                                value=m["capacity"])
        yield GaugeMetricFamily(LOAD_METRIC, "Active streams against capacity (1 = full)", value=m["load"])
        if m.get("cluster_demand") is not None:
            yield GaugeMetricFamily("helios_cluster_demand", "Streams asked of the Triton nodes (active, queued and "
                                    "refused in the last 60 s) against their capacity", value=m["cluster_demand"])
        if self.encode is not None:
            e = self.encode.metrics(self.fps)
            yield GaugeMetricFamily("helios_api_encode_load", "Live streams' encode time against the encoder "
                                    "threads' (1 = full)", value=e["encode_load"])
            yield GaugeMetricFamily("helios_api_encode_workers", "H.264 encoder threads", value=e["encode_workers"])


class Metrics:
    def __init__(self, store, backend, encode=None, fps: float = 24.0):
        self.registry = CollectorRegistry()
        self.registry.register(_Live(store, backend, encode, fps))
        self.first_chunk = Histogram("helios_api_first_chunk_latency_seconds",
                                     "Seconds from a request to its first decoded chunk", buckets=LATENCY_BUCKETS,
                                     registry=self.registry)
        self.chunks = Counter("helios_api_chunks", "Chunks delivered to jobs and streams", registry=self.registry)
        self.refused = Counter("helios_api_refused", "Requests refused", ["reason"], registry=self.registry)
        self.backlog = Histogram("helios_api_send_backlog_chunks", "Chunks made and not yet sent to a viewer",
                                 buckets=(0, 1, 2, 3, 4, 8), registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
