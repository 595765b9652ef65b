"""Who is who, asked of the agents service (AgentsInternalService.ResolveAgents).

An agent calls messaging with the API key it connected with; the agents registered with that
key are the agents the caller may act as. The sender is never taken from the request body.

Answers that found agents are remembered for CACHE_SECONDS, since every message needs two of
them and agents change keys rarely: an agent that connects with another key acts under the new
one here within that time. Empty answers are not remembered, so an agent that has just connected
for the first time can send and be sent to at once. The key itself is verified by the auth
service on every call, so a revoked key stops at once regardless.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc

from agentmesh.v1 import agents_pb2, agents_pb2_grpc
from servers.common.context import Principal
from servers.common.errors import NotFound, PermissionDenied, Unavailable, ValidationError
from servers.common.internal import CALL_TIMEOUT, InternalChannel

from .domain import AgentRef

CACHE_SECONDS = 2.0
CACHE_MAX = 10_000


def choose_sender(candidates: Sequence[AgentRef], from_agent: str) -> AgentRef:
    """The sending agent among those registered with the caller's key: the only one, or the
    one ``from_agent`` names."""
    if from_agent:
        for agent in candidates:
            if agent.agent_id == from_agent:
                return agent
        raise PermissionDenied(
            "from_agent is not an agent registered with this API key",
            details={"field": "from_agent"},
        )
    if not candidates:
        raise PermissionDenied("no agent is registered with this API key; connect this agent first")
    if len(candidates) > 1:
        raise ValidationError(
            "several agents are registered with this API key; from_agent must name the sender",
            details={"field": "from_agent", "agents": len(candidates)},
        )
    return candidates[0]


def _key_of(who: Principal) -> str:
    if who.kind != "api_key" or not who.token_id:
        raise PermissionDenied("only agents may call this")
    return who.token_id


class AgentResolver:
    """Agent lookups for messaging. ``timeout``: the caller's remaining deadline, if any."""

    def __init__(self, channel: InternalChannel) -> None:
        self._channel = channel
        self._known: dict[tuple[tuple[str, ...], str], tuple[float, list[AgentRef]]] = {}

    async def _resolve(
        self, *, agent_ids: Sequence[str] = (), key_id: str = "", timeout: float | None
    ) -> list[AgentRef]:
        question = (tuple(agent_ids), key_id)
        remembered = self._remembered(question)
        if remembered is not None:
            return remembered
        found = await self._ask(agent_ids, key_id, timeout)
        if found:
            if len(self._known) >= CACHE_MAX:
                self._known.clear()
            self._known[question] = (time.monotonic() + CACHE_SECONDS, found)
        return found

    def _remembered(self, question: tuple[tuple[str, ...], str]) -> list[AgentRef] | None:
        remembered = self._known.get(question)
        if remembered is not None and remembered[0] > time.monotonic():
            return remembered[1]
        return None

    async def _ask(
        self, agent_ids: Sequence[str], key_id: str, timeout: float | None
    ) -> list[AgentRef]:
        stub = self._channel.stub(agents_pb2_grpc.AgentsInternalServiceStub)
        budget = CALL_TIMEOUT if timeout is None else max(0.01, min(timeout, CALL_TIMEOUT))
        try:
            reply = await stub.ResolveAgents(
                agents_pb2.ResolveAgentsRequest(agent_ids=list(agent_ids), key_id=key_id),
                **self._channel.call_options(budget),
            )
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(
                "the agents service does not answer", details={"code": exc.code().name}
            ) from None
        return [AgentRef(a.agent_id, a.owner_id) for a in reply.agents]

    async def sender_and_recipient(
        self,
        who: Principal,
        from_agent: str,
        to_agent: str,
        *,
        timeout: float | None,
    ) -> tuple[AgentRef, AgentRef]:
        """The sending agent (see choose_sender) and the recipient (404 when unknown)."""
        key = _key_of(who)
        known_mine = self._remembered(((), key))
        known_theirs = self._remembered(((to_agent,), ""))
        if known_mine is not None and known_theirs is not None:
            # Every message needs both: the common case makes no task at all.
            mine, theirs = known_mine, known_theirs
        else:
            mine, theirs = await asyncio.gather(
                self._resolve(key_id=key, timeout=timeout),
                self._resolve(agent_ids=[to_agent], timeout=timeout),
            )
        sender = choose_sender(mine, from_agent)
        if not theirs:
            raise NotFound("no such agent", details={"to_agent": to_agent[:64]})
        return sender, theirs[0]

    async def mine(self, who: Principal, *, timeout: float | None) -> list[AgentRef]:
        """The agents registered with the caller's key."""
        return await self._resolve(key_id=_key_of(who), timeout=timeout)

    async def own(self, who: Principal, agent_id: str, *, timeout: float | None) -> AgentRef:
        """The caller's agent ``agent_id``; 404 for any other agent, as for an unknown one."""
        if agent_id and len(agent_id) <= 64:
            for agent in await self.mine(who, timeout=timeout):
                if agent.agent_id == agent_id:
                    return agent
        raise NotFound("no such agent", details={"agent_id": agent_id[:64]})
