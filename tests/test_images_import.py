"""Importing a base image into the content store: whole under its content name, or nothing."""

from __future__ import annotations

import hashlib

import pytest

from vmwebd.errors import InvalidArgument
from vmwebd.hv.images import import_file


def test_import_raw_names_by_content(tmp_path):
    """A raw image is copied under a name carrying its hash; sizes and hash are returned."""
    src = tmp_path / "disk.img"
    src.write_bytes(b"\x01" * 70_000)
    store = tmp_path / "store"
    name, size, virtual, sha = import_file(src, store, "base", "raw")
    assert sha == hashlib.sha256(src.read_bytes()).hexdigest() and sha[:12] in name
    assert (size, virtual) == (70_000, 70_000)
    assert (store / name).read_bytes() == src.read_bytes()
    assert sorted(p.name for p in store.iterdir()) == sorted([name, f".{name}.sha256"])


def test_import_refused_leaves_nothing(tmp_path):
    """A file that is not the qcow2 it claims is refused, and no partial copy stays behind."""
    src = tmp_path / "not-qcow2"
    src.write_bytes(b"plain bytes")
    store = tmp_path / "store"
    with pytest.raises(InvalidArgument, match="not a qcow2 image"):
        import_file(src, store, "base", "qcow2")
    assert list(store.iterdir()) == []
