"""Bearer-token authorization for the RPCs that need it, as a grpc.aio server interceptor.

    auth = TokenAuth(settings.admin_token, classify_token,
                     admin_methods=["/loopline.v1.Router/CreateExperiment", ...],
                     protected_methods=["/loopline.v1.Router/Classify", ...])
    GrpcServer(settings, register, name="router", interceptors=[auth])

The policy, method by method (full gRPC method names, `/package.Service/Method`):
- an admin method needs `authorization: Bearer <admin token>`;
- a protected method (classification), once a classify token is configured, needs either token;
- every other method (health, reflection, ...) is never checked.
A missing, repeated or malformed `authorization` header is UNAUTHENTICATED; a well-formed one
whose token is wrong for the method (the classify token on an admin method) is PERMISSION_DENIED.

No admin token configured means no authorization on admin methods: anyone who reaches the port
may call them. That keeps a laptop set-up free of ceremony; in a deployment the warning logged
when the interceptor is built says what is open and which variable closes it. (Refusing instead,
or opening admin only on loopback, was considered and rejected: the first breaks every local
set-up, the second ties security to a bind address that a proxy or a sidecar makes meaningless.)

Tokens are compared in constant time on their SHA-256 digests, so neither the content nor the
length of a configured token leaks through timing. The interceptor raises `Unauthenticated` or
`PermissionDenied` from the call's handler; `ErrorInterceptor` (installed first by `GrpcServer`)
turns them into statuses and counts them, like every other error.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import grpc
from pydantic import SecretStr

from loopline.errors import LooplineError, PermissionDenied, Unauthenticated
from loopline.logging import get_logger

__all__ = ["AUTHORIZATION_KEY", "TokenAuth", "bearer_metadata"]

log = get_logger(__name__)

AUTHORIZATION_KEY = "authorization"  # gRPC metadata keys are lower case on the wire
_METHOD = re.compile(r"/[A-Za-z_][\w.]*/[A-Za-z_]\w*")

Token = str | SecretStr | None
Metadata = Sequence[tuple[str, str | bytes]]


def bearer_metadata(token: str) -> tuple[tuple[str, str]]:
    """The call metadata that presents `token` (for clients and tests)."""
    return ((AUTHORIZATION_KEY, f"Bearer {token}"),)


class TokenAuth(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Checks the bearer token of admin and protected methods; see the module docstring.

    `admin_token` and `classify_token` may be empty (or None) for "not configured"; settings'
    `SecretStr` values are accepted as they are. The method lists are validated, because a typo
    in a method name would otherwise leave that method silently open.
    """

    def __init__(
        self,
        admin_token: Token,
        classify_token: Token = "",
        *,
        admin_methods: Iterable[str] = (),
        protected_methods: Iterable[str] = (),
    ) -> None:
        admin, classify = _digest(admin_token), _digest(classify_token)
        if admin is not None and admin == classify:
            raise ValueError("the classify token must differ from the admin token")
        admin_set = _methods(admin_methods, "admin_methods")
        protected_set = _methods(protected_methods, "protected_methods")
        if overlap := admin_set & protected_set:
            raise ValueError(f"methods listed as both admin and protected: {sorted(overlap)}")
        self._accepted = _accepted_digests(admin_set, protected_set, admin, classify)
        if admin is None and admin_set:
            log.warning(
                "no admin token configured: admin RPCs are open to every caller; "
                "set LOOPLINE_ADMIN_TOKEN to require one",
                extra={"open_methods": sorted(admin_set)},
            )

    @property
    def checked_methods(self) -> frozenset[str]:
        """The methods that need a token with the tokens configured now."""
        return frozenset(self._accepted)

    def check(self, method: str, metadata: Metadata | None) -> None:
        """Return if `metadata` authorizes `method`; raise `Unauthenticated`/`PermissionDenied`."""
        accepted = self._accepted.get(method)
        if accepted is None:
            return
        given = hashlib.sha256(_bearer_token(metadata)).digest()
        # Compare with every accepted token, no early exit: timing says nothing about which.
        matched = False
        for digest in accepted:
            matched |= hmac.compare_digest(given, digest)
        if not matched:
            raise PermissionDenied(
                f"the bearer token does not allow {method}; use the token configured for it",
                method=method,
            )

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Pass authorized (and unchecked) calls on; answer the others with their error."""
        try:
            self.check(handler_call_details.method, handler_call_details.invocation_metadata)
        except LooplineError as err:
            handler = await continuation(handler_call_details)
            # An unknown method stays UNIMPLEMENTED; a known one gets a handler that refuses.
            return None if handler is None else _refusing(handler, err)
        return await continuation(handler_call_details)


def _digest(token: Token) -> bytes | None:
    value = token.get_secret_value() if isinstance(token, SecretStr) else token
    if not value or not value.strip():
        return None
    return hashlib.sha256(value.strip().encode()).digest()


def _methods(methods: Iterable[str], field: str) -> frozenset[str]:
    if isinstance(methods, str):  # one name would otherwise be read as its letters
        raise ValueError(f"{field}: expected a list of method names, got the string {methods!r}")
    names = frozenset(methods)
    if bad := sorted(name for name in names if not _METHOD.fullmatch(name)):
        raise ValueError(f"{field}: not full method names ('/package.Service/Method'): {bad}")
    return names


def _accepted_digests(
    admin_methods: frozenset[str],
    protected_methods: frozenset[str],
    admin: bytes | None,
    classify: bytes | None,
) -> Mapping[str, tuple[bytes, ...]]:
    """Per checked method, the token digests it accepts; unconfigured methods are left out."""
    accepted: dict[str, tuple[bytes, ...]] = {}
    if admin is not None:
        accepted |= dict.fromkeys(admin_methods, (admin,))
    if classify is not None:
        either = (classify,) if admin is None else (admin, classify)
        accepted |= dict.fromkeys(protected_methods, either)
    return MappingProxyType(accepted)


def _bearer_token(metadata: Metadata | None) -> bytes:
    """The token of the one `authorization: Bearer <token>` header, or `Unauthenticated`."""
    values = [value for key, value in metadata or () if key == AUTHORIZATION_KEY]
    if not values:
        raise Unauthenticated(
            "missing 'authorization' metadata; send 'authorization: Bearer <token>'"
        )
    if len(values) > 1:
        raise Unauthenticated("more than one 'authorization' header; send exactly one")
    value = values[0].decode(errors="replace") if isinstance(values[0], bytes) else values[0]
    scheme, _, token = value.strip().partition(" ")
    # The scheme is case-insensitive (RFC 7235); anything but a bearer token is malformed here.
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("malformed 'authorization' metadata; expected 'Bearer <token>'")
    return token.strip().encode()


def _refusing(handler: grpc.RpcMethodHandler, err: LooplineError) -> grpc.RpcMethodHandler:
    """The same handler shape, with a behavior that raises `err` before reading any request."""

    async def refuse(_request: Any, _context: grpc.aio.ServicerContext) -> Any:
        raise err

    async def refuse_stream(
        _request: Any, _context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        raise err
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are

    requests = "stream" if handler.request_streaming else "unary"
    responses = "stream" if handler.response_streaming else "unary"
    behavior = refuse_stream if handler.response_streaming else refuse
    return handler._replace(**{f"{requests}_{responses}": behavior})
