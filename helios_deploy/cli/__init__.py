"""The helios-deploy CLI: a thin registry. Each command lives in its own module as one library call."""

from __future__ import annotations

import contextlib
import errno
import importlib
import importlib.util
import os
import signal
import sys
import threading

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
    "refit": "refit",
    "cost": "cost",
    "quantize": "quantize",
    "verify": "verify",
    "triton": "triton",
    "client": "client",
    "stream-control": "stream_control",
    "streams": "streams",
    "scale-report": "scale_report",
    "long-stream": "long_stream",
    "api": "api",
    "soak": "soak",
    "doctor": "doctor",
    "adherence": "adherence",
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


DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def _signals_as_interrupts():
    """SIGTERM (what systemd, Docker and Kubernetes send) unwinds like Ctrl-C, so every step's work folder
    is removed on the way out; SIGXFSZ (a file-size limit) becomes an EFBIG write error with a message
    instead of killing the process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGXFSZ, previous[1])


def main(argv=None) -> int:
    try:
        with _signals_as_interrupts():
            cli.main(args=argv, prog_name="helios-deploy", standalone_mode=False)
    except UserError as e:
        if os.environ.get("HELIOS_DEPLOY_DEBUG"):
            raise
        click.echo(f"error: {e.render()}", err=True)
        return 1
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted: nothing was changed (the step's work folder was removed)", err=True)
        return 1
    except OSError as e:
        if e.errno not in DISK_ERRNOS or os.environ.get("HELIOS_DEPLOY_DEBUG"):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        click.echo(f"error: out of disk space{where}: {os.strerror(e.errno)}\n"
                   "  found: the disk (or the file-size limit) filled up before the step finished; nothing was "
                   "changed (its work folder was removed)\n"
                   "  fix: free space where the output goes (docs/scale.md lists what each step "
                   "writes) and run the step again", err=True)
        return 1
    except click.ClickException as e:
        e.show()
        return 1 if e.exit_code else 0
    except SystemExit as e:  # click's own exits (--help, --version)
        return int(e.code or 0)
    return 0


def run() -> None:
    sys.exit(main())
