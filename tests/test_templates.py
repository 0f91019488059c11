"""Tests for vmwebd.templates: loading, validation errors, XML round trip and pure planning."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lxml import etree

from vmwebd.config import load_config
from vmwebd.errors import ConfigError, InvalidArgument
from vmwebd.templates import (
    NETWORK_MODES,
    NetworkSpec,
    Role,
    Template,
    expand,
    load_template_file,
    load_templates,
    min_count,
    plan_scale,
    role_of,
)

REPO = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = REPO / "conf" / "vmwebd.xml"
IMAGES = {"debian-12"}
POOLS = {"lab"}


def tpl(
    *roles: str,
    head: str = '<template name="t" description="d">',
    network: str = '<network mode="isolated" pool="lab"/>',
) -> str:
    """A template with ``head`` on line 1, ``network`` on line 2 and one role per line from line 3."""
    return "\n".join([head, network, *roles, "</template>"]) + "\n"


def role(name="r", count="rest", vcpus="1", memory="512", image="debian-12", extra="") -> str:
    return (
        f'<role name="{name}" count="{count}" vcpus="{vcpus}" memory-mib="{memory}" image="{image}"{extra}/>'
    )


def role_obj(name, count, vcpus=1, memory=512) -> Role:
    return Role(name, count, vcpus, memory, "debian-12")


HPC = Template("hpc", "", NetworkSpec("isolated", "lab"), (role_obj("head", 1), role_obj("compute", None)))
FIXED = Template("pair", "", NetworkSpec("isolated", "lab"), (role_obj("a", 1), role_obj("b", 2)))


def names(pairs):
    return [n for n, _ in pairs]


# -- shipped templates -------------------------------------------------------------------------


def test_shipped_templates_load_against_shipped_config():
    """The shipped templates load, use only the shipped config's images and pools, and include hpc, webtier and lab."""
    config = load_config(SHIPPED_CONFIG)
    templates = load_templates(config.templates_dir, config.image_names, config.ip_pool_names)
    assert {"hpc", "webtier", "lab"} <= set(templates)
    for t in templates.values():
        assert t.network.pool == "lab"
        assert all(r.image == "debian-12" for r in t.roles)
        assert t.description


def test_shipped_hpc_template_expands_head_first():
    """The shipped hpc template gives one head and N-1 compute nodes, head first."""
    hpc = load_templates(REPO / "conf" / "templates")["hpc"]
    assert names(expand(hpc, 4)) == ["head0", "compute0", "compute1", "compute2"]
    assert min_count(hpc) == 1


def test_shipped_lab_template_is_n_identical_machines():
    """The shipped lab template has a single rest role, so every VM is alike."""
    lab = load_templates(REPO / "conf" / "templates")["lab"]
    assert len(lab.roles) == 1 and lab.roles[0].is_rest
    assert len({r for _, r in expand(lab, 5)}) == 1


# -- loading errors ----------------------------------------------------------------------------

BAD = [
    # (id, text, line, field, fragment)
    (
        "two-rest",
        tpl(role("a"), role("b")),
        4,
        "template/role/@count",
        "only one role may have count=\"rest\" (first at line 3)",
    ),
    ("unknown-image", tpl(role(image="ubuntu")), 3, "template/role/@image", "no image named 'ubuntu'"),
    (
        "unknown-pool",
        tpl(role(), network='<network mode="isolated" pool="wan"/>'),
        2,
        "template/network/@pool",
        "no IP pool named 'wan'",
    ),
    (
        "bad-mode",
        tpl(role(), network='<network mode="bridged" pool="lab"/>'),
        2,
        "template/network/@mode",
        "'bridged'",
    ),
    (
        "bad-dns",
        tpl(role(), network='<network mode="nat" pool="lab" dns="192.0.2.53 192.0.2.300"/>'),
        2,
        "template/network/@dns",
        "'192.0.2.300' is not an IPv4 address",
    ),
    (
        "many-dns",
        tpl(role(), network='<network mode="nat" pool="lab" dns="192.0.2.1 192.0.2.2 192.0.2.3 192.0.2.4"/>'),
        2,
        "template/network/@dns",
        "at most 3",
    ),
    ("vcpus-zero", tpl(role(vcpus="0")), 3, "template/role/@vcpus", "out of range"),
    ("vcpus-text", tpl(role(vcpus="two")), 3, "template/role/@vcpus", "not an integer"),
    ("memory-small", tpl(role(memory="32")), 3, "template/role/@memory-mib", "out of range"),
    ("count-zero", tpl(role(count="0")), 3, "template/role/@count", "out of range"),
    ("count-text", tpl(role(count="many")), 3, "template/role/@count", "not an integer"),
    (
        "dup-role",
        tpl(role("a", "1"), role("a", "rest")),
        4,
        "template/role/@name",
        "duplicate role name 'a' (first at line 3)",
    ),
    ("role-digit-end", tpl(role("node1")), 3, "template/role/@name", "not a valid role name"),
    ("role-upper", tpl(role("Head")), 3, "template/role/@name", "not a valid role name"),
    (
        "role-missing-attr",
        tpl('<role name="r" count="rest" vcpus="1" image="debian-12"/>'),
        3,
        "template/role/@memory-mib",
        "required",
    ),
    ("role-unknown-attr", tpl(role(extra=' cpu="2"')), 3, "template/role/@cpu", "unknown attribute"),
    ("unknown-element", tpl(role(), "<disk/>"), 4, "template/disk", "unknown element"),
    (
        "no-network",
        "<template name=\"t\">\n" + role() + "\n</template>",
        1,
        "template/network",
        "required element",
    ),
    (
        "two-networks",
        tpl(role(), '<network mode="nat" pool="lab"/>'),
        4,
        "template/network",
        "only once (first at line 2)",
    ),
    ("no-roles", tpl(), 1, "template/role", "at least one role"),
    ("bad-name", tpl(role(), head='<template name="HPC">'), 1, "template/@name", "not a valid template name"),
    ("no-name", tpl(role(), head="<template>"), 1, "template/@name", "required attribute"),
    ("root", "<scenario name='x'/>", 1, "scenario", "root element must be <template>"),
    ("doctype", '<!DOCTYPE template [<!ENTITY e "x">]>\n' + tpl(role()), 1, "DOCTYPE", "not allowed"),
    ("not-xml", tpl(role()).replace("</template>", "</templ>"), 4, "xml", "not well-formed"),
]


@pytest.mark.parametrize("text,line,field,fragment", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_template_names_file_line_and_field(tmp_path, text, line, field, fragment):
    """Each kind of template mistake raises ConfigError naming the file, the line and the field."""
    path = tmp_path / "t.xml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_templates(tmp_path, known_images=IMAGES, known_pools=POOLS)
    e = info.value
    assert (e.path, e.line, e.field) == (str(path), line, field), str(e)
    assert fragment in str(e)
    assert str(e).startswith(f"{path}:{line}: {field}: ")


def test_unknown_image_and_pool_pass_without_known_sets(tmp_path):
    """Images and pools are only checked when the caller gives the known sets."""
    path = tmp_path / "t.xml"
    path.write_text(tpl(role(image="ubuntu"), network='<network mode="nat" pool="wan"/>'))
    t = load_template_file(path)
    assert t.roles[0].image == "ubuntu" and t.network == NetworkSpec("nat", "wan")


def test_duplicate_template_names_across_files(tmp_path):
    """Two files declaring the same template name are refused, naming the second file and the first."""
    (tmp_path / "a.xml").write_text(tpl(role()))
    (tmp_path / "b.xml").write_text(tpl(role()))
    with pytest.raises(ConfigError) as info:
        load_templates(tmp_path)
    assert info.value.path == str(tmp_path / "b.xml") and info.value.line == 1
    assert info.value.field == "template/@name" and "also in a.xml:1" in str(info.value)


def test_missing_templates_dir(tmp_path):
    """A missing templates directory is a ConfigError naming it."""
    with pytest.raises(ConfigError) as info:
        load_templates(tmp_path / "none")
    assert info.value.path == str(tmp_path / "none")


def test_non_xml_files_are_ignored_and_empty_dir_is_empty(tmp_path):
    """Only *.xml files are templates; a directory without any gives an empty dict."""
    (tmp_path / "README").write_text("not a template")
    assert load_templates(tmp_path) == {}


# -- XML round trip ----------------------------------------------------------------------------


def test_shipped_templates_round_trip_through_xml():
    """to_xml/from_xml give back an equal Template for each shipped template, as element and as bytes."""
    for t in load_templates(REPO / "conf" / "templates").values():
        assert Template.from_xml(t.to_xml()) == t
        assert Template.from_xml(t.to_xml_bytes()) == t


def test_to_xml_uses_the_file_format_names():
    """to_xml writes the same element and attribute names as the template files."""
    el = HPC.to_xml()
    assert el.tag == "template" and el.get("name") == "hpc"
    assert el.find("network").attrib == {"mode": "isolated", "pool": "lab"}
    assert [dict(r.attrib) for r in el.findall("role")][1] == {
        "name": "compute",
        "count": "rest",
        "vcpus": "1",
        "memory-mib": "512",
        "image": "debian-12",
    }


def test_from_xml_ignores_only_named_extra_attributes():
    """from_xml tolerates the DOM's extra attributes only when told to, and names the source otherwise."""
    el = HPC.to_xml()
    el.set("v", "1.0@host1")
    assert Template.from_xml(el, ignore_attributes=("v",)) == HPC
    with pytest.raises(ConfigError) as info:
        Template.from_xml(etree.tostring(el), source="<dom>")
    assert info.value.path == "<dom>" and info.value.field == "template/@v"


def test_from_xml_checks_known_images():
    """from_xml refuses a role image outside known_images when given."""
    with pytest.raises(ConfigError) as info:
        Template.from_xml(HPC.to_xml(), known_images={"other"})
    assert info.value.field == "template/role/@image"


# -- planning: examples ------------------------------------------------------------------------


@pytest.mark.parametrize("count", [0, -1])
def test_expand_refuses_counts_below_one(count):
    """expand refuses a count below one with InvalidArgument on 'count'."""
    with pytest.raises(InvalidArgument) as info:
        expand(HPC, count)
    assert info.value.field == "count"


def test_expand_refuses_count_below_fixed_roles():
    """expand refuses fewer VMs than the fixed roles need, naming the minimum."""
    t = Template("t", "", HPC.network, (role_obj("m", 2), role_obj("w", None)))
    assert min_count(t) == 2
    with pytest.raises(InvalidArgument, match="at least 2 VMs, got 1"):
        expand(t, 1)


@pytest.mark.parametrize("count", [True, 2.0, "3", None])
def test_expand_refuses_non_integers(count):
    """expand refuses booleans, floats, strings and None as counts."""
    with pytest.raises(InvalidArgument, match="not an integer"):
        expand(HPC, count)


def test_expand_respects_max_count():
    """expand refuses more VMs than max_count."""
    assert len(expand(HPC, 3, max_count=3)) == 3
    with pytest.raises(InvalidArgument, match="limit of 3"):
        expand(HPC, 4, max_count=3)


def test_fixed_size_template_expands_only_to_its_size():
    """A template without a rest role expands to exactly its size and refuses any other count."""
    assert names(expand(FIXED, 3)) == ["a0", "b0", "b1"]
    with pytest.raises(InvalidArgument, match="fixed size of 3 VMs"):
        expand(FIXED, 4)


def test_fixed_size_template_cannot_be_scaled():
    """Scaling a template without a rest role to another size errors; to its size it changes nothing."""
    existing = names(expand(FIXED, 3))
    assert plan_scale(FIXED, existing, 3) == ([], [])
    with pytest.raises(InvalidArgument, match="fixed size"):
        plan_scale(FIXED, existing, 5)


def test_rest_role_declared_first_still_comes_after_fixed_roles():
    """Fixed roles are expanded first even when the rest role is declared first."""
    t = Template("t", "", HPC.network, (role_obj("w", None), role_obj("m", 1)))
    assert names(expand(t, 3)) == ["m0", "w0", "w1"]


def test_scale_up_fills_lowest_unused_indexes():
    """Scaling up gives the rest role its lowest unused indexes, holes first."""
    add, remove = plan_scale(HPC, ["head0", "compute0", "compute2"], 5)
    assert names(add) == ["compute1", "compute3"] and remove == []


def test_scale_down_removes_highest_indexes_first():
    """Scaling down removes the rest role's highest indexes first and never the fixed ones."""
    add, remove = plan_scale(HPC, ["head0", "compute0", "compute2", "compute7"], 1)
    assert add == [] and remove == ["compute7", "compute2", "compute0"]


def test_scale_restores_a_missing_fixed_vm():
    """A cluster that lost a fixed-role VM gets it back when scaled."""
    add, remove = plan_scale(HPC, ["compute0", "compute1"], 2)
    assert names(add) == ["head0"] and remove == ["compute1"]


def test_scale_refuses_foreign_and_repeated_names():
    """Names that belong to no role, or repeat, are refused with InvalidArgument."""
    for existing in (["head0", "gpu0"], ["head0", "compute01"], ["head0", "head0"]):
        with pytest.raises(InvalidArgument) as info:
            plan_scale(HPC, existing, 3)
        assert info.value.field == "existing_vm_names"


def test_role_of_splits_names():
    """role_of maps a VM name back to its role and index, or None."""
    t = Template("t", "", HPC.network, (role_obj("node", 1), role_obj("node-x", None)))
    assert role_of(t, "node-x12") == (t.roles[1], 12)
    assert role_of(t, "node0") == (t.roles[0], 0)
    assert role_of(t, "node") is None and role_of(t, "nodex1") is None


# -- planning: properties ----------------------------------------------------------------------

ROLE_NAMES = ["head", "compute", "web", "db", "node", "node-x", "r2d", "a"]
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Cn")), max_size=40)


@st.composite
def templates(draw, rest=None):
    """Random valid templates; ``rest`` forces a rest role (True), forbids it (False) or lets it vary."""
    role_names = draw(st.lists(st.sampled_from(ROLE_NAMES), min_size=1, max_size=4, unique=True))
    has_rest = draw(st.booleans()) if rest is None else rest
    rest_index = draw(st.integers(0, len(role_names) - 1)) if has_rest else None
    roles = tuple(
        Role(
            name,
            None if i == rest_index else draw(st.integers(1, 3)),
            draw(st.integers(1, 64)),
            draw(st.integers(64, 8192)),
            draw(st.sampled_from(["debian-12", "alpine"])),
        )
        for i, name in enumerate(role_names)
    )
    network = NetworkSpec(draw(st.sampled_from(NETWORK_MODES)), draw(st.sampled_from(["lab", "wan-2"])))
    return Template(draw(st.sampled_from(["t", "hpc", "big-data"])), draw(TEXT), network, roles)


@st.composite
def template_and_count(draw, rest=True):
    t = draw(templates(rest=rest))
    return t, draw(st.integers(min_count(t), min_count(t) + 20))


def final_set(existing, plan):
    add, remove = plan
    return (set(existing) - set(remove)) | set(names(add))


@given(templates())
def test_property_round_trip_through_xml(t):
    """Any valid template survives to_xml_bytes/from_xml unchanged."""
    assert Template.from_xml(t.to_xml_bytes()) == t


@given(template_and_count(rest=None).filter(lambda tc: tc[0].rest_role or tc[1] == tc[0].fixed_count))
def test_property_expand_names_unique_count_right_fixed_roles_exact(tc):
    """expand gives count unique names, each fixed role exactly its count, all mapping back to their role."""
    t, count = tc
    vms = expand(t, count)
    assert len(vms) == count and len(set(names(vms))) == count
    for r in t.fixed_roles:
        assert sum(1 for _, vr in vms if vr == r) == r.count
    for name, r in vms:
        assert role_of(t, name)[0] == r


@given(template_and_count(), st.integers(0, 25))
def test_property_scale_from_expand(tc, target_extra):
    """Scaling an expanded cluster reaches the new size, keeps fixed VMs and only removes existing names."""
    t, count = tc
    new_count = min_count(t) + target_extra
    existing = names(expand(t, count))
    add, remove = plan_scale(t, existing, new_count)
    after = final_set(existing, (add, remove))
    assert len(after) == new_count
    assert set(remove) <= set(existing) and not set(names(add)) & set(existing)
    assert not (add and remove)
    fixed = {n for n in existing if not role_of(t, n)[0].is_rest}
    assert fixed <= after and not fixed & set(remove)


@given(template_and_count(), st.integers(0, 25))
def test_property_scale_up_then_down_returns_same_set(tc, more):
    """Scaling up by any amount and back down to the old size gives back exactly the old VM set."""
    t, count = tc
    existing = names(expand(t, count))
    up = final_set(existing, plan_scale(t, existing, count + more))
    down = final_set(up, plan_scale(t, sorted(up), count))
    assert down == set(existing)


@given(templates(rest=True), st.sets(st.integers(0, 30), max_size=15), st.integers(0, 25))
def test_property_scale_with_holes(t, rest_indexes, target_extra):
    """From any set of rest-role indexes, scaling reaches the size, removes highest first and adds lowest unused."""
    rest = t.rest_role
    existing = [n for n, _ in expand(t, min_count(t)) if not role_of(t, n)[0].is_rest]
    existing += [f"{rest.name}{i}" for i in rest_indexes]
    new_count = min_count(t) + target_extra
    add, remove = plan_scale(t, existing, new_count)
    after = final_set(existing, (add, remove))
    assert len(after) == new_count and set(remove) <= set(existing)
    removed_idx = [role_of(t, n)[1] for n in remove]
    kept_idx = [role_of(t, n)[1] for n in after if role_of(t, n)[0] == rest]
    assert all(r > k for r in removed_idx for k in kept_idx)
    added_idx = [role_of(t, n)[1] for n, _ in add]
    unused = [i for i in range(len(rest_indexes) + len(add)) if i not in rest_indexes]
    assert added_idx == unused[: len(add)]
