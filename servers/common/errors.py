"""The one error hierarchy of agentmesh.

    AgentmeshError
     +-- ValidationError          INVALID_ARGUMENT     VALIDATION_ERROR          400
     +-- AuthRequired             UNAUTHENTICATED      AUTH_REQUIRED             401
     |    +-- TokenExpired        UNAUTHENTICATED      TOKEN_EXPIRED             401
     |    +-- InvalidCredentials  UNAUTHENTICATED      INVALID_CREDENTIALS       401
     +-- PermissionDenied         PERMISSION_DENIED    INSUFFICIENT_PERMISSIONS  403
     +-- NotFound                 NOT_FOUND            NOT_FOUND                 404
     +-- AlreadyExists            ALREADY_EXISTS       CONFLICT                  409
     |    +-- UserExists          ALREADY_EXISTS       USER_EXISTS               409
     +-- Conflict                 ABORTED              CONFLICT                  409
     +-- RateLimited              RESOURCE_EXHAUSTED   RATE_LIMIT_EXCEEDED       429
     +-- NotImplementedYet        UNIMPLEMENTED        NOT_IMPLEMENTED           501
     +-- Unavailable              UNAVAILABLE          SERVICE_UNAVAILABLE       503
     +-- DeadlineExceeded         DEADLINE_EXCEEDED    TIMEOUT_ERROR             504
     +-- InternalError            INTERNAL             INTERNAL_ERROR            500

HTTP statuses are Envoy's gRPC-to-HTTP mapping; docs/errors.md lists the table.

Each class fixes its gRPC status code and its documented `reason`; a subclass or an instance may
narrow the reason (``NotFound("...", reason="TASK_NOT_FOUND")``). Dynamic values go into
``details``, which travels as ``ErrorInfo.metadata`` and becomes the envelope's ``details``.
The error interceptor turns these into ``google.rpc.Status``; anything else becomes INTERNAL.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

DOMAIN = "agentmesh"

# Envoy's gRPC-to-HTTP mapping of the codes above, for the few answers a server writes as HTTP
# itself (a process's own metrics port, servers/common/scrape.py).
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class AgentmeshError(Exception):
    """Base of every error a servicer raises on purpose."""

    status: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    reason: str = "INTERNAL_ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        details: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        # ErrorInfo.metadata is map<string, string>.
        self.details = {str(k): str(v) for k, v in (details or {}).items()}


class ValidationError(AgentmeshError):
    """The request is malformed or breaks a documented limit."""

    status = grpc.StatusCode.INVALID_ARGUMENT
    reason = "VALIDATION_ERROR"


class AuthRequired(AgentmeshError):
    """No credential, or one that cannot be verified."""

    status = grpc.StatusCode.UNAUTHENTICATED
    reason = "AUTH_REQUIRED"


class TokenExpired(AuthRequired):
    """The access token was valid but has expired."""

    reason = "TOKEN_EXPIRED"


class InvalidCredentials(AuthRequired):
    """Unknown account or wrong password; the two are deliberately indistinguishable."""

    reason = "INVALID_CREDENTIALS"


class PermissionDenied(AgentmeshError):
    """The principal is known but lacks the permission."""

    status = grpc.StatusCode.PERMISSION_DENIED
    reason = "INSUFFICIENT_PERMISSIONS"


class NotFound(AgentmeshError):
    """The resource does not exist, or the caller may not see it."""

    status = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class AlreadyExists(AgentmeshError):
    """Creating something that exists already."""

    status = grpc.StatusCode.ALREADY_EXISTS
    reason = "CONFLICT"


class UserExists(AlreadyExists):
    """An account with that username or email exists."""

    reason = "USER_EXISTS"


class Conflict(AgentmeshError):
    """The resource is in a state that does not allow the operation.

    ABORTED rather than FAILED_PRECONDITION: the seed documents answer a state conflict with
    409 CONFLICT, and ABORTED is the code Envoy maps to 409.
    """

    status = grpc.StatusCode.ABORTED
    reason = "CONFLICT"


class RateLimited(AgentmeshError):
    """A quota is exhausted; details carry retry_after."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RATE_LIMIT_EXCEEDED"


class NotImplementedYet(AgentmeshError):
    """The RPC is declared in the contract but not built yet."""

    status = grpc.StatusCode.UNIMPLEMENTED
    reason = "NOT_IMPLEMENTED"


class Unavailable(AgentmeshError):
    """A dependency (database, bus, another service) does not answer."""

    status = grpc.StatusCode.UNAVAILABLE
    reason = "SERVICE_UNAVAILABLE"


class DeadlineExceeded(AgentmeshError):
    """The work did not finish before the caller's deadline."""

    status = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "TIMEOUT_ERROR"


class InternalError(AgentmeshError):
    """A bug or an unexpected failure; the message sent to clients is generic."""

    status = grpc.StatusCode.INTERNAL
    reason = "INTERNAL_ERROR"
