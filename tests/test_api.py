"""The video API's jobs through the official openai SDK against a real uvicorn on loopback, over the tiny
artifacts: the downloaded mp4 decodes to the runtime's frames for the same request (within H.264's loss),
listing, deletion, the errors (400/401/404/409/413/429), and a restart of the `api` command that keeps
finished jobs and fails the ones it interrupted."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys

import httpx
import numpy as np
import pytest

from tests.api_helpers import (KEY, OTHER_KEY, assert_same_video, decode_mp4, free_port, make_app, reference_pipeline,
                               serving, wait_for)

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")

PROMPT = "A red fox running through fresh snow at sunrise."


@pytest.fixture(scope="module")
def api(artifacts, tmp_path_factory):
    with serving(make_app(artifacts, tmp_path_factory.mktemp("jobs"))) as served:
        yield served


@pytest.fixture(scope="module")
def pipe(artifacts):
    yield from reference_pipeline(artifacts)


def client(url, key=KEY):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_sdk_create_and_poll_download_matches_runtime(api, pipe, tmp_path):
    url, _ = api
    c = client(url)
    video = c.videos.create_and_poll(prompt=PROMPT, seconds="2", size="128x64", extra_body={"seed": 3})
    assert video.status == "completed" and video.progress == 100 and video.error is None
    assert (video.size, video.seconds, video.model, video.prompt) == ("128x64", "2", "helios", PROMPT)
    assert video.completed_at >= video.created_at
    got = decode_mp4(c.videos.download_content(video.id).read(), tmp_path)
    want = pipe.generate(PROMPT, num_frames=48, seed=3)  # 2 s at 24 fps: 2 chunks
    assert_same_video(got, want, pipe.generate(PROMPT, num_frames=48, seed=4), tmp_path)
    assert c.videos.retrieve(video.id).status == "completed"
    metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    completed = float(re.search(r'^helios_api_jobs\{status="completed"\} (\S+)$', metrics, re.M).group(1))
    first = float(re.search(r"^helios_api_first_chunk_latency_seconds_count (\S+)$", metrics, re.M).group(1))
    assert completed >= 1 and first >= 1, metrics


def test_json_body_with_helios_settings(api, pipe, tmp_path):
    url, _ = api
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{url}/v1/videos", headers=h, json={"prompt": PROMPT, "num_frames": 33, "seed": 7,
                                                         "extra_params": {"steps": [2, 1, 1]}})
    assert r.status_code == 200, r.text
    vid = r.json()["id"]
    done = wait_for(lambda: (v := httpx.get(f"{url}/v1/videos/{vid}", headers=h).json())["status"] == "completed" and v)
    assert done["seconds"] == "1.375"
    got = decode_mp4(httpx.get(f"{url}/v1/videos/{vid}/content", headers=h).content, tmp_path)
    want = pipe.generate(PROMPT, num_frames=33, seed=7, pyramid_steps=(2, 1, 1))
    assert_same_video(got, want, pipe.generate(PROMPT, num_frames=33, seed=7), tmp_path)


def test_sdk_image_to_video(api, pipe, tmp_path):
    from PIL import Image

    url, _ = api
    rng = np.random.default_rng(0)
    image = np.kron(rng.integers(0, 255, (8, 16, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 64x128 blocks
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    c = client(url)
    video = c.videos.create_and_poll(prompt=PROMPT, input_reference=("first.png", png.getvalue(), "image/png"),
                                     extra_body={"num_frames": 33, "seed": 1})
    assert video.status == "completed", video.error
    got = decode_mp4(c.videos.download_content(video.id).read(), tmp_path)
    want = pipe.generate(PROMPT, num_frames=33, seed=1, image=Image.fromarray(image))
    assert_same_video(got, want, pipe.generate(PROMPT, num_frames=33, seed=1), tmp_path)


def test_list_pages_delete_and_keys_see_their_own(api):
    url, _ = api
    c, other = client(url), client(url, OTHER_KEY)
    ids = [c.videos.create(prompt=f"{PROMPT} {i}", extra_body={"num_frames": 1}).id for i in range(2)]
    for vid in ids:
        wait_for(lambda: c.videos.retrieve(vid).status == "completed")
    page = c.videos.list(limit=1)
    assert [v.id for v in page.data] == [ids[1]] and page.has_more  # newest first
    listed = [v.id for v in c.videos.list(limit=1, order="asc")]  # the SDK follows the pages
    assert listed[-2:] == ids and len(listed) == len(set(listed))
    assert ids[0] not in [v.id for v in other.videos.list()]
    from openai import NotFoundError

    with pytest.raises(NotFoundError):
        other.videos.retrieve(ids[0])  # another key's job does not exist for it
    deleted = c.videos.delete(ids[0])
    assert (deleted.id, deleted.deleted, deleted.object) == (ids[0], True, "video.deleted")
    with pytest.raises(NotFoundError):
        c.videos.retrieve(ids[0])
    with pytest.raises(NotFoundError):
        c.videos.download_content(ids[0])
    assert ids[0] not in [v.id for v in c.videos.list()]


def _error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    return err


def test_auth(api):
    url, _ = api
    assert httpx.get(f"{url}/health").json()["status"] == "ok"  # the one open route
    for route in ("/v1/videos", "/v1/videos/video_" + "0" * 32, "/metrics"):
        _error(httpx.get(url + route), 401, "invalid_api_key")
        _error(httpx.get(url + route, headers={"Authorization": "Bearer not-a-key-at-all-0000"}), 401)
        _error(httpx.get(url + route, headers={"Authorization": KEY}), 401)  # no scheme
    _error(httpx.post(f"{url}/v1/videos", data={"prompt": "x"}), 401)
    from openai import AuthenticationError

    with pytest.raises(AuthenticationError):
        client(url, "wrong-key-0123456789abcdef").videos.list()


def test_bad_requests(api):
    url, _ = api
    h = {"Authorization": f"Bearer {KEY}"}

    def post(headers=None, **kw):
        return httpx.post(f"{url}/v1/videos", headers=headers or h, **kw)

    assert _error(post(data={"prompt": PROMPT, "size": "1280x720"}), 400)["param"] == "size"
    assert "128x64" in _error(post(data={"prompt": PROMPT, "size": "64x128"}), 400)["message"]  # WxH: 64 wide
    assert _error(post(data={"prompt": "  "}), 400)["param"] == "prompt"
    assert _error(post(data={"prompt": PROMPT, "num_frames": "331"}), 400)["param"] == "num_frames"
    assert _error(post(data={"prompt": PROMPT, "seconds": "-1"}), 400)["param"] == "seconds"
    assert _error(post(data={"prompt": PROMPT, "seed": "abc"}), 400)["param"] == "seed"
    assert _error(post(data={"prompt": PROMPT, "model": "sora-2"}), 400, "model_not_found")
    assert _error(post(data={"prompt": PROMPT, "colour": "red"}), 400, "unknown_parameter")
    assert _error(post(data={"prompt": PROMPT}, files={"input_reference": ("a.png", b"not an image", "image/png")}),
                  400)["param"] == "input_reference"
    _error(post(content=b"{", headers={**h, "content-type": "application/json"}), 400, "invalid_json")
    for ref in ({"image_url": "https://example.com/a.png"}, {"file_id": "file_123"},
                {"image_url": "data:image/png;base64,%%%"}):  # nothing is fetched; no file ids
        assert _error(post(json={"prompt": PROMPT, "input_reference": ref}), 400)["param"] == "input_reference"
    # a setting the variant does not have: the runtime's UserError, as a 400 (Distilled has no guidance)
    assert "guidance" in _error(post(json={"prompt": PROMPT, "guidance_scale": 5.0}), 400)["message"]


def test_not_found_and_not_ready(api):
    url, app = api
    h = {"Authorization": f"Bearer {KEY}"}
    for vid in ("video_" + "0" * 32, "..%2F..%2Fjobs.sqlite", "video_../../jobs"):
        _error(httpx.get(f"{url}/v1/videos/{vid}/content", headers=h), 404)
        _error(httpx.delete(f"{url}/v1/videos/{vid}", headers=h), 404)
    r = httpx.post(f"{url}/v1/videos", headers=h, data={"prompt": PROMPT, "num_frames": "330"})
    vid = r.json()["id"]
    try:
        r = httpx.get(f"{url}/v1/videos/{vid}", headers=h)
        assert r.json()["status"] in ("queued", "in_progress") and r.headers["openai-poll-after-ms"]
        _error(httpx.get(f"{url}/v1/videos/{vid}/content", headers=h), 409, "video_not_ready")
    finally:
        httpx.delete(f"{url}/v1/videos/{vid}", headers=h)  # stops its stream
    wait_for(lambda: app.state.api.backend.metrics()["active_streams"] == 0, timeout=30)


def test_body_limit(api):
    url, _ = api
    h = {"Authorization": f"Bearer {KEY}"}
    big = b"\0" * ((1 << 20) + 1)
    _error(httpx.post(f"{url}/v1/videos", headers=h, data={"prompt": PROMPT},
                      files={"input_reference": ("a.png", big, "image/png")}), 413, "body_too_large")

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(17):
            yield b"\0" * (1 << 16)

    _error(httpx.post(f"{url}/v1/videos", headers={**h, "content-type": "application/json"}, content=chunked()),
           413, "body_too_large")


def test_per_key_limit_and_capacity(api):
    url, app = api
    from openai import RateLimitError

    c, other = client(url), client(url, OTHER_KEY)
    long = {"num_frames": 330}
    jobs = [c.videos.create(prompt=PROMPT, extra_body=long).id for _ in range(2)]  # fills both streams
    try:
        with pytest.raises(RateLimitError) as e:
            c.videos.create(prompt=PROMPT, extra_body=long)
        assert e.value.body["code"] == "too_many_jobs"
        with pytest.raises(RateLimitError) as e:
            other.videos.create(prompt=PROMPT, extra_body=long)
        assert e.value.body["code"] == "over_capacity"
        metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        assert 'helios_api_refused_total{reason="over_capacity"} 1.0' in metrics
        assert "helios_api_active_streams 2.0" in metrics and "helios_api_load" in metrics
    finally:
        for vid in jobs:
            c.videos.delete(vid)
    wait_for(lambda: app.state.api.backend.metrics()["active_streams"] == 0, timeout=30)
    assert other.videos.create(prompt=PROMPT, extra_body={"num_frames": 1}).status == "in_progress"


def _serve(artifacts, store, port, log):
    env = {**os.environ, "HELIOS_API_KEY": KEY}
    return subprocess.Popen([sys.executable, "-m", "helios_deploy.cli", "api", "--artifacts", str(artifacts),
                             "--store", str(store), "--port", str(port)], env=env, stdout=log, stderr=log,
                            start_new_session=True)


def test_restart_keeps_finished_jobs_and_fails_interrupted(artifacts, tmp_path):
    store, port = tmp_path / "store", free_port()
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return httpx.get(f"{url}/health").status_code == 200
        except httpx.TransportError:
            return False

    with open(tmp_path / "server.log", "w") as log:
        server = _serve(artifacts, store, port, log)
        try:
            wait_for(up, timeout=120, every=0.2)
            c = client(url)
            done = c.videos.create_and_poll(prompt=PROMPT, extra_body={"num_frames": 33})
            video = c.videos.download_content(done.id).read()
            running_id = c.videos.create(prompt=PROMPT, extra_body={"num_frames": 330}).id
            wait_for(lambda: c.videos.retrieve(running_id).progress > 0, timeout=60)
        finally:
            os.killpg(server.pid, signal.SIGKILL)  # no clean shutdown: as a crash or an OOM kill
            server.wait()
        server = _serve(artifacts, store, port, log)
        try:
            wait_for(up, timeout=120, every=0.2)
            c = client(url)
            assert c.videos.retrieve(done.id).status == "completed"
            assert c.videos.download_content(done.id).read() == video
            failed = c.videos.retrieve(running_id)
            assert failed.status == "failed" and failed.error.code == "server_restarted", failed
            assert {v.id for v in c.videos.list()} == {done.id, running_id}
            partial = [p for p in (store / "videos").iterdir() if p.name.startswith(".") and p.name != ".helios-store"]
            assert not partial  # no partial video left (.helios-store: the store's marker)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    assert "marked failed" in (tmp_path / "server.log").read_text()


@pytest.mark.parametrize("args, env, message", [
    ([], {}, "pass --artifacts DIR"),
    (["--artifacts", "ARTS", "--triton", "localhost:8001"], {}, "pass --artifacts DIR"),
    (["--artifacts", "ARTS", "--host", "0.0.0.0"], {}, "refusing to serve on 0.0.0.0 without an API key"),
    (["--artifacts", "ARTS", "--api-key", "short"], {}, "API key too short"),
    (["--artifacts", "ARTS"], {"HELIOS_API_KEY": "a key with spaces 0123456789"}, "characters outside"),
])
def test_cli_refuses_before_loading_anything(args, env, message, tmp_path, capsys, monkeypatch):
    from tests.conftest import run_cli

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if not env:
        monkeypatch.delenv("HELIOS_API_KEY", raising=False)
    store = tmp_path / "store"
    code, out, err = run_cli(["api", "--store", store, *[str(tmp_path / a) if a == "ARTS" else a for a in args]], capsys)
    assert code == 1 and message in err and "Traceback" not in err, err
    assert not store.exists()  # nothing written
