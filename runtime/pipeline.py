"""The production runtime: artifacts -> video, chunk by chunk. Imports neither diffusers nor
transformers (unless a component is run on the torch backend)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch

from ..artifacts import Artifacts
from ..errors import UserError
from ..model.sizes import check_size_exported, video_sizes
from ..model.variants import Variant
from .base_sampler import denoise_chunk_base_steps
from .conditioning import Normaliser, encoder_fn, image_conditioning, video_conditioning
from .flow_scheduler import FlowScheduler
from .guidance import drive
from .runners import make_runner
from .runners.base import BACKENDS, graph_record
from .sampler import BlockNoise, ChunkRequest, ChunkState, HISTORY_SIZES, denoise_chunk_steps, update_history
from .scheduler import DMDScheduler
from .settings import MAX_SEED, Sampling, resolve_sampling
from .stream_state import CHUNK_FRAMES, StreamState, snapshot_meta
from .text import PromptTokenizer
from .vae import to_unit

COMPONENTS_T2V = ("text_encoder", "transformer", "vae_decoder")
PROMPT_CACHE_SIZE = 64  # prompt embeddings kept (least recently used dropped)


@dataclass
class Chunk:
    index: int
    frames: np.ndarray  # uint8 [T, H, W, 3] (or float32 in [0, 1] with output="float")
    snapshot: bytes | None = None  # the stream's state after this chunk (LiveScheduler.open(failover=True))


def parse_backend(backend: str | Mapping[str, str]) -> dict[str, str]:
    """"onnxruntime" for all, or "transformer=tensorrt,vae_decoder=torch" per component."""
    if isinstance(backend, Mapping):
        spec = dict(backend)
    elif "=" in backend:
        spec = dict(part.split("=", 1) for part in backend.split(",") if part)
    else:
        spec = {"*": backend}
    bad = [v for v in spec.values() if v not in BACKENDS]
    if bad:
        raise UserError(f"unknown backend {bad[0]!r}", expected=f"one of {', '.join(BACKENDS)}, "
                        "or per component like transformer=tensorrt,vae_decoder=torch")
    return spec


def to_host(x: torch.Tensor) -> np.ndarray:
    """A chunk's frames as a host array. From a GPU, through pinned memory: a pageable device-to-host
    copy is staged through a driver buffer at a fraction of the bus bandwidth, and a 384x640 chunk is
    24 MB of uint8. torch's caching host allocator hands the pinned block out again once the caller
    drops the array. The copy runs on the current stream, after the decoder's work, and is waited for."""
    if x.device.type != "cuda":
        return x.numpy()
    out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    out.copy_(x, non_blocking=True)
    torch.cuda.current_stream(x.device).synchronize()
    return out.numpy()


class Pipeline:
    def __init__(self, artifacts: Artifacts, backend: dict[str, str], device: str, precision: str = "fp32",
                 low_memory: bool = False):
        self.artifacts, self.backend, self.device = artifacts, backend, torch.device(device)
        self.precision = precision  # fp8: the quantized graphs from `quantize` (ONNX Runtime backend)
        self.low_memory = low_memory  # ONNX Runtime sessions hold one copy of the weights (no prepacking)
        m = artifacts.manifest
        self.sizes = video_sizes(m)  # every size the graphs have operating points for
        self.height, self.width = self.sizes[0]  # a request's default
        self.text_length = m["text_length"]
        # which Helios checkpoint: its loop (pyramid or one stage) and its scheduler (DMD or HeliosScheduler)
        self.variant = Variant.from_manifest(m)
        self.scheduler = (DMDScheduler if self.variant.is_distilled else FlowScheduler)(m["scheduler_config"])
        self._denoise_steps = denoise_chunk_steps if self.variant.pyramid else denoise_chunk_base_steps
        patch = artifacts.spec("transformer").attrs["patch_size"]  # (t, h, w): the blocks are (h, w)
        self.block_noise = BlockNoise(self.scheduler.gamma, tuple(patch[1:]))
        self.tokenizer = PromptTokenizer(artifacts.root / "tokenizer", self.text_length)
        self._runners: dict[tuple[str, str], object] = {}
        self._runner_lock = threading.RLock()  # runners are made once, whichever thread asks first
        self._driver: int | None = None  # bound: the one thread allowed to drive the runners (LiveScheduler's)
        self._prompt_cache: OrderedDict[str, torch.Tensor] = OrderedDict()  # least recently used first
        # the VAE's latent normalisation on the device (the decoder's input is un-normalised with it)
        self.latent_norm = Normaliser.from_attrs(artifacts.spec("vae_decoder").attrs).to(self.device)

    @classmethod
    def from_artifacts(cls, path: str | Path, backend: str | Mapping[str, str] = "onnxruntime",
                       device: str = "cpu", precision: str = "fp32", low_memory: bool = False) -> "Pipeline":
        arts = Artifacts.open(path)
        for c in ("text_encoder", "transformer", "vae_decoder"):
            arts.require(c)
        if precision == "fp8" and not arts.manifest["components"]["transformer"].get("fp8"):
            raise UserError(f"{arts.root} has no FP8 transformer graph",
                            fix=f"run `helios-deploy quantize {arts.root} --precision fp8` first")
        return cls(arts, parse_backend(backend), device, precision, low_memory)

    # -- components ------------------------------------------------------------------------------
    def bind(self, thread_id: int | None) -> None:
        """Allow only the thread ``thread_id`` (threading.get_ident()) to use the runners from now on (None:
        any thread): the LiveScheduler binds its worker, so a TensorRT context or CUDA stream is only ever
        driven by one thread; another thread that asks for a runner gets a RuntimeError."""
        self._driver = thread_id

    def runner(self, component: str, graph: str = "model"):
        if self._driver is not None and threading.get_ident() != self._driver:
            raise RuntimeError(f"runner {component}/{graph} asked for from thread {threading.current_thread().name}: "
                               "this pipeline's runners are driven by its LiveScheduler's worker only")
        key = (component, graph)
        with self._runner_lock:
            if key not in self._runners:
                self._runners[key] = self._make_runner(component, graph)
            return self._runners[key]

    def _make_runner(self, component: str, graph: str):
        spec = self.artifacts.spec(component)
        backend = self.backend.get(component, self.backend.get("*", "onnxruntime"))
        if backend == "onnxruntime":  # the graph it loads is there, with its recorded sizes
            self.artifacts.require_present(component, *graph_record(self.artifacts.manifest, component, graph,
                                                                     self.precision))
        return make_runner(backend, self.artifacts.root, self.artifacts.manifest, component,
                           spec.graph(graph), str(self.device), self.precision, self.low_memory).activate()

    def set_runner(self, component: str, graph: str, runner) -> None:
        """Use ``runner`` (active, same spec) for one graph instead of the one the backend would make: how
        calibration runs its range-recording graphs inside the real sampler loop."""
        if runner.graph != self.artifacts.spec(component).graph(graph):
            raise ValueError(f"runner for {component}/{graph} has another graph spec")
        self._runners[(component, graph)] = runner

    def release(self, component: str) -> None:
        """Release one component's runners (made again when next used): a pass that needs that component
        only first frees its weights for the next."""
        for key in [k for k in self._runners if k[0] == component]:
            self._runners.pop(key).deactivate()

    def close(self) -> None:
        """Release every runner (sessions, engines, device memory)."""
        for runner in self._runners.values():
            runner.deactivate()
        self._runners.clear()

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """UMT5 embeddings [1, L, D], zero past the prompt's real length; cached per prompt."""
        if prompt in self._prompt_cache:
            self._prompt_cache.move_to_end(prompt)
        else:
            ids, mask = self.tokenizer([prompt])
            out = self.runner("text_encoder").infer({"input_ids": torch.from_numpy(ids).to(self.device),
                                                     "attention_mask": torch.from_numpy(mask).to(self.device)})
            embeds = out["last_hidden_state"].float()
            embeds[:, int(mask.sum()):] = 0
            self._prompt_cache[prompt] = embeds
            if len(self._prompt_cache) > PROMPT_CACHE_SIZE:  # a long-running server sees many prompts
                self._prompt_cache.popitem(last=False)
        return self._prompt_cache[prompt]

    def _transformer(self, feeds):
        return self.runner("transformer").infer(feeds)["noise_pred"]

    def transformer_batched(self, feeds_list: list[dict]) -> list[torch.Tensor]:
        """One transformer call for several streams' feeds of equal shapes (concatenated along the batch);
        each stream's prediction back. The graphs have a dynamic batch (TensorRT: profiles built with
        ``build --max-batch``)."""
        if len(feeds_list) == 1:
            return [self._transformer(feeds_list[0])]
        sizes = [f["hidden_states"].shape[0] for f in feeds_list]
        out = self._transformer({k: torch.cat([f[k] for f in feeds_list]) for k in feeds_list[0]})
        return list(out.split(sizes))

    # -- generation ------------------------------------------------------------------------------
    def stream(self, prompt, num_frames: int = 33, seed: int = 0, image=None, video=None, pyramid_steps=None,
               amplify_first_chunk: bool | None = None, height: int | None = None, width: int | None = None,
               output: str = "uint8", on_step=None, **settings) -> Iterator[Chunk]:
        """Yield each 33-frame chunk as soon as it is decoded. ``prompt`` may be a string or a schedule
        {chunk index: prompt} (the prompt in force changes at those chunks). Sampler settings (``settings``:
        negative_prompt, guidance_scale, num_inference_steps, cfg_zero_star, use_zero_init, zero_steps,
        sampler) left at None take the checkpoint variant's reference defaults (helios_deploy.model.variants); a
        setting the variant does not have is a UserError. ``height`` x ``width`` is one of the exported sizes
        (default the first); the runners pick that size's operating points (TensorRT: its profiles) from the
        input shapes. The request is checked before anything runs."""
        state = self.open_stream(prompt, num_frames, seed, image, video, pyramid_steps=pyramid_steps,
                                 amplify_first_chunk=amplify_first_chunk, height=height, width=width, output=output,
                                 **settings)
        return self._chunks(state, on_step)

    def _chunks(self, state: StreamState, on_step) -> Iterator[Chunk]:
        while not state.done:
            yield drive(self.chunk_job(state, on_step), self._transformer)

    def open_stream(self, prompt, num_frames: int = 33, seed: int = 0, image=None, video=None, *,
                    height: int | None = None, width: int | None = None, output: str = "uint8",
                    **settings) -> StreamState:
        """A stream's state before its first chunk (the request checked, I2V / V2V conditioning encoded): run
        its chunks with chunk_job, in any order with other streams' (runtime/live.py)."""
        schedule = self._prompt_schedule(prompt)
        size = self._check_request(num_frames, height, width, image, video)
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
            raise UserError(f"seed {seed!r} out of range", expected=f"an integer from 0 to {MAX_SEED}")
        sampling = self.sampling(**settings)
        spec = self.artifacts.spec("transformer")
        # noise is drawn on the device the sampler runs on: on the CPU the same as the reference with
        # torch.Generator().manual_seed(seed); on a GPU as the reference given a generator on that GPU
        generator = torch.Generator(self.device).manual_seed(int(seed))
        chunk_state = self._initial_state(spec.attrs["in_channels"], image, video, generator, *size)
        indices = {k: torch.tensor([v], dtype=torch.int64, device=self.device)
                   for k, v in spec.attrs["frame_indices"].items()}
        return StreamState(schedule, sampling, size, num_frames, output, generator, chunk_state, indices)

    @property
    def model_id(self) -> str:
        """What a stream's frames depend on besides its state: the checkpoint's identity and the LoRA adapters
        fused into the artifacts (a snapshot resumes only on the same model)."""
        m = self.artifacts.manifest
        ident = {"checkpoint": m["checkpoint"]["identity"]["sha256"], "lora": m.get("lora"),
                 "precision": self.precision}
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def snapshot(self, state: StreamState, **extra) -> bytes:
        """``state`` as bytes (StreamState.snapshot) with this model's identity in it."""
        return state.snapshot({**extra, "model": self.model_id})

    def resume_stream(self, data: bytes) -> tuple[StreamState, dict]:
        """The StreamState of a snapshot (Pipeline.snapshot) on this pipeline's device, and its extra fields
        (``id``, ...), checked against these artifacts: same model, an exported size, the latent shape; a
        UserError otherwise. Prompt embeddings are encoded again from the text when its chunks run."""
        meta = snapshot_meta(data)
        if meta["extra"].get("model") != self.model_id:
            raise UserError("stream state was made by another model", found=f"model {meta['extra'].get('model')}, "
                            f"this node {self.model_id}", fix="resume it on a node serving the same artifacts")
        state = StreamState.restore(data, self.device)
        self.check_size(*state.size)
        channels = self.artifacts.spec("transformer").attrs["in_channels"]
        h, w = state.size
        if tuple(state.chunk_state.history.shape[:2]) != (1, channels) or \
                tuple(state.chunk_state.history.shape[3:]) != (h // 8, w // 8):
            raise UserError("stream state does not fit this model", found=f"history {tuple(state.chunk_state.history.shape)}")
        return state, meta["extra"]

    def sampling(self, **settings) -> Sampling:
        """The sampler settings of a request (see runtime/settings.py), checked against the variant."""
        return resolve_sampling(self.variant, self.scheduler.config.get("scheduler_type", "unipc"), **settings)

    def chunk_job(self, s: StreamState, on_step=None):
        """The stream's next chunk as a generator: yields each transformer call's feeds, is sent its output
        ("noise_pred"; ``drive`` makes the calls one by one), returns the decoded Chunk and advances ``s``."""
        k, sampling = s.next_index, s.sampling
        s.prompt_now = s.schedule.get(k, s.prompt_now)
        negative = None if sampling.guidance is None else self.encode_prompt(sampling.negative_prompt)
        request = ChunkRequest(self.encode_prompt(s.prompt_now), sampling.steps, sampling.amplify_first_chunk and k == 0,
                               sampling.guidance, negative, sampling.sampler)
        patch = self.artifacts.spec("transformer").attrs["patch_size"]
        latents = yield from self._denoise_steps(self.scheduler, self.block_noise, s.chunk_state, request, s.generator,
                                                 k == 0, patch, s.indices, on_step)
        update_history(s.chunk_state, latents, k == 0)
        decoded = self.runner("vae_decoder").infer({"latents": self.latent_norm.denormalise(latents)})
        keep = min(decoded["frames"].shape[1], s.total_frames - CHUNK_FRAMES * k)
        if s.output == "float":
            frames = to_unit(decoded["video"][0, :, :keep]).permute(1, 2, 3, 0)
        else:  # uint8 [T, H, W, 3], converted on the device by the chunk graph
            frames = decoded["frames"][0, :keep]
        s.next_index = k + 1
        return Chunk(k, to_host(frames))

    def _initial_state(self, channels: int, image, video, generator: torch.Generator, height: int,
                       width: int) -> ChunkState:
        """Zero history at the request's size, or the image / video conditioning in its place (the reference's
        step 4-5); every later shape follows the history's."""
        history = torch.zeros(1, channels, sum(HISTORY_SIZES), height // 8, width // 8, device=self.device)
        if image is None and video is None:
            return ChunkState(history, None)
        self.artifacts.require("vae_encoder")
        encode = encoder_fn(self.runner("vae_encoder", "first"), self.runner("vae_encoder", "step"))
        norm = Normaliser.from_attrs(self.artifacts.spec("vae_encoder").attrs).to(self.device)
        if image is not None:
            image_latents, fake = image_conditioning(image, encode, norm, generator, height, width)
            return ChunkState(torch.cat([history[:, :, :-1], fake], dim=2), image_latents)
        image_latents, video_latents = video_conditioning(video, encode, norm, generator, height, width)
        keep = history.shape[2] - video_latents.shape[2]
        history = torch.cat([history[:, :, :keep], video_latents], dim=2) if keep > 0 else video_latents
        return ChunkState(history, image_latents)

    def generate(self, prompt, output: str = "uint8", **kwargs) -> np.ndarray:
        """The whole video: uint8 [T, H, W, 3], or float32 in [0, 1] with output="float"."""
        return np.concatenate([c.frames for c in self.stream(prompt, output=output, **kwargs)], axis=0)

    # -- checks ----------------------------------------------------------------------------------
    @staticmethod
    def _prompt_schedule(prompt) -> dict[int, str]:
        schedule = {0: prompt} if isinstance(prompt, str) else dict(prompt or {})
        if 0 not in schedule or any(not isinstance(p, str) or not p.strip() for p in schedule.values()):
            raise UserError("empty prompt", expected="a non-empty prompt (or a schedule {chunk: prompt} with chunk 0)",
                            fix='pass --prompt "a cat walking in the snow"')
        return schedule

    def check_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """The request's (height, width): one of the exported sizes (a side left None: the default's, the first
        exported size), else one UserError naming the exported sizes."""
        return check_size_exported(height or self.height, width or self.width, self.sizes)

    def _check_request(self, num_frames, height, width, image, video) -> tuple[int, int]:
        if not isinstance(num_frames, int) or num_frames <= 0:
            raise UserError(f"number of frames must be positive, got {num_frames}", fix="pass --frames 33 or more")
        size = self.check_size(height, width)
        if image is not None and video is not None:
            raise UserError("pass an image or a video, not both", fix="use --image for I2V or --video for V2V")
        return size
