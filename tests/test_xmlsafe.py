"""The one safe XML reader (vmwebd.xmlsafe): what it refuses, and that its callers use it."""

from __future__ import annotations

import pytest
from lxml import etree

from vmwebd import xmlsafe
from vmwebd.xmlsafe import UnsafeXml

LAUGHS = (
    '<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">'
    + "".join(f'<!ENTITY lol{i} "{("&lol%d;" % (i - 1) if i > 1 else "&lol;") * 10}">' for i in range(1, 10))
    + ']>\n<lolz>&lol9;</lolz>'
).encode()


def refused(data: bytes, **kw) -> UnsafeXml:
    with pytest.raises(UnsafeXml) as info:
        xmlsafe.parse(data, "test-source", kw.pop("max_bytes", 1 << 20), **kw)
    assert str(info.value).startswith("test-source")
    return info.value


def test_plain_xml_parses():
    """Plain XML without a DOCTYPE parses to its root element."""
    root = xmlsafe.parse(b"<a x='1'><b>t</b></a>", "src", 100)
    assert root.tag == "a" and root.findtext("b") == "t"


def test_billion_laughs_refused():
    """A billion-laughs document is refused for its DOCTYPE, naming the line, before any expansion."""
    e = refused(LAUGHS)
    assert (e.field, e.line) == ("DOCTYPE", 2)
    assert "not allowed" in e.reason


def test_external_entity_refused(tmp_path):
    """An external entity (XXE) is refused and the file's content appears nowhere."""
    secret = tmp_path / "secret"
    secret.write_text("TOP-SECRET")
    e = refused(f'<!DOCTYPE a [<!ENTITY x SYSTEM "file://{secret}">]><a>&x;</a>'.encode())
    assert e.field == "DOCTYPE" and "TOP-SECRET" not in str(e)


def test_external_dtd_refused():
    """A DOCTYPE naming an external DTD is refused (no network is touched)."""
    assert refused(b'<!DOCTYPE a SYSTEM "http://192.0.2.1/x.dtd"><a/>').field == "DOCTYPE"


def test_doctype_in_utf16_refused_after_parse():
    """A DOCTYPE the byte scan cannot see (UTF-16) is refused from the parsed tree's docinfo."""
    data = '<!DOCTYPE a [<!ENTITY e "x">]>\n<a>&e;</a>'.encode("utf-16")
    assert refused(data).field == "DOCTYPE"


def test_oversize_refused_before_parsing():
    """Input over the limit is refused with field 'size', naming both sizes."""
    e = refused(b"<a>" + b"x" * 100 + b"</a>", max_bytes=50)
    assert e.field == "size" and "107" in e.reason and "50" in e.reason


def test_not_well_formed_names_line():
    """Broken XML is refused as not well-formed, on its line."""
    e = refused(b"<a>\n<b>\n</a>")
    assert e.field == "xml" and e.line is not None and "not well-formed" in e.reason


def test_strict_refuses_processing_instructions():
    """strict refuses processing instructions, before or inside the root; the default allows them."""
    assert xmlsafe.parse(b"<?pi x?><a/>", "s", 100).tag == "a"
    assert refused(b"<?pi x?><a/>", strict=True).field == "xml"
    assert refused(b"<a>\n<?pi x?></a>", strict=True).line == 2


def test_huge_tree_stays_off():
    """libxml2's depth limit is kept: a very deep document is refused, not parsed."""
    deep = b"<a>" * 300_000 + b"</a>" * 300_000
    assert refused(deep, max_bytes=len(deep)).field == "xml"


def test_parser_options_cannot_be_overridden():
    """Extra parser options may not turn a safe option off."""
    with pytest.raises(ValueError):
        xmlsafe.parser(resolve_entities=True)
    assert isinstance(xmlsafe.parser(remove_blank_text=True), etree.XMLParser)


def test_read_file_names_the_file(tmp_path):
    """read_file's errors name the file; a missing file is field 'file'."""
    p = tmp_path / "x.xml"
    p.write_bytes(LAUGHS)
    with pytest.raises(UnsafeXml, match=str(p)):
        xmlsafe.read_file(str(p), 1 << 20)
    with pytest.raises(UnsafeXml) as info:
        xmlsafe.read_file(str(tmp_path / "missing.xml"), 1 << 20)
    assert info.value.field == "file"


def test_callers_refuse_through_it():
    """The config loader, the DOM and the SOAP screen all refuse a billion-laughs document."""
    from vmwebd.api.soap import screen_soap_body
    from vmwebd.config import parse_xml as config_parse
    from vmwebd.dom.document import parse_xml as dom_parse
    from vmwebd.errors import ConfigError, MalformedRequest

    with pytest.raises(ConfigError, match="DOCTYPE"):
        config_parse(LAUGHS, "cfg.xml")
    with pytest.raises(MalformedRequest, match="peer entity"):
        dom_parse(LAUGHS, "peer entity", 1 << 20)
    with pytest.raises(MalformedRequest, match="request body"):
        screen_soap_body(LAUGHS)
