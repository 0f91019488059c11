"""The one atomic file write: a reader sees the old content or the new, never a part.

The steps, in this order: write a temporary file in the target's directory, fsync it, set its
mode, rename it over the target (or link it, refusing an existing target), fsync the directory
so the rename itself survives a power loss. A crash at any point leaves the old file (and at
worst a stray ``.NAME.*.tmp``), never a truncated one.

:func:`write_atomic` writes bytes or text in one call; :class:`AtomicFile` is the streaming form
(copying an image while hashing it, choosing the final name only once the hash is known).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

#: Temporary files are named ``.NAME.RANDOM.tmp``, next to the target.
TMP_SUFFIX = ".tmp"


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """fsyncs ``directory`` itself, so that a rename or link inside it is durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """A temporary file that becomes ``path`` only when committed.

    Use it as a context manager: ``with AtomicFile(path) as f: f.write(...)`` commits on a normal
    exit and removes the temporary file on an exception. :meth:`commit` may be called inside the
    block to give another final name (in the same directory) or to refuse an existing target.

    ``mode`` is the file's exact mode (set with chmod, so the umask neither narrows nor widens
    it); ``None`` leaves what the umask gives a new file. ``fsync=False`` skips both fsyncs
    (tests and throw-away demos): the write stays atomic for a killed process, not for a power
    loss.
    """

    def __init__(self, path: str | os.PathLike[str], mode: int | None = 0o600, fsync: bool = True) -> None:
        self.path = Path(path)
        self.mode = mode
        self.fsync = fsync
        self.tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        create_mode = 0o600 if mode is not None else 0o666
        fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, create_mode)
        self.file: BinaryIO = os.fdopen(fd, "wb")
        self.committed: Path | None = None

    def write(self, data: bytes) -> int:
        return self.file.write(data)

    def commit(self, path: str | os.PathLike[str] | None = None, replace: bool = True) -> Path:
        """Makes the written content the file ``path`` (default: the one given at creation).

        With ``replace=False`` an existing target is refused with :class:`FileExistsError`
        (``os.link`` refuses atomically, so two racing writers never both win). Returns the path.
        """
        if self.committed is not None:
            raise ValueError(f"{self.path}: already committed as {self.committed}")
        target = Path(path) if path is not None else self.path
        if target.parent != self.tmp.parent:
            raise ValueError(f"{target}: not in {self.tmp.parent}, where the temporary file is")
        self.file.flush()
        if self.fsync:
            os.fsync(self.file.fileno())
        self.file.close()
        if self.mode is not None:
            os.chmod(self.tmp, self.mode)
        if replace:
            os.replace(self.tmp, target)
        else:
            try:
                os.link(self.tmp, target)
            finally:
                os.unlink(self.tmp)
        if self.fsync:
            fsync_directory(target.parent)
        self.committed = target
        return target

    def discard(self) -> None:
        """Drops the temporary file (nothing happens to the target)."""
        if not self.file.closed:
            self.file.close()
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.discard()
        elif self.committed is None:
            try:
                self.commit()
            except BaseException:
                self.discard()
                raise


def write_atomic(
    path: str | os.PathLike[str],
    data: bytes | str,
    mode: int | None = 0o600,
    fsync: bool = True,
    replace: bool = True,
) -> Path:
    """Writes ``data`` (text as UTF-8) to ``path`` atomically; see :class:`AtomicFile`."""
    raw = data.encode() if isinstance(data, str) else data
    with AtomicFile(path, mode=mode, fsync=fsync) as f:
        f.write(raw)
        return f.commit(replace=replace)


__all__ = ["AtomicFile", "TMP_SUFFIX", "fsync_directory", "write_atomic"]
