"""Scenario templates: what a virtual cluster is made of, and pure planning on top of them.

One XML file per template in ``conf/templates/``::

    <template name="hpc" description="An HPC cluster: one head node and N-1 compute nodes">
      <network mode="isolated" pool="lab"/>
      <role name="head" count="1" vcpus="2" memory-mib="1024" image="debian-12"/>
      <role name="compute" count="rest" vcpus="1" memory-mib="512" image="debian-12"/>
    </template>

A role has a fixed ``count`` or ``count="rest"``: at most one role takes the rest of the VMs
(it may be empty). A template without a rest role has a fixed size. The same element and
attribute names are used by :meth:`Template.to_xml` / :meth:`Template.from_xml`, which the cluster
DOM uses to store templates as entities.

VM names are the role name followed by an index without leading zeros: ``head0``,
``compute0``, ``compute1``... Role names end with a letter, so a name splits back into its role
and index unambiguously (:func:`role_of`).

Planning (:func:`expand`, :func:`plan_scale`) is pure: names in, names out; the caller leases
addresses, places VMs and writes the DOM.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from vmwebd.config import ElementReader, parse_xml, read_xml_file
from vmwebd.errors import ConfigError, InvalidArgument

#: Network modes a cluster network may have: no route out, or NAT to the host's network.
NETWORK_MODES = ("isolated", "nat")

_TEMPLATE_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,62}")
# Ends with a letter so that "<role><index>" splits back unambiguously.
_ROLE_NAME_RE = re.compile(r"[a-z](?:[a-z0-9-]{0,30}[a-z])?")
_IMAGE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_POOL_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,30}")
_VM_NAME_RE = re.compile(r"(.*[a-z])(0|[1-9][0-9]*)")
_MAX_FIXED_COUNT = 10_000
_MAX_VCPUS = 64
_MAX_MEMORY_MIB = 1024 * 1024
_MAX_DESCRIPTION = 200


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    """The network a virtual cluster gets: its mode, the IP pool its addresses come from and the
    name servers its guests are told about (none by default)."""

    mode: str
    pool: str
    dns: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Role:
    """A kind of VM in a template; ``count`` is ``None`` for the role that takes the rest."""

    name: str
    count: int | None
    vcpus: int
    memory_mib: int
    image: str

    @property
    def is_rest(self) -> bool:
        return self.count is None


@dataclass(frozen=True, slots=True)
class Template:
    """A scenario: the roles of its VMs, in file order, and its network."""

    name: str
    description: str
    network: NetworkSpec
    roles: tuple[Role, ...]

    @property
    def rest_role(self) -> Role | None:
        return next((r for r in self.roles if r.is_rest), None)

    @property
    def fixed_roles(self) -> tuple[Role, ...]:
        return tuple(r for r in self.roles if not r.is_rest)

    @property
    def fixed_count(self) -> int:
        """VMs in the fixed roles together."""
        return sum(r.count for r in self.fixed_roles)

    def role(self, name: str) -> Role | None:
        return next((r for r in self.roles if r.name == name), None)

    def to_xml(self) -> etree._Element:
        """The template as a ``<template>`` element, in the file format."""
        el = etree.Element("template", name=self.name, description=self.description)
        net = etree.SubElement(el, "network", mode=self.network.mode, pool=self.network.pool)
        if self.network.dns:
            net.set("dns", " ".join(self.network.dns))
        for r in self.roles:
            etree.SubElement(
                el,
                "role",
                name=r.name,
                count="rest" if r.is_rest else str(r.count),
                vcpus=str(r.vcpus),
                **{"memory-mib": str(r.memory_mib)},
                image=r.image,
            )
        return el

    def to_xml_bytes(self) -> bytes:
        return etree.tostring(self.to_xml(), encoding="UTF-8", xml_declaration=True, pretty_print=True)

    @classmethod
    def from_xml(
        cls,
        xml: etree._Element | bytes | str,
        *,
        source: str = "<template>",
        known_images: Collection[str] | None = None,
        known_pools: Collection[str] | None = None,
        ignore_attributes: Collection[str] = (),
    ) -> "Template":
        """Read and validate a ``<template>`` element (or its text); raises ConfigError.

        ``ignore_attributes`` names extra attributes tolerated on the ``<template>`` element
        itself (e.g. the DOM's version stamps); anything else unknown is an error.
        """
        if isinstance(xml, str):
            xml = xml.encode("utf-8")
        root = parse_xml(xml, source) if isinstance(xml, bytes) else xml
        return _TemplateReader(source, known_images, known_pools).read(root, tuple(ignore_attributes))


def min_count(template: Template) -> int:
    """The fewest VMs a cluster of this template may have: its fixed roles, and at least one."""
    return max(1, template.fixed_count)


# -- loading -----------------------------------------------------------------------------------


class _TemplateReader(ElementReader):
    def __init__(self, source, known_images, known_pools):
        super().__init__(source)
        self.known_images = known_images
        self.known_pools = known_pools

    def read(self, root: etree._Element, ignore: tuple[str, ...]) -> Template:
        if root.tag != "template":
            raise self.error(root, str(root.tag), "the root element must be <template>")
        extra = tuple(a for a in root.attrib if a in ignore)
        a = self.attrs(root, "template", required=("name",), optional=("description",) + extra)
        name = self.matching(
            root, "template/@name", a["name"], _TEMPLATE_NAME_RE, "template name ([a-z][a-z0-9-]{0,62})"
        )
        description = a.get("description", "")
        if len(description) > _MAX_DESCRIPTION:
            raise self.error(root, "template/@description", f"is longer than {_MAX_DESCRIPTION} characters")
        kids = self.children(root, "template", single=("network",), multiple=("role",))
        if not kids["network"]:
            raise self.error(root, "template/network", "required element is missing")
        network = self._network(kids["network"][0])
        if not kids["role"]:
            raise self.error(root, "template/role", "at least one role is required")
        roles: list[Role] = []
        lines: dict[str, int] = {}
        rest_line = None
        for el in kids["role"]:
            role = self._role(el)
            if role.name in lines:
                raise self.error(
                    el,
                    "template/role/@name",
                    f"duplicate role name {role.name!r} (first at line {lines[role.name]})",
                )
            if role.is_rest:
                if rest_line is not None:
                    raise self.error(
                        el,
                        "template/role/@count",
                        f"only one role may have count=\"rest\" (first at line {rest_line})",
                    )
                rest_line = el.sourceline
            lines[role.name] = el.sourceline
            roles.append(role)
        return Template(name, description, network, tuple(roles))

    def _network(self, el) -> NetworkSpec:
        self.children(el, "template/network")
        a = self.attrs(el, "template/network", required=("mode", "pool"), optional=("dns",))
        if a["mode"] not in NETWORK_MODES:
            raise self.error(
                el, "template/network/@mode", f"{a['mode']!r} is not one of {', '.join(NETWORK_MODES)}"
            )
        pool = self.matching(el, "template/network/@pool", a["pool"], _POOL_NAME_RE, "pool name")
        if self.known_pools is not None and pool not in self.known_pools:
            raise self.error(
                el,
                "template/network/@pool",
                f"no IP pool named {pool!r} in the config (known: {_known(self.known_pools)})",
            )
        dns = []
        for part in a.get("dns", "").replace(",", " ").split():
            try:
                dns.append(str(ipaddress.IPv4Address(part)))
            except ValueError:
                raise self.error(el, "template/network/@dns", f"{part!r} is not an IPv4 address") from None
        if len(dns) > 3:
            raise self.error(el, "template/network/@dns", "at most 3 name servers")
        return NetworkSpec(a["mode"], pool, tuple(dns))

    def _role(self, el) -> Role:
        self.children(el, "template/role")
        a = self.attrs(el, "template/role", required=("name", "count", "vcpus", "memory-mib", "image"))
        name = self.matching(
            el,
            "template/role/@name",
            a["name"],
            _ROLE_NAME_RE,
            "role name (lower-case letters, digits and '-', ending with a letter)",
        )
        count = (
            None
            if a["count"] == "rest"
            else self.integer(el, "template/role/@count", a["count"], 1, _MAX_FIXED_COUNT)
        )
        vcpus = self.integer(el, "template/role/@vcpus", a["vcpus"], 1, _MAX_VCPUS)
        memory = self.integer(el, "template/role/@memory-mib", a["memory-mib"], 64, _MAX_MEMORY_MIB)
        image = self.matching(el, "template/role/@image", a["image"], _IMAGE_NAME_RE, "image name")
        if self.known_images is not None and image not in self.known_images:
            raise self.error(
                el,
                "template/role/@image",
                f"no image named {image!r} in the config (known: {_known(self.known_images)})",
            )
        return Role(name, count, vcpus, memory, image)


#: Namespace of a template's body inside the cluster DOM. A body without a namespace lost its
#: ``xmlns=""`` on the way through the peer SOAP stack and arrived in the DOM's namespace, where
#: the schema (rightly) refuses it; a namespace of its own survives every serialisation.
DOM_BODY_NS = "urn:vmweb:template:1"


def to_dom_body(t: Template) -> etree._Element:
    """The template as the body of its DOM entity (in :data:`DOM_BODY_NS`)."""
    el = t.to_xml()
    for e in el.iter():
        e.tag = f"{{{DOM_BODY_NS}}}{etree.QName(e).localname}"
    etree.cleanup_namespaces(el, top_nsmap={"t": DOM_BODY_NS})
    return el


def from_dom_body(el: etree._Element, source: str) -> Template:
    """The template stored by :func:`to_dom_body` (or by an older host, without a namespace)."""
    el = copy.deepcopy(el)
    for e in el.iter():
        if isinstance(e.tag, str):
            e.tag = etree.QName(e).localname
    etree.cleanup_namespaces(el)
    return Template.from_xml(el, source=source)


def _known(names: Iterable[str]) -> str:
    return ", ".join(sorted(names)) or "none"


def load_template_file(
    path: str | Path,
    known_images: Collection[str] | None = None,
    known_pools: Collection[str] | None = None,
) -> Template:
    """Load and validate one template file; raises ConfigError naming file, line and field."""
    return _TemplateReader(str(path), known_images, known_pools).read(read_xml_file(path), ())


def load_templates(
    directory: str | Path,
    known_images: Collection[str] | None = None,
    known_pools: Collection[str] | None = None,
) -> dict[str, Template]:
    """Load every ``*.xml`` template of a directory, by name; raises ConfigError on any problem.

    When ``known_images`` / ``known_pools`` are given (from the config), a template naming
    another image or IP pool is an error. An empty directory gives an empty dict.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(str(directory), None, "templates", "directory does not exist")
    out: dict[str, Template] = {}
    where: dict[str, str] = {}
    for path in sorted(directory.glob("*.xml")):
        root = read_xml_file(path)
        t = _TemplateReader(str(path), known_images, known_pools).read(root, ())
        if t.name in out:
            raise ConfigError(
                str(path),
                root.sourceline,
                "template/@name",
                f"duplicate template name {t.name!r} (also in {where[t.name]})",
            )
        out[t.name] = t
        where[t.name] = f"{path.name}:{root.sourceline}"
    return out


# -- planning (pure) ---------------------------------------------------------------------------


def vm_name(role: Role | str, index: int) -> str:
    """The name of a role's VM number ``index``: ``compute3``."""
    return f"{role if isinstance(role, str) else role.name}{index}"


def role_of(template: Template, name: str) -> tuple[Role, int] | None:
    """The role and index a VM name stands for in this template, or ``None``."""
    m = _VM_NAME_RE.fullmatch(name)
    if not m:
        return None
    role = template.role(m.group(1))
    return (role, int(m.group(2))) if role is not None else None


def _check_count(template: Template, count: object, max_count: int | None) -> int:
    if isinstance(count, bool) or not isinstance(count, int):
        raise InvalidArgument("count", f"{count!r} is not an integer")
    least = min_count(template)
    if count < least:
        raise InvalidArgument("count", f"template {template.name!r} needs at least {least} VMs, got {count}")
    if max_count is not None and count > max_count:
        raise InvalidArgument("count", f"{count} VMs is more than the limit of {max_count} per cluster")
    if template.rest_role is None and count != template.fixed_count:
        raise InvalidArgument(
            "count",
            f"template {template.name!r} has a fixed size of {template.fixed_count} VMs "
            f"(no role has count=\"rest\"), got {count}",
        )
    return count


def _lowest_unused(used: set[int], n: int) -> list[int]:
    out, i = [], 0
    while len(out) < n:
        if i not in used:
            out.append(i)
        i += 1
    return out


def expand(template: Template, count: int, max_count: int | None = None) -> list[tuple[str, Role]]:
    """Names and roles of the VMs of a new cluster of ``count`` VMs: fixed roles first.

    ``hpc`` with 4 gives ``head0, compute0, compute1, compute2``. Raises InvalidArgument('count')
    below :func:`min_count`, above ``max_count``, or off the size of a template without a rest role.
    """
    return plan_scale(template, [], count, max_count)[0]


def plan_scale(
    template: Template,
    existing_vm_names: Iterable[str],
    new_count: int,
    max_count: int | None = None,
) -> tuple[list[tuple[str, Role]], list[str]]:
    """What to add and remove to bring a cluster to ``new_count`` VMs: ``(to_add, to_remove)``.

    Only the rest role changes size: it grows with its lowest unused indexes (ascending) and
    shrinks from its highest index down. Fixed-role VMs are never removed; a missing one is
    added back. Raises InvalidArgument('count') as :func:`expand` does (so a template without a
    rest role can only be "scaled" to its own size, which changes nothing), and
    InvalidArgument('existing_vm_names') for a name that is not of this template or repeats.
    """
    new_count = _check_count(template, new_count, max_count)
    have: dict[str, set[int]] = {r.name: set() for r in template.roles}
    for name in existing_vm_names:
        parsed = role_of(template, name)
        if parsed is None:
            raise InvalidArgument(
                "existing_vm_names", f"VM {name!r} is not named after a role of template {template.name!r}"
            )
        role, index = parsed
        if index in have[role.name]:
            raise InvalidArgument("existing_vm_names", f"VM {name!r} is listed twice")
        have[role.name].add(index)

    to_add: list[tuple[str, Role]] = []
    fixed_after = 0
    for role in template.fixed_roles:
        missing = max(0, role.count - len(have[role.name]))
        to_add += [(vm_name(role, i), role) for i in _lowest_unused(have[role.name], missing)]
        fixed_after += len(have[role.name]) + missing

    rest = template.rest_role
    if rest is None:
        return to_add, []
    target = new_count - fixed_after
    if target < 0:
        # Only reachable when a cluster holds more fixed-role VMs than its template says.
        raise InvalidArgument(
            "count", f"the cluster keeps its {fixed_after} fixed-role VMs, cannot shrink to {new_count}"
        )
    current = have[rest.name]
    if target >= len(current):
        to_add += [(vm_name(rest, i), rest) for i in _lowest_unused(current, target - len(current))]
        return to_add, []
    to_remove = [vm_name(rest, i) for i in sorted(current, reverse=True)[: len(current) - target]]
    return to_add, to_remove
