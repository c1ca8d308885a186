"""Working directories for the processes the tests start (Squall, Redis, FerretDB, tools).

Under pytest they go inside the run's own temporary directory
(``tmp_path_factory``'s base), so pytest's retention keeps them for the most
recent runs only (three by default) and removes the rest: the logs of a failed
run stay there to read, and FerretDB's data directories (about 2 MB each) no
longer pile up in ``/tmp`` run after run. Outside pytest (a helper used from a
script), they are plain temporary directories.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

_base: Path | None = None


def set_base(path: Path | None) -> None:
    """Where ``scratch_dir`` creates directories from now on (None: the system's temp dir)."""
    global _base
    _base = path


def scratch_dir(prefix: str) -> Path:
    """A new, empty directory whose name starts with ``prefix``."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=_base))
