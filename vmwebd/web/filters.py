"""Search and filter for the owner and host views: a GET form, applied by the server.

The form's fields are query parameters (``/owner?q=lab&host=host2&state=running``), so a filter
works without JavaScript, can be bookmarked, and survives the live updates (the polling script
fetches the page with the same query). Items that do not match are left out of the page.

- ``q``: a piece of text, any case, looked for in the VM's id (``CLUSTER/NAME``), its IP and
  MAC, its cluster's name and its host's id;
- ``owner``: the owner of the VM's cluster (admins only: a user sees only their own);
- ``host``: the host a VM is placed on (on the host view: that host's card);
- ``state``: a VM's state (running, pending, shutoff…); on the host view also a host's state
  (alive, suspect, dead, left, draining), which keeps that host's card with all its VMs.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmwebd.web.html import Markup, el

#: VM states offered in the form (what hosts report; see ``VmStatus``).
VM_STATES = ("running", "pending", "shutoff", "paused", "crashed", "missing", "error")
#: Host states offered on the host view.
HOST_STATES = ("alive", "suspect", "dead", "left", "draining")
_MAX_TEXT = 100


@dataclass(frozen=True)
class Filter:
    q: str = ""
    owner: str = ""
    host: str = ""
    state: str = ""

    @classmethod
    def from_query(cls, query: dict) -> "Filter":
        """From the request's arguments (bytes names to lists of bytes values); anything not
        UTF-8 or too long is ignored."""

        def one(name: str) -> str:
            values = (query or {}).get(name.encode()) or [b""]
            try:
                return values[0].decode("utf-8").strip()[:_MAX_TEXT]
            except UnicodeDecodeError:
                return ""

        return cls(one("q"), one("owner"), one("host"), one("state"))

    @property
    def active(self) -> bool:
        return bool(self.q or self.owner or self.host or self.state)

    def text_matches(self, *texts: str) -> bool:
        q = self.q.lower()
        return not q or any(q in t.lower() for t in texts if t)

    def vm_matches(
        self, cluster: str, vm_id: str, ip: str, mac: str, owner: str, host: str, state: str
    ) -> bool:
        """Whether a VM (as the owner view lists it) passes every field of the filter."""
        return (
            self.text_matches(vm_id, ip, mac, cluster, host)
            and (not self.owner or owner == self.owner)
            and (not self.host or host == self.host)
            and (not self.state or state == self.state)
        )


def filter_form(
    action: str,
    f: Filter,
    owners: list[str],
    hosts: list[str],
    states: tuple[str, ...],
    shown: int,
    total: int,
    what: str,
) -> Markup:
    """The search form above a view (GET to ``action``), with what the filter leaves shown."""

    def select(name: str, label: str, options, current: str, any_label: str) -> Markup:
        opts = [el("option", any_label, value="")]
        opts += [el("option", o, value=o, selected=o == current) for o in options]
        if current and current not in options:
            opts.append(el("option", current, value=current, selected=True))
        return el("label", label, el("select", *opts, name=name, id=f"filter-{name}"))

    fields = [
        el(
            "label",
            "Search",
            el(
                "input",
                type="search",
                name="q",
                value=f.q,
                id="filter-q",
                autocomplete="off",
                autocapitalize="none",
                spellcheck="false",
                placeholder="name, IP, MAC…",
                maxlength=str(_MAX_TEXT),
            ),
        )
    ]
    if len(owners) > 1 or f.owner:
        fields.append(select("owner", "Owner", owners, f.owner, "any owner"))
    fields.append(select("host", "Host", hosts, f.host, "any host"))
    fields.append(select("state", "State", states, f.state, "any state"))
    count = (
        el("span", f"{shown} of {total} {what} match", id="filter-count", class_="meta", role="status")
        if f.active
        else None
    )
    clear = el("a", "Clear", href=action, id="filter-clear", class_="button secondary") if f.active else None
    return el(
        "form",
        *fields,
        el("div", el("button", "Filter", type="submit", id="filter-submit"), clear, class_="filter-buttons"),
        count,
        method="get",
        action=action,
        role="search",
        class_="card filter",
        id="filter",
    )
