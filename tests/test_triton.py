"""The Triton model repository against a real tritonserver (the nvidia-pytriton wheel's, Python backend
only, from .venv-triton built by `make triton-env`): streamed frames equal the in-process runtime's for
the same seed, I2V, malformed requests, concurrent clients, a client leaving mid-stream, the CLIs, and
tensorrt_plan configs from a manifest with (fake) engine records. Without the server environment these
tests fail with the fix, they do not skip: `make test` builds it."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from helios_deploy.errors import UserError

from .conftest import HEIGHT, SIZES, WIDTH, run_cli

pytestmark = pytest.mark.slow

PROMPT = "a red fox running through snow"


# ---------------------------------------------------------------------------------------------------
# Fixtures: a repository from the session's artifacts, a server on loopback, in-process references


@pytest.fixture(scope="module")
def repo(sizes_artifacts, tmp_path_factory) -> Path:
    """Written in one place, then moved: the copied-artifacts repository must be relocatable. Served: the
    two-size export (SIZES; requests default to the first, 64x128)."""
    from helios_deploy.serving.repository import RepoOptions, write_repository

    base = tmp_path_factory.mktemp("triton")
    report = write_repository(sizes_artifacts, base / "written", RepoOptions(backend="onnxruntime", max_frames=660,
                                                                           chunk_seconds=0.05))
    assert report.models == ["helios"] and report.skipped == []  # plan models are opt-in
    # explicit model control: helios loads at start and can be reloaded (a LoRA switch: refit + load)
    assert (base / "written" / "load_models.txt").read_text() == "helios\n"
    (base / "moved").mkdir()
    return (base / "written").rename(base / "moved" / "repo")


@pytest.fixture(scope="module")
def server(server_env, repo):
    from helios_deploy.serving.server import LocalServer

    srv = LocalServer(server_env, repo, log_path=repo.parent / "tritonserver.log").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    from helios_deploy.serving.client import HeliosClient

    with HeliosClient(server.grpc_url, timeout=300) as c:
        c.check_ready()
        yield c


@pytest.fixture(scope="module")
def pipe(sizes_artifacts):
    from helios_deploy.runtime import Pipeline

    return Pipeline.from_artifacts(sizes_artifacts, backend="onnxruntime", device="cpu")


def local(pipe, prompt=PROMPT, **kw) -> list[np.ndarray]:
    return [c.frames for c in pipe.stream(prompt, **kw)]


def served(client, prompt=PROMPT, **kw) -> list[np.ndarray]:
    chunks = list(client.stream(prompt, **kw))
    assert [c.index for c in chunks] == list(range(len(chunks)))
    return [c.frames for c in chunks]


def assert_same_video(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert [g.shape for g in got] == [w.shape for w in want]
    for k, (g, w) in enumerate(zip(got, want)):
        diff = int(np.abs(g.astype(np.int16) - w.astype(np.int16)).max())
        assert g.dtype == np.uint8 and diff == 0, f"chunk {k}: max abs diff {diff}"


def seeded_image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


def good_request_completes(client) -> None:
    frames = served(client, "a quiet lake at dawn", num_frames=33, seed=1)
    assert len(frames) == 1 and frames[0].shape == (33, HEIGHT, WIDTH, 3)


# ---------------------------------------------------------------------------------------------------
# Streaming through the server


def test_t2v_stream_equals_in_process_runtime(client, pipe):
    got = served(client, num_frames=66, seed=7)
    assert [len(f) for f in got] == [33, 32]  # two chunks, trimmed to 65 = 4k+1 frames as the runtime does
    assert_same_video(got, local(pipe, num_frames=66, seed=7))
    assert_same_video(served(client, num_frames=66, seed=7, pyramid_steps=(2, 1, 1), amplify_first_chunk=True),
                      local(pipe, num_frames=66, seed=7, pyramid_steps=(2, 1, 1), amplify_first_chunk=True))


def test_each_size_through_the_server_and_a_third_refused(client, pipe, tmp_path, capsys):
    """The request's height/width pick the size (default the first); a size not exported gets one error naming
    the exported sizes, from the server, and from the client CLI before anything is sent or written."""
    assert client.sizes() == SIZES
    for h, w in SIZES:
        got = served(client, num_frames=33, seed=2, height=h, width=w)
        assert got[0].shape == (33, h, w, 3)
        assert_same_video(got, local(pipe, num_frames=33, seed=2, height=h, width=w))
    with pytest.raises(UserError) as e:
        list(client.stream_arrays(request_arrays_at(128, 128)))
    assert "128x128 was not exported" in e.value.found and "64x128, 128x64" in e.value.found
    out = tmp_path / "x.mp4"
    code, _, err = run_cli(["client", client.url, "--prompt", PROMPT, "--height", 128, "--width", 128, "-o", out],
                           capsys)
    assert code == 1 and err.count("error:") == 1 and "128x128 was not exported" in err and "64x128, 128x64" in err
    assert not out.exists()
    good_request_completes(client)


def request_arrays_at(height, width):
    from helios_deploy.serving.client import request_arrays

    return request_arrays(PROMPT, num_frames=33, height=height, width=width)


def test_i2v_through_the_server(client, pipe):
    image = seeded_image(3)
    got = served(client, num_frames=33, seed=5, image=image)
    assert_same_video(got, local(pipe, num_frames=33, seed=5, image=image))
    assert not np.array_equal(got[0], local(pipe, num_frames=33, seed=5)[0])  # the image changed the video


def _bad_requests():
    from helios_deploy.serving.client import request_arrays

    base = request_arrays(PROMPT, num_frames=33)
    no_prompt = {k: v for k, v in base.items() if k != "prompt"}
    return {
        "no prompt": (no_prompt, "no prompt"),
        "empty prompt": (request_arrays("   "), "prompt' is empty"),
        "num_frames 0": (request_arrays(PROMPT, num_frames=0), "num_frames 0 is out of range"),
        "num_frames over max": (request_arrays(PROMPT, num_frames=661), "1..660"),
        "wrong dtype": ({**base, "num_frames": np.array([33], np.int64)}, "expects 'INT32'"),
        "float image": ({**base, "image": seeded_image().astype(np.float32)}, "expects 'UINT8'"),
        "image of the wrong size": ({**base, "image": seeded_image()[:32]}, "has shape [32, 128, 3]"),
        "image of the other size": (request_arrays(PROMPT, image=seeded_image(), height=128, width=64),
                                    "has shape [64, 128, 3]"),
        "size not exported": (request_arrays(PROMPT, height=128, width=128),
                              "128x128 was not exported"),
        "image and video": ({**base, "image": seeded_image(), "video": seeded_image()[None]}, "both 'image' and 'video'"),
        "bad steps": ({**base, "pyramid_steps": np.array([1, 0, 1], np.int32)}, "pyramid_steps [1, 0, 1] invalid"),
        "guidance on distilled": (request_arrays(PROMPT, guidance_scale=5.0), "has no setting guidance_scale"),
        "base steps on distilled": (request_arrays(PROMPT, num_inference_steps=4), "has no setting num_inference_steps"),
        "float32 steps": ({**base, "num_inference_steps": np.array([4.0], np.float32)}, "expects 'INT32'"),
    }


@pytest.mark.parametrize("case", list(_bad_requests()))
def test_malformed_request_gets_clear_error_and_server_keeps_serving(client, case):
    arrays, message = _bad_requests()[case]
    with pytest.raises(UserError) as e:
        list(client.stream_arrays(arrays))
    assert "refused or failed" in e.value.what and message in e.value.found, e.value.render()
    good_request_completes(client)


def test_four_concurrent_clients_get_complete_correct_streams(server, pipe):
    from helios_deploy.serving.client import HeliosClient

    seeds = [11, 12, 13, 14]
    results, errors = {}, []

    def run(seed):
        try:
            with HeliosClient(server.grpc_url, timeout=300) as c:
                results[seed] = served(c, num_frames=66, seed=seed)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"seed {seed}: {e!r}")

    threads = [threading.Thread(target=run, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors and sorted(results) == seeds, errors
    for seed in seeds:
        assert_same_video(results[seed], local(pipe, num_frames=66, seed=seed))


def test_client_leaving_mid_stream_does_not_wedge_the_model(server):
    from helios_deploy.serving.client import HeliosClient

    with HeliosClient(server.grpc_url, timeout=300) as gone:
        stream = gone.stream(PROMPT, num_frames=660, seed=2)  # 20 chunks
        assert next(stream).index == 0
    # the client closed its connection after the first chunk: the node sees the request cancelled
    with HeliosClient(server.grpc_url, timeout=300) as client:
        good_request_completes(client)  # a wedged model would never answer this
    end = time.time() + 60  # the stream is dropped at its next denoising step, beside the other stream
    while "request cancelled by the client; stopped" not in server.log() and time.time() < end:
        time.sleep(0.2)
    assert "request cancelled by the client; stopped" in server.log()


# ---------------------------------------------------------------------------------------------------
# Helios-Base through the server: guidance (one batch-2 call per step) with a negative prompt


@pytest.fixture(scope="module")
def base_server(server_env, base_artifacts, tmp_path_factory):
    from helios_deploy.serving.repository import RepoOptions, write_repository
    from helios_deploy.serving.server import LocalServer

    repo = tmp_path_factory.mktemp("triton-base") / "repo"
    # referenced, not copied: hard links would make onnx.checker refuse the artifacts in later tests
    write_repository(base_artifacts, repo, RepoOptions(backend="onnxruntime", max_frames=660, reference=True))
    srv = LocalServer(server_env, repo, log_path=repo.parent / "tritonserver.log").start()
    yield srv
    srv.stop()


def test_base_request_with_negative_prompt_equals_in_process_runtime(base_server, base_artifacts):
    from helios_deploy.runtime import Pipeline
    from helios_deploy.serving.client import HeliosClient

    base = Pipeline.from_artifacts(base_artifacts)
    request = dict(num_frames=66, seed=3, num_inference_steps=3, guidance_scale=5.0, negative_prompt="blurry, static")
    with HeliosClient(base_server.grpc_url, timeout=300) as client:
        got = served(client, **request)
        assert_same_video(got, local(base, **request))
        # the negative prompt reached the model: another one gives another video
        assert not np.array_equal(got[1], local(base, **{**request, "negative_prompt": "a dog"})[1])
        # defaults are Base's (guidance 5, negative prompt ""), steps as asked
        assert_same_video(served(client, num_frames=33, seed=3, num_inference_steps=2),
                          local(base, num_frames=33, seed=3, num_inference_steps=2))
        with pytest.raises(UserError) as e:  # a pyramid setting on Base: a clear error, the model keeps serving
            list(client.stream(PROMPT, num_frames=33, pyramid_steps=(1, 1, 1)))
        assert "Helios-Base has no setting pyramid_steps" in e.value.found
        assert len(served(client, num_frames=33, seed=1, num_inference_steps=1)) == 1


def test_client_cli_sends_base_settings(monkeypatch, tmp_path, capsys):
    """The client's sampler options become the request tensors the helios model declares (a stand-in client
    records them: no server, so no gRPC stream is open while ffmpeg is forked)."""
    import helios_deploy.serving.client as C

    sent = []

    class Recorder(C.HeliosClient):
        def __init__(self, url, model="helios", timeout=None):
            pass

        def check_ready(self):
            pass

        def sizes(self):
            return ((HEIGHT, WIDTH),)

        def stream_arrays(self, arrays):
            sent.append(arrays)
            yield C.StreamChunk(0, np.zeros((33, HEIGHT, WIDTH, 3), np.uint8), 0.1)

        def close(self):
            pass

    monkeypatch.setattr(C, "HeliosClient", Recorder)
    code, _, err = run_cli(["client", "localhost:1", "--prompt", PROMPT, "--frames", 33, "--num-inference-steps", 2,
                            "--guidance-scale", 3.5, "--negative-prompt", "blurry", "-o", tmp_path / "b.mp4"], capsys)
    assert code == 0, err
    (arrays,) = sent
    assert {k: (v.dtype, v.tolist()) for k, v in arrays.items() if k != "prompt"} == {
        "height": (np.int32, [HEIGHT]), "width": (np.int32, [WIDTH]),
        "num_frames": (np.int32, [33]), "seed": (np.int64, [0]), "num_inference_steps": (np.int32, [2]),
        "guidance_scale": (np.float32, [3.5]), "negative_prompt": (np.object_, [b"blurry"])}
    run_cli(["client", "localhost:1", "--prompt", PROMPT, "--steps", "2,2,2", "--amplify-first-chunk",
             "-o", tmp_path / "d.mp4"], capsys)
    assert sent[1]["pyramid_steps"].tolist() == [2, 2, 2] and sent[1]["amplify_first_chunk"].tolist() == [True]
    assert "guidance_scale" not in sent[1] and "negative_prompt" not in sent[1]  # absent: the variant's default


# ---------------------------------------------------------------------------------------------------
# The configs and the CLIs


def test_every_config_parses_and_the_server_loaded_the_declared_tensors(repo, client):
    from helios_deploy.serving.configs import CONTROL_INPUTS, HELIOS_INPUTS, HELIOS_OUTPUTS, parse_config

    configs = sorted(repo.rglob("config.pbtxt"))
    assert [p.parent.name for p in configs] == ["helios"]
    cfg = parse_config(configs[0].read_text())
    assert cfg.model_transaction_policy.decoupled and cfg.backend == "python"
    assert [g.kind for g in cfg.instance_group] == [cfg.instance_group[0].KIND_CPU]
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params["artifacts"] == "artifacts" and (repo / "helios" / "artifacts" / "manifest.json").is_file()
    import tritonclient.grpc as grpcclient  # the loaded config as Triton reports it, through Triton's own client

    with grpcclient.InferenceServerClient(client.url) as triton:
        loaded = triton.get_model_config("helios", as_json=True)["config"]
    assert [i["name"] for i in loaded["input"]] == [t.name for t in HELIOS_INPUTS + CONTROL_INPUTS]
    assert [o["name"] for o in loaded["output"]] == [t.name for t in HELIOS_OUTPUTS]  # stream_id: input and output
    # two sizes: height and width per request, so the image dims are open; the sizes are a parameter
    assert [int(d) for d in next(i for i in loaded["input"] if i["name"] == "image")["dims"]] == [-1, -1, 3]
    assert params["sizes"] == "64x128,128x64"
    assert "docker run" in (repo / "README.md").read_text()


def test_parse_config_rejects_a_bad_config():
    from helios_deploy.serving.configs import ConfigError, parse_config

    with pytest.raises(ConfigError, match="not_a_field"):
        parse_config('name: "x"\nnot_a_field: 3\n')
    with pytest.raises(ConfigError):
        parse_config('name: "x"\ninstance_group [ { kind: KIND_TPU } ]\n')


def test_triton_cli_bad_inputs_exit_1_and_write_nothing(artifacts, tmp_path, capsys):
    out = tmp_path / "repo"
    code, _, err = run_cli(["triton", tmp_path, "-o", out], capsys)
    assert code == 1 and "is not a helios-deploy artifact folder" in err and "Traceback" not in err
    code, _, err = run_cli(["triton", artifacts, "-o", out, "--backend", "tensorrt"], capsys)
    assert code == 1 and "needs TensorRT engines" in err and "helios-deploy build" in err
    code, _, err = run_cli(["triton", artifacts, "-o", out, "--precision", "fp8"], capsys)
    assert code == 1 and "needs the FP8 transformer graph" in err and "helios-deploy quantize" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing, not even a staging folder
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(["triton", artifacts, "-o", out], capsys)
    assert code == 1 and "not empty" in err and "--force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_triton_cli_reference_mode(artifacts, tmp_path, capsys):
    code, out, _ = run_cli(["triton", artifacts, "-o", tmp_path / "repo", "--reference-artifacts", "--gpus", "0,1"],
                           capsys)
    assert code == 0 and "models helios " in out and "skipped" not in out  # no plans unless asked
    from helios_deploy.serving.configs import parse_config

    cfg = parse_config((tmp_path / "repo" / "helios" / "config.pbtxt").read_text())
    assert cfg.parameters["artifacts"].string_value == str(Path(artifacts).resolve())
    assert not (tmp_path / "repo" / "helios" / "artifacts").exists()
    # one instance per node; the model runs one scheduler per GPU itself (KIND_MODEL, the gpus parameter)
    group = cfg.instance_group[0]
    assert len(cfg.instance_group) == 1 and group.count == 1 and group.kind == group.KIND_MODEL
    assert cfg.parameters["gpus"].string_value == "0,1"
    code, _, err = run_cli(["triton", artifacts, "-o", tmp_path / "r2", "--instances", 2], capsys)
    assert code == 1 and "--instances 2 applies to the tensorrt_plan models only" in err and "--gpus" in err
    assert not (tmp_path / "r2").exists()


def test_client_cli_writes_a_playable_mp4(server, tmp_path, capsys):
    from helios_deploy.runtime.video_io import read_video

    out = tmp_path / "fox.mp4"
    code, stdout, err = run_cli(["client", server.grpc_url, "--prompt", PROMPT, "--frames", 66, "-o", out], capsys)
    assert code == 0, err
    assert "time to first chunk" in err and "chunk 1: 32 frames" in err
    assert read_video(out).shape == (65, HEIGHT, WIDTH, 3)
    code, _, err = run_cli(["client", server.grpc_url, "--prompt", PROMPT, "--frames", 0, "-o", tmp_path / "x.mp4"],
                           capsys)
    assert code == 1 and "num_frames 0 is out of range" in err and not (tmp_path / "x.mp4").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox.mp4"]


def test_client_cli_unreachable_server_exits_1(tmp_path, capsys):
    from helios_deploy.serving.server import free_port

    code, _, err = run_cli(["client", f"127.0.0.1:{free_port()}", "--prompt", PROMPT, "-o", tmp_path / "x.mp4"], capsys)
    assert code == 1 and "cannot reach a Triton server" in err


# ---------------------------------------------------------------------------------------------------
# Benchmark: Triton against the in-process runtime, same request, one run


def test_latency_through_triton_vs_in_process(pipe, client):
    from helios_deploy.serving.bench import compare_latency

    r = compare_latency(pipe, client, repeats=5, log=print, num_frames=99, seed=1)
    assert r["frames_equal"]
    assert len(r["triton"]["chunk_s"]) == len(r["in_process"]["chunk_s"]) == 2
    # target: under 10% (measured about +2% total here); bound loosely against a busy 2-core machine
    assert r["overhead_pct"]["total"] < 25, r


# ---------------------------------------------------------------------------------------------------
# tensorrt_plan models from engine records (fake engine files: no TensorRT here)


def _with_fake_engines(artifacts: Path, dest: Path, graphs, precision: str = "fp32", tensorrt="10.13.3.9") -> Path:
    from helios_deploy.artifacts import Artifacts, write_manifest
    from helios_deploy.export.tensorrt import engines as E

    shutil.copytree(artifacts, dest)
    arts = Artifacts.open(dest)
    for component, graph_name in graphs:
        graph = arts.spec(component).graph(graph_name)
        version = tensorrt(component) if callable(tensorrt) else tensorrt
        fields = E.key_fields("g" * 64, "w" * 64, E.profiles(graph), E.BuildSettings(precision=precision),
                              version, "NVIDIA H100", "9.0")
        name = E.engine_filename(graph.file, E.key_digest(fields))
        (dest / component / name).write_bytes(f"fake engine {component}/{graph_name}".encode())
        arts.manifest["components"][component].setdefault("engines", {})[graph_name] = E.engine_record(name, fields)
    write_manifest(dest, arts.manifest)
    return dest


T2V_GRAPHS = [("text_encoder", "model"), ("transformer", "model"), ("vae_decoder", "model")]


def test_plan_configs_from_engine_records(artifacts, tmp_path):
    from helios_deploy.serving.configs import parse_config
    from helios_deploy.serving.repository import RepoOptions, write_repository

    arts = _with_fake_engines(artifacts, tmp_path / "arts", T2V_GRAPHS)
    report = write_repository(arts, tmp_path / "repo", RepoOptions(backend="tensorrt", gpus=(0, 1), reference=True,
                                                                   plan_models=True, triton_release="26.02"))
    assert report.models == ["helios", "helios_transformer", "helios_text_encoder", "helios_vae_decoder"]
    assert (tmp_path / "repo" / "load_models.txt").read_text() == "helios\n"  # plans on request only
    assert report.skipped == [f"helios_vae_encoder_{g}: no TensorRT engine in the manifest (run helios-deploy build)"
                              for g in ("first", "step")]
    cfg = {m: parse_config((tmp_path / "repo" / m / "config.pbtxt").read_text()) for m in report.models}
    channels = json.loads((Path(artifacts) / "manifest.json").read_text())["components"]["transformer"]["spec"]["attrs"]["in_channels"]
    tr = cfg["helios_transformer"]
    assert tr.platform == "tensorrt_plan" and tr.max_batch_size == 0
    inputs = {t.name: (model_type_name(t.data_type), list(t.dims)) for t in tr.input}
    assert inputs["hidden_states"] == ("TYPE_FP32", [-1, channels, 9, -1, -1])
    assert inputs["timestep"] == ("TYPE_INT64", [-1])
    assert inputs["indices_latents_history_long"] == ("TYPE_INT64", [-1, 16])
    assert [(o.name, list(o.dims)) for o in tr.output] == [("noise_pred", [-1, channels, 9, -1, -1])]
    group = tr.instance_group[0]
    assert list(group.gpus) == [0, 1] and group.kind == group.KIND_GPU
    assert list(group.profile) == ["0", "1", "2"]  # one profile per pyramid stage
    # the named -py3 release 26.02 (>= 25.05): its backend reads the strategy
    assert tr.parameters["execution_context_allocation_strategy"].string_value == "ON_PROFILE_CHANGE"
    text = (tmp_path / "repo" / "helios_transformer" / "config.pbtxt").read_text()
    # stage 0 at 64x128: latent 8x16 quartered -> 2x4; stage 2: the full 8x16
    assert f"hidden_states: [1, {channels}, 9, 2, 4] / [1, {channels}, 9, 2, 4]" in text
    assert f"hidden_states: [1, {channels}, 9, 8, 16] / [1, {channels}, 9, 8, 16]" in text
    te = cfg["helios_text_encoder"]
    assert [(t.name, model_type_name(t.data_type), list(t.dims)) for t in te.input] == [
        ("input_ids", "TYPE_INT64", [-1, -1]), ("attention_mask", "TYPE_INT64", [-1, -1])]
    assert list(te.instance_group[0].profile) == ["0"]
    vae = cfg["helios_vae_decoder"]  # the chunk graph: 9 latent frames in, 33 frames out (float and uint8)
    assert [(t.name, list(t.dims)[2]) for t in vae.input] == [("latents", 9)]
    assert [(o.name, model_type_name(o.data_type)) for o in vae.output] == [("video", "TYPE_FP32"), ("frames", "TYPE_UINT8")]
    assert (tmp_path / "repo" / "helios_transformer" / "1" / "model.plan").read_bytes() == b"fake engine transformer/model"
    helios = cfg["helios"]
    assert helios.parameters["backend"].string_value == "tensorrt"
    # one helios instance per node; it puts a scheduler on each GPU itself (serving/node.py)
    assert helios.instance_group[0].count == 1 and helios.instance_group[0].kind == group.KIND_MODEL
    assert helios.parameters["gpus"].string_value == "0,1"


def _readme_command(repo: Path) -> str:
    text = (repo / "README.md").read_text()
    return text[text.index("docker run"):text.index("```", text.index("docker run"))]


def test_tensorrt_repository_pins_the_engines_tensorrt_and_names_a_container_that_ships_it(artifacts, tmp_path):
    from helios_deploy.serving.repository import RepoOptions, write_repository

    arts = _with_fake_engines(artifacts, tmp_path / "arts", T2V_GRAPHS)
    report = write_repository(arts, tmp_path / "repo", RepoOptions(backend="tensorrt", reference=True))
    assert report.models == ["helios"]
    assert (tmp_path / "repo" / "load_models.txt").read_text() == "helios\n"  # no plan models
    command = _readme_command(tmp_path / "repo")
    assert 'pip install torch "numpy<2" tensorrt==10.13.3.9 /opt/helios-deploy' in command
    assert "nvcr.io/nvidia/tritonserver:26.02-trtllm-python-py3" in command  # its Python has TensorRT 10.13.3.9
    assert "check-libnvinfer" not in command
    assert "--model-control-mode explicit --load-model helios" in command and "helios_control" not in command
    readme = (tmp_path / "repo" / "README.md").read_text()
    assert "25.11, 25.12, 26.01, 26.02 ship it" in readme


def test_plan_models_check_libnvinfer_and_start_with_explicit_model_control(artifacts, tmp_path):
    from helios_deploy.serving.repository import RepoOptions, write_repository
    from helios_deploy.serving.server import startup_args

    arts = _with_fake_engines(artifacts, tmp_path / "arts", T2V_GRAPHS, tensorrt="10.8.0.43")
    report = write_repository(arts, tmp_path / "repo", RepoOptions(backend="tensorrt", reference=True, plan_models=True,
                                                                   triton_release="25.02"))  # -py3: named, not guessed
    command = _readme_command(tmp_path / "repo")
    assert "nvcr.io/nvidia/tritonserver:25.02-py3" in command  # the plain image: it has the tensorrt backend
    assert "check-libnvinfer 10.8.0.43 && tritonserver --model-repository /models --model-control-mode explicit " \
           "--load-model helios" in command
    assert startup_args(tmp_path / "repo") == ["--model-control-mode", "explicit", "--load-model", "helios"]
    config = (tmp_path / "repo" / "helios_transformer" / "config.pbtxt").read_text()
    assert "execution_context_allocation_strategy" not in config  # 25.02's backend has no such parameter
    readme = (tmp_path / "repo" / "README.md").read_text()
    assert "not loaded at start" in readme and "weights twice on the GPU" in readme and "STATIC" in readme
    assert report.deployment.release == "25.02"


@pytest.mark.parametrize("tensorrt, options, needle", [
    (lambda c: "10.13.3.9" if c == "transformer" else "10.8.0.43", {}, "different TensorRT versions"),
    ("10.0.1.6", {}, "TensorRT 10.0.1.6, which helios-deploy cannot run"),
    ("10.13.3.9", {"--triton-release": "25.02"}, "Triton 25.02 cannot load these engines: it ships TensorRT 10.8.0.43"),
    ("10.13.3.9", {"--triton-release": "99.01"}, "unknown Triton release '99.01'"),
    ("10.5.0.18", {"--plan-models": None}, "no table of the -py3 images' TensorRT"),
])
def test_combinations_that_cannot_load_are_refused(artifacts, tmp_path, capsys, tensorrt, options, needle):
    arts = _with_fake_engines(artifacts, tmp_path / "arts", T2V_GRAPHS, tensorrt=tensorrt)
    extra = [a for k, v in options.items() for a in ((k,) if v is None else (k, v))]
    code, _, err = run_cli(["triton", arts, "-o", tmp_path / "r", "--backend", "tensorrt", *extra], capsys)
    assert code == 1 and needle in err, err
    assert "Traceback" not in err and sorted(p.name for p in tmp_path.iterdir()) == ["arts"]


def test_without_plan_models_an_unlisted_tensorrt_is_pinned_on_the_default_container(artifacts, tmp_path):
    from helios_deploy.serving.repository import RepoOptions, write_repository

    arts = _with_fake_engines(artifacts, tmp_path / "arts", T2V_GRAPHS, tensorrt="10.5.0.18")
    write_repository(arts, tmp_path / "repo", RepoOptions(backend="tensorrt", reference=True))
    command = _readme_command(tmp_path / "repo")
    assert "tensorrt==10.5.0.18" in command and "nvcr.io/nvidia/tritonserver:24.10-py3" in command
    assert "no Triton release in helios-deploy's table ships it" in (tmp_path / "repo" / "README.md").read_text()


def test_check_libnvinfer_compares_the_containers_library_with_the_engines_tensorrt(capsys):
    from helios_deploy.serving import containers as C

    assert C.check_libnvinfer("10.8.0.43", loaded=100800) == "10.8.0"  # getInferLibVersion of TensorRT 10.8.0
    with pytest.raises(UserError, match="TensorRT 10.9.0 cannot load engines built with TensorRT 10.8.0.43"):
        C.check_libnvinfer("10.8.0.43", loaded=100900)
    assert C.main(["check-libnvinfer", "10.8.0.43"]) == 1  # no libnvinfer on this machine: one message
    err = capsys.readouterr().err
    assert "no libnvinfer.so.10" in err and "Traceback" not in err


def _model_states(server) -> dict[str, str]:
    import urllib.request

    request = urllib.request.Request(f"{server.http_url}/v2/repository/index", data=b"{}", method="POST")
    with urllib.request.urlopen(request, timeout=10) as r:
        return {m["name"]: m.get("state", "") for m in json.loads(r.read())}


def test_a_real_tritonserver_loads_only_helios_from_a_repository_with_plan_models(artifacts, server_env, tmp_path):
    """The pytriton tritonserver has no tensorrt backend: it starts only because explicit model control (the
    repository's load_models.txt) keeps the tensorrt_plan models unloaded; without it the server fails to start."""
    from helios_deploy.serving.repository import RepoOptions, write_repository
    from helios_deploy.serving.server import LocalServer

    arts = _with_fake_engines(artifacts, tmp_path / "arts", T2V_GRAPHS)
    repo = tmp_path / "repo"
    write_repository(arts, repo, RepoOptions(backend="onnxruntime", reference=True, plan_models=True,
                                             triton_release="26.02"))
    with LocalServer(server_env, repo, tmp_path / "server.log") as srv:
        states = _model_states(srv)
    assert states["helios"] == "READY" and "helios_control" not in states
    assert {m: states[m] for m in ("helios_transformer", "helios_text_encoder", "helios_vae_decoder")} == \
        {"helios_transformer": "", "helios_text_encoder": "", "helios_vae_decoder": ""}  # listed, never loaded
    (repo / "load_models.txt").unlink()
    with pytest.raises(RuntimeError, match="tritonserver exited") as e:
        LocalServer(server_env, repo, tmp_path / "server2.log").start(timeout=120)
    assert "tensorrt" in str(e.value)


def model_type_name(value: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(value)


def test_plan_repository_refuses_wrong_precision_and_missing_engine_files(artifacts, tmp_path, capsys):
    arts = _with_fake_engines(artifacts, tmp_path / "arts", T2V_GRAPHS)
    code, _, err = run_cli(["triton", arts, "-o", tmp_path / "r", "--backend", "tensorrt", "--precision", "fp8"], capsys)
    assert code == 1 and "built for fp32, not fp8" in err
    engine = next((arts / "transformer").glob("*.engine"))
    engine.unlink()
    code, _, err = run_cli(["triton", arts, "-o", tmp_path / "r", "--backend", "tensorrt"], capsys)
    assert code == 1 and "file is missing" in err and engine.name in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arts"]


# ---------------------------------------------------------------------------------------------------
# FP8: a repository with --precision fp8 serves the quantized transformer graph


def test_fp8_repository_streams_the_quantized_graph(artifacts, server_env, tmp_path):
    from helios_deploy.export.transforms.quantize import quantize_artifacts
    from helios_deploy.runtime import Pipeline
    from helios_deploy.serving.client import HeliosClient
    from helios_deploy.serving.repository import RepoOptions, write_repository
    from helios_deploy.serving.server import LocalServer

    arts = shutil.copytree(artifacts, tmp_path / "arts")
    (tmp_path / "prompts.txt").write_text(f"{PROMPT}\na drone shot over a snowy ridge at sunrise\n")
    # the tiny transformer has 2 blocks: keep only the edges so the blocks' linear layers are FP8
    quantize_artifacts(arts, ["transformer"], prompts_file=tmp_path / "prompts.txt",
                       keep=[r"^patch_", r"^condition_embedder\.", r"^proj_out/"], chunks=2, seed=0, log=lambda m: None)
    write_repository(arts, tmp_path / "repo", RepoOptions(precision="fp8"))
    with LocalServer(server_env, tmp_path / "repo", tmp_path / "server.log") as srv, \
            HeliosClient(srv.grpc_url, timeout=300) as client:
        got = served(client, num_frames=66, seed=4)
        assert "onnxruntime fp8" in srv.log(), srv.log()[-4000:]
    fp8 = Pipeline.from_artifacts(arts, precision="fp8")
    assert_same_video(got, local(fp8, num_frames=66, seed=4))
    assert not np.array_equal(got[0], local(Pipeline.from_artifacts(arts), num_frames=66, seed=4)[0])
