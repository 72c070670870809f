"""The soak run's clients (measure/soak.py): each a thread that repeats its kind of traffic against a running
API until the run's end, and records what it got. Real clients: websockets' and httpx's, over loopback.

    good       a live stream with a prompt change after its first chunk, read at once; its server progress
               (misses) and the chunks it got
    slow       a live stream read at half its playback speed through a small receive window, so it falls
               behind: warned (session.warning slow_consumer), then stopped (error slow_consumer, close 1008)
    vanish     a live stream whose client closes its TCP socket after one chunk, with no close frame
    bad        out-of-range fields, malformed / oversized / binary messages, a too-large body, a decompression
               bomb, a wrong key, a burst over the per-key limit: the answer of each
    jobs       video jobs: created and downloaded, created and deleted at once, deleted while in progress
"""

from __future__ import annotations

import base64
import json
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field

PROMPT = "a yellow circle moving right"
CHANGED = "a red square moving left"


@dataclass
class Tally:
    """What all clients saw (one lock; the clients are threads)."""

    statuses: list[int] = field(default_factory=list)  # every HTTP status
    ws_server_errors: list[str] = field(default_factory=list)  # WebSocket error messages of the server_error type
    good: list[dict] = field(default_factory=list)  # per good stream: chunks, expected, misses, status, refused
    slow: dict = field(default_factory=lambda: {"completed": 0, "stopped_slow_consumer": 0, "stopped_1008": 0,
                                                "warned_then_1008": 0, "refused": 0, "other": 0, "warned": 0,
                                                "close_codes": {}, "others": []})
    vanished: int = 0
    bad: dict = field(default_factory=dict)  # kind -> {"status"/"code", "openai_shape", "ok"}
    jobs: dict = field(default_factory=lambda: {"completed": 0, "downloaded": 0, "deleted": 0, "refused": 0,
                                                "lost": 0, "failed": 0})
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, fn) -> None:
        with self.lock:
            fn(self)


def openai_shape(body) -> bool:
    err = body.get("error") if isinstance(body, dict) else None
    return isinstance(err, dict) and set(err) == {"message", "type", "param", "code"} and bool(err["message"])


class Client:
    def __init__(self, base: str, key: str, tally: Tally, until: float, fps: float, limits: dict):
        import httpx

        self.base, self.key, self.tally, self.until, self.fps, self.limits = base, key, tally, until, fps, limits
        self.ws_url = base.replace("http://", "ws://") + "/v1/realtime/video"
        self.host, self.port = base.rsplit("/", 1)[-1].rsplit(":", 1)[0], int(base.rsplit(":", 1)[1])
        self.http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=120)

    def running(self) -> bool:
        return time.monotonic() < self.until

    def request(self, method: str, path: str, **kw):
        r = self.http.request(method, path, **kw)
        self.tally.add(lambda t: t.statuses.append(r.status_code))
        return r

    def connect(self, key: str | None = None, **kw):
        from websockets.sync.client import connect

        return connect(self.ws_url, additional_headers={"Authorization": f"Bearer {key or self.key}"},
                       max_size=1 << 24, open_timeout=60, **kw)

    def start(self, ws, **fields) -> dict:
        ws.send(json.dumps({"type": "session.start", "prompt": PROMPT, "num_frames": 132, **fields}))
        return self.recv_json(ws)

    def recv_json(self, ws) -> dict:
        while True:
            m = ws.recv(timeout=120)
            if isinstance(m, str):
                msg = json.loads(m)
                if msg.get("type") == "error" and msg["error"].get("type") == "server_error":
                    self.tally.add(lambda t: t.ws_server_errors.append(msg["error"]["message"]))
                return msg

    # -- the kinds of client ---------------------------------------------------------------------------
    def good(self) -> None:
        while self.running():
            with self.connect() as ws:
                started = self.start(ws, seed=int(time.monotonic() * 1000) % 100_000)
                if started["type"] != "session.started":  # over capacity: counted, not a miss
                    self.tally.add(lambda t: t.good.append({"refused": started["error"]["code"]}))
                    time.sleep(1.0)
                    continue
                chunks, end = 0, None
                while end is None:
                    msg = self.recv_json(ws)
                    if msg["type"] == "video.chunk_metadata":
                        ws.recv(timeout=120)
                        chunks += 1
                        if chunks == 1:
                            ws.send(json.dumps({"type": "session.interaction", "prompt": CHANGED}))
                    elif msg["type"] in ("session.completed", "session.stopped", "error"):
                        end = msg
                progress = end.get("progress") or {}
                record = {"chunks": chunks, "expected": started["num_chunks"], "end": end["type"],
                          "misses": progress.get("misses"), "lateness": progress.get("lateness_s"), "refused": None,
                          "error": end.get("error")}
                self.tally.add(lambda t: t.good.append(record))

    def slow(self) -> None:
        """Half speed through a 4 KB receive window, the client library holding one frame: the server's buffers
        (the soak gives it a small --send-buffer-kb) fill within a few chunks, and the viewer stays behind."""
        period = 33 / self.fps
        while self.running():
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window stays small
            sock.connect((self.host, self.port))
            with self.connect(sock=sock, max_queue=1) as ws:
                started = self.start(ws, num_frames=self.limits["slow_frames"])
                if started["type"] != "session.started":
                    self.tally.add(lambda t: t.slow.__setitem__("refused", t.slow["refused"] + 1))
                    time.sleep(1.0)
                    continue
                outcome, warned, code, why = "other", False, None, ""
                try:
                    while True:
                        time.sleep(2 * period)  # half speed
                        msg = self.recv_json(ws)
                        while msg["type"] == "session.warning":
                            warned = warned or msg.get("code") == "slow_consumer"
                            msg = self.recv_json(ws)
                        if msg["type"] == "video.chunk_metadata":
                            ws.recv(timeout=120)
                        elif msg["type"] == "session.completed":
                            outcome = "completed"
                            break
                        elif msg["type"] == "error":
                            outcome = "stopped_slow_consumer" if msg["error"]["code"] == "slow_consumer" else "other"
                            why = msg["error"]["message"][:160]
                            break
                    if outcome == "stopped_slow_consumer":
                        code = _close_code(ws)
                except Exception as e:  # noqa: BLE001 - the server closed the socket after telling
                    why = f"{type(e).__name__}: {e}"[:160]
                both = outcome == "stopped_slow_consumer" and warned and code == 1008

                def add(t, outcome=outcome, both=both, warned=warned, code=str(code), why=why):
                    t.slow.update({outcome: t.slow[outcome] + 1, "warned_then_1008": t.slow["warned_then_1008"] + both,
                                   "warned": t.slow["warned"] + warned, "stopped_1008": t.slow["stopped_1008"] + (
                                       outcome == "stopped_slow_consumer" and code == "1008")})
                    t.slow["close_codes"][code] = t.slow["close_codes"].get(code, 0) + 1
                    if outcome == "other" and len(t.slow["others"]) < 5:
                        t.slow["others"].append(why)

                self.tally.add(add)

    def vanish(self) -> None:
        while self.running():
            ws = self.connect()
            started = self.start(ws)
            if started["type"] == "session.started":
                self.recv_json(ws)  # one chunk's metadata, then gone: no close frame
            ws.socket.shutdown(socket.SHUT_RDWR)
            ws.socket.close()
            self.tally.add(lambda t: setattr(t, "vanished", t.vanished + 1))
            time.sleep(0.5)

    def jobs(self) -> None:
        n = 0
        while self.running():
            n += 1
            r = self.request("POST", "/v1/videos", json={"prompt": PROMPT, "num_frames": 66, "seed": n})
            if r.status_code == 429:
                self.tally.add(lambda t: t.jobs.__setitem__("refused", t.jobs["refused"] + 1))
                time.sleep(1.0)
                continue
            if r.status_code != 200:
                continue
            vid = r.json()["id"]
            if n % 3 == 1:  # a create/delete race
                self._delete(vid)
                continue
            if n % 3 == 2:  # deleted while in progress
                time.sleep(0.3)
                self._delete(vid)
                continue
            self._finish(vid)

    def _delete(self, vid: str) -> None:
        r = self.request("DELETE", f"/v1/videos/{vid}")
        if r.status_code == 200:
            self.tally.add(lambda t: t.jobs.__setitem__("deleted", t.jobs["deleted"] + 1))

    def _finish(self, vid: str) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            r = self.request("GET", f"/v1/videos/{vid}")
            status = r.json().get("status") if r.status_code == 200 else None
            if status in ("completed", "failed") or r.status_code == 404:
                break
            time.sleep(0.5)
        if status == "completed":
            data = self.request("GET", f"/v1/videos/{vid}/content")
            ok = data.status_code == 200 and data.content[4:8] == b"ftyp"
            self.tally.add(lambda t: t.jobs.update(completed=t.jobs["completed"] + 1,
                                                  downloaded=t.jobs["downloaded"] + ok, lost=t.jobs["lost"] + (not ok)))
        else:  # a job nobody deleted that failed or disappeared: lost
            kind = "failed" if status == "failed" else "lost"
            self.tally.add(lambda t: t.jobs.__setitem__(kind, t.jobs[kind] + 1))

    def bad(self) -> None:
        while self.running():
            for kind, (expected, attempt) in bad_inputs(self).items():
                got = attempt()
                got["ok"] = got.get("status") in expected and got.get("openai_shape", False)
                self.tally.add(lambda t, kind=kind, got=got: t.bad.setdefault(kind, got) if got["ok"]
                               else t.bad.__setitem__(kind, got))
                if not self.running():
                    return
            time.sleep(0.5)


def _close_code(ws) -> int | None:
    """The close code the server sends after its last message (None if the socket just went away)."""
    from websockets.exceptions import ConnectionClosed

    try:
        while True:
            ws.recv(timeout=10)
    except ConnectionClosed as e:  # carries the close frame the server sent
        return e.rcvd.code if e.rcvd is not None else None
    except Exception:  # noqa: BLE001 - no close frame within 10 s
        return None


# -- bad input -----------------------------------------------------------------------------------------
def bad_inputs(c: Client) -> dict:
    """kind -> (the statuses that are right, a call returning {"status", "openai_shape", ...})."""
    def post(json_body=None, headers=None, **kw):
        def call():
            r = c.request("POST", "/v1/videos", json=json_body, headers=headers, **kw)
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else None
            return {"status": r.status_code, "openai_shape": openai_shape(body),
                    "code": (body or {}).get("error", {}).get("code")}
        return call

    def ws_message(payload, expected_code):
        def call():
            with c.connect() as ws:
                ws.send(payload)
                msg = c.recv_json(ws)
                ws.send(json.dumps({"type": "session.ping"}))
                alive = c.recv_json(ws).get("type") == "session.pong"
            err = msg.get("error") or {}
            status = {"invalid_request_error": 400, "rate_limit_error": 429}.get(err.get("type"), 0)
            if err.get("code") == "message_too_large":
                status = 413
            return {"status": status if alive and err.get("code") == expected_code else -1,
                    "openai_shape": openai_shape(msg), "code": err.get("code"), "socket_kept": alive}
        return call

    big = c.limits["max_body_bytes"] + 1
    bomb = "data:image/png;base64," + base64.b64encode(_png(20_000, 20_000)).decode()
    return {
        "steps_out_of_range": ({400}, post({"prompt": PROMPT, "steps": [1, 1, 10_000]})),
        "seed_out_of_range": ({400}, post({"prompt": PROMPT, "seed": 2 ** 64})),
        "seconds_infinite": ({400}, post({"prompt": PROMPT, "seconds": "inf"})),
        "frames_out_of_range": ({400}, post({"prompt": PROMPT, "num_frames": 10 ** 9})),
        "guidance_out_of_range": ({400}, post({"prompt": PROMPT, "guidance_scale": 1e9})),
        "prompt_too_long": ({400}, post({"prompt": "x" * 100_000})),
        "decompression_bomb": ({400}, post({"prompt": PROMPT, "input_reference": {"image_url": bomb}})),
        "body_too_large": ({413}, post(content=b"\0" * big, headers={"content-type": "application/json"})),
        "malformed_json": ({400}, post(content=b"{", headers={"content-type": "application/json"})),
        "wrong_key": ({401}, post({"prompt": PROMPT}, headers={"Authorization": "Bearer wrong-key-0123456789abcdef"})),
        "burst_over_per_key_limit": ({429}, _burst(c)),
        "ws_malformed_json": ({400}, ws_message("{not json", "invalid_json")),
        "ws_oversized_message": ({413}, ws_message(json.dumps({"type": "session.ping", "pad": "x" * (
            c.limits["max_message_bytes"] + 1)}), "message_too_large")),
        "ws_seed_out_of_range": ({400}, ws_message(json.dumps({"type": "session.start", "prompt": PROMPT,
                                                               "seed": 2 ** 64}), "invalid_request")),
        "ws_unknown_message": ({400}, ws_message(json.dumps({"type": "session.explode"}), "unknown_message")),
    }


def _burst(c: Client):
    """max_jobs_per_key + 2 job requests of one key at once: the extra ones must be 429."""
    def call():
        from concurrent.futures import ThreadPoolExecutor

        n = c.limits["max_jobs_per_key"] + 2
        with ThreadPoolExecutor(n) as pool:
            answers = list(pool.map(lambda i: c.request("POST", "/v1/videos", json={"prompt": PROMPT,
                                                                                    "num_frames": 33}), range(n)))
        for r in answers:
            if r.status_code == 200:
                c._delete(r.json()["id"])
        refused = [r for r in answers if r.status_code == 429]
        accepted = sum(r.status_code == 200 for r in answers)
        over = accepted > c.limits["max_jobs_per_key"]
        return {"status": 429 if refused and not over else (500 if over else answers[0].status_code),
                "openai_shape": all(openai_shape(r.json()) for r in refused), "accepted": accepted}
    return call


def _png(width: int, height: int) -> bytes:
    """A real 1-bit PNG of zeros: a few tens of KB holding ``width * height`` pixels (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row, z = b"\0" * (1 + (width + 7) // 8), zlib.compressobj(9)
    raw = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
