"""helios-deploy: put the Helios video diffusion model into production.

Core package: component specs, checkpoint loading, errors and the CLI. The export pipeline lives in
``helios_deploy.export`` (top-level folder ``export/``) and the runtime in ``helios_deploy.runtime``
(top-level folder ``runtime/``).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("helios-deploy")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
