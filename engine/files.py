"""Files written whole or not at all: a reader, or a run killed halfway, never sees half a file."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

# write_atomically's temporary copy of NAME.SUFFIX: ".NAME." + mkstemp's 8 random characters + ".SUFFIX"
TEMPORARY_COPY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}(?P<suffix>\.[^.]*)?")


def is_temporary_copy(path: Path) -> bool:
    match = TEMPORARY_COPY.fullmatch(path.name)
    return match is not None and (match["suffix"] or "") == Path(match["name"]).suffix


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
