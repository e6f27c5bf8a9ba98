"""``allowed_hosts``: peer addresses as IP addresses, CIDR blocks or host names.

Parsed when the settings load (a bad entry stops the node with a message naming
it) and again when the receiver starts, which resolves host names once: a peer's
address is then matched against networks, before anything it sends is read.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def allowed_networks(entries: Sequence[str]) -> tuple[IPNetwork, ...]:
    """``allowed_hosts`` as networks: an address is a network of one, a CIDR block
    (``10.20.0.0/24``) itself, a host name every address it resolves to now. Raises
    ValueError naming the entry that is none of these."""
    networks: list[IPNetwork] = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
            continue
        except ValueError:
            pass
        if "/" in entry or not _HOST_NAME_RE.fullmatch(entry):
            raise ValueError(f"{entry!r} is neither an IP address, a CIDR block nor a host name")
        try:
            infos = socket.getaddrinfo(entry, None, proto=socket.IPPROTO_TCP)
        except OSError as exc:
            raise ValueError(f"host name {entry!r} does not resolve ({exc.strerror or exc})") from None
        networks.extend(ipaddress.ip_network(str(info[4][0]).split("%", 1)[0]) for info in infos)
    return tuple(dict.fromkeys(networks))


_HOST_NAME_RE = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?")


def host_allowed(host: str, networks: tuple[IPNetwork, ...]) -> bool:
    """Whether a peer address is in ``networks`` (none: everyone is); an IPv4
    peer on an IPv6 socket (``::ffff:10.0.0.1``) counts as its IPv4 address."""
    if not networks:
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)
