"""The nftables rules a host needs for its segments: NAT out of ``nat`` clusters, and isolation.

:func:`ruleset` is a pure function of a :class:`~vmwebd.net.plan.HostPlan`; it returns one
``nft -f`` script that replaces vmweb's own two tables, ``table inet vmweb`` and
``table bridge vmweb``, and nothing else of the host's ruleset. The script first *adds* each table
(a no-op when it exists), then deletes it, then defines it again, all in one transaction: it works
whether or not the tables exist, and the kernel never shows a half-replaced ruleset. A plan without
segments yields a script that only removes them.

What the rules say (every per-cluster rule carries ``comment "cluster NAME"``):

``inet vmweb``, chain ``forward``
    frames that stay within one bridge pass (with ``br_netfilter`` loaded, bridged traffic shows up
    in this hook with the bridge as both input and output device); a ``nat`` segment's own
    addresses go out to anything that is not a vmweb bridge, and what comes back for them passes
    when conntrack says it answers such traffic; anything else from or to a ``vmbr*`` device is
    dropped: guests of two clusters never reach each other, even on one host, and nothing outside
    opens a connection to a guest.
``inet vmweb``, chain ``input``
    from a vmweb bridge the host accepts replies to its own traffic and ICMP echo requests to the
    segment's gateway; everything else guests send to the host itself is dropped (the host's
    services are not theirs to reach).
``inet vmweb``, chain ``postrouting``
    a ``nat`` segment's traffic leaving it is masqueraded to the host's address.
``bridge vmweb``
    ARP for or from a ``nat`` segment's gateway address never crosses the VXLAN device: every host
    answers the gateway for its own guests (with the same MAC), so no host answers another's.

Both tables carry ``comment "vmweb <digest>"``, the digest of the script: :class:`NftRules`
compares the kernel's with the wanted one and loads the script only when they differ, so an apply
that changes nothing writes nothing.

Other tables (a host's own firewall) still see the same packets: an ``accept`` here does not
override a ``drop`` elsewhere.
"""

from __future__ import annotations

import hashlib
import re
import subprocess

from vmwebd.errors import ServerError
from vmwebd.net.plan import BRIDGE_PREFIX, HostPlan, Segment

TABLE = "vmweb"
FAMILIES = ("inet", "bridge")
#: Seconds one ``nft`` command may take before it is reported as failed.
DEFAULT_TIMEOUT = 20.0

_COMMENT_RE = re.compile(r'^\s*comment "vmweb ([0-9a-f]+)"', re.M)
_UNSAFE = re.compile(r"[^A-Za-z0-9._:/ -]")


class RulesError(ServerError):
    """nftables refused or could not load vmweb's rules; the message says what nft answered."""

    faultcode = "Server.Network.Rules"


def _comment(text: str) -> str:
    # nft comments are quoted strings of at most 128 bytes; cluster names are tame, but a quote or
    # a newline here would break the whole script, so anything unusual is replaced.
    return '"' + _UNSAFE.sub("?", text)[:120] + '"'


def _cluster(seg: Segment) -> str:
    return _comment(f"cluster {seg.cluster}")


def _body(plan: HostPlan) -> list[str]:
    """The rule lines of both tables (without the digest comment)."""
    any_br = f'"{BRIDGE_PREFIX}*"'
    fwd, inp, post, bfwd, bout = [], [], [], [], []
    for seg in sorted(plan.segments):
        c, br = _cluster(seg), f'"{seg.bridge}"'
        fwd.append(f"iifname {br} oifname {br} accept comment {c}")
        if not seg.routed:
            continue
        net, gw, vx = seg.subnet, seg.gateway, f'"{seg.vxlan}"'
        fwd.append(f"iifname {br} ip saddr {net} oifname != {any_br} accept comment {c}")
        fwd.append(f"oifname {br} ip daddr {net} ct state established,related accept comment {c}")
        inp.append(f"iifname {br} ip daddr {gw} icmp type echo-request accept comment {c}")
        post.append(f"ip saddr {net} ip daddr != {net} oifname != {any_br} masquerade comment {c}")
        bfwd.append(f"oifname {vx} arp daddr ip {gw} drop comment {c}")
        bfwd.append(f"iifname {vx} arp saddr ip {gw} drop comment {c}")
        bout.append(f"oifname {vx} arp saddr ip {gw} drop comment {c}")
        bout.append(f"oifname {vx} arp daddr ip {gw} drop comment {c}")
    fwd.append(f"iifname {any_br} drop comment {_comment('vmweb: guests reach no other segment')}")
    fwd.append(f"oifname {any_br} drop comment {_comment('vmweb: nothing opens a way into a segment')}")
    inp.insert(
        0,
        f"iifname {any_br} ct state established,related accept "
        f"comment {_comment('vmweb: replies to the host')}",
    )
    inp.append(f"iifname {any_br} drop comment {_comment('vmweb: guests do not reach the host')}")

    def chain(
        name: str, hook: str, rules: list[str], kind: str = "filter", prio: str = "filter"
    ) -> list[str]:
        return (
            [f"\tchain {name} {{", f"\t\ttype {kind} hook {hook} priority {prio}; policy accept;"]
            + [f"\t\t{r}" for r in rules]
            + ["\t}"]
        )

    inet = (
        chain("forward", "forward", fwd)
        + chain("input", "input", inp)
        + (chain("postrouting", "postrouting", post, "nat", "srcnat") if post else [])
    )
    bridge = chain("forward", "forward", bfwd) + chain("output", "output", bout) if bfwd else []
    return ["@inet"] + inet + ["@bridge"] + bridge


def digest(plan: HostPlan) -> str:
    """The digest the tables made for ``plan`` carry (empty when the plan needs no tables)."""
    if not plan.segments:
        return ""
    return hashlib.sha256("\n".join(_body(plan)).encode()).hexdigest()[:16]


def ruleset(plan: HostPlan) -> str:
    """The ``nft -f`` script that makes vmweb's tables what ``plan`` needs (see the module)."""
    lines = [f"# vmweb rules for host {_UNSAFE.sub('?', plan.host)}; generated, replaced as a whole"]
    for fam in FAMILIES:
        lines += [f"table {fam} {TABLE}", f"delete table {fam} {TABLE}"]
    if plan.segments:
        body, dg = _body(plan), digest(plan)
        split = body.index("@bridge")
        for fam, rules in (("inet", body[1:split]), ("bridge", body[split + 1 :])):
            lines += [f"table {fam} {TABLE} {{", f'\tcomment "vmweb {dg}"'] + rules + ["}"]
    return "\n".join(lines) + "\n"


class NftRules:
    """Loads :func:`ruleset` into the kernel with the ``nft`` command (blocking: call it from a
    thread).

    With ``netns`` the commands run in that named network namespace through
    ``ip netns exec NAME nft ...`` (``ip`` enters the namespace before ``nft`` starts, so this
    process never changes namespace); without, in the caller's.
    """

    def __init__(self, netns: str | None = None, nft: str = "nft", timeout: float = DEFAULT_TIMEOUT):
        self.netns = netns
        self.nft = nft
        self.timeout = timeout

    def _argv(self, *args: str) -> list[str]:
        pre = ["ip", "netns", "exec", self.netns] if self.netns else []
        return pre + [self.nft, *args]

    def _run(self, args: list[str], stdin: str = "") -> subprocess.CompletedProcess:
        where = f" in network namespace {self.netns}" if self.netns else ""
        try:
            return subprocess.run(
                self._argv(*args),
                input=stdin,
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
            )
        except FileNotFoundError as e:
            raise RulesError(f"cannot run {e.filename}{where}: not installed") from None
        except subprocess.TimeoutExpired:
            raise RulesError(f"nft {' '.join(args)}{where} took more than {self.timeout:g} s") from None

    def loaded_digests(self) -> tuple[str | None, str | None]:
        """The digests the kernel's ``inet`` and ``bridge`` vmweb tables carry (None for a table
        that is absent, "" for one that carries none)."""
        out = []
        for fam in FAMILIES:
            res = self._run(["list", "table", fam, TABLE])
            m = _COMMENT_RE.search(res.stdout)
            out.append(None if res.returncode != 0 else m.group(1) if m else "")
        return out[0], out[1]

    def apply(self, plan: HostPlan) -> bool:
        """Make vmweb's tables what ``plan`` needs; True when something was loaded. Raises
        :class:`RulesError` with nft's message when the script is refused."""
        want = digest(plan) or None
        if self.loaded_digests() == (want, want):
            return False
        self.load(ruleset(plan))
        return True

    def load(self, script: str) -> None:
        """Run ``script`` as one ``nft -f -`` transaction."""
        res = self._run(["-f", "-"], script)
        if res.returncode != 0:
            where = f" in network namespace {self.netns}" if self.netns else ""
            msg = (res.stderr or res.stdout).strip().splitlines()
            raise RulesError(
                f"nft refused vmweb's rules{where}: {' / '.join(msg[:6]) or f'exit status {res.returncode}'}"
            )
