"""The one safe XML reader: every XML that comes from outside the process is parsed here.

"Outside" means a config file, a scenario template, a SOAP request, a peer's DOM entity or a
DOM snapshot read back from disk. The reader

* refuses input larger than a limit the caller gives, before parsing;
* refuses any DOCTYPE, hence any entity declaration (billion laughs, external entities — XXE):
  first by a byte scan, which names the line, then on the parsed tree's docinfo, which catches
  encodings the byte scan cannot read (UTF-16);
* never expands an entity, never loads a DTD, never touches the network, and keeps libxml2's
  own depth and text-size limits (``huge_tree`` off);
* raises :class:`UnsafeXml` naming the source (a file, "request body", "peer entity"…), the
  line when known, and the reason. Callers turn it into their own error type
  (:class:`vmwebd.errors.ConfigError`, :class:`vmwebd.errors.MalformedRequest`).

The parser options are also exported (:data:`PARSER_OPTIONS`, :func:`parser`) for the one
place that must hand a parser to a library instead (spyne's SOAP input protocol).
"""

from __future__ import annotations

from typing import Any, Final

from lxml import etree

#: The options every parser of outside XML is built with.
PARSER_OPTIONS: Final[dict[str, bool]] = {
    "resolve_entities": False,
    "no_network": True,
    "load_dtd": False,
    "dtd_validation": False,
    "huge_tree": False,
}

#: Markup refused by the byte scan. XML keywords are case-sensitive, so in any ASCII-compatible
#: encoding these catch every DOCTYPE or entity declaration before a parser runs.
_FORBIDDEN: Final = ((b"<!DOCTYPE", "DOCTYPE"), (b"<!ENTITY", "DOCTYPE"))
_DOCTYPE_REASON: Final = "DOCTYPE and entity declarations are not allowed"


class UnsafeXml(ValueError):
    """XML refused by the safe reader.

    ``field`` says which check refused it: ``"size"`` (over the limit), ``"DOCTYPE"`` (a DOCTYPE
    or entity declaration), ``"xml"`` (not well-formed, or an entity reference or processing
    instruction where those are refused).
    """

    def __init__(self, source: str, line: int | None, field: str, reason: str) -> None:
        self.source = source
        self.line = line
        self.field = field
        self.reason = reason
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {reason}")


def parser(**extra: Any) -> etree.XMLParser:
    """A new lxml parser with :data:`PARSER_OPTIONS` (``extra`` may add options, such as
    ``remove_blank_text``, but never override the safe ones)."""
    clash = set(extra) & set(PARSER_OPTIONS)
    if clash:
        raise ValueError(f"the safe parser's options cannot be overridden: {sorted(clash)}")
    return etree.XMLParser(**PARSER_OPTIONS, **extra)  # type: ignore[arg-type]


def _line_of(data: bytes, needle: bytes) -> int | None:
    i = data.find(needle)
    return data.count(b"\n", 0, i) + 1 if i >= 0 else None


def parse(
    data: bytes,
    source: str,
    max_bytes: int,
    *,
    xml_parser: etree.XMLParser | None = None,
    strict: bool = False,
) -> etree._Element:
    """The root element of ``data``, parsed safely, or :class:`UnsafeXml` naming ``source``.

    ``xml_parser`` must come from :func:`parser` (to add options such as ``remove_comments``);
    by default a plain one is used. ``strict`` also refuses entity references and processing
    instructions anywhere in the document (config files and templates: neither has a use there).
    """
    if len(data) > max_bytes:
        raise UnsafeXml(source, None, "size", f"is {len(data)} bytes, larger than the {max_bytes}-byte limit")
    if b"<!" in data:  # one quick scan on the hot path (peers' entities have no declarations)
        for marker, field in _FORBIDDEN:
            line = _line_of(data, marker)
            if line is not None:
                raise UnsafeXml(source, line, field, _DOCTYPE_REASON)
    try:
        root = etree.fromstring(data, xml_parser if xml_parser is not None else parser())
    except etree.XMLSyntaxError as e:
        raise UnsafeXml(source, e.lineno or None, "xml", f"not well-formed XML: {e.msg}") from None
    except ValueError as e:  # lxml refusing some encodings
        raise UnsafeXml(source, None, "xml", f"not usable XML: {e}") from None
    if root is None:  # lxml's recover mode only; never with our parsers
        raise UnsafeXml(source, None, "xml", "no root element")
    docinfo: Any = root.getroottree().docinfo  # lxml-stubs lack doctype / internalDTD
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise UnsafeXml(source, 1, "DOCTYPE", _DOCTYPE_REASON)
    if strict:
        _refuse_entities_and_pis(root, source)
    return root


def _line(node: etree._Element) -> int | None:
    line: object = node.sourceline
    return line if isinstance(line, int) else None


def _refuse_entities_and_pis(root: etree._Element, source: str) -> None:
    for node in root.iter(etree.Entity, etree.ProcessingInstruction):
        kind = "entity references" if isinstance(node, etree._Entity) else "processing instructions"
        raise UnsafeXml(source, _line(node), "xml", f"{kind} are not allowed")
    prev = root.getprevious()
    while prev is not None:  # processing instructions before the root element
        if isinstance(prev, etree._ProcessingInstruction):
            raise UnsafeXml(source, _line(prev), "xml", "processing instructions are not allowed")
        prev = prev.getprevious()


def read_file(
    path: str, max_bytes: int, *, xml_parser: etree.XMLParser | None = None, strict: bool = False
) -> etree._Element:
    """Reads at most ``max_bytes + 1`` bytes of file ``path`` and parses them with :func:`parse`
    (the file's name is the source). An unreadable file is :class:`UnsafeXml` with field
    ``"file"``."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise UnsafeXml(path, None, "file", f"cannot read: {e.strerror or e}") from None
    return parse(data, path, max_bytes, xml_parser=xml_parser, strict=strict)


__all__ = ["PARSER_OPTIONS", "UnsafeXml", "parse", "parser", "read_file"]
