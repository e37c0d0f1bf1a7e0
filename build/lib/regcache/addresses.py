"""Host addresses and base URLs: loopback or not, where to connect to a listener, `http://host:port`.

Pure functions only; used by the listeners, the blob redirects, the metrics endpoint and the CLI.
"""

from __future__ import annotations

import ipaddress


def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address == "localhost"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def reachable_host(listen_host: str) -> str:
    """The address to connect to for a server listening on `listen_host` (any → loopback)."""
    return "127.0.0.1" if listen_host in ("", "0.0.0.0", "::") else listen_host


def base_url(host: str, port: int, scheme: str = "http") -> str:
    """`http://host:port`, with an IPv6 address in brackets."""
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
