"""Certificates made in the test (``cryptography``): a mesh CA, one certificate for
every kvmesh service (server and client, SANs 127.0.0.1 and localhost), and a second,
unrelated CA with a certificate of its own (a client the mesh must refuse)."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path
    rogue_cert: Path  # signed by another CA
    rogue_key: Path

    def tls(self) -> dict[str, str]:
        """The ``security.tls`` section of a kvmesh config."""
        return {"ca_file": str(self.ca), "cert_file": str(self.cert),
                "key_file": str(self.key)}


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name))
            .issuer_name(_name(common_name)).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(common_name: str, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate
          ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def _write(folder: Path, name: str, key: ec.EllipticCurvePrivateKey | None,
           cert: x509.Certificate) -> tuple[Path, Path]:
    cert_path = folder / f"{name}.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = folder / f"{name}.key"
    if key is not None:
        key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        key_path.chmod(0o600)
    return cert_path, key_path


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca = _ca("kvmesh test CA")
    key, cert = _leaf("kvmesh", ca_key, ca)
    rogue_ca_key, rogue_ca = _ca("someone else's CA")
    rogue_key, rogue = _leaf("kvmesh", rogue_ca_key, rogue_ca)  # same name, wrong issuer
    ca_path, _ = _write(folder, "ca", None, ca)
    cert_path, key_path = _write(folder, "kvmesh", key, cert)
    rogue_cert, rogue_key_path = _write(folder, "rogue", rogue_key, rogue)
    return Pki(ca_path, cert_path, key_path, rogue_cert, rogue_key_path)
