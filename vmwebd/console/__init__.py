"""A VM's serial console from any host: the ring, the per-VM hub on the VM's host, the relay.

- :mod:`.ring`: the last 64 KiB a VM's console printed, kept on the VM's host.
- :mod:`.hub`: :class:`ConsoleService` on every host: one open console stream per VM while
  someone watches it (read and written on threads of its own, never on the reactor), fanned out
  to every viewer; a viewer at another host is relayed over the peers' mutual TLS.
- :mod:`.wire`: the WebSocket end points: ``/console/CLUSTER/VM`` on the user API (a session
  cookie or HTTP Basic, the VM's owner or an admin) and on the peer endpoint (grid hosts only).
- :mod:`.pty`: a program under a pseudo-terminal behind the same stream interface as the
  hypervisor's console (a real local source for the tiers without a real guest).

docs/console.md says how it fits together.
"""
