"""The confirmation step before a destructive action, as a page of its own.

Every form of the pages whose action destroys something (a cluster, VMs of a scale down, a
running guest, a host's placement of its VMs, an account, an SSH key) carries ``confirm=ask``.
The action then does nothing yet: it answers with a page naming what would be lost ("Destroy
cluster lab1 and its 4 VMs?"), whose form posts the same fields again without ``confirm``, and a
Cancel link back. It is a server page rather than a script's dialog, so it works without
JavaScript. A form without ``confirm=ask`` (a script's, a test's) acts at once, as before: the
step guards against a slip of the mouse, not against the user; CSRF and permissions are checked
the same way for both.

The question is built from what this host's replica holds when it is asked; the permission
checks are the action's own (:class:`vmwebd.app.Application`), so a user asked to confirm something
they may not do gets the same refusal the action would give.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vmwebd.dom.records import UserRec, VClusterRec, VmRec
from vmwebd.errors import ClientError
from vmwebd.templates import plan_scale
from vmwebd.web.html import Markup, el
from vmwebd.web.views import post_form


@dataclass(frozen=True)
class Question:
    """What to ask: a one-line question, what would be lost (one line each), the button's label."""

    title: str
    lost: tuple[str, ...]
    button: str


def _natural(name: str) -> list:
    """pc2 before pc10."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def _plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def question(ctx, action: str, field) -> Question | None:
    """The question to ask before ``action`` with these form fields (``field(name)`` → text), or
    None when the action loses nothing (a scale up, a start) or cannot be asked about (a bad
    value: the action itself says what is wrong). Raises what the action would raise when the
    user may not do it."""
    a, p = ctx.access, ctx.principal
    if action == "destroy":
        c = a.cluster(p, field("cluster"))
        live = [v for v in c.vms if v.desired != "absent"]
        return Question(
            f"Destroy cluster {c.name} and its {_plural(len(live), 'VM')}?",
            (
                f"VMs {', '.join(v.name for v in live)}: stopped and deleted with their disks."
                if live
                else "No VM is left in it.",
                f"Its network ({c.network}) and its addresses are given back.",
                "This cannot be undone.",
            ),
            f"Destroy {c.name}",
        )
    if action == "scale":
        c = a.cluster(p, field("cluster"))
        existing = [v.name for v in c.vms if v.desired != "absent"]
        try:
            count = int(field("count").strip())
            _, remove = plan_scale(
                ctx.mgr.template(c.template), existing, count, ctx.mgr.limits.max_vms_per_cluster
            )
        except (ValueError, ClientError):  # the action itself says what is wrong
            return None
        if not remove:
            return None
        return Question(
            f"Scale cluster {c.name} down from {len(existing)} to {count} VMs?",
            (
                f"VMs {', '.join(f'{c.name}/{n}' for n in sorted(remove, key=_natural))}: stopped and deleted with their disks.",
                "Their addresses are given back.",
            ),
            f"Scale {c.name} down to {count}",
        )
    if action == "vm" and field("op") == "stop":
        c = a.cluster(p, field("cluster"))
        v = next((v for v in c.vms if v.name == field("vm") and v.desired != "absent"), None)
        if v is None:
            return None
        return Question(
            f"Stop VM {v.name} of cluster {c.name}?",
            (
                f"Its guest on {v.host} stops: whatever runs in it now ends.",
                "Its disk, addresses and host are kept; Start boots it again.",
            ),
            f"Stop {c.name}/{v.name}",
        )
    if action in ("drain", "evacuate"):
        a.require_admin(p, "draining hosts" if action == "drain" else "evacuating hosts")
        host = field("host")
        if host not in {h.id for h in ctx.mgr.hosts()}:
            return None
        vms = sorted(v.id for v in ctx.dom.all(VmRec) if v.host == host and v.desired != "absent")
        names = ", ".join(vms) if vms else "none"
        if action == "drain":
            return Question(
                f"Drain host {host} and move its {_plural(len(vms), 'VM')} away?",
                (
                    f"VMs {names}: moved to other hosts, live where they can be (one that cannot move "
                    "live is stopped and started again there).",
                    f"{host} takes no new VM until the drain is undone.",
                ),
                f"Drain {host}",
            )
        return Question(
            f"Evacuate host {host} and re-place its {_plural(len(vms), 'VM')}?",
            (
                f"VMs {names}: started afresh on live hosts from their base image, same addresses.",
                f"What they wrote to their disks stays on {host} and is lost to them.",
            ),
            f"Evacuate {host}",
        )
    if action == "user/delete":
        a.require_admin(p, "deleting users")
        rec = ctx.dom.get(UserRec, field("name"))
        if rec is None or rec.id == p.name or ctx.dom.select(VClusterRec, "owner", rec.id):
            return None  # the action refuses it, saying why
        return Question(
            f"Delete user {rec.id}?",
            (
                f"The account {rec.id} ({rec.role}) with its password and "
                f"{_plural(len(rec.ssh_key_list()), 'SSH key')}: {rec.id} can no longer log in.",
            ),
            f"Delete {rec.id}",
        )
    if action == "user/key/remove":
        name, fingerprint = field("name"), field("fingerprint")
        key = next((k for k in ctx.access.ssh_keys(p, name) if k.fingerprint == fingerprint), None)
        if key is None:
            return None
        return Question(
            f"Remove SSH key {key.fingerprint} from {name}?",
            (
                f"The {key.kind} key {key.fingerprint}" + (f" ({key.comment})" if key.comment else "") + ".",
                "VMs created from now on no longer accept it (VMs made before keep it).",
            ),
            "Remove key",
        )
    return None


def confirm_view(q: Question, action: str, fields: list[tuple[str, str]], csrf: str, back: str) -> Markup:
    """The confirmation: the question, what is lost, the same form again without ``confirm``
    (every field the first one sent, so options the question does not know of pass through) and
    a Cancel link back to where the user came from."""
    hidden = [el("input", type="hidden", name=k, value=v) for k, v in fields if k not in ("csrf", "confirm")]
    return el(
        "section",
        el("h2", q.title, id="confirm-question"),
        el("ul", *[el("li", line) for line in q.lost], class_="lost"),
        post_form(
            f"/action/{action}",
            csrf,
            *hidden,
            el(
                "div",
                el("button", q.button, type="submit", class_="danger", id="confirm-yes"),
                el("a", "Cancel", href=back, class_="button secondary", id="confirm-cancel"),
                class_="actions",
            ),
            class_="confirm-form",
        ),
        class_="card confirm",
        role="alertdialog",
        aria_labelledby="confirm-question",
    )
