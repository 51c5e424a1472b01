"""The network side of a box, run on the host (network mode ``allowlist``).

* ``_events``: ``NetworkEvent`` (one decision) and ``Approval`` (the callback
  for unlisted hosts): pure data, what the API and results import.
* ``_rules``: allow/deny rules, host canonicalization, the SSRF guard (pure).
* ``_proxy``: the per-box proxy (HTTP CONNECT, plain HTTP, SOCKS5,
  transparently redirected connections): decides, connects, records.
* ``_inspect``: a tunnel's opening checked before it goes upstream (the TLS
  ClientHello's SNI, HTTP/1 in a tunnel), the HTTP/1 head parser.
* ``_relay``: the bytes after the decision (splice(2) in the kernel).
* ``_dns``: the per-box DNS responder: allowed names -> stand-in addresses.

What happens inside the box's network namespace (listeners, routes, nftables)
is Linux's and lives with the Linux backends (``backends/linux/_netns.py``).
Nothing is imported here, so importing one module does not load the rest.
"""
