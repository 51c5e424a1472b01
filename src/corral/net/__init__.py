"""The network side of a box, run on the host (network mode ``allowlist``).

* ``_rules``: allow/deny rules, host canonicalization, the SSRF guard (pure).
* ``_proxy``: the per-box proxy (HTTP CONNECT, plain HTTP, SOCKS5, transparent
  connections), its decisions recorded as ``NetworkEvent``.
* ``_dns``: the per-box DNS responder: allowed names -> stand-in addresses.

What happens inside the box's network namespace (listeners, routes, nftables)
is Linux's and lives with the Linux backends (``backends/linux/_netns.py``).
Nothing is imported here, so importing one module does not load the rest.
"""
