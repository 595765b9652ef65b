"""Channels to the other services of the mesh: one process each, or replicas of each."""

from __future__ import annotations

from collections.abc import Sequence

import grpc


def peer_target(addresses: Sequence[tuple[str, int]]) -> str:
    """A gRPC target for a service's replicas: one address, or all of them (``open_channel``
    spreads the calls over those that answer)."""
    if len(addresses) == 1:
        return f"{addresses[0][0]}:{addresses[0][1]}"
    return "ipv4:" + ",".join(f"{host}:{port}" for host, port in addresses)


def open_channel(target: str) -> grpc.aio.Channel:
    """A channel to a peer service: round robin over its replicas when the target lists
    several (a replica that does not answer is left out until it does)."""
    options = [("grpc.lb_policy_name", "round_robin")] if "," in target else []
    return grpc.aio.insecure_channel(target, options=options)
