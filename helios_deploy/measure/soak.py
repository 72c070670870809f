"""`helios-deploy soak`: the API server (a real process: `helios-deploy api`, in process or in front of a real
tritonserver) under C clients of every kind for S seconds (measure/soak_clients.py), then the checks:

    rss_growth_pct < 5          the server's RSS after warm-up vs at the end (the API process; with Triton
                                also the tritonserver's, reported)
    active_streams_end == 0     streams and the runners' in-flight work back to 0 once the clients are gone
    errors_5xx == 0             HTTP 5xx answers and WebSocket server errors
    jobs_lost == 0              every finished job downloadable, none failed or gone without a DELETE
    chunks_lost == 0            every good stream that completed got all its chunks
    misses_good_streams == 0    deadline misses of the good streams (admitted: within capacity)
    slow_readers                readers at half speed are stopped (slow_consumer) and closed with 1008
    bad inputs                  each kind answered with its status (400/401/413/429) in the OpenAI shape
    health_p99_ms               /health's latency under the load (reported; checked < 1000 ms)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..errors import UserError
from .soak_clients import Client, Tally

KINDS = ("good", "bad", "slow", "vanish", "jobs", "good")  # clients take their kind in this order, round robin
# send_buffer_kb: the tiny artifacts' 64x128 chunks are about 100 KB, so 16 KB below the app (and the kernel's
# doubling of it) hold half of one: a slow reader fills them within a chunk or two (512 KB would hold ~15);
# slow_frames: the slow readers' streams (20 chunks) outlast the few chunks it takes them to fall behind
LIMITS = {"max_body_bytes": 1 << 20, "max_message_bytes": 64 << 10, "max_jobs_per_key": 2, "send_buffer_kb": 16,
          "slow_frames": 660}
RSS_GROWTH_MAX_PCT = 5.0
HEALTH_P99_MAX_MS = 1000.0


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _triton(artifacts: Path, work: Path, log):
    from ..serving.repository import RepoOptions, write_repository
    from ..serving.server import LocalServer, find_env

    write_repository(artifacts, work / "repo", RepoOptions(backend="onnxruntime", max_frames=330, reference=True))
    log("starting tritonserver ...")
    server = LocalServer(find_env(), work / "repo", log_path=work / "tritonserver.log").start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def _api(artifacts: Path, work: Path, keys: list[str], triton_url: str | None, log):
    """`helios-deploy api` as its own process (its RSS is the server's); yields (base URL, process)."""
    import httpx

    port = _free_port()
    source = ["--triton", triton_url] if triton_url else ["--artifacts", str(artifacts)]
    args = [sys.executable, "-m", "helios_deploy.cli", "api", *source, "--store", str(work / "store"),
            "--port", str(port), "--max-jobs-per-key", str(LIMITS["max_jobs_per_key"]),
            "--max-body-mb", str(LIMITS["max_body_bytes"] / (1 << 20)),
            "--max-message-kb", str(LIMITS["max_message_bytes"] >> 10), "--send-buffer-kb", str(LIMITS["send_buffer_kb"]),
            "--max-frames", str(LIMITS["slow_frames"])]
    env = {**os.environ, "HELIOS_API_KEY": ",".join(keys)}
    out = open(work / "api.log", "w")
    proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise UserError("the API server did not come up", found=(work / "api.log").read_text()[-2000:])
            time.sleep(0.2)
        log(f"API server up at {url} (pid {proc.pid})")
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        out.close()


class HealthProbe(threading.Thread):
    """GET /health every ``every`` seconds; its latencies (ms) and non-200 answers."""

    def __init__(self, url: str, every: float = 0.2):
        super().__init__(daemon=True, name="soak-health")
        self.url, self.every, self.ms, self.failed = url, every, [], 0
        self.stop = threading.Event()

    def run(self) -> None:
        import httpx

        with httpx.Client(timeout=10) as c:
            while not self.stop.wait(self.every):
                t = time.perf_counter()
                try:
                    ok = c.get(self.url + "/health").status_code == 200
                except httpx.TransportError:
                    ok = False
                self.ms.append(1000 * (time.perf_counter() - t))
                self.failed += not ok

    def p99(self) -> float | None:
        if not self.ms:
            return None
        s = sorted(self.ms)
        return round(s[min(len(s) - 1, int(0.99 * len(s)))], 1)


def _metric(url: str, key: str, name: str) -> float | None:
    import re

    import httpx

    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30).text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def run_soak(artifacts, *, via: str = "api", seconds: float = 60.0, clients: int = 6, fps: float = 24.0,
             warmup: float | None = None, log=print) -> dict:
    artifacts = Path(artifacts)
    if not (artifacts / "manifest.json").is_file():
        raise UserError(f"{artifacts} is not an artifact folder (no manifest.json)",
                        fix="helios-deploy demo -o DIR, then DIR/artifacts; or helios-deploy export")
    if seconds < 10 or clients < 1:
        raise UserError("a soak needs at least 10 seconds and 1 client", found=f"{seconds} s, {clients} clients")
    warmup = min(20.0, seconds / 4) if warmup is None else warmup
    keys = [secrets.token_urlsafe(24) for _ in range(clients)]
    with tempfile.TemporaryDirectory(prefix="helios-soak-") as tmp:
        work = Path(tmp)
        with contextlib.ExitStack() as stack:
            triton = stack.enter_context(_triton(artifacts, work, log)) if via == "triton" else None
            url, proc = stack.enter_context(_api(artifacts, work, keys, triton.grpc_url if triton else None, log))
            return _drive(url, proc, triton, keys, seconds, clients, fps, warmup, log)


def _drive(url, proc, triton, keys, seconds, clients, fps, warmup, log) -> dict:
    tally, health = Tally(), HealthProbe(url)
    health.start()
    until = time.monotonic() + seconds
    threads, errors = [], []
    for i in range(clients):
        kind = KINDS[i % len(KINDS)]
        client = Client(url, keys[i], tally, until, fps, LIMITS)

        def run(client=client, kind=kind):
            try:
                getattr(client, kind)()
            except Exception as e:  # noqa: BLE001 - a client that broke is reported, not hidden
                errors.append(f"{kind}: {type(e).__name__}: {e}")

        threads.append(threading.Thread(target=run, name=f"soak-{kind}-{i}", daemon=True))
        threads[-1].start()
    log(f"{clients} clients for {seconds:g} s; warm-up {warmup:g} s")
    time.sleep(warmup)
    rss_start = rss_mb(proc.pid)
    triton_start = rss_mb(triton.proc.pid) if triton is not None and hasattr(triton, "proc") else None
    for t in threads:
        t.join(timeout=max(0.0, until - time.monotonic()) + 600)
    end = time.monotonic() + 30  # the server lets go of everything within this
    while (active := _metric(url, keys[0], "helios_api_active_streams")) and time.monotonic() < end:
        time.sleep(0.5)
    time.sleep(2.0)
    health.stop.set()
    rss_end = rss_mb(proc.pid)
    return _report(tally, health, errors, rss_start, rss_end, active, triton_start,
                   rss_mb(triton.proc.pid) if triton_start is not None else None, seconds, clients)


def _report(tally: Tally, health: HealthProbe, errors, rss_start, rss_end, active, triton_start, triton_end,
            seconds, clients) -> dict:
    good = [g for g in tally.good if not g.get("refused")]
    completed = [g for g in good if g["end"] == "session.completed"]
    r = {"seconds": seconds, "clients": clients, "rss_start_mb": round(rss_start, 1), "rss_end_mb": round(rss_end, 1),
         "rss_growth_pct": round(100 * (rss_end - rss_start) / rss_start, 2),
         "errors_5xx": sum(s >= 500 for s in tally.statuses) + len(tally.ws_server_errors),
         "jobs_lost": tally.jobs["lost"] + tally.jobs["failed"],
         "chunks_lost": sum(g["expected"] - g["chunks"] for g in completed),
         "active_streams_end": active, "misses_good_streams": sum(g["misses"] or 0 for g in completed),
         "good_chunks": sum(g["chunks"] for g in completed),
         "misses_first_chunk": sum(bool(g.get("lateness")) and g["lateness"][0] > 0 for g in completed),
         "max_lateness_s": round(max((x for g in completed for x in g.get("lateness") or []), default=0.0), 3),
         "good_streams": len(completed), "good_streams_not_completed": len(good) - len(completed),
         "good_streams_refused": len(tally.good) - len(good), "slow_readers": tally.slow,
         "vanished_clients": tally.vanished, "jobs": tally.jobs, "http_requests": len(tally.statuses),
         "health_p99_ms": health.p99(), "health_checks": len(health.ms), "health_failures": health.failed,
         "bad_inputs": tally.bad, "client_errors": errors, "ws_server_errors": tally.ws_server_errors[:5]}
    if triton_start is not None:
        r.update(triton_rss_start_mb=round(triton_start, 1), triton_rss_end_mb=round(triton_end, 1))
    r["checks"] = checks(r)
    r["ok"] = all(c["ok"] for c in r["checks"].values())
    return r


def checks(r: dict) -> dict:
    bad_ok = bool(r["bad_inputs"]) and all(v.get("ok") for v in r["bad_inputs"].values())
    table = {"rss_growth_pct": (r["rss_growth_pct"] < RSS_GROWTH_MAX_PCT, f"< {RSS_GROWTH_MAX_PCT}"),
             "active_streams_end": (r["active_streams_end"] == 0, "0"),
             "errors_5xx": (r["errors_5xx"] == 0, "0"), "jobs_lost": (r["jobs_lost"] == 0, "0"),
             "chunks_lost": (r["chunks_lost"] == 0, "0"),
             "misses_good_streams": (r["misses_good_streams"] == 0, "0"),
             "good_streams": (r["good_streams"] > 0, "> 0"),
             "slow_readers": (_slow_ok(r["slow_readers"]), "stopped (slow_consumer) and closed with 1008: at "
                              "least one, every one stopped; none ended otherwise"),
             "health_p99_ms": (r["health_p99_ms"] is not None and r["health_p99_ms"] < HEALTH_P99_MAX_MS,
                               f"< {HEALTH_P99_MAX_MS:g}"),
             "bad_inputs": (bad_ok, "each kind answered with its status in the OpenAI shape"),
             "client_errors": (not r["client_errors"], "none")}
    return {k: {"ok": bool(ok), "want": want, "got": r.get(k) if k != "bad_inputs" else
                {n: v.get("status") for n, v in r["bad_inputs"].items()}} for k, (ok, want) in table.items()}


def _slow_ok(slow: dict) -> bool:
    """Slow readers that fell behind were stopped and closed with 1008 (the warning before it is sent when the
    server notices the backlog at a chunk; one whose first blocked send outlasts 3 periods is stopped without)."""
    stopped = slow.get("stopped_slow_consumer", 0)
    return stopped > 0 and slow.get("stopped_1008", 0) == stopped and slow.get("other", 0) == 0


def format_report(r: dict) -> str:
    lines = [f"soak: {r['clients']} clients for {r['seconds']:g} s -> {'PASS' if r['ok'] else 'FAIL'}",
             f"  server RSS {r['rss_start_mb']} MB after warm-up -> {r['rss_end_mb']} MB ({r['rss_growth_pct']:+.2f} %)",
             f"  good streams {r['good_streams']} (refused {r['good_streams_refused']}), misses "
             f"{r['misses_good_streams']} of {r['good_chunks']} chunks ({r['misses_first_chunk']} first chunks; "
             f"latest {r['max_lateness_s']} s), chunks lost {r['chunks_lost']}",
             f"  slow readers {r['slow_readers']}; vanished clients {r['vanished_clients']}",
             f"  jobs {r['jobs']}; HTTP requests {r['http_requests']}, 5xx {r['errors_5xx']}",
             f"  /health p99 {r['health_p99_ms']} ms over {r['health_checks']} checks; active streams at the end "
             f"{r['active_streams_end']}"]
    lines += [f"  bad input {k}: {v.get('status')} {'ok' if v.get('ok') else 'WRONG'} ({v.get('code')})"
              for k, v in sorted(r["bad_inputs"].items())]
    lines += [f"  FAILED {k}: got {c['got']}, want {c['want']}" for k, c in r["checks"].items() if not c["ok"]]
    return "\n".join(lines)
