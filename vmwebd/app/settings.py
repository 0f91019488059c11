"""The grid's own state as users ask for it: system settings and base images (admins change
them), the DOM as a caller may see it, and the audit trail (an admin reads anyone's records, a
user their own)."""

from __future__ import annotations

import copy
from typing import Any, Callable, Protocol

from lxml import etree
from twisted.internet import defer

from vmwebd.accounts import Principal
from vmwebd.app.checks import require_admin
from vmwebd.audit import AuditLog, check_query
from vmwebd.dom.persist import DomService
from vmwebd.dom.records import NS, AuditRec, ImageRec, SettingRec, VClusterRec
from vmwebd.errors import NotAuthorized
from vmwebd.settings import checked_setting


class ImageCatalog(Protocol):
    """Where base images are registered (:class:`vmwebd.hv.images.ImageStore`)."""

    def add(
        self, name: str, path: str, fmt: str = "qcow2", kernel: str = "", initrd: str = "", cmdline: str = ""
    ) -> defer.Deferred[ImageRec]: ...


class SettingsService:
    """Reads answer from ``domsvc``'s replica; settings are written there, images through
    ``images``; ``audit`` answers audit queries, ``now_ms`` is the clock a query's ``since``
    counts back from."""

    def __init__(self, domsvc: DomService, images: ImageCatalog, audit: AuditLog, now_ms: Callable[[], int]):
        self.domsvc = domsvc
        self.dom = domsvc.dom
        self.images = images
        self.audit = audit
        self.now_ms = now_ms

    def set_setting(self, p: Principal, key: str, value: str | None) -> defer.Deferred[SettingRec]:
        require_admin(p, "changing system settings")
        rec = checked_setting(key, value if value is not None else "")
        return self.domsvc.put(rec).addCallback(lambda _: rec)

    def add_image(
        self,
        p: Principal,
        name: str,
        path: str,
        fmt: str | None,
        kernel: str | None,
        initrd: str | None,
        cmdline: str | None,
    ) -> defer.Deferred[ImageRec]:
        require_admin(p, "adding base images")
        return self.images.add(name, path, fmt or "qcow2", kernel or "", initrd or "", cmdline or "")

    def dom_xml(self, p: Principal, pretty: bool = True) -> bytes:
        """The DOM as this principal may see it: never a password hash; a non-admin sees the
        grid (hosts, images, templates, settings), their own account, clusters, VMs and
        migrations, and no leases nor audit records (they name other users' clusters)."""
        root = copy.deepcopy(self.dom.root)
        q = "{%s}" % NS
        for user in root.iter(q + "user"):
            user.attrib.pop("password-hash", None)
        if not p.is_admin:
            mine = {c.id for c in self.dom.select(VClusterRec, "owner", p.name)}

            def keep(el: Any) -> bool:
                kind, id_ = etree.QName(el).localname, el.get("id")
                if kind == "user":
                    return id_ == p.name
                if kind == "vcluster":
                    return id_ in mine
                if kind == "vm":
                    return id_.partition("/")[0] in mine
                if kind == "migration":
                    return str(el.get("vm", "")).partition("/")[0] in mine
                # Audit records name what their user typed, other users' clusters included (a
                # refused attempt): ListAudit gives a user their own; the DOM view none.
                return kind not in ("lease", "audit")

            for container in root:
                for el in list(container):
                    if not keep(el):
                        container.remove(el)
        return etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=pretty)

    def list_audit(
        self, p: Principal, user: str | None = None, since: str | None = None, limit: int | None = None
    ) -> list[AuditRec]:
        """Audit records newest first: anyone's for an admin (``user`` to choose one), a user's
        own only; ``since`` an ISO 8601 time or a span back from now (``2d``), ``limit`` at most
        :data:`vmwebd.audit.LIST_MAX` (default :data:`vmwebd.audit.LIST_DEFAULT`)."""
        user = user or None
        if not p.is_admin:
            if user is not None and user != p.name:
                raise NotAuthorized(
                    f"user {p.name!r} may only read their own audit records, not those of {user!r}"
                )
            user = p.name
        since_ms, limit = check_query(since, limit, self.now_ms())
        return self.audit.query(user, since_ms, limit)
