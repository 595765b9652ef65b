"""Agent workers: the runtime for writing them (runtime.py) and the reference agent's built-in
task types (handlers.py, review.py), run by `agentmesh agent run`."""

from .runtime import Agent, AgentRefused, Handler, Progress, TaskFailed, metadata_of

__all__ = ["Agent", "AgentRefused", "Handler", "Progress", "TaskFailed", "metadata_of"]
