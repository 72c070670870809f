"""python -m helios_deploy.cli: the helios-deploy command."""

from . import run

run()
