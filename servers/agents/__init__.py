"""The agents service: agent registry and the Connect stream.

Serves AgentsService and AgentsInternalService.
"""
