"""The error tree of sms. Every adapter translates its third-party errors into these at its boundary.

    SmsError
    ├── ClientError            the caller's fault: a 4xx, nothing changed
    │   ├── BadRequest         400  malformed or invalid input
    │   ├── Unauthorized       401  no, unknown or expired token; wrong password
    │   ├── Forbidden          403  authenticated, but not allowed
    │   ├── NotFound           404  no such user / room / message
    │   ├── Conflict           409  a name is taken; the last admin cannot go
    │   ├── PayloadTooLarge    413  body over the cap
    │   └── RateLimited        429  too many requests; carries retry_after_ms
    ├── Unavailable            503  a dependency (etcd, the database) cannot be reached; retry later
    └── PeerError              a remote peer sent something invalid: penalise it, never crash

Anything else escaping a component is our own bug and crashes loudly.
"""

from __future__ import annotations


class SmsError(Exception):
    code = "internal"
    status = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ClientError(SmsError):
    status = 400
    code = "bad_request"


class BadRequest(ClientError):
    status = 400
    code = "bad_request"


class Unauthorized(ClientError):
    status = 401
    code = "unauthorized"


class Forbidden(ClientError):
    status = 403
    code = "forbidden"


class NotFound(ClientError):
    status = 404
    code = "not_found"


class Conflict(ClientError):
    status = 409
    code = "conflict"


class PayloadTooLarge(ClientError):
    status = 413
    code = "payload_too_large"


class RateLimited(ClientError):
    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class Unavailable(SmsError):
    status = 503
    code = "unavailable"


class PeerError(SmsError):
    """A remote peer sent something we must reject (bad frame, unauthorised author...)."""

    code = "peer_error"
