"""config.pbtxt text for the Triton model repository, derived from the component specs, and validated by
parsing into Triton's own ModelConfig protobuf (tritonclient.grpc.model_config_pb2) before it is written.

Two kinds of model:
- ``helios``: the decoupled Python-backend model that streams video chunks. Its request and response
  tensors are declared once here (HELIOS_INPUTS / HELIOS_OUTPUTS); model.py reads them back from the
  config Triton hands it, so there is no second list of names.
- ``helios_<component>[_<graph>]``: one ``tensorrt_plan`` model per built engine, whose inputs, outputs
  and dims come from the component's GraphSpec (symbolic dims -> -1) and whose optimization profiles
  are the spec's operating points (one per point, as export/tensorrt/engines.py builds them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from ..model.specs import PYRAMID_STAGES, GraphSpec, TensorSpec

# numpy dtype name (as in the specs) -> Triton data type
TRITON_TYPES = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
    "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
    "bytes": "TYPE_STRING",
}


@dataclass(frozen=True)
class ServedTensor:
    """A request or response tensor of the ``helios`` model. Dims may name "height" / "width" (the
    exported video size; -1 when the artifacts serve several) or be -1 (any size)."""

    name: str
    dtype: str
    dims: tuple
    optional: bool = False
    doc: str = ""


HELIOS_INPUTS = (
    ServedTensor("prompt", "bytes", (1,), True, "UTF-8 text prompt (an open: required; set_prompt: the new prompt)"),
    ServedTensor("image", "uint8", ("height", "width", 3), True, "first frame for image-to-video (RGB)"),
    ServedTensor("video", "uint8", (-1, "height", "width", 3), True, "input video for video-to-video (RGB)"),
    ServedTensor("height", "int32", (1,), True, "video height, one of the exported sizes; default the first's"),
    ServedTensor("width", "int32", (1,), True, "video width, one of the exported sizes; default the first's"),
    ServedTensor("num_frames", "int32", (1,), True, "frames to generate (rounded up to 33-frame chunks); default 33"),
    ServedTensor("seed", "int64", (1,), True, "random seed; default 0"),
    ServedTensor("pyramid_steps", "int32", (PYRAMID_STAGES,), True,
                 "Mid / Distilled: steps per pyramid stage; default the variant's (10,10,10 / 1,1,1)"),
    ServedTensor("amplify_first_chunk", "bool", (1,), True, "Distilled: twice the steps for the first chunk; default false"),
    ServedTensor("num_inference_steps", "int32", (1,), True, "Base: denoising steps; default 50"),
    ServedTensor("guidance_scale", "float32", (1,), True, "Base / Mid: classifier-free guidance scale; default 5.0 (1: off)"),
    ServedTensor("negative_prompt", "bytes", (1,), True, "Base / Mid with guidance: UTF-8 negative prompt; default empty"),
    ServedTensor("realtime", "bool", (1,), True, "true: chunks paced to playback (a live stream; default); false: made "
                 "as fast as the runners allow (a job), after live streams' nearer deadlines"),
    ServedTensor("failover", "bool", (1,), True, "true: every chunk response carries output `state` (the stream's "
                 "snapshot after that chunk, for a resume elsewhere); default false"),
    ServedTensor("resume", "bytes", (1,), True, "a snapshot (output `state`): continue that stream (same id, next "
                 "chunk) instead of starting one; the other open inputs are ignored"),
    ServedTensor("due_in", "float32", (1,), True, "a moved stream (resume, or stream_id): seconds until its next "
                 "chunk is due at its viewer (its playback deadline, kept across the move; 0: due now); default one "
                 "chunk period"),
    ServedTensor("prompt_changes", "bytes", (1,), True, "an open (again from its start, with stream_id; or a resume): "
                 "the prompt changes made before it, JSON [[from_chunk, prompt], ...] in the order they were applied, "
                 "each applied as set_prompt does before the stream is admitted; default none"),
)
# control requests: the same model, input `action` set (one `control` JSON response, then the final flag)
CONTROL_INPUTS = (
    ServedTensor("action", "bytes", (1,), True, "absent: open a stream; set_prompt | stop | progress | capacity | drain"),
    ServedTensor("stream_id", "bytes", (1,), True, "set_prompt / stop / progress: the stream's id; an open: the id "
                 "to keep (a stream opened again from its start on another node, lost before its first state)"),
    ServedTensor("owner", "bytes", (1,), True, "an open: who owns the stream (the API: sha256 hex of the API key); "
                 "control: answered only when it matches (else not_found); default empty"),
)
ACTIONS = ("set_prompt", "stop", "progress", "capacity", "drain")
HELIOS_OUTPUTS = (
    ServedTensor("frames", "uint8", (-1, "height", "width", 3), doc="the chunk's frames, RGB (none in the first response)"),
    ServedTensor("chunk_index", "int32", (1,), doc="-1 in the first response (the stream is open), then 0, 1, 2, ..."),
    ServedTensor("stream_id", "bytes", (1,), doc="the stream's id (uuid4 hex, made by the node), in every chunk response"),
    ServedTensor("state", "bytes", (1,), doc="with failover (and in a moved response): the stream's snapshot after "
                 "its last delivered chunk"),
    ServedTensor("control", "bytes", (1,), doc="JSON: a control request's answer; a refused or bad open's "
                 "{\"error\": {\"code\", \"message\"}}; a drained stream's last response {\"moved\": true, ...}"),
)


@dataclass(frozen=True)
class Placement:
    """Where model instances run: ``count`` per GPU in ``gpus`` (KIND_GPU), or ``count`` on CPU."""

    count: int = 1
    gpus: tuple[int, ...] = ()

    @property
    def kind(self) -> str:
        return "KIND_GPU" if self.gpus else "KIND_CPU"


# ---------------------------------------------------------------------------------------------------
# Text building blocks


def quoted(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dims(dims: Sequence[int]) -> str:
    return "[ " + ", ".join(str(int(d)) for d in dims) + " ]"


def _tensor_block(name: str, dtype: str, dims: Sequence[int], optional: bool = False) -> str:
    lines = ["  {", f"    name: {quoted(name)}", f"    data_type: {TRITON_TYPES[dtype]}", f"    dims: {_dims(dims)}"]
    if optional:
        lines.append("    optional: true")
    return "\n".join(lines) + "\n  }"


def _tensors(kind: str, blocks: Sequence[str]) -> str:
    return f"{kind} [\n" + ",\n".join(blocks) + "\n]\n"


def _instance_group(placement: Placement, profiles: Sequence[int] = ()) -> str:
    lines = ["instance_group [", "  {", f"    count: {placement.count}", f"    kind: {placement.kind}"]
    if placement.gpus:
        lines.append(f"    gpus: {_dims(placement.gpus)}")
    if profiles:
        lines.append("    profile: [ " + ", ".join(quoted(str(p)) for p in profiles) + " ]")
    return "\n".join(lines + ["  }", "]"]) + "\n"


def _parameters(params: Mapping[str, str]) -> str:
    return "".join(f"parameters {{\n  key: {quoted(k)}\n  value: {{ string_value: {quoted(str(v))} }}\n}}\n"
                   for k, v in params.items())


# ---------------------------------------------------------------------------------------------------
# The two kinds of model


def served_dims(t: ServedTensor, height: int, width: int) -> tuple[int, ...]:
    return tuple({"height": height, "width": width}.get(d, d) if isinstance(d, str) else d for d in t.dims)


def size_dims(sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """Height and width as the config declares them: the size when there is one, -1 (per request) otherwise."""
    return tuple(sizes[0]) if len(sizes) == 1 else (-1, -1)


def helios_config(sizes: Sequence[tuple[int, int]], gpus: Sequence[int], params: Mapping[str, str]) -> str:
    """The decoupled Python-backend model that streams one response per 33-frame chunk, at any of ``sizes``
    (the request's ``height`` / ``width``; the first by default). ONE instance per node: KIND_CPU, or with
    ``gpus`` KIND_MODEL (the model puts one LiveScheduler on each GPU itself, serving/node.py)."""
    dims = size_dims(sizes)
    ins = [_tensor_block(t.name, t.dtype, served_dims(t, *dims), t.optional) for t in HELIOS_INPUTS + CONTROL_INPUTS]
    outs = [_tensor_block(t.name, t.dtype, served_dims(t, *dims)) for t in HELIOS_OUTPUTS]
    names = ", ".join(f"{h}x{w}" for h, w in sizes)
    header = (f"# Generated by helios-deploy: streams {names} video (default {names.split(',')[0]}), one response per "
              "33-frame chunk,\n"
              "# then an empty response with the final flag (clients: enable_empty_final_response).\n")
    header += ("# Control requests (input action: set_prompt, stop, progress, capacity, drain) go to this model too: one\n"
               "# JSON response in output control, then the final flag (docs/serving.md).\n")
    return (header + 'name: "helios"\nbackend: "python"\nmax_batch_size: 0\n'
            "model_transaction_policy { decoupled: true }\n"
            + _tensors("input", ins) + _tensors("output", outs) + _helios_instance_group(gpus) + _parameters(params))


def _helios_instance_group(gpus: Sequence[int]) -> str:
    kind = "KIND_MODEL" if gpus else "KIND_CPU"
    return "instance_group [\n  {\n    count: 1\n    kind: " + kind + "\n  }\n]\n"


def plan_dims(t: TensorSpec) -> tuple[int, ...]:
    """Spec dims as Triton dims: fixed ints stay, symbols (``batch``, ``latent_height*8``) become -1."""
    return tuple(d if isinstance(d, int) else -1 for d in t.dims)


def _profile_comment(graph: GraphSpec, profiles: Sequence[Mapping]) -> str:
    lines = [f"# optimization profiles (one per operating point of the {graph.name} graph; min / opt / max):"]
    for i, (point, prof) in enumerate(zip(graph.operating_points, profiles)):
        lines.append(f"#   {i} {point.name}:")
        for name, (lo, opt, hi) in prof.items():
            lines.append(f"#     {name}: {list(lo)} / {list(opt)} / {list(hi)}")
    return "\n".join(lines) + "\n"


def plan_config(name: str, graph: GraphSpec, profiles: Sequence[Mapping], placement: Placement,
                allocation_strategy: str | None = None) -> str:
    """A tensorrt_plan model for one engine: tensors from the spec, one instance-group profile per point (each gets
    its own execution context); ``allocation_strategy`` sets the tensorrt backend's
    execution_context_allocation_strategy (only backends of release 25.05+ read it: serving/containers.py)."""
    params = {"execution_context_allocation_strategy": allocation_strategy} if allocation_strategy else {}
    ins = [_tensor_block(t.name, t.dtype, plan_dims(t)) for t in graph.inputs]
    outs = [_tensor_block(t.name, t.dtype, plan_dims(t)) for t in graph.outputs]
    return (f"# Generated by helios-deploy from the {graph.name} graph spec (the engine has an explicit batch axis).\n"
            + _profile_comment(graph, profiles)
            + f'name: {quoted(name)}\nplatform: "tensorrt_plan"\ndefault_model_filename: "model.plan"\nmax_batch_size: 0\n'
            + _tensors("input", ins) + _tensors("output", outs) + _instance_group(placement, range(len(profiles)))
            + _parameters(params))


# ---------------------------------------------------------------------------------------------------
# Validation against Triton's schema


class ConfigError(RuntimeError):
    """A generated config.pbtxt does not parse as Triton's ModelConfig: a bug in this module."""


def parse_config(text: str):
    """``text`` parsed into tritonclient's ModelConfig protobuf; raises ConfigError naming the problem."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise ConfigError(f"generated config.pbtxt is not a valid Triton ModelConfig: {e}\n{text}") from None
