"""How a config's relative paths resolve, said where a path is missing.

``extends`` is relative to the config file that names it (configs extend their neighbours); ``init_from``,
a stream's ``source`` / ``validation_source`` and ``run.output_dir`` are relative to the current directory,
as on the command line (``metalm train configs/x.yaml`` from the repository root names ``runs/...`` and
``data/...`` as the shell sees them). A missing path's message says so, and names the file it would have
been had it been resolved against the config file's folder, when that exists.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["relative_path_hint"]


def relative_path_hint(path: str, config_source: str | None) -> str:
    """Text to append to a "not found" message for `path` read from the config file `config_source`."""
    if Path(path).is_absolute():
        return ""
    hint = f" (relative paths other than `extends` are resolved against the current directory, {os.getcwd()}"
    if config_source and not config_source.startswith("<"):
        beside = Path(config_source).parent / path
        if beside != Path(path) and beside.exists():
            return f"{hint}; {path!r} exists next to the config file: write {str(beside)!r})"
    return hint + ")"
