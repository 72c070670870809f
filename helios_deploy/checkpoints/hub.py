"""Checkpoints named by Hugging Face Hub id (``org/name``): resolved to a snapshot folder of the local
hub cache with ``huggingface_hub.snapshot_download``, downloading only the files asked for (with its
progress bars) unless the cache already holds them.

The cache and the offline switch are read from the environment when a checkpoint is resolved, not when
huggingface_hub was imported: HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub (HF_HOME
defaulting to $XDG_CACHE_HOME/huggingface or ~/.cache/huggingface); HF_HUB_OFFLINE=1 (or
TRANSFORMERS_OFFLINE=1) resolves from the cache alone.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

from ..errors import UserError

# what the Hub accepts as a model id: one namespace, one name (letters, digits, - _ .)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_TRUE = {"1", "on", "yes", "true"}


def looks_like_repo_id(name: str) -> bool:
    """``org/name`` with nothing path-like around it (no leading ./ or /, one slash, no ..)."""
    return bool(_REPO_ID.match(name)) and ".." not in name


def cache_dir() -> Path:
    """The hub cache the environment names now (the same precedence as huggingface_hub)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def snapshot(repo_id: str, revision: str | None, allow_patterns: Sequence[str]) -> tuple[Path, dict]:
    """The local snapshot folder of ``repo_id`` at ``revision`` (branch, tag or commit; default main) and
    the record the manifest keeps: {"repo_id", "revision", "commit"}. Downloads what is missing unless
    offline; any failure is one UserError naming the cache it looked in."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf

    revision = revision or "main"
    cache, local_only = cache_dir(), offline()
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=local_only,
                                        allow_patterns=list(allow_patterns)))
    except hf.RevisionNotFoundError:
        raise UserError(f"revision {revision!r} of {repo_id} does not exist on the Hub",
                        fix="pass --revision with a branch, tag or commit of that repository") from None
    except (hf.RepositoryNotFoundError, hf.GatedRepoError) as e:  # GatedRepoError first in the MRO: same message
        raise UserError(f"cannot access {repo_id} on the Hugging Face Hub", found=_first_line(e),
                        fix="check the id; for a private or gated model log in (`hf auth login`) or set "
                            "HF_TOKEN") from None
    except hf.LocalEntryNotFoundError as e:  # offline (or the Hub unreachable) and not in the cache
        raise _not_in_cache(repo_id, revision, cache, local_only, e) from None
    except ValueError as e:  # huggingface_hub's validation of repo ids and arguments
        raise UserError(f"{repo_id!r} is not a valid Hub model id", found=str(e), expected="org/name") from None
    return folder, {"repo_id": repo_id, "revision": revision, "commit": folder.name}


def _not_in_cache(repo_id: str, revision: str, cache: Path, local_only: bool, error: Exception) -> UserError:
    stored = cache / ("models--" + repo_id.replace("/", "--"))
    found = (f"no snapshot of {repo_id} at revision {revision!r} in the hub cache {cache}"
             + ("" if stored.is_dir() else f" (no folder {stored.name})"))
    if type(error).__name__ == "IncompleteSnapshotError":  # huggingface_hub >= 1.x: files missing from it
        found = f"an incomplete snapshot of {repo_id} in the hub cache {cache}: {_first_line(error)}"
    if local_only:
        why, get = "HF_HUB_OFFLINE is set, so nothing is downloaded", "unset HF_HUB_OFFLINE to download it"
    else:
        why, get = f"the Hub could not be reached ({_first_line(error)})", "download it where the Hub is reachable"
    return UserError(f"checkpoint {repo_id} is not available: {why}", found=found,
                     expected="a local checkpoint folder, or a Hub id whose files are in the cache or downloadable",
                     fix=f"{get}, point HF_HUB_CACHE or HF_HOME at the cache that holds it, or pass the "
                         "checkpoint's local folder")


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
