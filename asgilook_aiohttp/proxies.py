"""The client behind a reverse proxy: who sent a request that a trusted proxy passed on.

A proxy names the client it serves in ``Forwarded`` (RFC 7239) or ``X-Forwarded-For``,
adding itself to whatever the request carried already, so only the right end of either
header is the proxies' word; the rest is what the client claimed. The client is therefore
the rightmost address that is not itself a trusted proxy. Headers are believed only from
a peer that is a trusted proxy; a header that cannot be read, or an entry it has for an
unknown or hidden node, leaves the peer as the client, as if there were no header.

The address found is kept in the request as ``CLIENT``, for the access log. The request
is not cloned with it as its ``remote``: a clone has a state of its own, and the
middleware and signals that keep a request's timings and problem in it must see one.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator, Sequence

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from .config import UNIX_PEERS
from .keys import CLIENT

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
TrustTest = Callable[[Address], bool]

# One forwarded-pair of RFC 7239: a token, "=", and a token or a quoted string.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PAIR = re.compile(rf'\s*({_TOKEN})=({_TOKEN}|"(?:[^"\\]|\\.)*")\s*')
_QUOTED_PAIR = re.compile(r"\\(.)")
# A node with a port: "192.0.2.1:4711", "[2001:db8::1]:4711" or "[2001:db8::1]".
_NODE_WITH_PORT = re.compile(r"\[(?P<bracketed>[^\]]+)\](?::\d+)?|(?P<v4>[0-9.]+):\d+")


class Malformed(ValueError):
    """A forwarding header that cannot be read, or names a node that is not an address."""


def trusted_proxies(trusted: Sequence[str]) -> Middleware:
    """A middleware that finds the client of each request a proxy in ``trusted``
    (networks, and ``unix`` for the Unix socket's peers) passed on."""
    networks = tuple(
        _unmapped_network(ipaddress.ip_network(entry)) for entry in trusted if entry != UNIX_PEERS
    )
    unix = UNIX_PEERS in trusted

    def is_trusted(address: Address) -> bool:
        return any(address in network for network in networks)

    def from_a_proxy(request: web.BaseRequest) -> bool:
        transport = request.transport
        if transport is None:  # gone already
            return False
        peername = transport.get_extra_info("peername")
        if isinstance(peername, (list, tuple)):
            return is_trusted(_unmapped(ipaddress.ip_address(peername[0])))
        return unix  # a Unix socket's peer has no name

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if from_a_proxy(request) and (client := find_client(request, is_trusted)):
            request[CLIENT] = client
        return await handler(request)

    return middleware


def find_client(request: web.BaseRequest, is_trusted: TrustTest) -> str | None:
    """The client the forwarding headers name, by the rightmost-untrusted rule; None if
    they name none, or cannot be read."""
    try:
        if forwarded := request.headers.getall(hdrs.FORWARDED, []):
            nodes = list(forwarded_for(", ".join(forwarded)))
        elif forwarded_for_header := request.headers.getall(hdrs.X_FORWARDED_FOR, []):
            nodes = [_address(entry.strip()) for entry in ",".join(forwarded_for_header).split(",")]
        else:
            return None
    except Malformed:
        return None
    for node in reversed(nodes):
        if node is None:  # a node the proxy did not know, or hid: the client is not known
            return None
        if not is_trusted(node):
            return str(node)
    # Proxies all the way: the one farthest from here is as near the client as is known.
    return str(nodes[0]) if nodes else None


def forwarded_for(header: str) -> Iterator[Address | None]:
    """The ``for`` of each element of a ``Forwarded`` header, in order: an address, or
    None for ``unknown`` and obfuscated identifiers."""
    for element in _elements(header):
        # An element without "for" tells nothing of who sent it.
        value = next((value for name, value in element if name.lower() == "for"), None)
        yield None if value is None else _node(value)


def _elements(header: str) -> Iterator[list[tuple[str, str]]]:
    position, end = 0, len(header)
    element: list[tuple[str, str]] = []
    while position < end:
        match = _PAIR.match(header, position)
        if match is None:
            raise Malformed(f"unreadable Forwarded header: {header!r}")
        value = match.group(2)
        if value.startswith('"'):
            value = _QUOTED_PAIR.sub(r"\1", value[1:-1])
        element.append((match.group(1), value))
        position = match.end()
        if position == end:
            break
        separator = header[position]
        position += 1
        if separator == ",":
            yield element
            element = []
            while position < end and header[position] in " \t,":
                position += 1
        elif separator != ";":
            raise Malformed(f"unreadable Forwarded header: {header!r}")
    if element:
        yield element


def _node(value: str) -> Address | None:
    """The address of a ``Forwarded`` node; None for one that is unknown or obfuscated."""
    if value.lower() == "unknown" or value.startswith("_"):
        return None
    return _address(value)


def _address(text: str) -> Address:
    """An address as a proxy writes it, with or without a port and brackets."""
    match = _NODE_WITH_PORT.fullmatch(text)
    if match is not None:
        text = match.group("bracketed") or match.group("v4")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise Malformed(f"not an address: {text!r}") from None
    return _unmapped(address)


def _unmapped_network(
    network: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """IPv4 addresses written as IPv6 ones (as the access log shows peers on a socket
    systemd opened for both) as the IPv4 network they are, as peers are compared."""
    mapped = network.network_address
    if isinstance(mapped, ipaddress.IPv6Address) and mapped.ipv4_mapped and network.prefixlen >= 96:
        return ipaddress.ip_network(f"{mapped.ipv4_mapped}/{network.prefixlen - 96}")
    return network


def _unmapped(address: Address) -> Address:
    """An IPv4 address as itself, though it came as an IPv6 one (on a socket that takes
    both)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
