"""A UNIX socket file checked and connected to as one file: no swap in between.

Checking a path and then connecting to it names the file twice; whoever can rename
a symlink or a directory on the way (anyone, in ``/tmp``) can make the two names
reach different files. :func:`pin_socket` opens the path once (``O_PATH``: no
permission needed, no side effect on the file) and yields what the kernel resolved:
the real path of that very file (``/proc/self/fd/N`` read back) to check, and
``/proc/self/fd/N`` to connect to. Connecting through that name reaches the inode
held open, whatever happens to the path's symlinks and directories meanwhile, so the
file checked is the file connected to; every attempt pins afresh.

The real path says where the file lives; a hard link would be a second name, so a
caller that allows paths by prefix should also require one link (``links``).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


class AddressRefused(Exception):
    """The socket file may not be connected to (the message says why)."""


@dataclass(frozen=True)
class PinnedSocket:
    """One socket file, held open: where it really is, and the name to connect to."""

    real_path: str
    links: int  # hard links of the file
    connect_path: str


@contextmanager
def pin_socket(path: str) -> Iterator[PinnedSocket]:
    """The socket file ``path`` names now, held open while the context lasts.

    Raises ``FileNotFoundError`` (or another ``OSError``) when there is no such
    file, ``ConnectionRefusedError`` when it is not a socket (as ``connect`` would),
    and :class:`AddressRefused` where the platform cannot pin (no ``O_PATH`` or no
    ``/proc``): callers that check paths must not fall back to the unpinned path.
    """
    o_path = getattr(os, "O_PATH", None)
    if o_path is None:
        raise AddressRefused("this platform cannot pin a socket file (no O_PATH)")
    fd = os.open(path, o_path | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISSOCK(info.st_mode):
            raise ConnectionRefusedError(f"{path!r} is not a socket")
        connect_path = f"/proc/self/fd/{fd}"
        try:
            real_path = os.readlink(connect_path)
        except OSError as exc:
            raise AddressRefused(f"cannot read back the socket's real path ({exc})") from None
        yield PinnedSocket(real_path, info.st_nlink, connect_path)
    finally:
        os.close(fd)
