import os
from pathlib import Path

import pytest

from controlplane import certgen
from controlplane.app import Address, Config
from controlplane.observability import grpc_core_log
from controlplane.tls import ReloadingServerCredentials, TlsError, TlsFiles, TlsMaterial


@pytest.fixture
def ca() -> certgen.Issued:
    return certgen.new_ca("test CA")


def _write_server(directory: Path, ca: certgen.Issued, name: str = "localhost") -> TlsFiles:
    certgen.issue(ca, name, dns_names=[name]).write(directory / "s.pem", directory / "s.key")
    (directory / "ca.pem").write_bytes(ca.cert_pem)
    return TlsFiles(directory / "s.pem", directory / "s.key", directory / "ca.pem")


def _replace(path: Path, data: bytes) -> None:
    """As cert-manager and SPIRE do: write beside, then rename over."""
    tmp = path.with_suffix(".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_a_consistent_set_loads(tmp_path, ca) -> None:
    material = TlsMaterial.load(_write_server(tmp_path, ca))
    assert material.client_ca == ca.cert_pem
    assert material.not_after.year >= 2027


def test_a_key_of_another_certificate_is_refused_naming_both_files(tmp_path, ca) -> None:
    files = _write_server(tmp_path, ca)
    files.key.write_bytes(certgen.issue(ca, "other").key_pem)
    with pytest.raises(
        TlsError, match=r"s\.key is not the private key of the certificate in .*s\.pem"
    ):
        TlsMaterial.load(files)


@pytest.mark.parametrize(
    ("which", "content", "message"),
    [
        ("cert", b"not pem", "not PEM certificates"),
        ("key", b"not pem", "not an unencrypted PEM private key"),
        ("client_ca", b"", "not PEM certificates"),
        ("cert", b"x" * (2 << 20), "larger than the limit of 1,048,576 bytes"),
    ],
)
def test_unusable_files_are_refused_by_name(tmp_path, ca, which, content, message) -> None:
    files = _write_server(tmp_path, ca)
    getattr(files, which).write_bytes(content)
    with pytest.raises(TlsError, match=message) as refused:
        TlsMaterial.load(files)
    assert str(getattr(files, which)) in str(refused.value)


def test_a_missing_file_is_refused_by_name(tmp_path, ca) -> None:
    files = _write_server(tmp_path, ca)
    files.key.unlink()
    with pytest.raises(TlsError, match=r"s\.key: No such file"):
        TlsMaterial.load(files)


def test_files_are_read_again_only_when_they_change(tmp_path, ca) -> None:
    files = _write_server(tmp_path, ca)
    loads: list[object] = []
    credentials = ReloadingServerCredentials(files, "xds", lambda port, m: loads.append(m))
    first = credentials.material
    assert credentials._configuration_if_changed() is None
    renewed = certgen.issue(ca, "localhost", dns_names=["localhost"])
    _replace(files.key, renewed.key_pem)
    _replace(files.cert, renewed.cert_pem)
    assert credentials._configuration_if_changed() is not None
    assert credentials.material.cert_chain == renewed.cert_pem != first.cert_chain
    assert credentials._configuration_if_changed() is None
    assert loads == [first, credentials.material]


def test_a_half_swapped_set_keeps_the_last_good_one_until_it_is_whole(tmp_path, ca) -> None:
    files = _write_server(tmp_path, ca)
    loads: list[object] = []
    credentials = ReloadingServerCredentials(files, "xds", lambda port, m: loads.append(m))
    good = credentials.material
    renewed = certgen.issue(ca, "localhost", dns_names=["localhost"])
    _replace(files.cert, renewed.cert_pem)  # the key is not there yet
    assert credentials._configuration_if_changed() is None
    assert credentials.material is good
    assert credentials._configuration_if_changed() is None  # refused once per change
    assert loads == [good, None]
    _replace(files.key, renewed.key_pem)
    assert credentials._configuration_if_changed() is not None
    assert credentials.material.cert_chain == renewed.cert_pem


def test_plaintext_is_refused_on_a_non_loopback_address_unless_allowed() -> None:
    with pytest.raises(ValueError, match=r"--xds-address 0\.0\.0\.0:18000 is not a loopback"):
        Config(xds_address=Address.parse(":18000"))
    with pytest.raises(ValueError, match=r"--admin-address 10\.0\.0\.1:18001 is not a loopback"):
        Config(admin_address=Address.parse("10.0.0.1:18001"))
    Config(xds_address=Address.parse(":18000"), allow_plaintext=True)
    Config(xds_address=Address.parse("[::1]:18000"))
    Config(xds_address=Address.parse("localhost:18000"))
    Config(
        xds_address=Address.parse(":18000"),
        admin_address=Address.parse(":18001"),
        tls_cert=Path("c"),
        tls_key=Path("k"),
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tls_cert": Path("c")}, "--tls-cert and --tls-key go together"),
        ({"xds_client_ca": Path("ca"), "trust_domain": "d"}, "needs --tls-cert"),
        (
            {"tls_cert": Path("c"), "tls_key": Path("k"), "xds_client_ca": Path("ca")},
            "--tls-client-ca and --trust-domain go together",
        ),
        (
            {"tls_cert": Path("c"), "tls_key": Path("k"), "trust_domain": "d"},
            "--tls-client-ca and --trust-domain go together",
        ),
    ],
)
def test_tls_flags_that_do_not_go_together_are_refused(fields, message) -> None:
    with pytest.raises(ValueError, match=message):
        Config(**fields)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (
            b"I1201 08:28:36.112629   26244 ssl_transport_security.cc:2563] Handshake failed "
            b"with error SSL_ERROR_SSL: error:100000c0:SSL routines:OPENSSL_internal:"
            b"PEER_DID_NOT_RETURN_A_CERTIFICATE: Invalid certificate verification context",
            "no_client_certificate",
        ),
        (
            b"I1201 08:28:36.120101   26243 ssl_transport_security.cc:2563] Handshake failed "
            b"with error SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
            b"CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate",
            "untrusted_certificate",
        ),
        (
            b"E0101 Handshake failed with fatal error SSL_ERROR_SSL: something new",
            "handshake_failed",
        ),
    ],
)
def test_grpc_core_handshake_failures_are_told_with_a_bounded_reason(line, reason) -> None:
    told: list[tuple[str, str]] = []
    grpc_core_log.subscribe(listener := lambda r, e: told.append((r, e)))
    try:
        grpc_core_log.parse_line(line)
        grpc_core_log.parse_line(b"I1201 08:28:36 chttp2_transport.cc:100] something else")
    finally:
        grpc_core_log.unsubscribe(listener)
    assert [r for r, _ in told] == [reason]
    assert told[0][1] in line.decode()
