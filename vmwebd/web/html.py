"""A tiny HTML builder that escapes everything by default.

``el("td", name, class_="state")`` escapes ``name`` (text) and every attribute value; only
:class:`Markup` (what ``el`` itself returns) passes unescaped. So text from the DOM, from a form or
from an error message can never become markup: there is no way to interpolate a plain ``str``
without escaping it.
"""

from __future__ import annotations

import html
from typing import Iterable

_VOID = frozenset({"br", "hr", "img", "input", "link", "meta"})


class Markup(str):
    """HTML that is already safe (built here); everything else gets escaped."""


def esc(value) -> Markup:
    """``value`` as HTML text: Markup as it is, anything else escaped (quotes too)."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value), quote=True))


def _children(children: Iterable) -> str:
    out = []
    for c in children:
        if c is None or c is False:
            continue
        if isinstance(c, (list, tuple)):
            out.append(_children(c))
        else:
            out.append(esc(c))
    return "".join(out)


def el(tag: str, *children, **attrs) -> Markup:
    """An element; attribute names lose a trailing ``_`` (``class_``) and turn ``_`` into ``-``
    (``data_k``); a True value writes a bare attribute, None/False leaves it out."""
    parts = [tag]
    for name, value in attrs.items():
        if value is None or value is False:
            continue
        name = name.rstrip("_").replace("_", "-")
        parts.append(name if value is True else f'{name}="{esc(value)}"')
    start = "<" + " ".join(parts) + ">"
    if tag in _VOID:
        return Markup(start)
    return Markup(f"{start}{_children(children)}</{tag}>")


def frag(*children) -> Markup:
    """Several nodes side by side."""
    return Markup(_children(children))
