"""OpenAI-compatible video jobs: POST/GET /v1/videos, GET/DELETE /v1/videos/{id}, GET .../content.

A job is a stream on the backend (so jobs and live streams share the runners by the scheduler's deadlines)
whose chunks a thread appends to an mp4 through the project's video writer (runtime/video_io.py); the job
row in the store follows its progress. Each key sees its own jobs only.
"""

from __future__ import annotations

import io
import json
import threading
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from ..errors import UserError
from ..runtime.video_io import write_mp4
from .errors import ApiError, from_user_error
from .requests import VideoRequest, parse

POLL_AFTER_MS = 500  # the openai SDK's poll waits this long between retrieves (openai-poll-after-ms)


def video_object(job: dict) -> dict:
    out = {k: job[k] for k in ("id", "created_at", "completed_at", "status", "progress", "model", "prompt",
                               "seconds", "size")}
    out.update(object="video", expires_at=job.get("expires_at"), remixed_from_video_id=None,
               error=None if job["status"] != "failed" else {"code": job["error_code"] or "failed",
                                                             "message": job["error_message"] or ""})
    return out


def input_png(image, size: tuple[int, int]) -> bytes:
    """An I2V job's input image as it is stored with the job: resized to the video's (height, width) the way
    the runtime resizes it (Lanczos; runtime/conditioning.py), so a re-run's resize is a copy and its frames
    are the first run's, and PNG (lossless). At most the video's size: bounded."""
    from PIL import Image

    h, w = size
    buf = io.BytesIO()
    image.convert("RGB").resize((w, h), resample=Image.LANCZOS).save(buf, format="PNG")
    return buf.getvalue()


class Cancelled(Exception):
    """Raised into a job's video writer when the job is deleted or the server stops."""


class JobRunner:
    """Starts jobs on the backend and writes their videos; one thread per running job.

    The job's row is written (queued) before its stream is opened, under a lock with the per-key count, so a
    burst cannot pass the per-key limit and a store failure leaves no stream without a job; a stream the
    backend refuses takes its row away again."""

    def __init__(self, state):
        self.state = state
        self._streams: dict[str, object] = {}  # job id -> backend stream, while it runs
        self._cancelled: dict[str, threading.Event] = {}  # job id -> set by cancel(), while it runs
        self._lock = threading.Lock()
        self._admit = threading.Lock()  # the per-key count and the row's creation, together
        self._closing = False
        if hasattr(state.store, "serve_queue"):  # jobs the store re-queued (a dead replica's) are run here
            state.store.serve_queue(self.resume)

    def start(self, key: str, request: VideoRequest) -> dict:
        s = self.state
        job = self._reserve(key, request)
        if request.image is not None:  # kept with the job: a replica that reclaims it runs it with the same image
            try:
                self._store(s.store.save_input, job["id"], input_png(request.image, request.size))
            except BaseException:
                self._store(s.store.delete, job["id"])
                raise
        opened = time.perf_counter()
        try:
            stream = s.backend.open(request.prompt, realtime=False, **request.backend_kwargs())
        except BaseException as e:
            self._store(s.store.delete, job["id"])  # refused or failed: no job was made
            if isinstance(e, UserError):
                if getattr(e, "code", None) == "over_capacity":
                    s.metrics.refused.labels("over_capacity").inc()
                raise from_user_error(e) from None
            raise
        with self._lock:
            self._streams[job["id"]] = stream
            self._cancelled[job["id"]] = threading.Event()
        try:
            self._store(s.store.update, job["id"], status="in_progress")
        except ApiError:
            self.cancel(job["id"])
            raise
        threading.Thread(target=self._run, args=(job["id"], stream, opened), name=f"job-{job['id']}",
                         daemon=True).start()
        return self._store(s.store.get, job["id"]) or job

    def resume(self, job: dict) -> None:
        """Run a job this replica claimed from the store's queue (its replica died) again from the start;
        an error (e.g. over capacity) hands it back to the queue."""
        params = json.loads(job["params"])
        image = None
        if params.pop("image", False):
            data = self.state.store.load_input(job["id"]) if hasattr(self.state.store, "load_input") else None
            if data is None:
                self._fail(job["id"], "input_lost", "the replica running this image-to-video job stopped, and its "
                           "input image is gone from the store: create the job again")
                return
            from PIL import Image

            image = Image.open(io.BytesIO(data)).convert("RGB")
        if params.get("pyramid_steps") is not None:
            params["pyramid_steps"] = tuple(params["pyramid_steps"])
        width, height = (int(v) for v in job["size"].split("x"))
        opened = time.perf_counter()
        stream = self.state.backend.open(job["prompt"], realtime=False, image=image, height=height, width=width,
                                         **params)
        with self._lock:
            self._streams[job["id"]] = stream
            self._cancelled[job["id"]] = threading.Event()
        threading.Thread(target=self._run, args=(job["id"], stream, opened), name=f"job-{job['id']}",
                         daemon=True).start()

    def _reserve(self, key: str, request: VideoRequest) -> dict:
        """The job's row (queued), if ``key`` has room: counted and written in one step."""
        s, limit = self.state, self.state.limits.max_jobs_per_key
        row = dict(key=key, model=request.model, prompt=request.prompt, seconds=request.seconds(s.fps),
                   size=request.size_text, params=request.params())
        if hasattr(s.store, "reserve"):  # one transaction in the store (every replica's jobs counted)
            job = self._store(s.store.reserve, limit=limit, **row)
        else:
            with self._admit:
                full = self._store(s.store.count_active, key) >= limit
                job = None if full else self._store(s.store.create, **row)
        if job is None:
            s.metrics.refused.labels("per_key_limit").inc()
            raise ApiError(429, f"this key already has {limit} jobs queued or running", "too_many_jobs")
        return job

    @staticmethod
    def _store(fn, *args, **kwargs):
        """A store call; its failure (locked, corrupt, gone) is one clear 503."""
        try:
            return fn(*args, **kwargs)
        except (ApiError, LookupError):
            raise
        except Exception as e:  # noqa: BLE001 - sqlite3 / psycopg errors and the store's own
            message = e.render() if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            raise ApiError(503, f"the job store failed: {message}", "store_unavailable") from None

    def _run(self, job_id: str, stream, opened: float) -> None:
        store, cancelled = self.state.store, self._cancelled[job_id]
        staged = store.staging_path(job_id) if hasattr(store, "staging_path") else store.video_path(job_id)

        def frames():
            while (chunk := stream.next()) is not None:
                if cancelled.is_set():
                    raise Cancelled()
                if chunk.index == 0:
                    self.state.metrics.first_chunk.observe(time.perf_counter() - opened)
                self.state.metrics.chunks.inc()
                p = stream.progress()
                if not store.progress(job_id, min(99, int(100 * p["chunks_done"] / p["num_chunks"]))):
                    raise Cancelled()  # deleted (through any replica), or another replica holds it now
                yield chunk.frames

        try:
            write_mp4(staged, frames(), fps=round(self.state.fps))
            if cancelled.is_set() or stream.progress()["status"] == "stopped":  # deleted, or the server stops
                raise Cancelled()
            self._finish(job_id, staged)
        except Cancelled:
            staged.unlink(missing_ok=True)
            if self._closing and hasattr(store, "release"):
                store.release(job_id)  # the server stops: back to the queue, for another replica or the next start
            else:
                self._fail(job_id, "cancelled", "the job was stopped before it completed (deleted, or the server "
                           "stopped)")
        except Exception as e:  # noqa: BLE001 - any failure of the stream becomes the job's error
            staged.unlink(missing_ok=True)
            self._fail(job_id, "generation_failed", e.render() if isinstance(e, UserError) else f"{type(e).__name__}: {e}")
        finally:
            with self._lock:
                self._streams.pop(job_id, None)
                self._cancelled.pop(job_id, None)
            if cancelled.is_set() or store.get(job_id) is None:  # deleted while it ran
                store.video_path(job_id).unlink(missing_ok=True)

    def _finish(self, job_id: str, staged) -> None:
        store = self.state.store
        if hasattr(store, "complete"):
            store.complete(job_id, staged)  # moves it into place; False (and no file) if deleted meanwhile
        else:
            store.update(job_id, status="completed", completed_at=int(time.time()), progress=100)

    def _fail(self, job_id: str, code: str, message: str) -> None:
        store = self.state.store
        if hasattr(store, "fail"):
            store.fail(job_id, code, message)
        else:
            store.update(job_id, status="failed", completed_at=int(time.time()), error_code=code,
                         error_message=message)

    def cancel(self, job_id: str) -> None:
        """Stop a job's stream (if it still generates) and its writer (if it still encodes)."""
        with self._lock:
            stream, cancelled = self._streams.get(job_id), self._cancelled.get(job_id)
        if cancelled is not None:
            cancelled.set()
        if stream is not None:
            try:
                stream.stop()
            except UserError:
                pass  # its chunks are all made (the writer is still encoding) or it ended meanwhile

    def stop_all(self) -> None:
        self._closing = True
        if hasattr(self.state.store, "serve_queue"):
            self.state.store.serve_queue(None)
        for job_id in list(self._streams):
            self.cancel(job_id)


async def _fields(request: Request) -> dict:
    kind = request.headers.get("content-type", "")
    if kind.startswith("application/json"):
        try:
            data = await request.json()
        except ValueError:
            raise ApiError(400, "the body is not valid JSON", "invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object", "invalid_json")
        return data
    if kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form()
        out = {}
        for name, value in form.multi_items():
            out[name] = await value.read() if hasattr(value, "read") else value
        return out
    raise ApiError(400, f"content type {kind or 'none'!r} is not accepted: send multipart/form-data or JSON",
                   "invalid_request")


def router(auth) -> APIRouter:
    r = APIRouter(prefix="/v1/videos")

    async def own(request: Request, video_id: str, key: str) -> dict:
        job = await run_in_threadpool(JobRunner._store, request.app.state.api.store.get, video_id)
        if job is None or job["key"] != key:
            raise ApiError(404, f"no video {video_id!r}", "video_not_found", "video_id")
        return job

    @r.post("")
    async def create(request: Request, key: str = Depends(auth)):
        s = request.app.state.api
        req = await run_in_threadpool(parse, await _fields(request), sizes=s.backend.sizes, fps=s.fps,
                                      max_frames=s.limits.max_frames, models=s.models)  # decodes an image
        job = await run_in_threadpool(s.jobs.start, key, req)
        return video_object(job)

    @r.get("")
    async def list_videos(request: Request, after: str | None = None, limit: int = 20, order: str = "desc",
                          key: str = Depends(auth)):
        store = request.app.state.api.store
        if after is not None:
            await own(request, after, key)
        try:
            jobs, more = await run_in_threadpool(store.list, after=after, limit=limit, order=order, key=key)
        except UserError as e:
            raise ApiError(400, e.render(), "invalid_request") from None
        except Exception as e:  # noqa: BLE001 - the store itself failed
            raise ApiError(503, f"the job store failed: {type(e).__name__}: {e}", "store_unavailable") from None
        data = [video_object(j) for j in jobs]
        return {"object": "list", "data": data, "has_more": more,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

    @r.get("/{video_id}")
    async def retrieve(request: Request, video_id: str, key: str = Depends(auth)):
        job = await own(request, video_id, key)
        headers = {"openai-poll-after-ms": str(POLL_AFTER_MS)} if job["status"] in ("queued", "in_progress") else {}
        return JSONResponse(video_object(job), headers=headers)

    @r.get("/{video_id}/content")
    async def content(request: Request, video_id: str, variant: str = "video", key: str = Depends(auth)):
        job = await own(request, video_id, key)
        if variant != "video":
            raise ApiError(400, f"variant {variant!r} is not available; this server makes the video only",
                           "invalid_request", "variant")
        if job["status"] != "completed":
            raise ApiError(409, f"video {video_id} is {job['status']}, not completed", "video_not_ready")
        path = request.app.state.api.store.video_path(video_id)
        if not path.is_file():
            raise ApiError(404, f"the video file of {video_id} is gone", "video_not_found")
        return FileResponse(path, media_type="video/mp4", filename=f"{video_id}.mp4")

    @r.delete("/{video_id}")
    async def delete(request: Request, video_id: str, key: str = Depends(auth)):
        s = request.app.state.api
        await own(request, video_id, key)
        await run_in_threadpool(s.jobs.cancel, video_id)  # also while its video is still being encoded
        await run_in_threadpool(JobRunner._store, s.store.delete, video_id)
        return {"id": video_id, "deleted": True, "object": "video.deleted"}

    return r
