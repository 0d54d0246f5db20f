"""TLS on the public port: a self-signed certificate made at test time, real clients on loopback."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic_settings import SettingsConfigDict

from loopline.grpc_server import running
from loopline.settings import ServiceSettings, SettingsError, load_settings

# cryptography is installed with mlflow (the trainer and monitor extras); the tests need those.
SERVING = health_pb2.HealthCheckResponse.SERVING


class RouterLikeSettings(ServiceSettings):
    """A service's settings narrow the prefix, as a real service's do."""

    model_config = SettingsConfigDict(env_prefix="LOOPLINE_ROUTER_")


def write_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key


def write_self_signed(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """A certificate for localhost and 127.0.0.1, valid for a day, signed by its own key."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(certificate, key) in PEM."""
    folder = tmp_path_factory.mktemp("tls")
    key = write_key(folder / "key.pem")
    write_self_signed(folder / "cert.pem", key)
    return folder / "cert.pem", folder / "key.pem"


def tls_settings(cert: Path, key: Path) -> ServiceSettings:
    return load_settings(
        ServiceSettings, host="127.0.0.1", port=0, tls_cert_file=cert, tls_key_file=key
    )


def no_services(_server: grpc.aio.Server) -> list[str]:
    return []


async def health_status(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return int(reply.status)


def test_health_over_tls_with_the_certificate_as_root(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files

    async def main() -> None:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        async with running(tls_settings(cert, key), no_services) as server:
            for host in ("localhost", "127.0.0.1"):  # both names are in the certificate
                address = f"{host}:{server.port}"
                async with grpc.aio.secure_channel(address, credentials) as channel:
                    assert await health_status(channel) == SERVING

    asyncio.run(main())


def test_a_plaintext_client_fails(tls_files: tuple[Path, Path]) -> None:
    async def main() -> None:
        async with (
            running(tls_settings(*tls_files), no_services) as server,
            grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await health_status(channel)
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())


def test_a_client_that_does_not_trust_the_certificate_fails(
    tls_files: tuple[Path, Path], tmp_path: Path
) -> None:
    other = tmp_path / "other.pem"
    write_self_signed(other, write_key(tmp_path / "other-key.pem"))

    async def main() -> None:
        credentials = grpc.ssl_channel_credentials(root_certificates=other.read_bytes())
        async with (
            running(tls_settings(*tls_files), no_services) as server,
            grpc.aio.secure_channel(f"localhost:{server.port}", credentials) as channel,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await health_status(channel)
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())


def test_a_key_that_does_not_match_fails_at_startup(
    tls_files: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, _ = tls_files
    wrong_key = tmp_path / "wrong.pem"
    write_key(wrong_key)

    async def main() -> None:
        async with running(tls_settings(cert, wrong_key), no_services):
            pytest.fail("the server started with a key that does not match its certificate")

    with pytest.raises(RuntimeError, match="LOOPLINE_TLS_CERT_FILE and LOOPLINE_TLS_KEY_FILE"):
        asyncio.run(main())


def test_a_file_that_is_not_pem_fails_at_startup(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")

    async def main() -> None:
        async with running(tls_settings(junk, junk), no_services):
            pytest.fail("the server started with a certificate that is not PEM")

    with pytest.raises(RuntimeError, match="cannot use the TLS certificate"):
        asyncio.run(main())


def test_certificate_and_key_go_together(
    tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tls_files
    pair = "set both LOOPLINE_ROUTER_TLS_CERT_FILE and LOOPLINE_ROUTER_TLS_KEY_FILE"
    monkeypatch.setenv("LOOPLINE_ROUTER_TLS_CERT_FILE", str(cert))
    with pytest.raises(SettingsError) as caught:
        load_settings(RouterLikeSettings)
    assert pair in caught.value.problems["LOOPLINE_ROUTER_TLS_KEY_FILE"]

    monkeypatch.delenv("LOOPLINE_ROUTER_TLS_CERT_FILE")
    with pytest.raises(SettingsError) as caught:
        load_settings(RouterLikeSettings, tls_key_file=key)
    assert pair in caught.value.problems["LOOPLINE_ROUTER_TLS_KEY_FILE"]

    monkeypatch.setenv("LOOPLINE_ROUTER_TLS_CERT_FILE", str(cert))
    monkeypatch.setenv("LOOPLINE_ROUTER_TLS_KEY_FILE", str(key))
    settings = load_settings(RouterLikeSettings)
    assert (settings.tls_cert_file, settings.tls_key_file) == (cert, key)
    assert load_settings(ServiceSettings).tls_cert_file is None  # plaintext by default


def test_missing_files_are_named(tls_files: tuple[Path, Path], tmp_path: Path) -> None:
    cert, _ = tls_files
    with pytest.raises(SettingsError) as caught:
        load_settings(RouterLikeSettings, tls_cert_file=cert, tls_key_file=tmp_path / "nope.pem")
    assert "is not a file" in caught.value.problems["LOOPLINE_ROUTER_TLS_KEY_FILE"]
    with pytest.raises(SettingsError) as caught:
        load_settings(RouterLikeSettings, tls_cert_file=tmp_path, tls_key_file=cert)
    assert "is not a file" in caught.value.problems["LOOPLINE_ROUTER_TLS_CERT_FILE"]
