"""Rewriting a domain's libvirt XML for another host (no libvirt calls: text in, text out)."""

from __future__ import annotations

from lxml import etree

from vmwebd import xmlsafe


def retarget_xml(xml: str, disk: str, console: str, seed: str = "") -> str:
    """The domain XML with the disk, seed and serial log paths the destination chose."""
    root = etree.fromstring(xml.encode(), xmlsafe.parser())
    if disk:
        for el in root.iterfind("devices/disk"):
            src = el.find("source")
            if el.get("device", "disk") == "disk" and src is not None and src.get("file") is not None:
                src.set("file", disk)
                break
    if seed:
        for el in root.iterfind("devices/disk[@device='cdrom']"):
            src = el.find("source")
            if src is not None and src.get("file") is not None:
                src.set("file", seed)
    for dev in ("serial", "console"):
        for el in root.iterfind(f"devices/{dev}"):
            src, log = el.find("source"), el.find("log")
            if el.get("type") == "file" and src is not None and console:
                src.set("path", console)  # a domain defined before serial ports were ptys
            if log is not None and log.get("file") is not None and console:
                log.set("file", console)
    return etree.tostring(root, encoding="unicode")
