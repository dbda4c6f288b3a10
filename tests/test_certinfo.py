"""What a certificate file says (``--check``), read without ``cryptography``; checked against it."""

from __future__ import annotations

import ipaddress
import re
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import certifi
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type  # BMPString: only this way
from cryptography.x509.oid import NameOID

from aioserver.certinfo import describe_certificates, read_certificates
from aioserver.cli import main

from conftest import PemFiles, aioserver_command

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def expected(certificate: x509.Certificate) -> tuple[object, ...]:
    """What read_certificates must find, as cryptography reads it."""

    def attributes(name: x509.Name) -> tuple[tuple[str, str], ...]:
        return tuple((a.oid.dotted_string, str(a.value)) for a in name)

    try:
        alt = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names: list[str] = []
    else:
        prefixes = {
            x509.DNSName: "DNS",
            x509.IPAddress: "IP",
            x509.RFC822Name: "email",
            x509.UniformResourceIdentifier: "URI",
        }
        names = [f"{prefixes[type(n)]}:{n.value}" for n in alt if type(n) in prefixes]
    return (
        attributes(certificate.subject),
        attributes(certificate.issuer),
        tuple(names),
        certificate.not_valid_before_utc,
        certificate.not_valid_after_utc,
    )


SHORT = {"CN": "2.5.4.3", "O": "2.5.4.10", "OU": "2.5.4.11", "C": "2.5.4.6", "L": "2.5.4.7", "ST": "2.5.4.8",
         "emailAddress": "1.2.840.113549.1.9.1", "DC": "0.9.2342.19200300.100.1.25", "serialNumber": "2.5.4.5",
         "street": "2.5.4.9", "UID": "0.9.2342.19200300.100.1.1"}  # fmt: skip


def found(path: Path) -> list[tuple[object, ...]]:
    return [
        (
            tuple((SHORT.get(kind, kind), value) for kind, value in c.subject),
            tuple((SHORT.get(kind, kind), value) for kind, value in c.issuer),
            c.names,
            c.not_before,
            c.not_after,
        )
        for c in read_certificates(str(path))
    ]


def as_read(path: Path) -> list[tuple[object, ...]]:
    certificates = x509.load_pem_x509_certificates(path.read_bytes())
    return [
        (
            tuple((kind, value) for kind, value in subject),
            tuple((kind, value) for kind, value in issuer),
            names,
            before,
            after,
        )
        for subject, issuer, names, before, after in map(expected, certificates)
    ]


@pytest.mark.filterwarnings("ignore:Parsed a serial number:cryptography.utils.CryptographyDeprecationWarning")
def test_the_public_cas_read_as_cryptography_reads_them() -> None:
    """certifi's bundle: a hundred-odd real CA certificates, of every age and encoding."""
    bundle = Path(certifi.where())
    assert len(as_read(bundle)) > 100
    assert found(bundle) == as_read(bundle)


def build(
    path: Path, subject: x509.Name, not_before: datetime, not_after: datetime, sans: list[x509.GeneralName]
) -> None:
    """Append a certificate to ``path``, as cryptography makes it (X.509 v3)."""
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Some CA")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    with path.open("ab") as file:
        file.write(certificate.public_bytes(serialization.Encoding.PEM))


def build_version1(path: Path, folder: Path) -> None:
    """Append an X.509 v1 certificate (no version field, no extensions), as ``openssl x509 -req`` makes one."""
    key, request, made = folder / "v1-key.pem", folder / "v1.csr", folder / "v1.pem"
    openssl = ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    subprocess.run(
        [*openssl, "-keyout", key, "-out", request, "-subj", "/O=Home-made/CN=old"], check=True, capture_output=True
    )
    subprocess.run(
        ["openssl", "x509", "-req", "-in", request, "-signkey", key, "-out", made, "-days", "3"],
        check=True,
        capture_output=True,
    )
    assert x509.load_pem_x509_certificate(made.read_bytes()).version == x509.Version.v1
    with path.open("ab") as file:
        file.write(made.read_bytes())


def test_names_times_and_encodings(tmp_path: Path) -> None:
    path = tmp_path / "made.pem"
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bücher, Kaffee & Co"),  # UTF8String
            x509.NameAttribute(NameOID.COMMON_NAME, "bmp.example", _ASN1Type.BMPString),
            x509.NameAttribute(NameOID.EMAIL_ADDRESS, "ops@example.com"),  # IA5String
            x509.NameAttribute(x509.ObjectIdentifier("2.5.4.97"), "VATDE-123"),  # not one of ours: its OID
        ]
    )
    sans: list[x509.GeneralName] = [
        x509.DNSName("api.example.com"),
        x509.DNSName("*.example.com"),
        x509.IPAddress(ipaddress.ip_address("192.0.2.7")),
        x509.IPAddress(ipaddress.ip_address("2001:db8::1")),
        x509.RFC822Name("ops@example.com"),
        x509.UniformResourceIdentifier("https://example.com/"),
        x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "skipped")])),
    ]
    # UTCTime up to 2049, GeneralizedTime from 2050 (RFC 5280 section 4.1.2.5), on both sides of 2000.
    build(
        path,
        subject,
        datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC),
        datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC),
        sans,
    )
    build(path, subject, datetime(1950, 1, 1, tzinfo=UTC), datetime(2050, 1, 1, tzinfo=UTC), [])
    build_version1(path, tmp_path)
    assert found(path) == as_read(path)
    first = read_certificates(str(path))[0]
    assert first.names == ("DNS:api.example.com", "DNS:*.example.com", "IP:192.0.2.7", "IP:2001:db8::1",
                           "email:ops@example.com", "URI:https://example.com/")  # fmt: skip
    lines = describe_certificates(str(path), NOW)
    assert lines[0] == (
        f"{path}, certificate 1 of 3: C=DE, O=Bücher\\, Kaffee & Co, CN=bmp.example,"
        " emailAddress=ops@example.com, 2.5.4.97=VATDE-123"
    )
    assert lines[1:4] == [
        "  names: DNS:api.example.com, DNS:*.example.com, IP:192.0.2.7, IP:2001:db8::1, email:ops@example.com,"
        " URI:https://example.com/",
        "  issuer: CN=Some CA",
        "  not after: 2049-12-31 23:59:59 UTC (8614 days left)",
    ]
    assert "  names: none" in lines
    # openssl made the v1 today, after NOW: the only warning.
    (warning,) = [line for line in lines if "WARNING" in line]
    assert warning.startswith(f"WARNING: {path}, certificate 3 of 3 is not valid before ")


def test_a_served_chain_leaf_first(tmp_path: Path) -> None:
    root = trustme.CA()
    intermediate = root.create_child_ca()
    leaf = intermediate.issue_cert("api.example.com", "192.0.2.1", common_name="api")
    chain = tmp_path / "chain.pem"
    for pem in leaf.cert_chain_pems:
        pem.write_to_path(chain, append=True)
    leaf.private_key_pem.write_to_path(chain, append=True)  # a file holding its key too
    lines = describe_certificates(str(chain))
    headers = [line for line in lines if not line.startswith(" ")]
    assert len(headers) == 2 and headers[0].endswith(", CN=api")
    assert lines[1] == "  names: DNS:api.example.com, IP:192.0.2.1"
    assert "Testing CA" in lines[2] and "Testing CA" in headers[1]


@pytest.mark.parametrize(
    ("left", "warning"),
    [
        (timedelta(days=400), None),
        (timedelta(days=14, minutes=1), None),
        (timedelta(days=13, hours=23), "expires in 13 days, on 2026-06-15 11:00:00 UTC"),
        (timedelta(hours=3), "expires in 0 days, on 2026-06-01 15:00:00 UTC"),
        (-timedelta(days=2), "EXPIRED on 2026-05-30 12:00:00 UTC"),
    ],
)
def test_expiry_warnings(tmp_path: Path, left: timedelta, warning: str | None) -> None:
    path = tmp_path / "cert.pem"
    trustme.CA().issue_cert("api.example.com", not_after=NOW + left).cert_chain_pems[0].write_to_path(path)
    lines = describe_certificates(str(path), NOW)
    warnings = [line for line in lines if line.startswith("WARNING")]
    if warning is None:
        assert warnings == [] and re.fullmatch(r"  not after: .* \(\d+ days left\)", lines[3])
    else:
        assert warnings == [f"WARNING: {path}, certificate 1 of 1 {warning}"]
        assert lines[3].endswith("(EXPIRED)" if left < timedelta(0) else f"({left.days} days left)")


def test_not_valid_yet(tmp_path: Path) -> None:
    path = tmp_path / "cert.pem"
    build(
        path,
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "later")]),
        NOW + timedelta(days=1),
        NOW + timedelta(days=90),
        [],
    )
    assert describe_certificates(str(path), NOW)[-1] == (
        f"WARNING: {path}, certificate 1 of 1 is not valid before 2026-06-02 12:00:00 UTC"
    )


def test_unreadable_files_say_why(tmp_path: Path, pem_files: PemFiles) -> None:
    missing, empty, broken = tmp_path / "missing.pem", tmp_path / "empty.pem", tmp_path / "broken.pem"
    empty.write_text("nothing\n")
    pem = pem_files.ca.read_text().splitlines()
    broken.write_text("\n".join([pem[0], pem[1][:20] + "A" * 40, *pem[2:]]) + "\n")  # the DER cut short
    assert describe_certificates(str(missing)) == [f"WARNING: cannot read {missing}: No such file or directory"]
    assert describe_certificates(str(empty)) == [f"WARNING: {empty} holds no PEM certificate"]
    (line,) = describe_certificates(str(broken))
    assert line.startswith(f"WARNING: {broken}: certificate 1 cannot be decoded: ")


def test_names_cannot_forge_lines(tmp_path: Path) -> None:
    path = tmp_path / "cert.pem"
    forged = "x\nWARNING: all is well\x1b[2J"
    build(path, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, forged)]), NOW, NOW + timedelta(days=90), [])
    lines = describe_certificates(str(path), NOW)
    assert len(lines) == 4 and lines[0].endswith("CN=x\\nWARNING: all is well\\x1b[2J")


# -- --check


def test_check_prints_the_certificates(tmp_path: Path, pem_files: PemFiles, capsys: pytest.CaptureFixture[str]) -> None:
    ca = trustme.CA()
    short = ca.issue_cert("localhost", "127.0.0.1", not_after=datetime.now(UTC) + timedelta(days=5, hours=12))
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    short.cert_chain_pems[0].write_to_path(cert)
    short.private_key_pem.write_to_path(key)
    argv = ["--check", "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--ssl-ca-certs", str(pem_files.ca)]
    assert main(argv, env={}) == 0
    out = capsys.readouterr().out.splitlines()
    start = out.index("  served certificate chain:")
    assert out[start + 1].startswith(f"    {cert}, certificate 1 of 1: O=trustme")
    assert out[start + 2 : start + 5] == [
        "      names: DNS:localhost, IP:127.0.0.1",
        f"      issuer: O=trustme v{trustme.__version__}, OU=Testing CA #{out[start + 3].rpartition('#')[2]}",
        out[start + 4],
    ]
    assert re.fullmatch(r"      not after: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(5 days left\)", out[start + 4])
    assert out[start + 5] == f"    WARNING: {cert}, certificate 1 of 1 expires in 5 days, on {out[start + 4][17:40]}"
    assert out[start + 6] == "  client CA certificates:"
    assert out[start + 7].startswith(f"    {pem_files.ca}, certificate 1 of 1: O=trustme")
    assert out[start + 10] == "      not after: 3000-01-01 00:00:00 UTC (" + out[start + 10].split("(")[1]
    assert out[-1] == "OK"


def test_check_without_tls_prints_no_certificate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--check"], env={}) == 0
    assert "certificate" not in capsys.readouterr().out


def test_check_as_installed(tmp_path: Path) -> None:
    """``python -m aioserver --check`` as each install runs it: the README's first has no cryptography."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf = trustme.CA().issue_cert("api.example.com", not_after=datetime.now(UTC) - timedelta(days=3))
    leaf.cert_chain_pems[0].write_to_path(cert)
    leaf.private_key_pem.write_to_path(key)
    command = aioserver_command("--check", "--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "    names: DNS:api.example.com" in done.stdout
    assert f"    WARNING: {cert}, certificate 1 of 1 EXPIRED on " in done.stdout
