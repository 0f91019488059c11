"""Fast validation of DOM entities against ``schema.rng``, without libxml2's RelaxNG engine.

libxml2 validates an element with many *optional* attributes in time that grows exponentially with
their number: 6 s for one migration entity (17 attributes), 44 ms for a host (14), measured. Every
peer delivery validates what it carries on the reactor thread, so that stalled whole hosts (their
peers then saw them as dead). The schema itself is simple: per entity kind, optional attributes of
a few types, a VM's ``status`` sub-part, a template's foreign-namespace body. This module reads
those facts *from schema.rng* (so the schema stays the one source of truth) and checks entities in
linear time. ``tests/test_dom_validate.py`` checks it agrees with RelaxNG on generated entities.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Callable, cast

from lxml import etree

from vmwebd import xmlsafe

RNG = "http://relaxng.org/ns/structure/1.0"
_R = "{%s}" % RNG


#: Says whether an attribute's text is valid.
Checker = Callable[[str], bool]


@dataclass
class ElementSpec:
    """What one element (an entity, or a sub-part) may carry."""

    attrs: dict[str, Checker] = field(default_factory=dict)  # name -> checker(str) -> bool
    required: set[str] = field(default_factory=set)
    children: dict[str, ElementSpec] = field(default_factory=dict)  # local name -> spec (same namespace)
    foreign_children: bool = False  # any element of another namespace (template body)


_INT = re.compile(r"^\s*[+-]?[0-9]+\s*$")
_DOUBLE = re.compile(r"^\s*([+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?INF|NaN)\s*$")


def _string_checker(data: etree._Element) -> Checker:
    params = {p.get("name"): (p.text or "") for p in data.iterfind(_R + "param")}
    lo = int(params.get("minLength", 0))
    hi = int(params.get("maxLength", 1 << 62))
    pattern = re.compile(r"(?:%s)\Z" % params["pattern"]) if "pattern" in params else None

    def check(v: str) -> bool:
        return lo <= len(v) <= hi and (pattern is None or pattern.match(v) is not None)

    return check


class _Reader:
    def __init__(self, grammar: etree._Element):
        self.defines = {d.get("name", ""): d for d in grammar.iterfind(_R + "define")}

    def value_checker(self, node: etree._Element) -> Checker:
        """Checker for the content of an <attribute>: a ref, a data or a choice of values."""
        kids = [k for k in node if isinstance(k.tag, str)]
        if not kids:
            return lambda v: True  # <attribute name=…/> with no pattern: any text
        k = kids[0]
        tag = etree.QName(k).localname
        if tag == "ref":
            return self.value_checker(self.defines[k.get("name", "")])
        if tag == "data":
            t = k.get("type")
            if t == "integer":
                return lambda v: _INT.match(v) is not None
            if t == "double":
                return lambda v: _DOUBLE.match(v) is not None
            if t == "string":
                return _string_checker(k)
            raise ValueError(f"schema.rng: data type {t!r} is not supported by the fast validator")
        if tag == "choice":
            values = {c.text or "" for c in k.iterfind(_R + "value")}
            return lambda v: v in values
        if tag == "value":
            want = k.text or ""
            return lambda v: v == want
        raise ValueError(f"schema.rng: attribute content <{tag}> is not supported")

    def element(self, el: etree._Element) -> ElementSpec:
        spec = ElementSpec()
        self._content(el, spec, required=True)
        return spec

    def _content(self, node: etree._Element, spec: ElementSpec, required: bool) -> None:
        for k in node:
            if not isinstance(k.tag, str):
                continue
            tag = etree.QName(k).localname
            if tag == "attribute":
                name = k.get("name", "")
                spec.attrs[name] = self.value_checker(k)
                if required:
                    spec.required.add(name)
            elif tag == "optional":
                self._content(k, spec, required=False)
            elif tag == "zeroOrMore" or tag == "oneOrMore":
                self._content(k, spec, required=False)
            elif tag == "ref":
                target = self.defines[k.get("name", "")]
                inner = [x for x in target if isinstance(x.tag, str)]
                if inner and etree.QName(inner[0]).localname == "element" and inner[0].get("name") is None:
                    spec.foreign_children = True  # anyForeign
                else:
                    self._content(target, spec, required)
            elif tag == "element":
                spec.children[k.get("name", "")] = self.element(k)
            elif tag in ("data", "choice", "value", "text", "empty"):
                continue
            else:
                raise ValueError(f"schema.rng: <{tag}> is not supported by the fast validator")


def load_specs(text: bytes | None = None) -> tuple[str, dict[str, ElementSpec]]:
    """(namespace, {entity kind: spec}) read from schema.rng."""
    if text is None:
        text = resources.files("vmwebd.dom").joinpath("schema.rng").read_bytes()
    grammar = etree.fromstring(text, xmlsafe.parser())
    ns = grammar.get("ns")
    start = grammar.find(_R + "start")
    if ns is None or start is None:
        raise ValueError("schema.rng: the grammar needs an ns attribute and a <start>")
    reader = _Reader(grammar)
    specs = {}
    for container in start.iter(_R + "element"):
        for ref in container.iter(_R + "ref"):
            name = ref.get("name", "")
            el = reader.defines[name].find(_R + "element")
            if el is not None and el.get("name") == name:
                specs[name] = reader.element(el)
    return ns, specs


_NS, _SPECS = load_specs()


#: Containers a valid document may lack (added to schema.rng after documents were first saved).
OPTIONAL_CONTAINERS = frozenset({"audits"})


def document_error(root: etree._Element, containers: dict[str, str]) -> str | None:
    """Why a whole DOM document is not valid, or None: the root, every container in order, and
    in each only entities of its kind, each valid."""
    if root.tag != f"{{{_NS}}}dom":
        return f"the root is {root.tag}, not dom"
    for attr, value in root.attrib.items():
        if attr != "schema" or value != "1":
            return f"element dom: attribute {attr!r} is not allowed here"
    kids = [k for k in root if isinstance(k.tag, str)]
    names = [etree.QName(k).localname for k in kids]
    # A container added to the schema later is optional: documents saved before it existed lack it.
    expected = [c for c in containers.values() if c not in OPTIONAL_CONTAINERS or c in names]
    if names != expected or any(etree.QName(k).namespace != _NS for k in kids):
        return f"element dom: its children are {names}, expected {list(containers.values())}"
    kinds = [k for k, c in containers.items() if c in names]
    for kind, box in zip(kinds, kids):
        for el in box:
            if not isinstance(el.tag, str):
                continue
            if etree.QName(el).localname != kind:
                return f"element {etree.QName(box).localname} has extra content: {etree.QName(el).localname}"
            err = entity_error(el)
            if err:
                return f"{kind} {el.get('id')!r}: {err}"
    return None


def entity_error(el: etree._Element) -> str | None:
    """Why ``el`` is not a valid entity of the DOM schema, or None if it is."""
    q = etree.QName(el)
    if q.namespace != _NS or q.localname not in _SPECS:
        return f"{el.tag} is not a DOM entity"
    return _element_error(el, _SPECS[q.localname])


def _element_error(el: etree._Element, spec: ElementSpec) -> str | None:
    name = etree.QName(el).localname
    # lxml gives str for str input (the stubs say str or bytes)
    for attr, value in cast("list[tuple[str, str]]", el.attrib.items()):
        if attr.startswith("{"):
            return f"element {name}: attribute {attr} is not allowed"
        check = spec.attrs.get(attr)
        if check is None:
            return f"element {name}: attribute {attr!r} is not allowed"
        if not check(value):
            return f"element {name}: attribute {attr!r} has an invalid value {value[:60]!r}"
    missing = spec.required - set(el.attrib)
    if missing:
        return f"element {name}: attribute {sorted(missing)[0]!r} is missing"
    if el.text is not None and el.text.strip():
        return f"element {name}: text is not allowed here"
    seen = set()
    for child in el:
        if not isinstance(child.tag, str):
            continue  # comments, processing instructions
        if child.tail is not None and child.tail.strip():
            return f"element {name}: text is not allowed here"
        cq = etree.QName(child)
        if cq.namespace == _NS:
            sub = spec.children.get(cq.localname)
            if sub is None or cq.localname in seen:
                return f"element {name} has extra content: {cq.localname}"
            seen.add(cq.localname)
            err = _element_error(child, sub)
            if err:
                return err
        elif not spec.foreign_children:
            return f"element {name} has extra content: {cq.localname}"
    return None
