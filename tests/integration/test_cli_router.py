"""`loopline classify | feedback | experiments` against a real gRPC server with a fake router.

The fake records every request with its metadata and answers with canned messages or errors, so
these tests pin what the CLI sends, what it prints and which exit code each status becomes.
"""

# The fake servicer's methods carry the RPC names of the proto.
# ruff: noqa: N802

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from typer.testing import CliRunner, Result

from loopline.errors import KIND_METADATA_KEY, InvalidInput
from loopline.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.cli.experiments import (
    ModelSpec,
    ShadowSpec,
    VariantSpec,
    parse_shadow,
    parse_time,
    parse_variant,
    parse_weight,
)
from services.cli.main import app
from tests.fixtures.waiting import free_port

runner = CliRunner()
Status = common_pb2.ExperimentStatus


def _experiment(exp_id: str = "exp-1", **changes: Any) -> common_pb2.Experiment:
    exp = common_pb2.Experiment(
        id=exp_id,
        name="pt-distil",
        model="sentiment",
        status=Status.EXPERIMENT_STATUS_RUNNING,
        variants=[
            common_pb2.Variant(
                name="control",
                model=common_pb2.ModelRef(name="sentiment", alias="champion"),
                weight=90,
            ),
            common_pb2.Variant(
                name="candidate",
                model=common_pb2.ModelRef(name="sentiment", version="7"),
                weight=10,
            ),
        ],
        shadows=[
            common_pb2.ShadowVariant(
                name="mirror",
                model=common_pb2.ModelRef(name="sentiment", alias="challenger"),
                sample_rate=0.5,
            )
        ],
        pinned_users={"qa-1": "candidate"},
    )
    exp.create_time.FromDatetime(dt.datetime(2025, 1, 14, 9, 30, tzinfo=dt.UTC))
    for key, value in changes.items():
        setattr(exp, key, value)
    return exp


CLASSIFIED = router_pb2.ClassifyResponse(
    label="positive",
    probabilities=[
        common_pb2.LabelScore(label="negative", score=0.0269),
        common_pb2.LabelScore(label="positive", score=0.9731),
    ],
    model=common_pb2.ModelRef(name="sentiment", version="7", alias="champion"),
    experiment_id="exp-1",
    variant="candidate",
    request_id="req-42",
    truncated=True,
    language="en",
    timings=router_pb2.Timings(
        total=Duration(nanos=3_200_000),
        queue=Duration(nanos=400_000),
        inference=Duration(nanos=1_900_000),
    ),
)


@dataclass
class Call:
    method: str
    request: Any
    metadata: dict[str, str]


@dataclass
class FakeRouter(router_pb2_grpc.RouterServicer):
    """Records calls; answers from `answers`, or aborts with `errors[method]`."""

    address: str = ""
    calls: list[Call] = field(default_factory=list)
    errors: dict[str, tuple[grpc.StatusCode, str, bool]] = field(default_factory=dict)
    pages: list[router_pb2.ListExperimentsResponse] = field(default_factory=list)
    hold: threading.Event | None = None  # when set, Classify waits for it (a slow router)

    def _answer(self, method: str, request: Any, context: grpc.ServicerContext, answer: Any) -> Any:
        self.calls.append(Call(method, request, dict(context.invocation_metadata())))
        if method in self.errors:
            code, details, from_loopline = self.errors[method]
            if from_loopline:
                context.set_trailing_metadata(((KIND_METADATA_KEY, "not_ready"),))
            context.abort(code, details)
        return answer

    def Classify(self, request: Any, context: Any) -> Any:
        if self.hold is not None:
            self.hold.wait(timeout=10)
        return self._answer("Classify", request, context, CLASSIFIED)

    def ClassifyBatch(self, request: Any, context: Any) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "the CLI does not use ClassifyBatch")

    def ClassifyStream(self, request_iterator: Any, context: Any) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "the CLI does not use ClassifyStream")

    def Feedback(self, request: Any, context: Any) -> Any:
        return self._answer(
            "Feedback", request, context, router_pb2.FeedbackResponse(feedback_id="fb-9")
        )

    def CreateExperiment(self, request: Any, context: Any) -> Any:
        created = common_pb2.Experiment()
        created.CopyFrom(request.experiment)
        created.id = "exp-new"
        return self._answer("CreateExperiment", request, context, created)

    def GetExperiment(self, request: Any, context: Any) -> Any:
        return self._answer("GetExperiment", request, context, _experiment(request.id))

    def ListExperiments(self, request: Any, context: Any) -> Any:
        page = self.pages[int(request.page.page_token or 0)]
        return self._answer("ListExperiments", request, context, page)

    def UpdateExperiment(self, request: Any, context: Any) -> Any:
        return self._answer("UpdateExperiment", request, context, _experiment(request.id))

    def StopExperiment(self, request: Any, context: Any) -> Any:
        stopped = _experiment(
            request.id, status=Status.EXPERIMENT_STATUS_STOPPED, winner=request.winner
        )
        promoted = common_pb2.ModelRef(name="sentiment", version="7", alias=request.alias)
        answer = router_pb2.StopExperimentResponse(experiment=stopped, promoted=promoted)
        return self._answer("StopExperiment", request, context, answer)


@contextmanager
def _serve(fake: FakeRouter, credentials: Any = None) -> Iterator[FakeRouter]:
    """Serve `fake` on a free loopback port (TLS with `credentials`) until the block ends."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    router_pb2_grpc.add_RouterServicer_to_server(fake, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    fake.address = f"127.0.0.1:{port}"
    try:
        yield fake
    finally:
        server.stop(grace=None)


@pytest.fixture
def router(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRouter]:
    """A fake router on a free loopback port, found through LOOPLINE_ROUTER_ADDRESS."""
    monkeypatch.setenv("COLUMNS", "200")  # rich tables: no wrapping of the figures asserted
    for name in ("LOOPLINE_ADMIN_TOKEN", "LOOPLINE_ROUTER_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    with _serve(FakeRouter()) as fake:
        monkeypatch.setenv("LOOPLINE_ROUTER_ADDRESS", fake.address)
        yield fake


def _invoke(*args: str) -> Result:
    return runner.invoke(app, list(args))


# --- the spec parsers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            "control=sentiment@champion:50",
            VariantSpec("control", ModelSpec("sentiment", alias="champion"), 50),
        ),
        (
            "candidate=sentiment/7:50",
            VariantSpec("candidate", ModelSpec("sentiment", version="7"), 50),
        ),
        (
            "b=models:/sentiment-pt@challenger:12.5",
            VariantSpec("b", ModelSpec("sentiment-pt", alias="challenger"), 12.5),
        ),
        (" off=sentiment/12:0 ", VariantSpec("off", ModelSpec("sentiment", version="12"), 0)),
    ],
)
def test_variant_specs_parse(spec: str, expected: VariantSpec) -> None:
    assert parse_variant(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "control",  # no model at all
        "control=sentiment:50",  # neither alias nor version
        "control=sentiment@champion",  # no weight
        "control=sentiment/v7:50",  # versions are numbers
        "control=sentiment/0:50",  # versions count from 1
        "control=sentiment@champion:-1",  # negative weight
        "control=sentiment@champion:half",
        "control=sentiment@champion:nan",
        "=sentiment@champion:50",  # no name
        "control=sentiment@champion/7:50",  # both alias and version
        "control=sentiment@champion:50:1",
    ],
)
def test_bad_variant_specs_show_the_expected_form(spec: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_variant(spec)
    assert repr(spec) in caught.value.message
    assert "NAME=MODEL@ALIAS:WEIGHT or NAME=MODEL/VERSION:WEIGHT" in caught.value.message


def test_shadow_specs_default_to_mirroring_everything_and_bound_the_rate() -> None:
    assert parse_shadow("s=sentiment@challenger") == ShadowSpec(
        "s", ModelSpec("sentiment", alias="challenger"), 1.0
    )
    assert parse_shadow("s=sentiment/3:0.25").sample_rate == 0.25
    for bad in ("s=sentiment/3:0", "s=sentiment/3:1.5", "s=sentiment", "s=sentiment/3:"):
        with pytest.raises(InvalidInput, match=r"NAME=MODEL@ALIAS or NAME=MODEL/VERSION"):
            parse_shadow(bad)


def test_weights_and_times_parse() -> None:
    assert parse_weight("candidate=20") == ("candidate", 20.0)
    with pytest.raises(InvalidInput, match="NAME=WEIGHT"):
        parse_weight("candidate:20")
    with pytest.raises(InvalidInput, match=">= 0"):
        parse_weight("candidate=-3")
    assert parse_time("--end-time", "2025-02-01T12:00:00Z") == dt.datetime(
        2025, 2, 1, 12, tzinfo=dt.UTC
    )
    # Without an offset a time is UTC, not the machine's local time.
    assert parse_time("--end-time", "2025-02-01T12:00").utcoffset() == dt.timedelta(0)
    with pytest.raises(InvalidInput, match="ISO 8601"):
        parse_time("--end-time", "next friday")


# --- classify and feedback ----------------------------------------------------------------------


def test_classify_sends_the_request_and_prints_label_probabilities_and_origin(
    router: FakeRouter,
) -> None:
    result = _invoke(
        "classify", "great movie", "--model", "sentiment", "--alias", "champion",
        "--user", "u1", "--request-id", "req-42",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (call,) = router.calls
    assert call.method == "Classify"
    assert call.request.text == "great movie"
    assert call.request.model == common_pb2.ModelRef(name="sentiment", alias="champion")
    assert (call.request.user_id, call.request.request_id) == ("u1", "req-42")
    assert "authorization" not in call.metadata
    lines = result.stdout.splitlines()
    assert lines[0] == "positive"
    assert any("positive" in line and "0.9731" in line for line in lines)
    assert any("negative" in line and "0.0269" in line for line in lines)
    for figure in ("sentiment/7@champion", "exp-1 (variant candidate)", "req-42", "en", "yes"):
        assert figure in result.stdout
    assert "total 3.2 ms, queue 0.4 ms, inference 1.9 ms" in result.stdout


def test_classify_json_is_the_response_with_proto_field_names(router: FakeRouter) -> None:
    result = _invoke("classify", "great movie", "--json", "--token", "s3cret")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["label"] == "positive"
    assert answer["request_id"] == "req-42"
    assert answer["model"] == {"name": "sentiment", "version": "7", "alias": "champion"}
    assert [p["label"] for p in answer["probabilities"]] == ["negative", "positive"]
    assert router.calls[0].metadata["authorization"] == "Bearer s3cret"
    # No model given: the name stays empty and the router picks its default model.
    assert router.calls[0].request.model == common_pb2.ModelRef()


def test_classify_reads_standard_input_and_refuses_version_with_alias(router: FakeRouter) -> None:
    result = runner.invoke(app, ["classify", "-"], input="from a pipe\n")
    assert result.exit_code == 0, result.output
    assert router.calls[0].request.text == "from a pipe\n"
    result = _invoke("classify", "x", "--version", "7", "--alias", "champion")
    assert result.exit_code == 2
    assert "--version or --alias, not both" in result.output
    assert len(router.calls) == 1


def test_feedback_sends_label_user_and_source(router: FakeRouter) -> None:
    result = _invoke("feedback", "req-42", "negative", "--user", "u1", "--source", "annotator")
    assert result.exit_code == 0, result.output
    assert router.calls[0].request == router_pb2.FeedbackRequest(
        request_id="req-42", label="negative", user_id="u1", source="annotator"
    )
    assert "fb-9" in result.stdout
    result = _invoke("feedback", "req-42", "negative", "--json")
    assert json.loads(result.stdout) == {"feedback_id": "fb-9"}


# --- experiments --------------------------------------------------------------------------------


def test_create_sends_variants_shadows_pins_and_the_admin_token(
    router: FakeRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOPLINE_ADMIN_TOKEN", "s3cret")
    result = _invoke(
        "experiments", "create", "pt-distil",
        "--variant", "control=sentiment@champion:90",
        "--variant", "candidate=sentiment/7:10",
        "--shadow", "mirror=sentiment@challenger:0.5",
        "--pin", "qa-1=candidate", "--salt", "s1", "--sticky", "request",
        "--start", "--description", "distilled is as good",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (call,) = router.calls
    assert call.metadata["authorization"] == "Bearer s3cret"
    exp = call.request.experiment
    assert (exp.name, exp.model, exp.salt) == ("pt-distil", "sentiment", "s1")
    assert exp.status == Status.EXPERIMENT_STATUS_RUNNING
    assert exp.sticky_by == common_pb2.STICKINESS_REQUEST
    assert [
        (v.name, v.model.name, v.model.alias, v.model.version, v.weight) for v in exp.variants
    ] == [
        ("control", "sentiment", "champion", "", 90.0),
        ("candidate", "sentiment", "", "7", 10.0),
    ]
    assert [(s.name, s.model.alias, s.sample_rate) for s in exp.shadows] == [
        ("mirror", "challenger", 0.5)
    ]
    assert dict(exp.pinned_users) == {"qa-1": "candidate"}
    assert exp.description == "distilled is as good"
    for figure in ("exp-new", "running", "90.0%", "10.0%", "50% mirrored", "qa-1=candidate"):
        assert figure in result.stdout


def test_create_without_start_is_a_draft_on_the_first_variants_model(router: FakeRouter) -> None:
    result = _invoke(
        "experiments", "create", "x", "--variant", "a=sentiment-pt@champion:100", "--json"
    )
    assert result.exit_code == 0, result.output
    exp = router.calls[0].request.experiment
    assert exp.status == Status.EXPERIMENT_STATUS_DRAFT
    assert exp.model == "sentiment-pt"
    assert exp.sticky_by == common_pb2.STICKINESS_UNSPECIFIED
    assert json.loads(result.stdout)["status"] == "EXPERIMENT_STATUS_DRAFT"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--variant", "control=sentiment:50"],
            "NAME=MODEL@ALIAS:WEIGHT or NAME=MODEL/VERSION:WEIGHT",
        ),
        (["--variant", "a=s@champion:50", "--shadow", "m=s@x:2"], "rate must be in (0, 1]"),
        (["--variant", "a=s@champion:50", "--variant", "a=s/2:50"], "repeated: a"),
        (["--variant", "a=s@champion:100", "--shadow", "a=s/2"], "repeated: a"),
        (["--variant", "a=s@champion:100", "--pin", "u1=b"], "no served variant 'b'"),
        (["--variant", "a=s@champion:100", "--pin", "u1"], "USER=VARIANT"),
    ],
)
def test_bad_create_input_exits_2_without_calling(
    router: FakeRouter, args: list[str], message: str
) -> None:
    result = _invoke("experiments", "create", "x", *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stderr.startswith("error: ")
    assert router.calls == []


def test_list_follows_pages_filters_and_prints_variants_in_create_syntax(
    router: FakeRouter,
) -> None:
    router.pages = [
        router_pb2.ListExperimentsResponse(experiments=[_experiment("exp-2")], next_page_token="1"),
        router_pb2.ListExperimentsResponse(experiments=[_experiment("exp-1")]),
    ]
    result = _invoke("experiments", "list", "--model", "sentiment", "--status", "running")
    assert result.exit_code == 0, result.output
    assert [c.request.page.page_token for c in router.calls] == ["", "1"]
    assert {c.request.model for c in router.calls} == {"sentiment"}
    assert {c.request.status for c in router.calls} == {Status.EXPERIMENT_STATUS_RUNNING}
    out = result.stdout
    assert out.index("exp-2") < out.index("exp-1")
    for figure in (
        "control=sentiment@champion:90",
        "candidate=sentiment/7:10",
        "mirror=sentiment@challenger:0.5 (shadow)",
        "2025-01-14 09:30",
        "running",
    ):
        assert figure in out

    result = _invoke("experiments", "list", "--json")
    listed = json.loads(result.stdout)
    assert [e["id"] for e in listed["experiments"]] == ["exp-2", "exp-1"]
    assert listed["experiments"][0]["variants"][1]["weight"] == 10


def test_get_prints_details_and_json(router: FakeRouter) -> None:
    result = _invoke("experiments", "get", "exp-1")
    assert result.exit_code == 0, result.output
    assert router.calls[0].request.id == "exp-1"
    for figure in ("pt-distil", "90.0%", "10.0%", "qa-1=candidate", "2025-01-14 09:30:00 UTC"):
        assert figure in result.stdout
    result = _invoke("experiments", "get", "exp-1", "--json")
    assert json.loads(result.stdout)["pinned_users"] == {"qa-1": "candidate"}


def test_update_sends_only_what_changes(router: FakeRouter) -> None:
    result = _invoke(
        "experiments", "update", "exp-1", "--weight", "control=80", "--weight", "candidate=20",
        "--status", "paused", "--end-time", "2025-02-01T12:00:00+01:00",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    request = router.calls[0].request
    assert request.id == "exp-1"
    assert dict(request.weights) == {"control": 80.0, "candidate": 20.0}
    assert request.status == Status.EXPERIMENT_STATUS_PAUSED
    assert request.end_time.ToDatetime(tzinfo=dt.UTC) == dt.datetime(2025, 2, 1, 11, tzinfo=dt.UTC)
    assert request.description == ""

    for args in ([], ["--weight", "control"], ["--end-time", "soon"], ["--status", "stopped"]):
        result = _invoke("experiments", "update", "exp-1", *args)
        assert result.exit_code == 2, args
    assert len(router.calls) == 1


def test_stop_promotes_the_winner(router: FakeRouter) -> None:
    result = _invoke(
        "experiments", "stop", "exp-1", "--winner", "candidate", "--alias", "champion",
        "--reason", "better accuracy",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert router.calls[0].request == router_pb2.StopExperimentRequest(
        id="exp-1", winner="candidate", alias="champion", reason="better accuracy"
    )
    assert "stopped" in result.stdout
    assert "promoted sentiment/7 to @champion" in result.stdout
    result = _invoke("experiments", "stop", "exp-1", "--json")
    assert json.loads(result.stdout)["experiment"]["status"] == "EXPERIMENT_STATUS_STOPPED"
    result = _invoke("experiments", "stop", "exp-1", "--alias", "champion")
    assert result.exit_code == 2
    assert len(router.calls) == 2


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "exit_code"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 2),
        (grpc.StatusCode.NOT_FOUND, 3),
        (grpc.StatusCode.FAILED_PRECONDITION, 4),
        (grpc.StatusCode.UNAUTHENTICATED, 5),
        (grpc.StatusCode.PERMISSION_DENIED, 5),
        (grpc.StatusCode.UNAVAILABLE, 6),
        (grpc.StatusCode.ALREADY_EXISTS, 1),
        (grpc.StatusCode.INTERNAL, 1),
    ],
)
def test_status_codes_become_exit_codes_and_one_red_line(
    router: FakeRouter, code: grpc.StatusCode, exit_code: int
) -> None:
    router.errors["GetExperiment"] = (code, f"experiment 'nope' [{code.name}]", True)
    result = _invoke("experiments", "get", "nope")
    assert result.exit_code == exit_code
    assert result.stderr.splitlines()[0].startswith(f"error: experiment 'nope' [{code.name}]")
    assert result.stdout == ""
    assert "Traceback" not in result.output
    # A status the router itself sent is not blamed on the network.
    assert "not reachable" not in result.stderr


def test_unauthenticated_without_a_token_says_how_to_give_one(router: FakeRouter) -> None:
    router.errors["UpdateExperiment"] = (
        grpc.StatusCode.UNAUTHENTICATED,
        "missing admin token",
        False,
    )
    result = _invoke("experiments", "update", "exp-1", "--status", "running")
    assert result.exit_code == 5
    assert "pass --token or set LOOPLINE_ADMIN_TOKEN" in result.stderr


def test_nothing_listening_exits_6_naming_the_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOOPLINE_ROUTER_ADDRESS", raising=False)
    address = f"127.0.0.1:{free_port()}"
    result = _invoke("classify", "hello", "--router", address, "--timeout", "5")
    assert result.exit_code == 6
    assert f"the router is not reachable at {address}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_slow_router_meets_the_timeout(router: FakeRouter) -> None:
    router.hold = threading.Event()
    try:
        result = _invoke("classify", "hello", "--timeout", "0.2")
    finally:
        router.hold.set()
    assert result.exit_code == 1
    assert "no answer within 0.2s (raise --timeout)" in result.stderr


# --- TLS ----------------------------------------------------------------------------------------


def _self_signed() -> tuple[bytes, bytes]:
    """A key and a certificate for 127.0.0.1, made with `cryptography` (skip without it)."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "loopline-test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def test_tls_with_the_ca_file_connects_and_without_it_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_pem, cert_pem = _self_signed()
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(cert_pem)
    credentials = grpc.ssl_server_credentials([(key_pem, cert_pem)])
    monkeypatch.delenv("LOOPLINE_ADMIN_TOKEN", raising=False)
    with _serve(FakeRouter(), credentials) as fake:
        monkeypatch.setenv("LOOPLINE_ROUTER_CA_FILE", str(ca_file))
        result = _invoke("feedback", "req-1", "positive", "--router", fake.address)
        assert result.exit_code == 0, result.output
        assert len(fake.calls) == 1
        missing = _invoke("feedback", "r", "l", "--ca-file", str(tmp_path / "nope.pem"))
        assert missing.exit_code == 2
        monkeypatch.delenv("LOOPLINE_ROUTER_CA_FILE")
        result = _invoke("feedback", "req-1", "positive", "--router", fake.address)
        assert result.exit_code == 6
        assert len(fake.calls) == 1
