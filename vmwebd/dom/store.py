"""A durable store of opaque byte records: one snapshot plus a journal of records appended after it.

The cluster DOM serializes its entity changes into records and appends them here; now and then it
writes a snapshot of the whole document, which empties the journal. What :meth:`DurableStore.append`
or :meth:`DurableStore.append_many` acknowledged (returned from) survives ``kill -9`` and, with
``fsync=True``, a power loss.

Files in the store's directory, for generation ``G`` (a number that grows by one per compaction)::

    snapshot.G   magic "VMWSNAP1", G (u64), payload length (u64), crc32 (u32), payload
                 -- absent for generation 0, the empty store
    journal.G    magic "VMWJRNL1", G (u64), then frames
    *.tmp        a file being written; never read, removed on open

A frame is ``length (u32, big-endian) | crc32 (u32) | payload``. The top bit of ``length`` is the
*batch-continues* flag: every record of an :meth:`~DurableStore.append_many` batch but the last has
it set, so a batch is loaded entirely or not at all. The crc32 covers the length word and the
payload (so an all-zero header is never a valid empty record).

Recovery rules (applied by :meth:`DurableStore.open`):

- the newest ``snapshot.G`` is the state; its ``journal.G`` holds what came after it. A missing
  ``journal.G`` means compaction crashed after the snapshot was renamed into place but before the
  new journal was; the snapshot holds everything, so an empty journal is created.
- older generations and ``*.tmp`` files are leftovers of an interrupted compaction; they are deleted.
- a bad frame (torn header, length past the end of the file, crc mismatch, length over the limit)
  with no valid frame anywhere after it is a torn tail: the crash happened while it was written, it
  was never acknowledged, and it is truncated away together with the unfinished batch it belongs to.
- a bad frame followed by a valid one is corruption of acknowledged data: :class:`StoreError`, naming
  the file and byte offset. We do not guess what to drop.

  (A power loss can in principle persist the pages of the one un-synced write out of order, leaving
  a hole followed by valid frames of that same unacknowledged batch; that is reported as corruption
  too, for an operator to look at, rather than silently accepted.)

Threading: this is blocking file I/O with no locks. A ``DurableStore`` is *thread-confined*: the
caller (the Twisted layer) uses one instance from one thread at a time -- typically a dedicated
single-thread pool -- and never from the reactor thread.
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
import zlib
from pathlib import Path

from vmwebd.atomicfile import fsync_directory, write_atomic
from vmwebd.errors import StoreError

__all__ = ["DurableStore", "StoreStats", "DEFAULT_MAX_RECORD"]

#: Default upper bound on one record (and one snapshot is bounded by the file system only).
DEFAULT_MAX_RECORD = 64 * 1024 * 1024

_SNAP_MAGIC = b"VMWSNAP1"
_JRNL_MAGIC = b"VMWJRNL1"
_SNAP_HEADER = struct.Struct(">8sQQI")  # magic, generation, payload length, crc32
_JRNL_HEADER = struct.Struct(">8sQ")  # magic, generation
_FRAME = struct.Struct(">II")  # length | flags, crc32
_CONTINUES = 0x8000_0000  # batch-continues flag in the length word
_LENGTH_MASK = 0x7FFF_FFFF
_NAME = re.compile(r"^(snapshot|journal)\.(\d{20})$")
_NONZERO = re.compile(rb"[^\x00]")


@dataclasses.dataclass(frozen=True)
class StoreStats:
    """What the caller needs to decide when to compact."""

    generation: int
    journal_bytes: int  #: size of the current journal file, header included
    records_since_snapshot: int


def _name(kind: str, generation: int) -> str:
    return f"{kind}.{generation:020d}"


def _crc(length_word: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(length_word.to_bytes(4, "big")))


def encode_frames(records: list[bytes]) -> bytes:
    """Frame ``records`` as one batch (all but the last carry the batch-continues flag)."""
    out = bytearray()
    last = len(records) - 1
    for i, record in enumerate(records):
        word = len(record) | (_CONTINUES if i < last else 0)
        out += _FRAME.pack(word, _crc(word, record))
        out += record
    return bytes(out)


def _frame_at(data: bytes | memoryview, pos: int, max_record: int) -> tuple[int, bool] | None:
    """Return (end offset, continues) of a valid frame at ``pos``, or None if there is none."""
    end = len(data)
    if pos + _FRAME.size > end:
        return None
    word, crc = _FRAME.unpack_from(data, pos)
    length = word & _LENGTH_MASK
    stop = pos + _FRAME.size + length
    if length > max_record or stop > end:
        return None
    if _crc(word, bytes(data[pos + _FRAME.size : stop])) != crc:
        return None
    return stop, bool(word & _CONTINUES)


def _valid_frame_after(data: bytes, pos: int, max_record: int) -> int | None:
    """Offset of the first valid frame starting after ``pos``, or None.

    Runs of zero bytes (what a file system leaves in a torn, pre-allocated tail) cannot start a
    valid frame -- the crc of a zero length word is not zero -- so they are skipped in one step.
    """
    view = memoryview(data)
    candidate = pos + 1
    last = len(data) - _FRAME.size
    while candidate <= last:
        if data[candidate] == 0 and data[candidate : candidate + _FRAME.size] == bytes(_FRAME.size):
            nonzero = _NONZERO.search(data, candidate)
            if nonzero is None:
                return None
            candidate = max(candidate + 1, nonzero.start() - _FRAME.size + 1)
            continue
        if _frame_at(view, candidate, max_record) is not None:
            return candidate
        candidate += 1
    return None


def scan_journal(
    data: bytes, start: int, max_record: int, filename: str = "journal"
) -> tuple[list[bytes], int]:
    """Parse frames of ``data`` from offset ``start``.

    Returns the records of every complete batch and the offset where the good part ends (everything
    from there on is a torn tail). Raises :class:`StoreError` naming ``filename`` and the offset
    when a bad frame is followed by valid data.
    """
    records: list[bytes] = []
    batch: list[bytes] = []
    good_end = pos = start
    view = memoryview(data)
    while pos < len(data):
        frame = _frame_at(view, pos, max_record)
        if frame is None:
            follower = _valid_frame_after(data, pos, max_record)
            if follower is not None:
                raise StoreError(
                    f"{filename}: corrupt record at byte offset {pos} "
                    f"(valid data follows at byte offset {follower})"
                )
            break
        stop, continues = frame
        batch.append(bytes(view[pos + _FRAME.size : stop]))
        pos = stop
        if not continues:
            records.extend(batch)
            batch.clear()
            good_end = pos
    return records, good_end


class DurableStore:
    """A snapshot plus an append-only journal of opaque records, in one directory.

    Blocking and thread-confined: see the module docstring. Use as::

        store = DurableStore(path)
        snapshot, records = store.load()   # opens (and recovers) the store if needed
        store.append(b"...")               # durable when it returns
        store.compact(new_snapshot)        # snapshot must cover every record so far
        store.close()

    ``fsync=False`` skips every fsync: acknowledged records then survive a killed process (they are
    in the page cache) but not a power loss. Meant for tests and throw-away demos.
    """

    def __init__(self, directory: str | Path, fsync: bool = True, max_record: int = DEFAULT_MAX_RECORD):
        if not 0 <= max_record <= _LENGTH_MASK:
            raise ValueError(f"max_record must be between 0 and {_LENGTH_MASK}")
        self.directory = Path(directory)
        self.fsync = fsync
        self.max_record = max_record
        self._fd: int | None = None
        self._generation = 0
        self._journal_bytes = 0
        self._records = 0
        self._recovered: tuple[bytes | None, list[bytes]] | None = None
        self._broken: str | None = None

    # -- opening and recovery ------------------------------------------------------------------
    def open(self) -> None:
        """Open the store, creating the directory if needed, and recover from any crash.

        Recovery deletes leftovers of an interrupted compaction, creates a missing journal and
        truncates a torn journal tail (see the module docstring). Raises :class:`StoreError` on
        corruption. Opening an open store does nothing.
        """
        if self._fd is not None:
            return
        try:
            self._open()
        except OSError as e:
            raise StoreError(f"cannot open store {self.directory}: {e}") from e

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        snapshots: set[int] = set()
        journals: set[int] = set()
        for entry in os.listdir(self.directory):
            if entry.endswith(".tmp"):
                os.unlink(self.directory / entry)
                continue
            match = _NAME.match(entry)
            if match:
                (snapshots if match[1] == "snapshot" else journals).add(int(match[2]))
        generation = max(snapshots, default=0)
        newer = sorted(g for g in journals if g > generation)
        if newer:
            # A journal is created only after its snapshot is durably in place.
            raise StoreError(
                f"store {self.directory}: {_name('journal', newer[0])} has no snapshot "
                f"(newest snapshot generation is {generation})"
            )
        snapshot = self._read_snapshot(generation) if generation in snapshots else None
        journal = self.directory / _name("journal", generation)
        if generation not in journals:
            self._create_journal(generation)
        # Older generations are fully contained in the newest snapshot.
        stale = [_name("snapshot", g) for g in snapshots if g < generation]
        stale += [_name("journal", g) for g in journals if g < generation]
        for name in stale:
            os.unlink(self.directory / name)
        if stale:
            self._sync_directory()

        data = journal.read_bytes()
        self._check_journal_header(journal, data, generation)
        records, good_end = scan_journal(data, _JRNL_HEADER.size, self.max_record, str(journal))
        fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            if good_end < len(data):
                # Torn tail: never acknowledged. Cut it before appending anything after it.
                os.ftruncate(fd, good_end)
                if self.fsync:
                    os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._generation = generation
        self._journal_bytes = good_end
        self._records = len(records)
        self._recovered = (snapshot, records)
        self._broken = None

    def _read_snapshot(self, generation: int) -> bytes:
        path = self.directory / _name("snapshot", generation)
        data = path.read_bytes()
        if len(data) < _SNAP_HEADER.size:
            raise StoreError(f"{path}: snapshot header is truncated ({len(data)} bytes)")
        magic, gen, length, crc = _SNAP_HEADER.unpack_from(data)
        payload = data[_SNAP_HEADER.size :]
        if magic != _SNAP_MAGIC or gen != generation:
            raise StoreError(f"{path}: not a snapshot of generation {generation}")
        if length != len(payload) or zlib.crc32(payload) != crc:
            raise StoreError(f"{path}: snapshot is corrupt (length or crc32 mismatch)")
        return payload

    @staticmethod
    def _check_journal_header(path: Path, data: bytes, generation: int) -> None:
        # Journals are created complete (temp file + rename), so a bad header is corruption.
        if len(data) < _JRNL_HEADER.size:
            raise StoreError(f"{path}: journal header is truncated ({len(data)} bytes)")
        magic, gen = _JRNL_HEADER.unpack_from(data)
        if magic != _JRNL_MAGIC or gen != generation:
            raise StoreError(f"{path}: not a journal of generation {generation}")

    def load(self) -> tuple[bytes | None, list[bytes]]:
        """Return the latest snapshot (None if never compacted) and the journal records after it.

        Opens the store first if needed. Records are in append order.
        """
        self.open()
        if self._recovered is not None:
            result, self._recovered = self._recovered, None
            return result
        snapshot = self._read_snapshot(self._generation) if self._generation else None
        journal = self.directory / _name("journal", self._generation)
        data = journal.read_bytes()[: self._journal_bytes]
        records, _ = scan_journal(data, _JRNL_HEADER.size, self.max_record, str(journal))
        return snapshot, records

    # -- writing -------------------------------------------------------------------------------
    def append(self, record: bytes) -> None:
        """Append one record; it is durable when this returns."""
        self.append_many([record])

    def append_many(self, records: list[bytes]) -> None:
        """Append a batch of records with one write and one fsync (group commit).

        The batch is durable when this returns, and atomic across a crash: a later load sees all
        of it or none of it.
        """
        records = [bytes(r) for r in records]
        if not records:
            return
        for record in records:
            if len(record) > self.max_record:
                raise StoreError(
                    f"store {self.directory}: record of {len(record)} bytes exceeds the limit "
                    f"of {self.max_record} bytes"
                )
        fd = self._writable()
        data = encode_frames(records)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if self.fsync:
                os.fdatasync(fd)
        except OSError as e:
            # After a failed write or fsync the journal's on-disk content is unknown (the kernel
            # may have dropped the dirty pages): refuse further appends until a reopen re-scans.
            self._broken = f"append to {self._journal_path()} failed: {e}"
            raise StoreError(self._broken) from e
        self._journal_bytes += len(data)
        self._records += len(records)

    def compact(self, snapshot: bytes) -> None:
        """Make ``snapshot`` the new state and start an empty journal.

        ``snapshot`` must include every record appended so far (the caller guarantees it). A crash
        at any point leaves either the old snapshot and journal or the new ones loadable.
        """
        fd = self._writable()
        old, new = self._generation, self._generation + 1
        try:
            # 1. The snapshot, durably in place under its final name: from here on it is the state.
            payload = bytes(snapshot)
            header = _SNAP_HEADER.pack(_SNAP_MAGIC, new, len(payload), zlib.crc32(payload))
            self._write_atomically(_name("snapshot", new), header + payload)
            # 2. Its (empty) journal. A crash between 1 and 2 is repaired by open().
            self._create_journal(new)
            new_fd = os.open(self.directory / _name("journal", new), os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError as e:
            self._broken = f"compaction of store {self.directory} failed: {e}"
            raise StoreError(self._broken) from e
        # 3. Switch.
        self._fd, self._generation = new_fd, new
        self._journal_bytes, self._records = _JRNL_HEADER.size, 0
        os.close(fd)
        # 4. The old generation is now redundant.
        try:
            for kind in ("snapshot", "journal"):
                try:
                    os.unlink(self.directory / _name(kind, old))
                except FileNotFoundError:
                    pass  # generation 0 has no snapshot
            self._sync_directory()
        except OSError as e:
            # The new state is complete; the next open() deletes what is left.
            raise StoreError(f"store {self.directory}: cannot delete generation {old}: {e}") from e

    def stats(self) -> StoreStats:
        """Journal size and record count since the last snapshot."""
        return StoreStats(self._generation, self._journal_bytes, self._records)

    def close(self) -> None:
        """Close the journal. Closing a closed store does nothing."""
        fd, self._fd = self._fd, None
        self._recovered = None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> "DurableStore":
        self.open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- helpers -------------------------------------------------------------------------------
    def _writable(self) -> int:
        if self._fd is None:
            raise StoreError(f"store {self.directory} is not open")
        if self._broken is not None:
            raise StoreError(f"store {self.directory} must be reopened: {self._broken}")
        self._recovered = None  # what open() read is stale once we write
        return self._fd

    def _journal_path(self) -> Path:
        return self.directory / _name("journal", self._generation)

    def _create_journal(self, generation: int) -> None:
        self._write_atomically(_name("journal", generation), _JRNL_HEADER.pack(_JRNL_MAGIC, generation))

    def _write_atomically(self, name: str, data: bytes) -> None:
        """Write ``data`` to ``name``: temp file, fsync, rename, fsync the directory."""
        write_atomic(self.directory / name, data, mode=0o600, fsync=self.fsync)

    def _sync_directory(self) -> None:
        if self.fsync:
            fsync_directory(self.directory)
