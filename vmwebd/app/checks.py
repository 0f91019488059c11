"""The two permission rules every part of the application shares: admins only, and a cluster's
owner (or an admin)."""

from __future__ import annotations

from vmwebd.accounts import Principal
from vmwebd.dom.document import Dom
from vmwebd.dom.records import VClusterRec
from vmwebd.errors import NoSuchCluster, NotAuthorized


def require_admin(p: Principal, what: str) -> None:
    """NotAuthorized naming ``what`` unless ``p`` is an admin."""
    if not p.is_admin:
        raise NotAuthorized(f"{what} is for admins; user {p.name!r} is not one")


def owned_cluster(dom: Dom, p: Principal, name: object) -> VClusterRec:
    """The cluster ``name`` if ``p`` may see and change it (its owner, or an admin):
    NoSuchCluster if there is none, NotAuthorized naming it if it is another user's."""
    c = dom.get(VClusterRec, name) if isinstance(name, str) else None
    if c is None:
        raise NoSuchCluster(str(name))
    if not p.is_admin and c.owner != p.name:
        raise NotAuthorized(
            f"user {p.name!r} may not see or change cluster {name!r}: it belongs to another user"
        )
    return c
