"""A ``helios`` request's tensors -> what the node does with it: an open's Pipeline.stream keywords (checked
against the config's tensors and the served sizes) or a control request's action. Pure functions over numpy
arrays (``get(name)`` -> array or None), so they are tested without Triton."""

from __future__ import annotations

import json
from typing import Callable, Mapping

import numpy as np

from ..errors import UserError
from .configs import CONTROL_INPUTS, HELIOS_INPUTS, served_dims

DEFAULTS = {"num_frames": 33, "seed": 0}  # the sampler settings' defaults are the checkpoint variant's
_NUMPY = {"bytes": np.object_, "uint8": np.uint8, "int32": np.int32, "int64": np.int64, "bool": np.bool_,
          "float32": np.float32}


def _check_tensor(name: str, value: np.ndarray, height: int, width: int) -> None:
    spec = next(t for t in HELIOS_INPUTS if t.name == name)
    if value.dtype != _NUMPY[spec.dtype] and not (spec.dtype == "bytes" and value.dtype.kind in "SU"):
        raise UserError(f"input {name!r} has data type {value.dtype}", expected=f"{spec.dtype} {list(spec.dims)}")
    dims = served_dims(spec, height, width)
    if value.ndim != len(dims) or any(d != -1 and s != d for s, d in zip(value.shape, dims)):
        raise UserError(f"input {name!r} has shape {list(value.shape)}",
                        expected=f"{list(dims)} ({spec.doc}; -1: any size)",
                        fix=f"the request is for {height}x{width}; resize to that size"
                        if name in ("image", "video") else None)


def _text(value: np.ndarray, name: str) -> str:
    raw = value.reshape(-1)[0]
    try:
        return raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError as e:
        raise UserError(f"input {name!r} is not UTF-8", found=str(e)) from None


def _prompt(value: np.ndarray | None) -> str:
    if value is None or value.size != 1:
        raise UserError("the request has no prompt", expected="input 'prompt': one UTF-8 string (BYTES [1])")
    text = _text(value, "prompt")
    if not text.strip():
        raise UserError("input 'prompt' is empty", expected="a non-empty text prompt")
    return text


def _sampler_settings(values: Mapping[str, np.ndarray | None]) -> dict:
    """The optional sampler settings present in the request, as Pipeline.stream keywords (absent: None, so
    the checkpoint variant's defaults apply; a setting the variant lacks is refused by the pipeline)."""
    def scalar(name, cast):
        return None if values[name] is None else cast(values[name].reshape(-1)[0])

    steps = values["pyramid_steps"]
    if steps is not None and any(int(s) < 1 for s in steps):
        raise UserError(f"pyramid_steps {[int(s) for s in steps]} invalid", expected="positive integers per stage, e.g. [1, 1, 1]")
    return {"pyramid_steps": None if steps is None else tuple(int(s) for s in steps),
            "amplify_first_chunk": True if scalar("amplify_first_chunk", bool) else None,
            "num_inference_steps": scalar("num_inference_steps", int),
            "guidance_scale": scalar("guidance_scale", float),
            "negative_prompt": None if values["negative_prompt"] is None else _text(values["negative_prompt"],
                                                                                    "negative_prompt")}


def _size(values: Mapping[str, np.ndarray | None], check_size: Callable) -> tuple[int, int]:
    """The request's (height, width) through ``check_size`` (Pipeline.check_size: one of the exported sizes)."""
    for name in ("height", "width"):
        if values[name] is not None:
            _check_tensor(name, values[name], -1, -1)
    h, w = (None if values[n] is None else int(values[n].reshape(-1)[0]) for n in ("height", "width"))
    return check_size(h, w)


def parse_request(get: Callable[[str], np.ndarray | None], check_size: Callable, max_frames: int) -> dict:
    """Pipeline.stream keyword arguments from a request's tensors (``get(name)`` -> array or None);
    a UserError for anything the pipeline would reject, at a size not exported (``check_size``:
    Pipeline.check_size) or that does not fit the request's size."""
    values = {t.name: get(t.name) for t in HELIOS_INPUTS}
    height, width = _size(values, check_size)
    for name, value in values.items():
        if value is not None:
            _check_tensor(name, value, height, width)
    out = {"prompt": _prompt(values["prompt"]), "height": height, "width": width}
    out.update({k: values[k] for k in ("image", "video")})
    if out["image"] is not None and out["video"] is not None:
        raise UserError("the request has both 'image' and 'video'", expected="at most one (I2V or V2V)")
    if out["video"] is not None and out["video"].shape[0] < 1:
        raise UserError("input 'video' has no frames")
    n = int(values["num_frames"][0]) if values["num_frames"] is not None else DEFAULTS["num_frames"]
    if not 1 <= n <= max_frames:
        raise UserError(f"num_frames {n} is out of range", expected=f"1..{max_frames} (this repository's --max-frames)")
    out["realtime"] = True if values["realtime"] is None else bool(values["realtime"].reshape(-1)[0])
    out.update(num_frames=n, seed=int(values["seed"][0]) if values["seed"] is not None else DEFAULTS["seed"],
               **_sampler_settings(values))
    return out


def model_parameters(model_config: Mapping) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in (model_config.get("parameters") or {}).items()}


def text_input(get: Callable[[str], np.ndarray | None], name: str) -> str | None:
    """An optional one-string BYTES input as text (None when absent)."""
    value = get(name)
    if value is None:
        return None
    if value.size != 1:
        raise UserError(f"input {name!r} has {value.size} elements", expected="one UTF-8 string (BYTES [1])")
    return _text(value, name)


def control_request(get: Callable[[str], np.ndarray | None]) -> dict:
    """The control inputs of a request: {"action": None (an open) or the action, "stream_id", "owner", "prompt"}."""
    out = {t.name: text_input(get, t.name) for t in CONTROL_INPUTS}
    out["owner"] = out["owner"] or ""
    if out["action"] is not None:
        out["prompt"] = text_input(get, "prompt")
    return out


def due_in_request(get: Callable[[str], np.ndarray | None]) -> float | None:
    """A moved stream's ``due_in`` (seconds until its next chunk is due; never below 0), or None when not given."""
    value = get("due_in")
    if value is None or value.size == 0:
        return None
    due = float(value.reshape(-1)[0])
    if not np.isfinite(due):
        raise UserError("input 'due_in' must be a finite number of seconds", found=str(due))
    return max(0.0, due)


def prompt_changes_request(get: Callable[[str], np.ndarray | None]) -> list[tuple[int, str]] | None:
    """An open's ``prompt_changes`` as [(from_chunk, prompt), ...] in the order given (the order they were applied),
    or None when absent; a UserError for anything but a JSON list of [chunk >= 0, non-empty prompt] pairs."""
    text = text_input(get, "prompt_changes")
    if text is None:
        return None
    expected = 'a JSON list of [from_chunk, prompt] pairs in the order applied, e.g. [[1, "a dog"]] (chunk >= 0)'
    try:
        changes = json.loads(text)
    except ValueError as e:
        raise UserError("input 'prompt_changes' is not JSON", found=str(e), expected=expected) from None
    if not isinstance(changes, list):
        raise UserError("input 'prompt_changes' is not a list", found=text[:80], expected=expected)
    out = []
    for item in changes:
        if not (isinstance(item, list) and len(item) == 2 and type(item[0]) is int and item[0] >= 0
                and isinstance(item[1], str) and item[1].strip()):
            raise UserError("input 'prompt_changes' has a bad entry", found=json.dumps(item)[:80], expected=expected)
        out.append((item[0], item[1]))
    return out


def failover_request(get: Callable[[str], np.ndarray | None]) -> tuple[bool, bytes | None]:
    """(``failover`` flag, ``resume`` snapshot bytes or None) of an open."""
    flag = get("failover")
    resume = get("resume")
    if resume is not None:
        if resume.size != 1:
            raise UserError("input 'resume' must be one snapshot (BYTES [1])", found=f"{resume.size} elements")
        resume = resume.reshape(-1)[0]
        resume = resume if isinstance(resume, bytes) else bytes(resume)
    return (False if flag is None else bool(flag.reshape(-1)[0])), resume
