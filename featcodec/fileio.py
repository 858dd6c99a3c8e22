"""Reading inputs (a path or '-' for stdin) and writing outputs atomically."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from .errors import FeatcodecError

STDIO = "-"


def read_input(source: str) -> bytes:
    """All bytes of a file, or of stdin when ``source`` is '-' (reads until EOF, however it trickles in)."""
    if source == STDIO:
        return sys.stdin.buffer.read()
    path = Path(source)
    if not path.exists():
        raise FeatcodecError(f"{source}: no such file")
    if not path.is_file():
        raise FeatcodecError(f"{source}: not a file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise FeatcodecError(f"{source}: cannot read ({exc.strerror})") from None


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, then rename it into place.

    An interrupted write leaves the old file (or none), never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            os.fchmod(out.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; use the usual permissions
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
