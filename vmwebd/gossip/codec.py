"""Peer envelopes as XML (namespace ``urn:vmweb:peer:1``), carried inside SOAP by the peer endpoint.

```
<env xmlns="urn:vmweb:peer:1" v="1" src="h1" src-addr="10.0.0.1:8570" dst="h2">
  <ping seq="7" target="h2"/>                      one message element, named after its kind
  <member node="h3" addr="…" inc="2" status="suspect" by="h1"/>   piggybacked membership rumors
  <rumors><vm xmlns="urn:vmweb:dom:1" …/></rumors>        piggybacked DOM entity states
</env>
```
Decoding is strict: unknown kinds, missing or malformed attributes raise
:class:`~vmwebd.errors.MalformedRequest` naming the field.
"""

from __future__ import annotations

import copy

from lxml import etree
from twisted.logger import Logger

from vmwebd.dom.document import SUMMARY_HEX
from vmwebd.dom.hlc import Version
from vmwebd.errors import MalformedRequest
from vmwebd.gossip.messages import (
    NAMES,
    Ack,
    Bundle,
    Envelope,
    Gossip,
    MemberState,
    Ping,
    PingReq,
    ProbeNack,
    Sync,
    SyncDelta,
    SyncReply,
)
from vmwebd.ids import is_host_id

NS = "urn:vmweb:peer:1"
_Q = "{%s}" % NS
_BY_NAME = {name: kind for kind, name in NAMES.items()}
_STATUSES = {"alive", "suspect", "dead", "left"}


def _stamp(s: tuple[int, int]) -> str:
    return f"{s[0]}.{s[1]}"


def _parse_stamp(text: str, field: str) -> tuple[int, int]:
    try:
        a, b = text.split(".")
        return (int(a), int(b))
    except (ValueError, AttributeError):
        raise MalformedRequest(f"peer envelope: {field}: {text!r} is not a stamp WALLMS.COUNTER") from None


def _vv(parent, tag: str, vv: dict):
    for origin in sorted(vv):
        etree.SubElement(parent, _Q + tag, origin=origin, stamp=_stamp(vv[origin]))


def _held(parent, held: dict):
    for origin in sorted(held):
        box = etree.SubElement(parent, _Q + "held", origin=origin)
        for stamp, digest in held[origin]:
            etree.SubElement(box, _Q + "at", stamp=_stamp(stamp), h=digest)


def _members(parent, members):
    for m in members:
        el = etree.SubElement(
            parent, _Q + "member", node=m.node, addr=m.addr, inc=str(m.incarnation), status=m.status
        )
        if m.by:  # optional: older peers neither send nor read it
            el.set("by", m.by)


def _entities(parent, tag: str, entities):
    if entities:
        box = etree.SubElement(parent, _Q + tag)
        for e in entities:
            box.append(copy.deepcopy(e))


def encode(env: Envelope) -> etree._Element:
    root = etree.Element(_Q + "env", nsmap={None: NS})
    root.set("v", str(env.version))
    root.set("src", env.src)
    root.set("src-addr", env.src_addr)
    if env.dst is not None:
        root.set("dst", env.dst)
    msg = env.msg
    el = etree.SubElement(root, _Q + NAMES[type(msg)])
    if isinstance(msg, (Ping, Ack, ProbeNack)):
        el.set("seq", str(msg.seq))
        el.set("target", msg.target)
    elif isinstance(msg, PingReq):
        el.set("seq", str(msg.seq))
        el.set("target", msg.target)
        el.set("target-addr", msg.target_addr)
        if msg.nack:
            el.set("nack", "1")
    elif isinstance(msg, Sync):
        _vv(el, "cvv", msg.cvv)
        _members(el, msg.members)
        _held(el, msg.held)
    elif isinstance(msg, SyncReply):
        _vv(el, "cvv", msg.cvv)
        _vv(el, "claim", msg.claims)
        _members(el, msg.members)
        _entities(el, "entities", msg.entities)
        _held(el, msg.held)
    elif isinstance(msg, SyncDelta):
        _vv(el, "claim", msg.claims)
        _entities(el, "entities", msg.entities)
    elif type(msg).__module__ == "vmwebd.lease.paxos":
        _encode_paxos(el, msg)
    elif isinstance(msg, Bundle):
        for m in msg.msgs:
            if type(m).__module__ != "vmwebd.lease.paxos":
                raise ValueError(f"a bundle carries consensus messages only, not {type(m).__name__}")
            _encode_paxos(etree.SubElement(el, _Q + NAMES[type(m)]), m)
    _members(root, env.members)
    _entities(root, "rumors", env.entities)
    return root


def _encode_paxos(el, msg) -> None:
    from vmwebd.lease import paxos

    if isinstance(msg, paxos.Forward):
        el.set("op", msg.op)
        for k, (expected, new) in sorted(msg.cas.items(), key=lambda kv: kv[0]):
            c = etree.SubElement(el, _Q + "cas", k=k)
            if isinstance(expected, paxos.Update):
                u = etree.SubElement(c, _Q + "update", kind=expected.KIND)
                for name, value in expected.to_attrs().items():
                    u.set(name, value)
                continue
            if expected is not None:
                c.set("expected", expected)
            if new is not None:
                c.set("new", new)
        return
    if isinstance(msg, paxos.Outcome):
        el.set("op", msg.op)
        r = msg.result
        if isinstance(r, paxos.Decided):
            el.set("result", "decided")
            if r.ballot is not None:
                el.set("ballot", str(r.ballot))
            # The requester reads which keys were decided; large values stay here (see paxos._Said).
            for k, v in sorted(r.values.items()):
                e = etree.SubElement(el, _Q + "value", k=k)
                if v is paxos.ELIDED or (v is not None and len(v) >= paxos.BIG_VALUE):
                    e.set("elided", "1")
                elif v is not None:
                    e.set("holder", v)
        elif isinstance(r, paxos.Conflict):
            el.set("result", "conflict")
            el.set("key", r.key)
            if r.holder is not None:
                el.set("holder", r.holder)
            _values(el, "seen", r.seen)
        else:
            el.set("result", "noquorum")
            for name in ("reachable", "needed", "members"):
                el.set(name, str(getattr(r, name)))
        return
    if hasattr(msg, "op"):
        el.set("op", msg.op)
    el.set("ballot", str(msg.ballot))
    if isinstance(msg, paxos.Prepare):
        if msg.end is not None:
            el.set("end", str(msg.end))
            el.set("digest", " ".join(f"{d:x}" for d in msg.digest))
            if msg.keep is not None:
                el.set("keep", str(msg.keep))
        for k in msg.keys:
            e = etree.SubElement(el, _Q + "key", k=k)
            if k in msg.known:
                e.set("known", str(msg.known[k]))
    elif isinstance(msg, paxos.Promise):
        if msg.whole:
            el.set("whole", "1")
        for k, (ab, av, cb, cv) in sorted(msg.entries.items()):
            e = etree.SubElement(el, _Q + "entry", k=k)
            if ab is not None:
                e.set("acc-ballot", str(ab))
                # The value accepted and committed at one ballot travels once (a capacity set
                # can be large): the reader takes the committed value for both.
                if av is not None and not (ab == cb and av == cv):
                    e.set("acc-holder", av)
            if cb is not None:
                e.set("com-ballot", str(cb))
                if cv is paxos.KNOWN:
                    e.set("com-known", "1")
                elif cv is not None:
                    e.set("com-holder", cv)
    elif isinstance(msg, (paxos.Accept, paxos.Commit)):
        for k, v in sorted(msg.values.items()):
            e = etree.SubElement(el, _Q + "value", k=k)
            if v is paxos.ACCEPTED:
                e.set("accepted", "1")
            elif v is not None:
                e.set("holder", v)
        if isinstance(msg, paxos.Accept):
            for k in msg.reads:
                etree.SubElement(el, _Q + "read", k=k)
    elif isinstance(msg, paxos.Nack):
        el.set("promised", str(msg.promised))
    elif isinstance(msg, paxos.Accepted) and msg.refs:
        el.set("refs", "1")


def _ballot(el, name: str, what: str, optional: bool = False):
    v = el.get(name)
    if v is None:
        if optional:
            return None
        raise MalformedRequest(f"peer envelope: {what}/@{name} is missing")
    try:
        return Version.parse(v)
    except ValueError as e:
        raise MalformedRequest(f"peer envelope: {what}/@{name}: {e}") from None


def _values(el, tag: str, values: dict) -> None:
    for k, v in sorted(values.items()):
        e = etree.SubElement(el, _Q + tag, k=k)
        if v is not None:
            e.set("holder", v)


def _read_values(el, tag: str) -> dict:
    return {_attr(c, "k", tag): c.get("holder") for c in _children(el, tag)}


def _decode_forwarded(kind, el):
    from vmwebd.lease import capacity, paxos  # noqa: F401  (capacity registers its updates)

    name = NAMES[kind]
    op = _attr(el, "op", name)
    if kind is paxos.Forward:
        cas = {}
        for c in _children(el, "cas"):
            k = _attr(c, "k", "cas")
            ups = _children(c, "update")
            if ups:
                cls = paxos.UPDATES.get(ups[0].get("kind", ""))
                if cls is None:
                    raise MalformedRequest(
                        f"peer envelope: cas {k}: unknown update kind {ups[0].get('kind')!r}"
                    )
                try:
                    cas[k] = (cls.from_attrs(ups[0].attrib), None)
                except (ValueError, TypeError) as e:
                    raise MalformedRequest(f"peer envelope: cas {k}: bad update ({e})") from None
            else:
                cas[k] = (c.get("expected"), c.get("new"))
        return paxos.Forward(op, cas)
    result = el.get("result")
    if result == "decided":
        values = {
            _attr(c, "k", "value"): paxos.ELIDED if c.get("elided") == "1" else c.get("holder")
            for c in _children(el, "value")
        }
        return paxos.Outcome(op, paxos.Decided(op, _ballot(el, "ballot", name, True), values))
    if result == "conflict":
        return paxos.Outcome(
            op, paxos.Conflict(op, _attr(el, "key", name), el.get("holder"), _read_values(el, "seen"))
        )
    if result == "noquorum":
        return paxos.Outcome(
            op,
            paxos.NoQuorum(
                op, _int(el, "reachable", name), _int(el, "needed", name), _int(el, "members", name)
            ),
        )
    raise MalformedRequest(f"peer envelope: {name}/@result: {result!r}")


def _decode_paxos(kind, el):
    from vmwebd.lease import paxos

    if kind in (paxos.Forward, paxos.Outcome):
        return _decode_forwarded(kind, el)
    name = NAMES[kind]
    ballot = _ballot(el, "ballot", name)
    if kind is paxos.Prepare:
        keys = _children(el, "key")
        known = {_attr(c, "k", "key"): _ballot(c, "known", "key") for c in keys if c.get("known")}
        end = _ballot(el, "end", name, True)
        digest: tuple[int, ...] = ()
        if end is not None:
            try:
                digest = tuple(int(d, 16) for d in (el.get("digest") or "").split())
            except ValueError:
                raise MalformedRequest(f"peer envelope: {name}/@digest is not hexadecimal numbers") from None
        return paxos.Prepare(
            _attr(el, "op", name),
            ballot,
            tuple(_attr(c, "k", "key") for c in keys),
            known,
            end=end,
            digest=digest,
            keep=_ballot(el, "keep", name, True) if end is not None else None,
        )
    if kind is paxos.Promise:
        entries = {}
        for c in _children(el, "entry"):
            ab, cb = _ballot(c, "acc-ballot", "entry", True), _ballot(c, "com-ballot", "entry", True)
            av, cv = c.get("acc-holder"), c.get("com-holder")
            if c.get("com-known") == "1":
                if cb is None:
                    raise MalformedRequest("peer envelope: entry/@com-known without @com-ballot")
                cv = paxos.KNOWN
            if av is None and ab is not None and ab == cb:
                av = cv
            entries[_attr(c, "k", "entry")] = (ab, av, cb, cv)
        return paxos.Promise(_attr(el, "op", name), ballot, entries, whole=el.get("whole") == "1")
    if kind in (paxos.Accept, paxos.Commit):
        if kind is paxos.Accept:
            reads = tuple(_attr(c, "k", "read") for c in _children(el, "read"))
            return paxos.Accept(_attr(el, "op", name), ballot, _read_values(el, "value"), reads)
        values = {
            _attr(c, "k", "value"): paxos.ACCEPTED if c.get("accepted") == "1" else c.get("holder")
            for c in _children(el, "value")
        }
        return paxos.Commit(ballot, values)
    if kind is paxos.Accepted:
        return paxos.Accepted(_attr(el, "op", name), ballot, refs=el.get("refs") == "1")
    return paxos.Nack(_attr(el, "op", name), ballot, _ballot(el, "promised", name))


def _attr(el, name: str, what: str) -> str:
    v = el.get(name)
    if v is None:
        raise MalformedRequest(f"peer envelope: {what}/@{name} is missing")
    return v


def _int(el, name: str, what: str) -> int:
    v = _attr(el, name, what)
    try:
        return int(v)
    except ValueError:
        raise MalformedRequest(f"peer envelope: {what}/@{name}: {v!r} is not an integer") from None


def _children(el, tag):
    return [c for c in el if c.tag == _Q + tag]


def _read_vv(el, tag) -> dict:
    return {
        _attr(c, "origin", tag): _parse_stamp(_attr(c, "stamp", tag), f"{tag}/@stamp")
        for c in _children(el, tag)
    }


#: At most this many ``held`` summaries (origins) in an envelope, and checkpoints in each.
MAX_HELD_ORIGINS, MAX_HELD_POINTS = 4096, 64
_HEX = frozenset("0123456789abcdef")


def _read_held(el) -> dict:
    """A Sync's or SyncReply's summary of what its sender holds above its complete vector
    (optional: older peers send none)."""
    boxes = _children(el, "held")
    if len(boxes) > MAX_HELD_ORIGINS:
        raise MalformedRequest(f"peer envelope: more than {MAX_HELD_ORIGINS} held summaries")
    out = {}
    for box in boxes:
        origin = _attr(box, "origin", "held")
        points = _children(box, "at")
        if len(points) > MAX_HELD_POINTS:
            raise MalformedRequest(f"peer envelope: held {origin!r}: more than {MAX_HELD_POINTS} checkpoints")
        read = []
        for c in points:
            digest = _attr(c, "h", "held/at")
            if len(digest) != SUMMARY_HEX or not set(digest) <= _HEX:
                raise MalformedRequest(
                    f"peer envelope: held/at/@h: {digest[:40]!r} is not {SUMMARY_HEX} lower-case hex digits"
                )
            read.append((_parse_stamp(_attr(c, "stamp", "held/at"), "held/at/@stamp"), digest))
        if read != sorted(read):
            raise MalformedRequest(f"peer envelope: held {origin!r}: checkpoints out of stamp order")
        out[origin] = read
    return out


def _read_members(el) -> tuple:
    out = []
    for c in _children(el, "member"):
        node = _attr(c, "node", "member")
        status = _attr(c, "status", "member")
        if not is_host_id(node):
            raise MalformedRequest(f"peer envelope: member/@node: {node!r} is not a host id")
        if status not in _STATUSES:
            raise MalformedRequest(f"peer envelope: member/@status: {status!r} is not a member status")
        by = c.get("by", "")
        if by and not is_host_id(by):
            raise MalformedRequest(f"peer envelope: member/@by: {by!r} is not a host id")
        out.append(MemberState(node, _attr(c, "addr", "member"), _int(c, "inc", "member"), status, by))
    return tuple(out)


def _read_entities(el, tag) -> tuple:
    out = []
    for box in _children(el, tag):
        out.extend(c for c in box if isinstance(c.tag, str))
    return tuple(out)


def decode(root: etree._Element) -> Envelope:
    if root.tag != _Q + "env":
        raise MalformedRequest(f"peer envelope: expected {{{NS}}}env, got {root.tag}")
    version = _int(root, "v", "env")
    src = _attr(root, "src", "env")
    if not is_host_id(src):
        raise MalformedRequest(f"peer envelope: env/@src: {src!r} is not a host id")
    kinds = [
        c
        for c in root
        if isinstance(c.tag, str) and c.tag.startswith(_Q) and etree.QName(c).localname in _BY_NAME
    ]
    if len(kinds) != 1:
        raise MalformedRequest(f"peer envelope from {src}: expected one message, found {len(kinds)}")
    el = kinds[0]
    kind = _BY_NAME[etree.QName(el).localname]
    if kind in (Ping, Ack, ProbeNack):
        msg = kind(_int(el, "seq", NAMES[kind]), _attr(el, "target", NAMES[kind]))
    elif kind is PingReq:
        msg = PingReq(
            _int(el, "seq", "ping-req"),
            _attr(el, "target", "ping-req"),
            _attr(el, "target-addr", "ping-req"),
            el.get("nack") == "1",
        )
    elif kind is Gossip:
        msg = Gossip()
    elif kind is Sync:
        msg = Sync(_read_vv(el, "cvv"), _read_members(el), _read_held(el))
    elif getattr(kind, "__module__", "") == "vmwebd.lease.paxos":
        msg = _decode_paxos(kind, el)
    elif kind is Bundle:
        msgs = []
        for c in el:
            if not isinstance(c.tag, str):
                continue
            inner = _BY_NAME.get(etree.QName(c).localname) if c.tag.startswith(_Q) else None
            if getattr(inner, "__module__", "") != "vmwebd.lease.paxos":
                raise MalformedRequest(
                    f"peer envelope from {src}: bundle/{etree.QName(c).localname} is not a consensus message"
                )
            msgs.append(_decode_paxos(inner, c))
        if not msgs:
            raise MalformedRequest(f"peer envelope from {src}: bundle is empty")
        msg = Bundle(tuple(msgs))
    elif kind is SyncReply:
        msg = SyncReply(
            _read_entities(el, "entities"),
            _read_vv(el, "claim"),
            _read_vv(el, "cvv"),
            _read_members(el),
            _read_held(el),
        )
    elif kind is SyncDelta:
        msg = SyncDelta(_read_entities(el, "entities"), _read_vv(el, "claim"))
    return Envelope(
        src,
        _attr(root, "src-addr", "env"),
        root.get("dst"),
        msg,
        _read_members(root),
        _read_entities(root, "rumors"),
        version,
    )


_log = Logger()


def answers_from(dst: str, elements):
    """Envelopes a peer answered with inline (in a Deliver response), decoded, and only those from
    ``dst``: the host the request went to, whose certificate the TLS connection checked. An
    unreadable one is a lost message; one claiming another sender is dropped with a warning."""
    for el in elements:
        try:
            env = decode(el)
        except Exception as e:  # noqa: BLE001 (a malformed answer is a lost message)
            _log.debug("unreadable answer from {dst}: {err}", dst=dst, err=e)
            continue
        if env.src != dst:
            _log.warn("an answer from host {dst} claims to come from {src}; dropped", dst=dst, src=env.src)
            continue
        yield env
