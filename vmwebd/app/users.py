"""Accounts as users ask for them: an admin creates and deletes users and sets quotas; a user
sees their own account, changes their own password and manages their own SSH public keys (an
admin anyone's). Passwords are hashed off the reactor (scrypt is slow on purpose)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger

from vmwebd.accounts import (
    DEFAULT_QUOTA,
    MAX_QUOTA,
    MAX_SSH_KEYS,
    ROLES,
    SSH_KEY_TYPES,
    Principal,
    SshKey,
    check_new_password,
    check_user_name,
    hash_password,
    parse_ssh_key,
    parse_ssh_key_file,
)
from vmwebd.app.checks import require_admin
from vmwebd.dom.persist import DomService
from vmwebd.dom.records import UserRec, VClusterRec, VmRec
from vmwebd.errors import InvalidArgument, NameTaken, NoSuchSshKey, NoSuchUser, NotAuthorized, SshKeyExists

log = Logger()

#: The longest ``ssh-keys`` attribute schema.rng allows.
SSH_KEYS_ATTR_MAX = 65536

#: Runs a blocking function off the reactor: ``run(f, *args)`` fires with ``f(*args)`` (the
#: daemon gives a :class:`vmwebd.blocking.ThreadPoolRunner`).
Runner = Callable[..., "defer.Deferred[Any]"]


@dataclass(frozen=True)
class UserView:
    name: str
    role: str
    quota_vms: int
    used_vms: int
    used_vcpus: int
    used_memory_mib: int
    clusters: int


class UserService:
    """Reads answer from ``domsvc``'s replica; changes are written there. ``run`` hashes
    passwords off the reactor (a thread-pool runner in the daemon)."""

    def __init__(self, domsvc: DomService, run: Runner):
        self.domsvc = domsvc
        self.dom = domsvc.dom
        self._run = run

    def _user_view(self, rec: UserRec) -> UserView:
        own = self.dom.select(VClusterRec, "owner", rec.id)
        vms = [vm for c in own for vm in self.dom.select(VmRec, "cluster", c.id) if vm.desired != "absent"]
        return UserView(
            rec.id,
            rec.role,
            rec.quota_vms,
            len(vms),
            sum(v.vcpus for v in vms),
            sum(v.memory_mib for v in vms),
            len(own),
        )

    def users(self, p: Principal) -> list[UserView]:
        recs = sorted(self.dom.all(UserRec), key=lambda u: u.id)
        return [self._user_view(r) for r in recs if p.is_admin or r.id == p.name]

    def user(self, p: Principal, name: str) -> UserView:
        if not p.is_admin and name != p.name:
            raise NotAuthorized(f"user {p.name!r} may only see their own account")
        rec = self.dom.get(UserRec, name) if isinstance(name, str) else None
        if rec is None:
            raise NoSuchUser(str(name))
        return self._user_view(rec)

    @staticmethod
    def _check_role(role: str | None) -> str:
        role = role or "user"
        if role not in ROLES:
            raise InvalidArgument("role", f"{role!r} is not a role (admin or user)")
        return role

    @staticmethod
    def _check_quota_value(quota: object) -> int:
        quota = DEFAULT_QUOTA if quota is None else quota
        if isinstance(quota, bool) or not isinstance(quota, int) or not 0 <= quota <= MAX_QUOTA:
            raise InvalidArgument("quota", f"{quota!r} is not a number of VMs from 0 to {MAX_QUOTA}")
        return quota

    def _hash(self, password: str) -> defer.Deferred[str]:
        return self._run(hash_password, password)

    @defer.inlineCallbacks
    def create_user(
        self, p: Principal, name: str, password: str, role: str | None = None, quota: int | None = None
    ):
        require_admin(p, "creating users")
        check_user_name(name)
        check_new_password(password)
        role, quota = self._check_role(role), self._check_quota_value(quota)
        if self.dom.get(UserRec, name) is not None:
            raise NameTaken("user", name)
        stored = yield self._hash(password)
        if self.dom.get(UserRec, name) is not None:  # created meanwhile, while scrypt ran
            raise NameTaken("user", name)
        rec = UserRec(id=name, role=role, password_hash=stored, quota_vms=quota)
        yield self.domsvc.put(rec)
        log.info(
            "user {name} ({role}, quota {quota} VMs) created by {by}",
            name=name,
            role=role,
            quota=quota,
            by=p.name,
        )
        return self._user_view(rec)

    @defer.inlineCallbacks
    def delete_user(self, p: Principal, name: str):
        require_admin(p, "deleting users")
        rec = self.dom.get(UserRec, name) if isinstance(name, str) else None
        if rec is None:
            raise NoSuchUser(str(name))
        if name == p.name:
            raise InvalidArgument("name", f"user {name!r} cannot delete their own account")
        owned = sorted(c.id for c in self.dom.select(VClusterRec, "owner", name))
        if owned:
            raise InvalidArgument(
                "name", f"user {name!r} still owns cluster(s) {', '.join(owned)}: destroy them first"
            )
        yield self.domsvc.delete(("user", name))
        log.info("user {name} deleted by {by}", name=name, by=p.name)
        return True

    @defer.inlineCallbacks
    def set_password(self, p: Principal, name: str, password: str):
        if not p.is_admin and name != p.name:
            raise NotAuthorized(f"user {p.name!r} may only change their own password")
        check_new_password(password)
        if (self.dom.get(UserRec, name) if isinstance(name, str) else None) is None:
            raise NoSuchUser(str(name))
        stored = yield self._hash(password)
        rec = self.dom.get(UserRec, name)
        if rec is None:
            raise NoSuchUser(name)
        yield self.domsvc.put(dataclasses.replace(rec, password_hash=stored))
        log.info("password of user {name} changed by {by}", name=name, by=p.name)
        return True

    @defer.inlineCallbacks
    def set_quota(self, p: Principal, name: str, quota: int):
        require_admin(p, "changing quotas")
        quota = self._check_quota_value(quota)
        rec = self.dom.get(UserRec, name) if isinstance(name, str) else None
        if rec is None:
            raise NoSuchUser(str(name))
        rec = dataclasses.replace(rec, quota_vms=quota)
        yield self.domsvc.put(rec)
        return self._user_view(rec)

    # -- SSH keys --------------------------------------------------------------------------
    def _key_owner(self, p: Principal, name: str | None) -> UserRec:
        """The account whose keys ``p`` asks about (their own when ``name`` is empty)."""
        name = name or p.name
        if not p.is_admin and name != p.name:
            raise NotAuthorized(
                f"user {p.name!r} may only see or change their own SSH keys, not those of {name!r}"
            )
        rec = self.dom.get(UserRec, name) if isinstance(name, str) else None
        if rec is None:
            raise NoSuchUser(str(name))
        return rec

    def ssh_keys(self, p: Principal, name: str | None = None) -> list[SshKey]:
        """A user's SSH public keys, in the order added."""
        return [parse_ssh_key(k) for k in self._key_owner(p, name).ssh_key_list()]

    def add_ssh_key(self, p: Principal, name: str | None, key: str) -> defer.Deferred[SshKey]:
        """Adds one OpenSSH public key to a user's account; fires with the :class:`SshKey`."""
        return self._add_ssh_keys(p, name, [parse_ssh_key(key)]).addCallback(lambda ks: ks[0])

    def add_ssh_key_file(self, p: Principal, name: str | None, text: str) -> defer.Deferred[list[SshKey]]:
        """Adds every key of an OpenSSH public key file's text (one per line), all or none;
        fires with the list of :class:`SshKey` added."""
        if not isinstance(text, str):
            raise InvalidArgument("key", "an SSH public key is required")
        return self._add_ssh_keys(p, name, parse_ssh_key_file(text))

    def _add_ssh_keys(
        self, p: Principal, name: str | None, new: list[SshKey]
    ) -> defer.Deferred[list[SshKey]]:
        rec = self._key_owner(p, name)
        have = [parse_ssh_key(k) for k in rec.ssh_key_list()]
        blobs = {k.blob for k in have}
        for k in new:
            if k.blob in blobs:
                raise SshKeyExists(rec.id, k.fingerprint)
            blobs.add(k.blob)
        if len(have) + len(new) > MAX_SSH_KEYS:
            raise InvalidArgument(
                "key",
                f"user {rec.id!r} has {len(have)} SSH keys and may have "
                f"at most {MAX_SSH_KEYS}; remove some first",
            )
        encoded = UserRec.encode_ssh_keys([k.line for k in have + new])
        if len(encoded) > SSH_KEYS_ATTR_MAX:
            raise InvalidArgument(
                "key",
                f"user {rec.id!r}'s SSH keys would take more than "
                f"{SSH_KEYS_ATTR_MAX} bytes; remove one first",
            )
        # Read, change and write in one reactor turn: two requests at this host cannot lose
        # each other's key (two hosts changing one account at once: the later write wins).
        d = self.domsvc.put(dataclasses.replace(rec, ssh_keys=encoded))
        log.info(
            "SSH key(s) {fps} added to user {name} by {by}",
            fps=" ".join(k.fingerprint for k in new),
            name=rec.id,
            by=p.name,
        )
        return d.addCallback(lambda _: new)

    def remove_ssh_key(
        self, p: Principal, name: str | None, key_or_fingerprint: str
    ) -> defer.Deferred[SshKey]:
        """Removes the key given by its fingerprint (``SHA256:…``), its line or its base64 blob;
        fires with the :class:`SshKey` removed."""
        rec = self._key_owner(p, name)
        if not isinstance(key_or_fingerprint, str) or not key_or_fingerprint.strip():
            raise InvalidArgument("key_or_fingerprint", "give the key or its fingerprint (SHA256:...)")
        want = key_or_fingerprint.strip()
        parts = want.split()
        blob = parts[1] if len(parts) >= 2 and parts[0] in SSH_KEY_TYPES else parts[0]
        have = [parse_ssh_key(k) for k in rec.ssh_key_list()]
        gone = [k for k in have if want == k.fingerprint or blob == k.blob]
        if not gone:
            raise NoSuchSshKey(rec.id, want)
        keep = [k.line for k in have if k not in gone]
        d = self.domsvc.put(dataclasses.replace(rec, ssh_keys=UserRec.encode_ssh_keys(keep)))
        log.info(
            "SSH key {fp} removed from user {name} by {by}", fp=gone[0].fingerprint, name=rec.id, by=p.name
        )
        return d.addCallback(lambda _: gone[0])
