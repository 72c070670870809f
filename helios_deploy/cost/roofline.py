"""Roofline time of each call on a few GPUs: max(compute time, memory time) per call, summed per chunk.

Compute time uses the dense tensor-core peaks (datasheets print them "with sparsity", twice the dense
figure; we halve those). The fp8 variant runs the transformer's linear layers at the FP8 peak; fp8+attn also
its attention matmuls; fp8+attn+vae also the VAE decoder's convolutions (FAST_KINDS); the rest stays bf16. Memory time is the call's bytes moved (weights read
once per call at their precision + activation traffic + the call's inputs/outputs) over the peak
bandwidth. Real kernels reach perhaps 60-80% of these peaks, so these are lower bounds on time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Which FLOP kinds run on the FP8 tensor cores, per component, in each engine variant: linears only (`quantize
# --precision fp8`), + attention (`--fp8-attention`: both attention matmuls, self and cross, in TensorRT's fused
# FP8 attention at the FP8 peak), + VAE (the decoder's convolutions in FP8). Everything else runs at bf16.
_ATTENTION = ("linear", "attention_self", "attention_cross")
FAST_KINDS = {"bf16": {}, "fp8": {"transformer": ("linear",)}, "fp8+attn": {"transformer": _ATTENTION},
              "fp8+attn+vae": {"transformer": _ATTENTION, "vae_decoder": ("conv",)}}
PRECISIONS = tuple(FAST_KINDS)
REALTIME_FPS = 24.0


@dataclass(frozen=True)
class Gpu:
    name: str
    bf16_tflops: float  # dense
    fp8_tflops: float  # dense
    bandwidth_tbs: float  # TB/s (1e12 bytes/s)
    memory_gb: float  # GB (1e9 bytes)
    source: str

    def as_dict(self) -> dict:
        return asdict(self)


GPUS = (
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: BF16 1,979 / FP8 3,958 TFLOPS with
    # sparsity, 80 GB HBM3 at 3.35 TB/s.
    Gpu("H100 SXM", 989.5, 1979.0, 3.35, 80, "NVIDIA H100 datasheet (SXM), dense = sparsity figure / 2"),
    # same datasheet, H100 PCIe column: BF16 1,513 / FP8 3,026 with sparsity, 80 GB HBM2e at 2.0 TB/s.
    Gpu("H100 PCIe", 756.5, 1513.0, 2.0, 80, "NVIDIA H100 datasheet (PCIe), dense = sparsity figure / 2"),
    # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM: same tensor cores as H100 SXM, 141 GB HBM3e at 4.8 TB/s.
    Gpu("H200", 989.5, 1979.0, 4.8, 141, "NVIDIA H200 datasheet (SXM), dense = sparsity figure / 2"),
    # NVIDIA HGX B200 / DGX B200 datasheet: 8 GPUs give FP8 72 PFLOPS and BF16 36 PFLOPS with sparsity,
    # 1,440 GB HBM3e, 64 TB/s; per GPU and dense: 2.25 PF bf16, 4.5 PF fp8, 180 GB, 8 TB/s.
    Gpu("B200", 2250.0, 4500.0, 8.0, 180, "NVIDIA DGX/HGX B200 datasheet, per GPU (total / 8), dense"),
    # NVIDIA L40S datasheet: BF16 362.05 (733 with sparsity), FP8 733 (1,466 with sparsity), 48 GB GDDR6 at 864 GB/s.
    Gpu("L40S", 362.05, 733.0, 0.864, 48, "NVIDIA L40S datasheet, dense"),
)


def gpu_by_name(name: str) -> Gpu:
    for gpu in GPUS:
        if gpu.name.lower() == name.lower():
            return gpu
    raise KeyError(name)


def call_time(gpu: Gpu, flops_fast: float, flops_bf16: float, bytes_moved: float, precision: str) -> dict:
    """Roofline of one call: ``flops_fast`` run at ``precision`` (any fp8 variant: the FP8 peak), ``flops_bf16``
    always at bf16."""
    fast = gpu.fp8_tflops if precision.startswith("fp8") else gpu.bf16_tflops
    compute = flops_fast / (fast * 1e12) + flops_bf16 / (gpu.bf16_tflops * 1e12)
    memory = bytes_moved / (gpu.bandwidth_tbs * 1e12)
    return {"compute_s": compute, "memory_s": memory, "seconds": max(compute, memory),
            "bound": "compute" if compute >= memory else "memory"}


def throughput(chunk_seconds: float, chunk_frames: int) -> dict:
    fps = chunk_frames / chunk_seconds
    return {"chunk_s": chunk_seconds, "fps": fps, "realtime_streams": fps / REALTIME_FPS,
            "realtime_streams_whole": int(fps // REALTIME_FPS)}


def realtime_chunk_seconds(chunk_frames: int) -> float:
    """The time budget of one chunk for real-time playback (33 frames / 24 fps = 1.375 s)."""
    return chunk_frames / REALTIME_FPS
