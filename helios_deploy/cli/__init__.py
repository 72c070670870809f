"""The helios-deploy CLI: a thin registry. Each command lives in its own module as one library call."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import click

from .. import __version__
from ..errors import UserError

# command name -> module under helios_deploy.cli that defines `command`
COMMANDS = {
    "tiny-checkpoint": "tiny_checkpoint",
    "export": "export",
    "parity": "parity",
    "demo": "demo",
    "generate": "generate",
    "bench": "bench",
    "build": "build",
    "cost": "cost",
    "quantize": "quantize",
    "verify": "verify",
    "triton": "triton",
    "client": "client",
}


class _LazyGroup(click.Group):
    """Imports a command's module only when it is used (torch and diffusers load slowly)."""

    def list_commands(self, ctx):
        return sorted(n for n, m in COMMANDS.items() if importlib.util.find_spec(f"{__name__}.{m}") is not None)

    def get_command(self, ctx, name):
        module = COMMANDS.get(name)
        if module is None:
            return None
        return importlib.import_module(f"{__name__}.{module}").command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="helios-deploy")
def cli():
    """Export Helios to verified ONNX, build engines, run and serve it.

    Set HELIOS_DEPLOY_DEBUG=1 to see tracebacks for input errors.
    """


def main(argv=None) -> int:
    try:
        cli.main(args=argv, prog_name="helios-deploy", standalone_mode=False)
    except UserError as e:
        if os.environ.get("HELIOS_DEPLOY_DEBUG"):
            raise
        click.echo(f"error: {e.render()}", err=True)
        return 1
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except click.ClickException as e:
        e.show()
        return 1 if e.exit_code else 0
    except SystemExit as e:  # click's own exits (--help, --version)
        return int(e.code or 0)
    return 0


def run() -> None:
    sys.exit(main())
