"""The one atomic write (vmwebd.atomicfile): old content or new, never a part."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest

from vmwebd import atomicfile
from vmwebd.atomicfile import AtomicFile, write_atomic

OLD = b"old\n" * 1000
NEW = b"new!" * 250_000


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(atomicfile.TMP_SUFFIX))


def test_write_replaces_whole_file(tmp_path):
    """write_atomic replaces the content, sets the exact mode and leaves no temporary file."""
    p = tmp_path / "f"
    p.write_bytes(OLD)
    write_atomic(p, NEW, mode=0o640)
    assert p.read_bytes() == NEW
    assert stat.S_IMODE(p.stat().st_mode) == 0o640
    assert leftovers(tmp_path) == []


def test_text_is_utf8(tmp_path):
    """Text is written as UTF-8."""
    write_atomic(tmp_path / "t", "héllo")
    assert (tmp_path / "t").read_bytes() == "héllo".encode()


def test_no_replace_refuses_existing(tmp_path):
    """replace=False refuses an existing target and keeps it as it was."""
    p = tmp_path / "key"
    p.write_bytes(OLD)
    with pytest.raises(FileExistsError):
        write_atomic(p, NEW, replace=False)
    assert p.read_bytes() == OLD and leftovers(tmp_path) == []


def test_failed_fsync_keeps_old_content(tmp_path, monkeypatch):
    """A write whose fsync fails (a fault injected) leaves the old content and no temporary file."""
    p = tmp_path / "f"
    p.write_bytes(OLD)

    def broken_fsync(fd):
        raise OSError(5, "injected I/O error")

    monkeypatch.setattr(atomicfile.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="injected"):
        write_atomic(p, NEW)
    assert p.read_bytes() == OLD and leftovers(tmp_path) == []


def test_exception_inside_block_discards(tmp_path):
    """An exception while streaming into an AtomicFile drops it: the target is untouched."""
    p = tmp_path / "f"
    p.write_bytes(OLD)
    with pytest.raises(RuntimeError):
        with AtomicFile(p) as f:
            f.write(NEW[:1000])
            raise RuntimeError("stop")
    assert p.read_bytes() == OLD and leftovers(tmp_path) == []


def test_commit_under_another_name(tmp_path):
    """commit may name the final file (same directory) once the content is known."""
    with AtomicFile(tmp_path / "incoming") as f:
        f.write(NEW)
        final = f.commit(tmp_path / "named-by-hash")
    assert final.read_bytes() == NEW and not (tmp_path / "incoming").exists()
    with pytest.raises(ValueError):
        with AtomicFile(tmp_path / "x") as f:
            f.commit(tmp_path / "sub" / "y")


CHILD = textwrap.dedent("""
    import sys
    from vmwebd.atomicfile import AtomicFile
    with AtomicFile(sys.argv[1]) as f:
        f.write(b"new!" * 125_000)
        f.file.flush()
        print("half", flush=True)
        sys.stdin.read()          # killed here, half written
        f.write(b"new!" * 125_000)
""")


@pytest.mark.process
def test_killed_mid_write_leaves_old_content(tmp_path):
    """A process killed with SIGKILL half-way through a write leaves the old content whole."""
    p = tmp_path / "f"
    p.write_bytes(OLD)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(p)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    try:
        assert child.stdout.readline() == b"half\n"
        half = leftovers(tmp_path)
        assert len(half) == 1 and (tmp_path / half[0]).stat().st_size == len(NEW) // 2
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert p.read_bytes() == OLD


def test_store_and_pki_write_through_it(tmp_path, monkeypatch):
    """The DOM store's snapshots and the PKI's files go through write_atomic."""
    from vmwebd.dom import store as store_mod
    from vmwebd.gossip import pki

    seen = []
    real = atomicfile.write_atomic

    def spy(path, data, **kw):
        seen.append(os.path.basename(path))
        return real(path, data, **kw)

    monkeypatch.setattr(store_mod, "write_atomic", spy)
    monkeypatch.setattr(pki, "write_atomic", spy)
    store_mod.DurableStore(tmp_path / "store", fsync=False).open()
    pki._write_file(tmp_path / "host.crt", b"pem", 0o644, replace=False)
    assert any(n.startswith("journal") for n in seen) and "host.crt" in seen
