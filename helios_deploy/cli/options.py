"""Shared option decorators, so every command spells its common options the same way."""

from __future__ import annotations

import click

from ..model.specs import COMPONENTS


def force_option(f):
    return click.option("--force", is_flag=True, help="Replace a non-empty output folder.")(f)


def revision_option(f):
    return click.option("--revision", default=None, metavar="REV",
                        help="With a Hub id: the branch, tag or commit to resolve (default: main).")(f)


def lora_option(f):
    return click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
                        help="A LoRA adapter (.safetensors: the diffusers/PEFT layout, or a Wan-style layout diffusers "
                             "converts; text_encoder.* keys in the PEFT layout) fused into the transformer's (and text encoder's) "
                             "weights with SCALE (default 1.0); repeat for "
                             "several, added in order. The manifest records each file's sha256 and scale.")(f)


def parse_loras(values) -> list:
    from ..export.exporter.lora import Adapter

    return [Adapter.parse(v) for v in values]


def size_options(f):
    f = click.option("--width", type=int, default=640, show_default=True, help="Video width in pixels.")(f)
    return click.option("--height", type=int, default=384, show_default=True, help="Video height in pixels.")(f)


def request_size_options(f):
    """The video size of one request (generate, bench, client): one of the sizes the artifacts were exported
    for; unset, the first exported size."""
    f = click.option("--width", type=int, default=None, help="Video width (default: the first exported size's).")(f)
    return click.option("--height", type=int, default=None,
                        help="Video height, one of the exported sizes (default: the first exported size's).")(f)


def sizes_option(f):
    return click.option("--sizes", default=None, metavar="HxW,...",
                        help="Several video sizes, e.g. 384x640,640x384,512x832 (replaces --height/--width; "
                             "the first is the default).")(f)


def resolve_sizes(height: int, width: int, sizes: str | None):
    """The --sizes list, or the one --height x --width."""
    from ..model.sizes import parse_sizes, sizes_or_one

    return sizes_or_one(height, width, parse_sizes(sizes) if sizes else None)


def parse_components(value: str | None) -> tuple[str, ...]:
    if not value:
        return COMPONENTS
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [n for n in names if n not in COMPONENTS]
    if bad:
        raise click.BadParameter(f"unknown component(s) {', '.join(bad)}; choose from {', '.join(COMPONENTS)}")
    return names


def components_option(f):
    return click.option(
        "--components", default=None, metavar="LIST",
        help=f"Comma-separated subset of {','.join(COMPONENTS)} (default: all).",
    )(f)


def request_options(f):
    """What one generation asks for (generate, client): prompt, frames, seed, and the sampler settings of the
    checkpoint's variant. Unset settings take the variant's reference defaults; a setting the variant does not
    have (guidance on Distilled, --steps on Base, ...) is an error."""
    f = click.option("--amplify-first-chunk", is_flag=True, help="Distilled: twice the steps for the first chunk.")(f)
    f = click.option("--negative-prompt", default=None,
                     help="Base / Mid with guidance: what to steer away from (default: the empty prompt).")(f)
    f = click.option("--guidance-scale", type=float, default=None,
                     help="Base / Mid: classifier-free guidance scale (default 5.0; 1 turns guidance off).")(f)
    f = click.option("--num-inference-steps", type=int, default=None, help="Base: denoising steps (default 50).")(f)
    f = click.option("--steps", default=None,
                     help="Mid / Distilled: steps per pyramid stage, e.g. 2,2,2 (default: Mid 10,10,10, Distilled 1,1,1).")(f)
    f = click.option("--seed", type=int, default=0, show_default=True)(f)
    f = click.option("--frames", type=int, default=33, show_default=True, help="Rounded up to chunks of 33 frames.")(f)
    return click.option("--prompt", required=True, help="Text prompt.")(f)


def parse_steps(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        steps = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers such as 1,1,1") from None
    if not steps or any(s < 1 for s in steps):
        raise click.BadParameter(f"{value!r}: every stage needs at least one step")
    return steps


def request_settings(steps=None, num_inference_steps=None, guidance_scale=None, negative_prompt=None,
                     amplify_first_chunk=False, **more) -> dict:
    """The request_options values as Pipeline.stream keywords (None: the variant's default)."""
    return {"pyramid_steps": parse_steps(steps), "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale, "negative_prompt": negative_prompt,
            "amplify_first_chunk": True if amplify_first_chunk else None, **more}
