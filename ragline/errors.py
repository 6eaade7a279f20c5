"""The one exception tree of ragline.

Every error a user can cause or observe is a ``RaglineError``; the server maps
each class to one HTTP status in ``ragline.server.errors`` and the CLI prints
its message on one line and exits non-zero.  Nothing else is raised across a
public boundary.

::

    RaglineError                      500  (base; never raised directly)
    ├── InvalidInput                  400  bad value the caller can fix
    │   ├── PayloadTooLarge           413  a size limit from settings was exceeded
    │   └── UnsupportedFile           415  unknown type or a corrupt file
    ├── NotFound                      404  unknown document id, route object
    ├── Unauthorized                  401  missing or unknown API key where one is required
    ├── Forbidden                     403  key lacks the admin role
    ├── ConfigError                   500  settings that cannot work (raised at start-up)
    ├── UpstreamError                 502  the LLM / embedding service failed
    │   ├── UpstreamTimeout           504  it did not answer within the deadline
    │   └── RateLimited               429  it (or our own limiter) refused; carries retry_after
    ├── ServiceUnavailable            503  a component is not ready (circuit open, shutting down)
    │   └── AtCapacity                503  admission control refused it (slots and queue full); Retry-After
    ├── NotInstalled                  501  an optional feature whose package is missing (e.g. profiling)
    └── StoreError                    500  the document store failed; the transaction rolled back
"""

from __future__ import annotations


class RaglineError(Exception):
    """Base of every ragline error; ``status`` is the HTTP status it maps to."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        """The request field at fault, when one is (``error.param`` of the OpenAI-shaped body)."""


class InvalidInput(RaglineError):
    """The request or argument has a value the caller must change."""

    status = 400
    code = "invalid_input"


class PayloadTooLarge(InvalidInput):
    """A size the user controls exceeded its configured limit."""

    status = 413
    code = "payload_too_large"


class UnsupportedFile(InvalidInput):
    """A file whose type is not supported, or whose content cannot be parsed."""

    status = 415
    code = "unsupported_file"


class NotFound(RaglineError):
    """The named object (usually a document id) does not exist for this tenant."""

    status = 404
    code = "not_found"


class Unauthorized(RaglineError):
    """An API key is required, or the one given is unknown."""

    status = 401
    code = "unauthorized"


class Forbidden(RaglineError):
    """The caller is known but may not perform this operation."""

    status = 403
    code = "forbidden"


class ConfigError(RaglineError):
    """Settings that cannot work together; raised at start-up, never per request."""

    status = 500
    code = "config_error"


class UpstreamError(RaglineError):
    """An upstream service (LLM or remote embedder) failed after retries.

    ``upstream_status`` is the HTTP status the upstream answered with (``None``: no answer, or a
    malformed one); the gateway reads it to tell the upstream's failures from the request's faults."""

    status = 502
    code = "upstream_error"

    def __init__(self, message: str, upstream_status: int | None = None, *, public: str | None = None) -> None:
        super().__init__(message)
        self.upstream_status = upstream_status
        self.public = public
        """What a client may read; ``message`` (upstream URL, reply excerpt) goes to the log only."""

    @property
    def client_message(self) -> str:
        if self.public is not None:
            return self.public
        status = f" (HTTP {self.upstream_status})" if self.upstream_status else ""
        return f"the model upstream failed{status}; the server log has the details"


class UpstreamTimeout(UpstreamError):
    """An upstream service did not answer within its deadline."""

    status = 504
    code = "upstream_timeout"

    @property
    def client_message(self) -> str:
        return self.public or "the model upstream did not answer in time"


class RateLimited(UpstreamError):
    """A rate limit refused the call; ``retry_after`` is in seconds when known."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after: float | None = None, *, public: str | None = None) -> None:
        super().__init__(message, public=public)
        self.retry_after = retry_after

    @property
    def client_message(self) -> str:
        if self.public is not None:
            return self.public
        wait = "" if self.retry_after is None else f"; retry after {max(1, round(self.retry_after))}s"
        return f"the model upstream is rate-limiting requests{wait}"


class NotInstalled(RaglineError):
    """An optional feature was asked for whose package is not installed on the server."""

    status = 501
    code = "not_installed"


class ServiceUnavailable(RaglineError):
    """A required component is not ready (start-up, shutdown, open breaker); ``retry_after`` in
    seconds when it is known when to ask again."""

    status = 503
    code = "unavailable"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class AtCapacity(ServiceUnavailable):
    """Admission control refused the request: every slot held and the queue full, or its queue
    deadline passed (:mod:`ragline.infra.admission`).  Expected under load: counted, not logged."""


class StoreError(RaglineError):
    """The document store failed; the write was rolled back, nothing was lost."""

    status = 500
    code = "store_error"
