"""Tests of the durable record store: framing, recovery, compaction, and SIGKILL durability."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmwebd.dom import store as store_module
from vmwebd.dom.store import DurableStore, encode_frames
from vmwebd.errors import StoreError

HERE = Path(__file__).resolve().parent
WRITER = HERE / "helpers" / "store_writer.py"
JOURNAL_HEADER = 16  # magic (8) + generation (8)
FRAME_HEADER = 8  # length word (4) + crc32 (4)

_spec = importlib.util.spec_from_file_location("store_writer", WRITER)
writer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(writer)


def journal(directory: Path, generation: int = 0) -> Path:
    return directory / f"journal.{generation:020d}"


def reopen(directory: Path, **kwargs) -> tuple[bytes | None, list[bytes]]:
    with DurableStore(directory, **kwargs) as s:
        return s.load()


# -- basics ----------------------------------------------------------------------------------------
def test_round_trip(tmp_path):
    """Records appended one by one and in batches load back in order after a reopen."""
    with DurableStore(tmp_path / "s") as s:
        assert s.load() == (None, [])
        s.append(b"one")
        s.append_many([b"two", b"", b"four" * 1000])
        s.append(b"five")
    assert reopen(tmp_path / "s") == (None, [b"one", b"two", b"", b"four" * 1000, b"five"])


def test_load_while_open_sees_appends(tmp_path):
    """load() on an open store returns what was appended since it was opened."""
    with DurableStore(tmp_path) as s:
        s.append(b"a")
        assert s.load() == (None, [b"a"])
        s.append_many([b"b", b"c"])
        assert s.load() == (None, [b"a", b"b", b"c"])


def test_stats_count_records_and_bytes(tmp_path):
    """stats() reports the journal file size and the records since the snapshot."""
    with DurableStore(tmp_path) as s:
        assert (s.stats().journal_bytes, s.stats().records_since_snapshot) == (JOURNAL_HEADER, 0)
        s.append_many([b"x" * 10, b"y" * 20])
        stats = s.stats()
        assert stats.records_since_snapshot == 2
        assert stats.journal_bytes == journal(tmp_path).stat().st_size == 16 + 2 * 8 + 30


def test_append_on_closed_store_fails(tmp_path):
    """Appending to a store that is not open raises StoreError."""
    s = DurableStore(tmp_path)
    with pytest.raises(StoreError, match="not open"):
        s.append(b"x")


def test_oversized_record_is_refused(tmp_path):
    """A record over the size limit raises StoreError naming its size, and nothing is written."""
    with DurableStore(tmp_path, max_record=100) as s:
        s.append(b"x" * 100)
        with pytest.raises(StoreError, match="101 bytes exceeds the limit of 100"):
            s.append_many([b"ok", b"x" * 101])
    assert reopen(tmp_path, max_record=100) == (None, [b"x" * 100])


def test_group_commit_syncs_once_per_batch(tmp_path, monkeypatch):
    """append_many makes one data sync for the whole batch, append one per record."""
    syncs = []
    real = os.fdatasync
    monkeypatch.setattr(store_module.os, "fdatasync", lambda fd: (syncs.append(fd), real(fd)))
    with DurableStore(tmp_path) as s:
        s.append_many([b"r%d" % i for i in range(50)])
        assert len(syncs) == 1
        s.append(b"a")
        s.append(b"b")
        assert len(syncs) == 3
    assert len(reopen(tmp_path)[1]) == 52


def test_no_fsync_mode_never_syncs(tmp_path, monkeypatch):
    """With fsync=False the store never calls fsync or fdatasync, and still round-trips."""

    def forbidden(fd):
        raise AssertionError("synced although fsync=False")

    monkeypatch.setattr(store_module.os, "fsync", forbidden)
    monkeypatch.setattr(store_module.os, "fdatasync", forbidden)
    with DurableStore(tmp_path, fsync=False) as s:
        s.append(b"a")
        s.compact(b"snap")
        s.append_many([b"b", b"c"])
    assert reopen(tmp_path, fsync=False) == (b"snap", [b"b", b"c"])


def test_failed_sync_requires_reopen(tmp_path, monkeypatch):
    """After a failed fsync the store refuses appends until it is reopened."""
    s = DurableStore(tmp_path)
    s.open()
    s.append(b"a")

    def failing(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store_module.os, "fdatasync", failing)
    with pytest.raises(StoreError, match="Input/output error"):
        s.append(b"b")
    monkeypatch.undo()
    with pytest.raises(StoreError, match="must be reopened"):
        s.append(b"c")
    s.close()
    with DurableStore(tmp_path) as s2:
        _, records = s2.load()
        assert records[0] == b"a"
        s2.append(b"d")
    assert reopen(tmp_path)[1][-1] == b"d"


# -- compaction ------------------------------------------------------------------------------------
def test_compaction_replaces_journal_with_snapshot(tmp_path):
    """After compact() the store loads the snapshot and only the records appended after it."""
    with DurableStore(tmp_path) as s:
        s.append_many([b"a", b"b"])
        s.compact(b"snapshot-ab")
        assert s.stats().records_since_snapshot == 0
        assert s.stats().generation == 1
        s.append(b"c")
        assert s.load() == (b"snapshot-ab", [b"c"])
        s.compact(b"snapshot-abc")
        s.append(b"d")
    assert reopen(tmp_path) == (b"snapshot-abc", [b"d"])
    assert sorted(os.listdir(tmp_path)) == [f"journal.{2:020d}", f"snapshot.{2:020d}"]


def test_empty_snapshot_is_not_none(tmp_path):
    """An empty snapshot loads as b'' rather than None."""
    with DurableStore(tmp_path) as s:
        s.compact(b"")
    assert reopen(tmp_path) == (b"", [])


def test_crash_after_snapshot_rename_is_recovered(tmp_path):
    """A snapshot whose journal was never created loads with an empty journal, the old one gone."""
    with DurableStore(tmp_path) as s:
        s.append(b"a")
        s.compact(b"s1")
        s.append(b"b")
        old = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
        s.compact(b"s2")
    # Rewind to a crash inside that compaction: snapshot.2 renamed into place, journal.2 not yet
    # created, generation 1 not yet deleted, a temp file half written.
    os.unlink(journal(tmp_path, 2))
    for name, content in old.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / f"journal.{2:020d}.tmp").write_bytes(b"VMWJ")
    assert reopen(tmp_path) == (b"s2", [])
    assert sorted(os.listdir(tmp_path)) == [f"journal.{2:020d}", f"snapshot.{2:020d}"]


def test_journal_without_snapshot_is_an_error(tmp_path):
    """A journal newer than every snapshot cannot come from a crash and raises StoreError."""
    with DurableStore(tmp_path) as s:
        s.append(b"a")
    os.rename(journal(tmp_path), journal(tmp_path, 3))
    with pytest.raises(StoreError, match=r"journal\.0+3 has no snapshot"):
        reopen(tmp_path)


def test_corrupt_snapshot_is_an_error(tmp_path):
    """A snapshot whose crc does not match raises StoreError naming the file."""
    with DurableStore(tmp_path) as s:
        s.compact(b"important state")
    path = tmp_path / f"snapshot.{1:020d}"
    path.write_bytes(path.read_bytes().replace(b"important", b"imp0rtant"))
    with pytest.raises(StoreError, match=r"snapshot\.0+1: snapshot is corrupt"):
        reopen(tmp_path)


# -- torn tails and corruption ---------------------------------------------------------------------
def test_torn_tail_is_truncated(tmp_path):
    """A half-written last record is dropped silently, cut from the file, and appends continue."""
    with DurableStore(tmp_path) as s:
        s.append(b"first")
        s.append(b"second")
    path = journal(tmp_path)
    full = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(full - 3)
    assert reopen(tmp_path) == (None, [b"first"])
    assert path.stat().st_size == JOURNAL_HEADER + FRAME_HEADER + len(b"first")
    with DurableStore(tmp_path) as s:
        s.append(b"third")
    assert reopen(tmp_path) == (None, [b"first", b"third"])


def test_torn_batch_is_dropped_entirely(tmp_path):
    """A batch cut anywhere after its first record loads as none of the batch."""
    with DurableStore(tmp_path) as s:
        s.append(b"before")
        s.append_many([b"b1", b"b2", b"b3"])
    path = journal(tmp_path)
    # Cut right after b2's frame: b1 and b2 are intact but the batch never finished.
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - FRAME_HEADER - 2)
    assert reopen(tmp_path) == (None, [b"before"])


def test_zero_filled_tail_is_truncated(tmp_path):
    """Zeros after the last record (a torn, pre-allocated tail) are dropped, not called corrupt."""
    with DurableStore(tmp_path) as s:
        s.append(b"kept")
    with open(journal(tmp_path), "ab") as f:
        f.write(bytes(10000))
    assert reopen(tmp_path) == (None, [b"kept"])


def test_mid_file_corruption_names_file_and_offset(tmp_path):
    """A bad crc followed by valid records raises StoreError with the file and byte offset."""
    with DurableStore(tmp_path) as s:
        s.append(b"aaaa")
        s.append(b"bbbb")
        s.append(b"cccc")
    path = journal(tmp_path)
    raw = bytearray(path.read_bytes())
    second = JOURNAL_HEADER + FRAME_HEADER + 4
    raw[second + FRAME_HEADER + 1] ^= 0x40  # flip a bit in b"bbbb"
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError) as info:
        reopen(tmp_path)
    assert str(path) in str(info.value)
    assert f"byte offset {second}" in str(info.value)
    assert path.stat().st_size == len(raw)  # nothing was truncated away


def test_corrupt_length_word_is_detected(tmp_path):
    """A length word over the limit, followed by valid records, is corruption, not a torn tail."""
    with DurableStore(tmp_path, max_record=1000) as s:
        s.append_many([b"x" * 10, b"y" * 10])
    path = journal(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[JOURNAL_HEADER : JOURNAL_HEADER + 4] = (5000).to_bytes(4, "big")
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=f"corrupt record at byte offset {JOURNAL_HEADER}"):
        reopen(tmp_path, max_record=1000)


# -- properties of the framing ---------------------------------------------------------------------
records_st = st.lists(st.binary(max_size=300), min_size=1, max_size=5)
batches_st = st.lists(records_st, max_size=8)


def _write_batches(directory: Path, batches: list[list[bytes]]) -> list[int]:
    """Write ``batches`` to a fresh store; return the journal offset where each batch ends."""
    ends, offset = [], JOURNAL_HEADER
    with DurableStore(directory, fsync=False) as s:
        for batch in batches:
            s.append_many(batch)
            offset += len(encode_frames(batch))
            ends.append(offset)
    return ends


@given(batches_st)
@settings(max_examples=150, deadline=None)
def test_any_records_round_trip(batches):
    """Any list of records, appended in any batches, loads back identical and in order."""
    with tempfile.TemporaryDirectory() as d:
        _write_batches(Path(d), batches)
        assert reopen(Path(d), fsync=False) == (None, [r for b in batches for r in b])


@pytest.mark.property
@given(batches_st, st.data())
@settings(max_examples=200, deadline=None)
def test_any_truncation_loads_a_prefix(batches, data):
    """Cutting the journal at any byte loads exactly the batches that end before the cut."""
    with tempfile.TemporaryDirectory() as d:
        ends = _write_batches(Path(d), batches)
        path = journal(Path(d))
        cut = data.draw(st.integers(JOURNAL_HEADER, path.stat().st_size), label="cut")
        with open(path, "r+b") as f:
            f.truncate(cut)
        complete = sum(1 for end in ends if end <= cut)
        expected = [r for b in batches[:complete] for r in b]
        assert reopen(Path(d), fsync=False) == (None, expected)


@pytest.mark.property
@given(batches_st.filter(lambda b: len(b) > 0), st.data())
@settings(max_examples=200, deadline=None)
def test_corruption_is_never_silent(batches, data):
    """Changing any byte of the journal either raises StoreError or loads a prefix of batches."""
    with tempfile.TemporaryDirectory() as d:
        _write_batches(Path(d), batches)
        path = journal(Path(d))
        raw = bytearray(path.read_bytes())
        pos = data.draw(st.integers(JOURNAL_HEADER, len(raw) - 1), label="pos")
        raw[pos] ^= data.draw(st.integers(1, 255), label="xor")
        path.write_bytes(bytes(raw))
        try:
            _, records = reopen(Path(d), fsync=False)
        except StoreError as e:
            assert "byte offset" in str(e)
            return
        prefixes = [[r for b in batches[:k] for r in b] for k in range(len(batches))]
        assert records in prefixes  # a strict prefix: the damaged batch is gone


# -- a real process, killed ------------------------------------------------------------------------
class Writer:
    """tests/helpers/store_writer.py as a child process whose output lines we read one by one."""

    def __init__(self, directory: Path, seed: int, *extra: str):
        self.proc = subprocess.Popen(
            [sys.executable, str(WRITER), str(directory), str(seed), *extra],
            stdout=subprocess.PIPE,
        )
        self.buffer = b""
        self.acked = 0
        self.start = None

    def line(self) -> str | None:
        """The next output line, or None at end of output. Bounded: fails after 60 s of silence."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([fd], [], [], 60)
            assert ready, "store_writer printed nothing for 60 s"
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        text = line.decode()
        if text.startswith("ack "):
            self.acked = int(text.split()[1])
        elif text.startswith("start "):
            self.start = int(text.split()[1])
        return text

    def kill(self) -> None:
        """SIGKILL the writer, then read what it printed before dying (acks still in the pipe)."""
        self.proc.send_signal(signal.SIGKILL)
        self.drain()

    def drain(self) -> int:
        while self.line() is not None:
            pass
        self.proc.stdout.close()
        return self.proc.wait()


def check_store(directory: Path, acked: int) -> int:
    """Assert the store in ``directory`` loads, holds records 0..n-1 exactly, n >= acked."""
    snapshot, records = reopen(directory)
    count = 0
    if snapshot is not None:
        state = json.loads(snapshot)
        count = state["count"]
        assert state["digest"] == writer.digest(count), "snapshot does not match its records"
    for offset, rec in enumerate(records):
        assert rec == writer.record(count + offset), f"record {count + offset} is wrong"
    total = count + len(records)
    assert total >= acked, f"{acked} records acknowledged but only {total} survived"
    # At most the one batch in flight at the kill was written without being acknowledged.
    assert total <= acked + writer.MAX_BATCH
    names = os.listdir(directory)
    assert not [n for n in names if n.endswith(".tmp")]
    assert len({n.split(".")[1] for n in names}) == 1, f"more than one generation: {names}"
    return total


def test_acknowledged_records_survive_sigkill(tmp_path):
    """A writer killed with SIGKILL at random acks or mid-compaction never loses an acked record."""
    rng = random.Random(20240611)
    directory = tmp_path / "store"
    acked = 0
    kills_in_compaction = 0
    for _ in range(24):
        w = Writer(directory, rng.randrange(2**32))
        assert w.line() == f"start {w.start}"
        assert w.start >= acked  # what the previous writer acknowledged is still there
        if rng.random() < 0.4:
            # Kill as soon as a compaction has started (it may be anywhere inside it).
            target = rng.randint(1, 3)
            while target:
                line = w.line()
                assert line is not None, "writer exited early"
                target -= line == "compact"
            kills_in_compaction += 1
        else:
            target = w.start + rng.randint(1, 60)
            while w.acked < target:
                assert w.line() is not None, "writer exited early"
        w.kill()
        assert w.proc.returncode == -signal.SIGKILL
        acked = max(acked, w.acked)
        acked = check_store(directory, acked)
    assert kills_in_compaction >= 5


@pytest.mark.property
def test_crash_at_every_step_of_compaction(tmp_path):
    """A writer dying before any file-system call of a compaction leaves a complete store."""
    steps = 0
    for k in range(1, 100):
        directory = tmp_path / f"k{k}"
        # A first writer compacts once (so there is an old snapshot to replace), then is killed.
        first = Writer(directory, 7)
        while (line := first.line()) != "compacted":
            assert line is not None, "writer exited early"
        first.kill()
        acked = check_store(directory, first.acked)
        # The second one dies just before its k-th file-system call inside its first compaction.
        second = Writer(directory, 11, "--crash-in-compaction", str(k))
        rc = second.drain()
        check_store(directory, max(acked, second.acked))
        if rc == 0:
            break  # the compaction made fewer than k calls: every step has been crashed at
        assert rc == -signal.SIGKILL
        steps += 1
    else:
        pytest.fail("the compaction never finished")
    assert steps >= 10  # temp file, fsync, rename, directory fsync (twice), unlink, ...
