"""A real process that appends to a DurableStore until it is killed; used by tests/test_store.py.

Usage: store_writer.py DIR SEED [--crash-in-compaction K] [--max-records N]

It opens the store in DIR (recovering whatever a previous, killed writer left), then appends
records whose content is a pure function of their index (:func:`record`), sometimes one at a time,
sometimes with append_many, and compacts often. Output lines, each flushed:

    start N         the store held N records when this writer opened it
    ack N           an append returned: records 0..N-1 are acknowledged
    compact         a compaction is about to start
    compacted       it finished
    survived        (--crash-in-compaction only) the compaction finished before the K-th call
    done            --max-records reached; the writer exits 0

A snapshot is JSON {"count": c, "digest": sha256 of records 0..c-1}; the journal then holds
records c, c+1, ... in order.

--crash-in-compaction K makes the writer SIGKILL itself just before the K-th file-system call
(open, write, fsync, fdatasync, replace, unlink, ftruncate) made during its first compaction, so a
test can crash it at every step of a compaction in turn.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vmwebd.dom.store import DurableStore  # noqa: E402

MAX_BATCH = 6


def record(index: int) -> bytes:
    """The content of record number ``index``: deterministic, of varied size (some cross pages)."""
    rng = random.Random(index)
    size = rng.choice([0, 1, 17, 100, 300, 1000, 5000]) if index % 7 else rng.randint(0, 9000)
    return b"record %d:" % index + rng.randbytes(size)


def hasher(count: int):
    """A sha256 fed records 0..count-1, each prefixed with its length."""
    h = hashlib.sha256()
    for i in range(count):
        feed(h, i)
    return h


def feed(h, index: int) -> None:
    r = record(index)
    h.update(len(r).to_bytes(4, "big") + r)


def digest(count: int) -> str:
    """sha256 over records 0..count-1, each prefixed with its length."""
    return hasher(count).hexdigest()


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class _CrashAt:
    """Wrap the os functions the store uses so the process dies before the K-th call."""

    NAMES = ("open", "write", "fsync", "fdatasync", "replace", "unlink", "ftruncate")

    def __init__(self, k: int):
        self.k, self.calls, self.armed = k, 0, False
        for name in self.NAMES:
            setattr(os, name, self._wrap(getattr(os, name)))

    def _wrap(self, fn):
        def wrapper(*args, **kwargs):
            if self.armed:
                self.calls += 1
                if self.calls == self.k:
                    os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return wrapper


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("seed", type=int)
    parser.add_argument("--crash-in-compaction", type=int, default=0)
    parser.add_argument("--max-records", type=int, default=20000)
    args = parser.parse_args()

    crash = _CrashAt(args.crash_in_compaction) if args.crash_in_compaction else None
    store = DurableStore(args.directory)
    snapshot, records = store.load()
    count = json.loads(snapshot)["count"] if snapshot is not None else 0
    total = count + len(records)
    h = hasher(total)  # running digest of records 0..total-1, for the snapshots
    say(f"start {total}")
    rng = random.Random(args.seed)
    while total < args.max_records:
        roll = rng.random()
        if roll < 0.15:
            say("compact")
            if crash:
                crash.armed = True
            store.compact(json.dumps({"count": total, "digest": h.hexdigest()}).encode())
            if crash:
                say("survived")
                return 0
            say("compacted")
        elif roll < 0.55:
            n = rng.randint(1, MAX_BATCH)
            store.append_many([record(i) for i in range(total, total + n)])
            for i in range(total, total + n):
                feed(h, i)
            total += n
            say(f"ack {total}")
        else:
            store.append(record(total))
            feed(h, total)
            total += 1
            say(f"ack {total}")
    store.close()
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
