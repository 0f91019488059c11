"""Simulated hosts for libvirt's test driver: one node file per host, one URI per file.

``test:///ABS/PATH/host.xml`` opens an independent in-memory hypervisor whose CPUs and memory come
from that file; it starts with no domains, pools or networks. (``test:///default`` is one
hypervisor shared by the whole process, so vmweb never uses it.)
"""

from __future__ import annotations

import os

from lxml import etree
from lxml.builder import E

from vmwebd.atomicfile import write_atomic


def node_xml(cpus: int, memory_mib: int) -> str:
    """The test driver's ``<node>`` document for a host of ``cpus`` CPUs and ``memory_mib``."""
    if cpus < 1 or memory_mib < 1:
        raise ValueError(f"a test host needs cpus >= 1 and memory_mib >= 1, got {cpus} and {memory_mib}")
    node = E.node(
        E.cpu(
            E.mode("32"),
            E.active(str(cpus)),
            E.nodes("1"),
            E.sockets("1"),
            E.cores(str(cpus)),
            E.threads("1"),
            E.mhz("2000"),
        ),
        E.memory(str(memory_mib * 1024)),  # KiB
    )
    return etree.tostring(node, pretty_print=True, encoding="unicode")


def write_test_host(path, cpus: int, memory_mib: int) -> str:
    """Write a node file for one simulated host at ``path``; return its ``test:///`` URI."""
    path = os.path.abspath(os.fspath(path))
    write_atomic(path, node_xml(cpus, memory_mib), mode=None)  # a half-written node file would fail to parse
    return f"test://{path}"
