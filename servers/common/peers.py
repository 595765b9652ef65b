"""Channels to the other services of the mesh: one process each, or replicas of each."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import grpc


def is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def peer_target(addresses: Sequence[tuple[str, int]]) -> str:
    """A gRPC target for a service's replicas: IPv4 addresses, or one name (resolved by DNS,
    to as many addresses as it has). ``open_channel`` spreads the calls over those that
    answer."""
    if len(addresses) == 1:
        host, port = addresses[0]
        return f"{host}:{port}" if is_ipv4(host) else f"dns:///{host}:{port}"
    return "ipv4:" + ",".join(f"{host}:{port}" for host, port in addresses)


def open_channel(target: str) -> grpc.aio.Channel:
    """A channel to a peer service: round robin over its replicas when the target may name
    several (a replica that does not answer is left out until it does)."""
    several = "," in target or target.startswith("dns:")
    options = [("grpc.lb_policy_name", "round_robin")] if several else []
    return grpc.aio.insecure_channel(target, options=options)
