"""Self-signed X.509 certificates for the Graph certificate-credential tests.

What a tenant administrator makes with ``openssl req -x509 -newkey rsa:2048`` (or
``New-SelfSignedCertificate``) and uploads to the app registration: the certificate's public
part goes to Entra (`GraphServer.register_certificate`), certificate + key to the profile's
``client_certificate``.
"""

from __future__ import annotations

import datetime as dt
import functools
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


@functools.cache
def rsa_key(n: int = 0, bits: int = 2048) -> rsa.RSAPrivateKey:
    """The ``n``-th test key (cached: generating one takes tens of milliseconds)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


@dataclass(frozen=True)
class AppCertificate:
    certificate: x509.Certificate
    cert_pem: str
    key_pem: str

    @property
    def pem(self) -> str:
        """Certificate followed by its key: what ``client_certificate`` holds."""
        return self.cert_pem + self.key_pem


def make(*, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None = None,
         common_name: str = "serversync graph app",
         not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
         ) -> AppCertificate:
    now = dt.datetime.now(dt.UTC)
    private = key if key is not None else rsa_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    certificate = (x509.CertificateBuilder()
                   .subject_name(name).issuer_name(name)
                   .public_key(private.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(not_before or now - dt.timedelta(days=1))
                   .not_valid_after(not_after or now + dt.timedelta(days=365))
                   .sign(private, hashes.SHA256()))
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = private.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
    return AppCertificate(certificate, cert_pem, key_pem)
