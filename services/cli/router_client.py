"""A small synchronous client of the router's public API, shared by the router commands.

Every router command takes the same connection options (`--router`, `--ca-file`, `--token`,
`--timeout`). `RouterClient` turns them into one channel, sends the token as
`authorization: Bearer <token>` on every call and raises `RouterCallError` for a failed call;
`reports_rpc_errors` turns that into one red line and an exit code a script can branch on.
grpc and the generated stubs are imported only when a command connects, so `--help` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.markup import escape

from loopline.errors import KIND_METADATA_KEY, LooplineError
from services.cli.common import EXIT_CODES, console, out

if TYPE_CHECKING:
    from loopline.v1.router_pb2_grpc import RouterStub

DEFAULT_ADDRESS = "127.0.0.1:8000"
DEFAULT_TIMEOUT_SECONDS = 10.0

# Exit codes by gRPC status name; bad input, missing things and refused preconditions match the
# codes of `common.EXIT_CODES` so every command speaks the same language to scripts.
EXIT_BY_STATUS = {
    "INVALID_ARGUMENT": 2,
    "NOT_FOUND": 3,
    "FAILED_PRECONDITION": 4,
    "UNAUTHENTICATED": 5,
    "PERMISSION_DENIED": 5,
    "UNAVAILABLE": 6,
}

RouterAddress = Annotated[
    str,
    typer.Option(
        "--router",
        envvar="LOOPLINE_ROUTER_ADDRESS",
        help="Router address, host:port.",
        rich_help_panel="Connection",
    ),
]
CaFile = Annotated[
    Path | None,
    typer.Option(
        "--ca-file",
        envvar="LOOPLINE_ROUTER_CA_FILE",
        exists=True,
        dir_okay=False,
        readable=True,
        help="PEM CA certificates: connect with TLS and verify the router against them.",
        rich_help_panel="Connection",
    ),
]
Token = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="LOOPLINE_ADMIN_TOKEN",
        help="Bearer token sent as 'authorization: Bearer <token>' (admin calls need it).",
        show_default=False,
        rich_help_panel="Connection",
    ),
]
Timeout = Annotated[
    float,
    typer.Option(
        "--timeout",
        min=0.001,
        help="Seconds to wait for the router's answer.",
        rich_help_panel="Connection",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON, for scripts.")]

F = TypeVar("F", bound=Callable[..., Any])
R = TypeVar("R")


@dataclass(frozen=True)
class Target:
    """Where the router is and how to talk to it."""

    address: str = DEFAULT_ADDRESS
    ca_file: Path | None = None
    token: str | None = None
    timeout: float = DEFAULT_TIMEOUT_SECONDS

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata: the bearer token when there is one."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


class RouterCallError(Exception):
    """A router call that failed: the status code's name and a message for a person."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)

    @property
    def exit_code(self) -> int:
        """2 bad input, 3 not found, 4 precondition, 5 not allowed, 6 unreachable, else 1."""
        return EXIT_BY_STATUS.get(self.code, 1)


class RouterClient:
    """One channel to the router; use it as a context manager so the channel is closed."""

    def __init__(self, target: Target) -> None:
        import grpc

        from loopline.v1.router_pb2_grpc import RouterStub

        self.target = target
        if target.ca_file is None:
            self._channel = grpc.insecure_channel(target.address)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=target.ca_file.read_bytes()
            )
            self._channel = grpc.secure_channel(target.address, credentials)
        self.stub: RouterStub = RouterStub(self._channel)

    def __enter__(self) -> RouterClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._channel.close()

    def call(self, rpc: Callable[..., R], request: Any) -> R:
        """Call one unary method of `self.stub` with the token and the timeout."""
        import grpc

        try:
            return rpc(request, timeout=self.target.timeout, metadata=self.target.metadata())
        except grpc.RpcError as err:
            raise translate(err, self.target) from None


def translate(err: Any, target: Target) -> RouterCallError:
    """A `grpc.RpcError` as a `RouterCallError` whose message says what to do next."""
    code: str = err.code().name
    details: str = err.details() or code.lower().replace("_", " ")
    return RouterCallError(code, _explain(code, details, err, target))


def _explain(code: str, details: str, err: Any, target: Target) -> str:
    """The server's details, with a hint where the status alone does not say what to do."""
    if code == "UNAVAILABLE" and not _from_loopline(err):
        # No Loopline error kind attached: the transport failed, not the router's logic.
        return (
            f"the router is not reachable at {target.address} ({details}); start it with "
            "`loopline serve router`, or set --router / LOOPLINE_ROUTER_ADDRESS"
        )
    if code == "DEADLINE_EXCEEDED":
        return f"{details}: no answer within {target.timeout:g}s (raise --timeout)"
    if code == "UNAUTHENTICATED" and not target.token:
        return f"{details}; pass --token or set LOOPLINE_ADMIN_TOKEN"
    return details


def _from_loopline(err: Any) -> bool:
    """Whether a Loopline server sent this status (its interceptor attaches the error kind)."""
    trailing = err.trailing_metadata() or ()
    return any(key == KIND_METADATA_KEY for key, _ in trailing)


def reports_rpc_errors(func: F) -> F:
    """Turn failed router calls and bad input into one red line and an exit code, no traceback."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except RouterCallError as err:
            _error_line(err.message)
            raise typer.Exit(err.exit_code) from None
        except LooplineError as err:
            _error_line(err.message)
            raise typer.Exit(EXIT_CODES.get(err.kind, 1)) from None

    return wrapper  # type: ignore[return-value]


def _error_line(message: str) -> None:
    # Escaped: details and echoed user input may hold brackets that rich would read as markup.
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)


def print_message_json(message: Any) -> None:
    """Print a protobuf message as JSON with the proto's field names and every field shown."""
    from google.protobuf import json_format

    text = json_format.MessageToJson(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    out.print_json(text)


def ref_text(ref: Any) -> str:
    """A `ModelRef` in the syntax the commands accept: NAME@ALIAS, NAME/VERSION, or both."""
    text = ref.name or "(default model)"
    if ref.version:
        text += f"/{ref.version}"
    if ref.alias:
        text += f"@{ref.alias}"
    return text
