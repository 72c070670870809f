"""Shared option decorators, so every command spells its common options the same way."""

from __future__ import annotations

import click

from ..specs import COMPONENTS


def force_option(f):
    return click.option("--force", is_flag=True, help="Replace a non-empty output folder.")(f)


def revision_option(f):
    return click.option("--revision", default=None, metavar="REV",
                        help="With a Hub id: the branch, tag or commit to resolve (default: main).")(f)


def size_options(f):
    f = click.option("--width", type=int, default=640, show_default=True, help="Video width in pixels.")(f)
    return click.option("--height", type=int, default=384, show_default=True, help="Video height in pixels.")(f)


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
    """What one generation asks for: prompt, frames, seed, steps per pyramid stage, amplify (generate, client)."""
    f = click.option("--amplify-first-chunk", is_flag=True, help="Twice the steps for the first chunk.")(f)
    f = click.option("--steps", default="1,1,1", show_default=True, help="Steps per pyramid stage, e.g. 2,2,2.")(f)
    f = click.option("--seed", type=int, default=0, show_default=True)(f)
    f = click.option("--frames", type=int, default=33, show_default=True, help="Rounded up to chunks of 33 frames.")(f)
    return click.option("--prompt", required=True, help="Text prompt.")(f)
