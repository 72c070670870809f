"""An image-to-video job on a replica killed with -9 mid-job is run again by another replica with the same
input image (kept with the job in the shared store: api/store_base.py), to the same frames as the request run
through that replica directly. The fixtures and helpers are tests/test_replicas.py's."""

from __future__ import annotations

import io
import os
import signal
import stat

import numpy as np

from tests.api_helpers import decode_mp4, free_port, wait_for
from tests.test_replicas import PROMPT, _replica, _serve_replica, _served, client, healthy

FRAMES = 660  # 20 chunks: A is killed at its first chunk's progress, long before its last (max_frames: 1650)


def _image_png() -> bytes:
    """Not the video's size (64x128) nor its aspect: the stored copy is the resized one."""
    from PIL import Image

    rng = np.random.default_rng(3)
    image = np.kron(rng.integers(0, 255, (6, 10, 3)), np.ones((10, 10, 1))).astype(np.uint8)  # 60x100 blocks
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_killed_replica_i2v_job_is_run_again_with_its_image(artifacts, pg_url, tmp_path):
    videos, port = tmp_path / "shared-videos", free_port()
    url_a = f"http://127.0.0.1:{port}"
    image = ("first.png", _image_png(), "image/png")

    app_b = _replica(artifacts, pg_url, videos)
    store_b = app_b.state.api.store
    with open(tmp_path / "replica-a.log", "w") as log, _served(app_b) as b:
        server = _serve_replica(artifacts, pg_url, videos, port, log)
        try:
            wait_for(lambda: healthy(url_a), timeout=120, every=0.2)
            job = client(url_a).videos.create(prompt=PROMPT, input_reference=image,
                                              extra_body={"num_frames": FRAMES, "seed": 4})
            cb = client(b)
            wait_for(lambda: cb.videos.retrieve(job.id).progress > 0, timeout=60, every=0.1)
            kept = store_b.input_path(job.id)  # in the shared folder, while the job runs
            assert kept.is_file() and stat.S_IMODE(os.stat(kept).st_mode) == 0o600
            assert store_b.get(job.id)["owner"] not in (None, store_b.replica)  # A's
        finally:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        done = wait_for(lambda: (v := cb.videos.retrieve(job.id)).status in ("completed", "failed") and v,
                        timeout=300, every=0.2)
        assert done.status == "completed", done.error
        assert store_b.get(job.id)["attempts"] == 2 and not kept.exists()  # run again by B; its input gone with it
        got = decode_mp4(cb.videos.download_content(job.id).read(), tmp_path)
        again = cb.videos.create_and_poll(prompt=PROMPT, input_reference=image,
                                          extra_body={"num_frames": FRAMES, "seed": 4})
        want = decode_mp4(cb.videos.download_content(again.id).read(), tmp_path)
        assert got.shape == want.shape and got.shape[0] >= FRAMES - 10 and np.array_equal(got, want)
        t2v = cb.videos.create_and_poll(prompt=PROMPT, extra_body={"num_frames": 33, "seed": 4})
        assert not np.array_equal(decode_mp4(cb.videos.download_content(t2v.id).read(), tmp_path), want[:33])
        assert not [p for p in videos.iterdir() if p.name.endswith(".input.png")]
