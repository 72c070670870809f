"""A video request, from an OpenAI-style body (multipart form or JSON) to the backend's keywords.

Fields: ``prompt`` (required), ``model``, ``seconds`` or ``num_frames``, ``size`` as WIDTHxHEIGHT (one of
the exported sizes), ``input_reference`` (an image file, or {"image_url": "data:image/...;base64,..."})
for image-to-video; Helios settings as extra fields: ``seed``, ``steps`` / ``pyramid_steps`` ("1,1,1"),
``num_inference_steps``, ``guidance_scale``, ``negative_prompt``, ``amplify_first_chunk`` (also inside an
``extra_params`` object). The same fields start a WebSocket stream.

Every field has an upper bound (BOUNDS; the runtime's own where runtime/settings.py names one): a request
over one is a 400 naming the field, before anything is decoded or scheduled. An input image is checked by
its header's size before its pixels are decoded (a decompression bomb is refused, not decoded).
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import warnings
from dataclasses import dataclass, field

from .errors import ApiError

CHUNK_FRAMES = 33


def _runtime_limit(name: str, default):
    """A bound the runtime defines (runtime/settings.py), else the API's own."""
    try:
        from ..runtime import settings
    except ImportError:  # pragma: no cover - the API always ships with the runtime
        return default
    return getattr(settings, name, default)


# upper bounds of the request fields (the lower ones are checked where the field is read)
BOUNDS = {
    "prompt_chars": 4000,  # prompt and negative_prompt; the text encoder reads 512 tokens at most anyway
    "steps_per_stage": _runtime_limit("MAX_PYRAMID_STEPS", 50),  # pyramid_steps, each stage
    "num_inference_steps": _runtime_limit("MAX_INFERENCE_STEPS", 100),  # Helios-Base (the reference: 50)
    "guidance_scale": _runtime_limit("MAX_GUIDANCE_SCALE", 20.0),  # the reference's 5.0
    "seed": 2 ** 63 - 1,  # torch.Generator.manual_seed's range that also fits Triton's INT64 input
    "image_pixels": 4096 * 4096,  # input_reference, checked from the header before decoding
    "image_side": 8192,
}
_INT = ("num_frames", "seed", "num_inference_steps")
_FLOAT = ("guidance_scale",)
KNOWN = {"prompt", "model", "seconds", "size", "input_reference", "num_frames", "seed", "steps", "pyramid_steps",
         "num_inference_steps", "guidance_scale", "negative_prompt", "amplify_first_chunk", "extra_params"}


@dataclass
class VideoRequest:
    prompt: str
    model: str
    num_frames: int
    size: tuple[int, int]  # (height, width)
    seed: int = 0
    image: object = None  # PIL image for I2V
    settings: dict = field(default_factory=dict)  # Pipeline.stream sampler keywords (None: the variant's)

    @property
    def size_text(self) -> str:  # the OpenAI spelling: WIDTHxHEIGHT
        return f"{self.size[1]}x{self.size[0]}"

    def seconds(self, fps: float) -> str:
        return f"{self.num_frames / fps:g}"

    def backend_kwargs(self) -> dict:
        return {"num_frames": self.num_frames, "seed": self.seed, "image": self.image, "height": self.size[0],
                "width": self.size[1], **self.settings}

    def params(self) -> dict:
        """What is stored with a job (JSON)."""
        return {"num_frames": self.num_frames, "seed": self.seed, "image": self.image is not None, **self.settings}


def parse(fields: dict, *, sizes, fps: float, max_frames: int, models: tuple[str, ...]) -> VideoRequest:
    """Check and convert one request's fields; every problem is a 400 naming the field."""
    fields = dict(fields)
    extra = fields.pop("extra_params", None)
    if extra is not None:
        extra = _json_object(extra, "extra_params")
        fields.update({k: v for k, v in extra.items() if k not in fields})
    unknown = sorted(set(fields) - KNOWN)
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}", "unknown_parameter", unknown[0])
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ApiError(400, "prompt is required: a non-empty text", "invalid_request", "prompt")
    _text_bound(prompt, "prompt")
    model = fields.get("model") or models[0]
    if model not in models:
        raise ApiError(400, f"model {model!r} is not served here; this server serves {', '.join(models)}",
                       "model_not_found", "model")
    num_frames, size = _frames(fields, fps, max_frames), _size(fields.get("size"), sizes)
    seed, settings = _bounded(fields, "seed", int, 0, 0, BOUNDS["seed"]), _settings(fields)
    return VideoRequest(prompt=prompt, model=model, num_frames=num_frames, size=size, seed=seed,
                        image=_image(fields.get("input_reference")), settings=settings)  # the image last: the costly part


def _text_bound(text: str, name: str) -> None:
    if len(text) > BOUNDS["prompt_chars"]:
        raise ApiError(400, f"{name} is {len(text)} characters; at most {BOUNDS['prompt_chars']} are accepted",
                       "invalid_request", name)


def _bounded(fields: dict, name: str, kind, default, low, high):
    """_number, refused with a 400 outside [low, high]."""
    value = _number(fields, name, kind, default)
    if value is not None and not ((kind is int or math.isfinite(value)) and low <= value <= high):
        raise ApiError(400, f"{name} {str(fields.get(name))[:40]} is out of range: {low} to {high}", "invalid_request", name)
    return value


def _frames(fields: dict, fps: float, max_frames: int) -> int:
    if fields.get("seconds") not in (None, "") and fields.get("num_frames") not in (None, ""):
        raise ApiError(400, "pass seconds or num_frames, not both", "invalid_request", "seconds")
    if fields.get("seconds") not in (None, ""):
        seconds = _number(fields, "seconds", float, None)
        if not (seconds > 0 and math.isfinite(seconds)):
            raise ApiError(400, f"seconds must be positive, got {fields['seconds']!r}", "invalid_request", "seconds")
        frames = max(1, round(seconds * fps))
    else:
        frames = _number(fields, "num_frames", int, CHUNK_FRAMES)
    if not 1 <= frames <= max_frames:
        raise ApiError(400, f"{frames} frames is out of range: this server makes 1 to {max_frames} frames "
                       f"({max_frames / fps:g} s at {fps:g} fps) per video", "invalid_request", "num_frames")
    return frames


def _size(text, sizes) -> tuple[int, int]:
    names = ", ".join(f"{w}x{h}" for h, w in sizes)
    if text in (None, ""):
        return tuple(sizes[0])
    m = re.fullmatch(r"(\d+)x(\d+)", str(text).strip())
    size = (int(m.group(2)), int(m.group(1))) if m else None
    if size not in [tuple(s) for s in sizes]:
        raise ApiError(400, f"size {text!r} is not served; sizes (WIDTHxHEIGHT): {names}", "invalid_request", "size")
    return size


def _number(fields: dict, name: str, kind, default):
    value = fields.get(name)
    if value in (None, ""):
        return default
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ApiError(400, f"{name} must be a{'n integer' if kind is int else ' number'}, got {value!r}",
                       "invalid_request", name) from None


def _settings(fields: dict) -> dict:
    steps = fields.get("pyramid_steps", fields.get("steps"))
    if isinstance(steps, str):
        steps = [s for s in steps.split(",") if s.strip()]
    if steps is not None:
        try:
            if len(steps) > 8:
                raise ValueError
            steps = tuple(int(s) for s in steps)
        except (TypeError, ValueError):
            raise ApiError(400, f"steps must be integers such as 1,1,1, got {str(steps)[:80]!r}", "invalid_request",
                           "steps") from None
        if any(not 1 <= s <= BOUNDS["steps_per_stage"] for s in steps):
            raise ApiError(400, f"steps {','.join(map(str, steps))} out of range: each stage takes 1 to "
                           f"{BOUNDS['steps_per_stage']} steps", "invalid_request", "steps")
    amplify = fields.get("amplify_first_chunk")
    if isinstance(amplify, str):
        amplify = {"true": True, "1": True, "false": False, "0": False}.get(amplify.lower(), amplify)
    if amplify not in (None, True, False):
        raise ApiError(400, f"amplify_first_chunk must be true or false, got {amplify!r}", "invalid_request",
                       "amplify_first_chunk")
    negative = fields.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise ApiError(400, "negative_prompt must be text", "invalid_request", "negative_prompt")
    if negative is not None:
        _text_bound(negative, "negative_prompt")
    return {"pyramid_steps": steps,
            "num_inference_steps": _bounded(fields, "num_inference_steps", int, None, 1, BOUNDS["num_inference_steps"]),
            "guidance_scale": _bounded(fields, "guidance_scale", float, None, 0.0, BOUNDS["guidance_scale"]),
            "negative_prompt": negative, "amplify_first_chunk": amplify}


def _json_object(value, name: str) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, dict):
        raise ApiError(400, f"{name} must be a JSON object", "invalid_request", name)
    return value


def _image(ref):
    """An uploaded file's bytes, or {"image_url": data URL} -> PIL RGB image."""
    from PIL import Image, UnidentifiedImageError

    if ref is None or ref == "":
        return None
    if isinstance(ref, (dict, str)) and not isinstance(ref, bytes):
        ref = _json_object(ref, "input_reference") if isinstance(ref, str) else ref
        url = ref.get("image_url")
        if not isinstance(url, str) or not url.startswith("data:image/") or ";base64," not in url:
            raise ApiError(400, "input_reference must be an uploaded image or {\"image_url\": a base64 data URL}; "
                           "this server fetches nothing from the network and has no file ids", "invalid_request",
                           "input_reference")
        try:
            ref = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
        except ValueError:
            raise ApiError(400, "input_reference data URL is not valid base64", "invalid_request",
                           "input_reference") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(ref))  # reads the header only
            _pixel_bound(image.size)
            return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(400, "input_reference is too large to decode (a decompression bomb?)", "image_too_large",
                       "input_reference") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ApiError(400, "input_reference is not an image (PNG, JPEG, WebP)", "invalid_request",
                       "input_reference") from None


def _pixel_bound(size: tuple[int, int]) -> None:
    w, h = size
    if w * h > BOUNDS["image_pixels"] or max(w, h) > BOUNDS["image_side"]:
        raise ApiError(400, f"input_reference is {w}x{h} pixels; at most {BOUNDS['image_pixels']:,} pixels and "
                       f"{BOUNDS['image_side']} per side are accepted (it is resized to the video's size)",
                       "image_too_large", "input_reference")
