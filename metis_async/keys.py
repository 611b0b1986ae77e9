"""Keys for tests and small deployments: a CA, server and learner certificates, token secrets.

    metis-async keys ca DIR                       # DIR/ca.key, DIR/ca.crt
    metis-async keys server DIR --host HOST ...   # DIR/server.key, DIR/server.crt (SANs)
    metis-async keys learner DIR ID               # DIR/learner-ID.key/.crt (CN = ID, for mTLS)
    metis-async keys token-secret FILE            # a signing secret for learner tokens
    metis-async keys learner-token ID --secret FILE [--days N]

Certificates use ECDSA P-256 (the `cryptography` package); private keys are written 0600. A
larger deployment would use its own PKI; these files are what the controller and the reference
learner read either way (PEM).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from metis_async.auth import new_secret

VALID_DAYS = 825


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "metis-async"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def create_ca(directory: str | Path) -> tuple[Path, Path]:
    """A self-signed CA in `directory` (ca.key, ca.crt); returns their paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("metis-async CA"))
        .issuer_name(_name("metis-async CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_private(out / "ca.key", _key_pem(key))
    (out / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out / "ca.key", out / "ca.crt"


def issue_certificate(
    directory: str | Path, name: str, common_name: str, hosts: list[str], server: bool
) -> tuple[Path, Path]:
    """A certificate signed by `directory`'s CA: `name`.key and `name`.crt in `directory`."""
    out = Path(directory)
    ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("ca.key is not an EC key made by `metis-async keys ca`")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_private(out / f"{name}.key", _key_pem(key))
    (out / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out / f"{name}.key", out / f"{name}.crt"


def create_server_certificate(directory: str | Path, hosts: list[str]) -> tuple[Path, Path]:
    """server.key / server.crt for `hosts` (DNS names or IP addresses)."""
    if not hosts:
        raise ValueError("a server certificate needs at least one --host")
    return issue_certificate(directory, "server", hosts[0], hosts, server=True)


def create_learner_certificate(directory: str | Path, learner_id: str) -> tuple[Path, Path]:
    """learner-ID.key / .crt whose common name is the learner id (its mTLS identity)."""
    if not learner_id or "/" in learner_id:
        raise ValueError(f"unusable learner id for a file name: {learner_id!r}")
    return issue_certificate(directory, f"learner-{learner_id}", learner_id, [], server=False)


def create_token_secret(path: str | Path) -> Path:
    """A new token-signing secret in `path` (hex, mode 0600)."""
    out = Path(path)
    _write_private(out, new_secret().hex().encode() + b"\n")
    return out


def create_admin_token(path: str | Path) -> Path:
    """A new admin token in `path` (URL-safe text, mode 0600): the Admin service's and the
    dashboard's credential (`[admin] token_file`)."""
    import secrets

    out = Path(path)
    _write_private(out, secrets.token_urlsafe(32).encode() + b"\n")
    return out
