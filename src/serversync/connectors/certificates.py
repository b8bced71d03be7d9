"""Certificate credentials for the Microsoft identity platform: signed client assertions.

Follows "Microsoft identity platform application authentication certificate credentials"
(https://learn.microsoft.com/en-us/entra/identity-platform/certificate-credentials). Instead
of a client secret, the client-credentials token request carries
``client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer`` and a
``client_assertion``: a JWT signed with the private key of a certificate uploaded to the app
registration. Its header names the certificate by ``x5t#S256`` (base64url SHA-256 of the DER
certificate); its claims are ``aud`` (the token endpoint), ``iss`` = ``sub`` = the client
id, a fresh ``jti``, and ``nbf``/``iat``/``exp`` spanning 10 minutes at most.

Why PS256: the page says ``alg`` "should be PS256" and "use PSS padding"; RFC 7518 §3.5
fixes the PSS salt at the hash length. Why no PyJWT: signing is one `cryptography` call,
as for the Google service-account assertion (`connectors.gmail`).

The profile keeps certificate and key as one PEM text (``client_certificate``, encrypted at
rest like every secret). `load` refuses what Microsoft could never accept — no certificate,
no key, a key that is not RSA or does not belong to the certificate, an encrypted key —
with a one-line `ConfigError` naming the field; `ClientCertificate.check_valid` refuses an
expired or not-yet-valid certificate before any request is sent.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from serversync.core.errors import AuthError, ConfigError

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME_S = 600  # "keep it short - 5-10 minutes after nbf at most"
FIELD = "client_certificate"
MIN_KEY_BITS = 2048

_KEY_BLOCK = re.compile(
    r"-----BEGIN (?P<kind>(?:RSA |ENCRYPTED |EC )?PRIVATE KEY)-----.*?-----END (?P=kind)-----",
    re.DOTALL)
_FIX = ("give the PEM text of the certificate uploaded to the app registration followed by "
        "its unencrypted private key (for example: cat cert.pem key.pem)")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """A certificate and its RSA private key, ready to sign client assertions."""

    certificate: x509.Certificate
    key: rsa.RSAPrivateKey

    @property
    def thumbprint_s256(self) -> str:
        """``x5t#S256``: base64url SHA-256 of the certificate's DER encoding."""
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        return _b64url(hashlib.sha256(der).digest())

    @property
    def sha1_thumbprint(self) -> str:
        """The hex thumbprint the Entra admin center lists under Certificates & secrets."""
        return self.certificate.fingerprint(hashes.SHA1()).hex().upper()  # noqa: S303

    @property
    def not_before(self) -> dt.datetime:
        return self.certificate.not_valid_before_utc

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc

    def describe(self) -> str:
        """Subject, thumbprint and validity: public facts, safe for logs and alerts."""
        return (f"certificate {self.certificate.subject.rfc4514_string() or '(no subject)'} "
                f"(thumbprint {self.sha1_thumbprint}, valid until "
                f"{self.not_after:%Y-%m-%d %H:%M} UTC)")

    def check_valid(self, now: dt.datetime | None = None) -> None:
        """Refuse a certificate outside its validity period: the token endpoint would too."""
        moment = now or dt.datetime.now(dt.UTC)
        if moment >= self.not_after:
            raise AuthError(
                f"the client certificate expired on {self.not_after:%Y-%m-%d %H:%M} UTC "
                f"({self.describe()})",
                fix="create a new certificate, upload its public part to the app registration "
                    "(Certificates & secrets → Certificates) and update client_certificate",
                code="client-certificate-expired")
        if moment < self.not_before:
            raise AuthError(
                f"the client certificate is not valid before {self.not_before:%Y-%m-%d %H:%M} "
                f"UTC ({self.describe()})",
                fix="wait until it becomes valid, or check this server's clock (NTP)",
                code="client-certificate-not-yet-valid")

    def assertion(self, client_id: str, audience: str, *, now: float | None = None,
                  jti: str | None = None) -> str:
        """The signed ``client_assertion`` JWT (PS256) for ``client_id`` at ``audience``."""
        issued = int(now if now is not None else time.time())
        header = {"alg": "PS256", "typ": "JWT", "x5t#S256": self.thumbprint_s256}
        claims = {"aud": audience, "iss": client_id, "sub": client_id,
                  "jti": jti or str(uuid.uuid4()), "nbf": issued, "iat": issued,
                  "exp": issued + ASSERTION_LIFETIME_S}
        signing_input = ".".join(_b64url(json.dumps(part, separators=(",", ":")).encode())
                                 for part in (header, claims))
        signature = self.key.sign(
            signing_input.encode(),
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH),
            hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"


def load(pem: str, field: str = FIELD) -> ClientCertificate:
    """Certificate and private key from one PEM text; a `ConfigError` naming ``field``."""
    data = pem.strip().encode()
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(field, "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                          fix=_FIX) from None
    block = _KEY_BLOCK.search(pem)
    if block is None:
        raise ConfigError(field, "holds no PEM private key (-----BEGIN PRIVATE KEY-----)",
                          fix=_FIX)
    if block["kind"].startswith("ENCRYPTED"):
        raise ConfigError(field, "the private key is encrypted with a passphrase",
                          fix="store it unencrypted (openssl pkey -in key.pem): the field is "
                              "encrypted at rest")
    try:
        key = serialization.load_pem_private_key(block.group(0).encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(field, "the private key cannot be read", fix=_FIX) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError(field, "the private key is not an RSA key",
                          fix="Microsoft Entra certificate credentials use RSA keys (2048 bits "
                              "or more)")
    if key.key_size < MIN_KEY_BITS:
        raise ConfigError(field, f"the RSA key has {key.key_size} bits, fewer than "
                          f"{MIN_KEY_BITS}", fix="create a certificate with a 2048-bit key")
    mine = key.public_key().public_numbers()
    for certificate in certificates:  # the leaf may come with its chain, in any order
        public = certificate.public_key()
        if isinstance(public, rsa.RSAPublicKey) and public.public_numbers() == mine:
            return ClientCertificate(certificate, key)
    raise ConfigError(field, "the private key does not belong to the certificate",
                      fix="give the certificate and the key that were created together")
