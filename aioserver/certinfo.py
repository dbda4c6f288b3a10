"""What a PEM certificate file says: subject, names, issuer, expiry; for ``--check`` and the logs.

The default install has no ``cryptography``, and the ``ssl`` module decodes only the
certificates it verified (``getpeercert``) or CA certificates (``get_ca_certs``, which skips a
server's own): so the few fields shown here are read from the DER (RFC 5280 section 4.1)
directly. Display only: what OpenSSL will serve is decided by OpenSSL when it loads the file.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from .files import TLS_FILE_LIMIT, read_small_file
from .logtext import loggable

WARN_BEFORE = timedelta(days=14)  # an expiry nearer than this is a WARNING line

_BEGIN, _END = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
_OID_ARC_BITS = 160  # an arc longer is no OID one meets (a UUID's, 2.25.N, has 128 bits)

# The attribute types of names one meets (RFC 4519, RFC 4514's short names); others show as OIDs.
_ATTRIBUTES = {
    "2.5.4.3": "CN",
    "2.5.4.5": "serialNumber",
    "2.5.4.6": "C",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.9": "street",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "0.9.2342.19200300.100.1.25": "DC",
    "0.9.2342.19200300.100.1.1": "UID",
    "1.2.840.113549.1.9.1": "emailAddress",
}
_SUBJECT_ALT_NAME = "2.5.29.17"
_STRING_CODECS = {
    0x0C: "utf-8",  # UTF8String
    0x12: "ascii",  # NumericString
    0x13: "ascii",  # PrintableString
    0x14: "latin-1",  # TeletexString, as everyone reads it
    0x16: "ascii",  # IA5String
    0x1A: "ascii",  # VisibleString
    0x1C: "utf-32-be",  # UniversalString
    0x1E: "utf-16-be",  # BMPString
}


@dataclass(frozen=True)
class CertificateInfo:
    """The fields of a certificate that an operator checks."""

    subject: tuple[tuple[str, str], ...]  # (attribute, value), in the certificate's order
    issuer: tuple[tuple[str, str], ...]
    names: tuple[str, ...]  # subjectAltName: "DNS:example.com", "IP:192.0.2.1", ...
    not_before: datetime
    not_after: datetime


class CertificateFileError(Exception):
    """A certificate file that cannot be read, or holds a certificate that cannot be decoded."""


def read_certificates(path: str) -> list[CertificateInfo]:
    """The certificates of a PEM file, in its order (blocking); raises CertificateFileError."""
    try:
        pem = read_small_file(path, TLS_FILE_LIMIT)  # a FIFO, a device: refused, not waited for
    except OSError as exc:
        raise CertificateFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    certificates = []
    for number, block in enumerate(_pem_blocks(pem), 1):
        try:
            certificates.append(decode_certificate(ssl.PEM_cert_to_DER_cert(block.decode("ascii"))))
        except (ValueError, IndexError) as exc:
            raise CertificateFileError(f"{path}: certificate {number} cannot be decoded: {exc}") from None
    if not certificates:
        raise CertificateFileError(f"{path} holds no PEM certificate")
    return certificates


def _pem_blocks(pem: bytes) -> list[bytes]:
    """Each BEGIN CERTIFICATE ... END CERTIFICATE block, in one pass over ``pem``.

    Not a regular expression: a lazy one looks for each BEGIN's END to the end of the file,
    and a file of BEGIN lines without an END took minutes.
    """
    blocks = []
    position = 0
    while (start := pem.find(_BEGIN, position)) >= 0:
        after = start + len(_BEGIN)
        if not pem[after : after + 1].isspace():
            position = after
            continue
        end = pem.find(_END, after)
        if end < 0:
            break  # no END after this BEGIN, nor after any later one
        blocks.append(pem[start : end + len(_END)])
        position = end + len(_END)
    return blocks


def describe_certificates(path: str, now: datetime | None = None) -> list[str]:
    """Lines saying, for each certificate of ``path``, its subject, names, issuer and days left.

    The first certificate of a served chain is its leaf. A certificate with fewer than 14 days
    left gets a WARNING line, one past its date says EXPIRED, one not valid yet says so too.
    A file that cannot be read or decoded is a WARNING line saying why.
    """
    now = now or datetime.now(UTC)
    try:
        certificates = read_certificates(path)
    except CertificateFileError as exc:
        return [f"WARNING: {loggable(str(exc))}"]
    lines = []
    for number, certificate in enumerate(certificates, 1):
        label = f"{path}, certificate {number} of {len(certificates)}"
        left = certificate.not_after - now
        if left < timedelta(0):
            expiry = f"{_date(certificate.not_after)} (EXPIRED)"
        else:
            expiry = f"{_date(certificate.not_after)} ({left.days} days left)"
        lines += [
            f"{loggable(label)}: {_name(certificate.subject)}",
            f"  names: {', '.join(map(loggable, certificate.names)) or 'none'}",
            f"  issuer: {_name(certificate.issuer)}",
            f"  not after: {expiry}",
        ]
        if left < timedelta(0):
            lines.append(f"WARNING: {loggable(label)} EXPIRED on {_date(certificate.not_after)}")
        elif left < WARN_BEFORE:
            lines.append(f"WARNING: {loggable(label)} expires in {left.days} days, on {_date(certificate.not_after)}")
        if certificate.not_before > now:
            lines.append(f"WARNING: {loggable(label)} is not valid before {_date(certificate.not_before)}")
    return lines


def _date(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _name(attributes: tuple[tuple[str, str], ...]) -> str:
    """``CN=example.com, O=Example``: RFC 4514's form, in the certificate's order."""
    if not attributes:
        return "(empty)"
    escaped = (value.replace("\\", "\\\\").replace(",", "\\,") for _, value in attributes)
    return loggable(", ".join(f"{kind}={value}" for (kind, _), value in zip(attributes, escaped, strict=True)))


# -- DER, as far as these fields need (X.690; RFC 5280 section 4.1)


def _elements(data: bytes) -> list[tuple[int, bytes]]:
    """The (tag, content) of each element that ``data`` holds, one after the other."""
    elements = []
    position = 0
    while position < len(data):
        tag, length = data[position], data[position + 1]
        if tag & 0x1F == 0x1F:
            raise ValueError("a multi-byte tag")
        position += 2
        if length & 0x80:
            count = length & 0x7F
            if not 0 < count <= 4:
                raise ValueError("a length of an unsupported form")
            length = int.from_bytes(data[position : position + count], "big")
            position += count
        if position + length > len(data):
            raise ValueError("truncated")
        elements.append((tag, data[position : position + length]))
        position += length
    return elements


def _expect(element: tuple[int, bytes], tag: int, what: str) -> bytes:
    if element[0] != tag:
        raise ValueError(f"{what}: tag {element[0]:#04x}, expected {tag:#04x}")
    return element[1]


def decode_certificate(der: bytes) -> CertificateInfo:
    """The fields of one DER certificate; raises ValueError (or IndexError) when it is not one."""
    (certificate,) = _elements(der)
    tbs = _elements(_expect(_elements(_expect(certificate, 0x30, "certificate"))[0], 0x30, "tbsCertificate"))
    if tbs[0][0] == 0xA0:  # [0] version, absent in v1
        tbs = tbs[1:]
    _serial, _signature, issuer, validity, subject, _key, *optional = tbs
    not_before, not_after = (_time(element) for element in _elements(_expect(validity, 0x30, "validity")))
    extensions = next((content for tag, content in optional if tag == 0xA3), None)  # [3]
    return CertificateInfo(
        subject=_attributes(_expect(subject, 0x30, "subject")),
        issuer=_attributes(_expect(issuer, 0x30, "issuer")),
        names=_alt_names(extensions) if extensions is not None else (),
        not_before=not_before,
        not_after=not_after,
    )


def _oid(content: bytes) -> str:
    numbers, value = [], 0
    for byte in content:
        value = value << 7 | byte & 0x7F
        if value >> _OID_ARC_BITS:  # else each shift copies an ever longer number: quadratic
            raise ValueError(f"an OID arc of more than {_OID_ARC_BITS} bits")
        if not byte & 0x80:
            numbers.append(value)
            value = 0
    if not numbers:
        raise ValueError("an empty OID")
    first = min(numbers[0] // 40, 2)
    return ".".join(map(str, [first, numbers[0] - 40 * first, *numbers[1:]]))


def _attributes(name: bytes) -> tuple[tuple[str, str], ...]:
    """A Name's attributes (RFC 5280 section 4.1.2.4): a SEQUENCE of SETs of (type, value)."""
    attributes = []
    for relative in _elements(name):
        for pair in _elements(_expect(relative, 0x31, "name")):
            kind, (tag, value) = _elements(_expect(pair, 0x30, "attribute"))[:2]
            oid = _oid(_expect(kind, 0x06, "attribute type"))
            codec = _STRING_CODECS.get(tag)
            text = value.decode(codec, errors="replace") if codec else "#" + value.hex()
            attributes.append((_ATTRIBUTES.get(oid, oid), text))
    return tuple(attributes)


def _time(element: tuple[int, bytes]) -> datetime:
    tag, content = element
    text = content.decode("ascii")
    if tag == 0x17:  # UTCTime: YYMMDDHHMMSSZ, years 1950 to 2049 (RFC 5280 section 4.1.2.5.1)
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != 0x18:  # GeneralizedTime: YYYYMMDDHHMMSSZ
        raise ValueError(f"a time of tag {tag:#04x}")
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)


def _alt_names(extensions: bytes) -> tuple[str, ...]:
    """The DNS names, IP addresses, e-mail addresses and URIs of the subjectAltName extension."""
    (sequence,) = _elements(extensions)
    for extension in _elements(_expect(sequence, 0x30, "extensions")):
        parts = _elements(_expect(extension, 0x30, "extension"))
        if _oid(_expect(parts[0], 0x06, "extension type")) != _SUBJECT_ALT_NAME:
            continue
        (general_names,) = _elements(_expect(parts[-1], 0x04, "extension value"))
        names = []
        for tag, content in _elements(_expect(general_names, 0x30, "subjectAltName")):
            if tag == 0x82:  # [2] dNSName
                names.append(f"DNS:{content.decode('ascii', errors='replace')}")
            elif tag == 0x87:  # [7] iPAddress: 4 or 16 bytes
                names.append(f"IP:{ipaddress.ip_address(content)}")
            elif tag == 0x81:  # [1] rfc822Name
                names.append(f"email:{content.decode('ascii', errors='replace')}")
            elif tag == 0x86:  # [6] uniformResourceIdentifier
                names.append(f"URI:{content.decode('ascii', errors='replace')}")
        return tuple(names)
    return ()
