"""Certificates and site keys for a Kumiki deployment (``kumiki certs DIR``).

One directory holds everything a federation needs, made with the ``cryptography``
package (a dependency of flwr, so nothing extra is installed)::

    DIR/ca.crt              the federation's root certificate: every host gets a copy
    DIR/ca.key              its private key: keep it offline, on the operator's machine only
    DIR/superlink.crt       the SuperLink's TLS certificate, signed by ca.key, for the names below
    DIR/superlink.key       its private key (server host only)
    DIR/operator.crt        the operator's client certificate (CN kumiki-operator, clientAuth), signed by ca.key:
                            the proxy's Control API listener admits only it (mutual TLS, ``deploy/proxy.py``)
    DIR/operator.key        its private key (the operator's machine only)
    DIR/app-signing.key     the operator's ed25519 app-signing key (OpenSSH): every app submitted is signed with it
    DIR/app-signing.pub     its public key (OpenSSH): every factory verifies apps against it (``launch/fastpath.py``, app-verify)
    DIR/superexec.secret    shared secret of the SuperLink and the SuperExec that runs the ServerApp
                            (Flower's SuperExec authentication, ``--superexec-auth-secret-file``)
    DIR/sites/<site>.key    one ECDSA P-384 key per factory, OpenSSH format (that factory's host only)
    DIR/sites/<site>.pub    its public key: what the operator registers with ``flwr supernode register``
    DIR/sites/<site>.superexec.secret   the factory's SuperNode <-> SuperExec shared secret

The SuperLink certificate's subject alternative names are the names the SuperLink is
dialled by: ``superlink`` (the compose service), ``localhost``, ``127.0.0.1``, ``::1``,
``host.docker.internal`` (a factory container on the server's own host) and every ``--host`` the operator gives (a DNS name or an IP address of the server host).
SuperNode authentication in Flower 1.41 needs EC keys on a NIST curve, loaded with
``load_ssh_private_key``; node ids are fixed when a key is registered.

Running it again is safe: existing files are kept, missing ones (a new factory's key) are
added. ``rotate=[site]`` replaces a factory's key (the old pair is kept as ``*.old-<time>``),
``renew_superlink=True`` re-issues the SuperLink certificate (new names) with the same CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kumiki.atomic import atomic_bytes

#: the names every SuperLink certificate carries (compose service name + loopback)
DEFAULT_NAMES = ("superlink", "localhost", "127.0.0.1", "::1", "host.docker.internal")
#: the factories the repository ships (deploy/sites/*.env, deploy/factories.toml)
DEFAULT_SITES = ("factory-a", "factory-b", "factory-c")
CA_DAYS, CERT_DAYS = 3650, 825
_SITE_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class CertError(ValueError):
    """Bad input to ``make_certs`` (a site or host name that cannot be used)."""


@dataclass
class CertBundle:
    """Paths of one certificates directory; ``created`` lists what this call wrote."""

    root: Path
    sites: list[str]
    created: list[Path] = field(default_factory=list)

    @property
    def ca_crt(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def superlink_crt(self) -> Path:
        return self.root / "superlink.crt"

    @property
    def superlink_key(self) -> Path:
        return self.root / "superlink.key"

    @property
    def operator_crt(self) -> Path:
        return self.root / "operator.crt"

    @property
    def operator_key(self) -> Path:
        return self.root / "operator.key"

    @property
    def app_signing_key(self) -> Path:
        return self.root / "app-signing.key"

    @property
    def app_signing_pub(self) -> Path:
        return self.root / "app-signing.pub"

    @property
    def superexec_secret(self) -> Path:
        return self.root / "superexec.secret"

    def site_key(self, site: str) -> Path:
        return self.root / "sites" / f"{site}.key"

    def site_pub(self, site: str) -> Path:
        return self.root / "sites" / f"{site}.pub"

    def site_secret(self, site: str) -> Path:
        return self.root / "sites" / f"{site}.superexec.secret"


def check_site_name(site: str) -> str:
    if not _SITE_RE.match(site):
        raise CertError(f"site name {site!r}: use lower-case letters, digits, '-', '_' or '.' (at most 63)")
    return site


def _write(path: Path, data: bytes, private: bool, bundle: CertBundle) -> None:
    """Write atomically; private files are created 0600 (never world-readable, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_bytes(path, data, mode=0o600 if private else 0o644)
    bundle.created.append(path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in dict.fromkeys(names):  # de-duplicated, order kept
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            if not re.match(r"^[A-Za-z0-9*]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$", n):
                raise CertError(f"--host {n!r} is neither a DNS name nor an IP address") from None
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew


def _make_ca(bundle: CertBundle, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Kumiki federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "Kumiki federation CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(_now())
            .not_valid_after(_now() + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA384()))
    _write(bundle.ca_key, _pem_key(key), True, bundle)
    _write(bundle.ca_crt, cert.public_bytes(serialization.Encoding.PEM), False, bundle)
    return key, cert


def _load_ca(bundle: CertBundle) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = serialization.load_pem_private_key(bundle.ca_key.read_bytes(), None)
    cert = x509.load_pem_x509_certificate(bundle.ca_crt.read_bytes())
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{bundle.ca_key} is not the EC key kumiki certs writes")
    return key, cert


def _make_superlink_cert(bundle: CertBundle, ca_key, ca_cert: x509.Certificate, names: list[str], days: int) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Kumiki federation"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(_now())
            .not_valid_after(_now() + dt.timedelta(days=days))
            .add_extension(_san(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write(bundle.superlink_key, _pem_key(key), True, bundle)
    _write(bundle.superlink_crt, cert.public_bytes(serialization.Encoding.PEM), False, bundle)


#: the operator's client certificate's common name (``deploy/proxy.py`` checks it)
OPERATOR_CN = "kumiki-operator"


def _make_operator_cert(bundle: CertBundle, ca_key, ca_cert: x509.Certificate, days: int) -> None:
    """A client certificate (clientAuth only) for the operator: the proxy's Control API listener wants it."""
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Kumiki federation"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, OPERATOR_CN)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(_now())
            .not_valid_after(_now() + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write(bundle.operator_key, _pem_key(key), True, bundle)
    _write(bundle.operator_crt, cert.public_bytes(serialization.Encoding.PEM), False, bundle)


def _make_app_signing_key(bundle: CertBundle) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    # OpenSSH format: what Flower's ed25519 loader (flwr.supercore.primitives.asymmetric_ed25519) reads
    _write(bundle.app_signing_key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                     serialization.NoEncryption()), True, bundle)
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(bundle.app_signing_pub, pub + b" kumiki-app-signing\n", False, bundle)


def site_keypair() -> tuple[bytes, bytes]:
    """(private, public) of a new SuperNode key: ECDSA P-384, OpenSSH format (what flwr 1.41 loads)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public


def _make_site(bundle: CertBundle, site: str) -> None:
    private, public = site_keypair()
    _write(bundle.site_key(site), private, True, bundle)
    _write(bundle.site_pub(site), public + f" kumiki-site:{site}\n".encode(), False, bundle)


def superlink_names(cert_path: Path) -> list[str]:
    """The subject alternative names of a certificate (DNS names and IPs, as strings)."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in san]


def make_certs(root: str | Path, sites: list[str] | tuple[str, ...] = DEFAULT_SITES, hosts: list[str] | None = None,
               *, rotate: list[str] | None = None, renew_superlink: bool = False, days: int = CERT_DAYS) -> CertBundle:
    """Create what is missing under ``root`` (see the module docstring); return the bundle."""
    bundle = CertBundle(Path(root), [check_site_name(s) for s in sites])
    rotate = [check_site_name(s) for s in rotate or []]
    names = [*DEFAULT_NAMES, *(hosts or [])]
    _san(names)  # reject a bad --host before writing anything
    bundle.root.mkdir(parents=True, exist_ok=True)
    os.chmod(bundle.root, 0o700)
    if bundle.ca_key.is_file() and bundle.ca_crt.is_file():
        ca_key, ca_cert = _load_ca(bundle)
    elif bundle.ca_crt.exists() or bundle.ca_key.exists():
        raise CertError(f"{bundle.root} has only half a CA (ca.crt / ca.key); restore the missing file or use a new DIR")
    else:
        ca_key, ca_cert = _make_ca(bundle, CA_DAYS)
    have = bundle.superlink_crt.is_file() and bundle.superlink_key.is_file()
    if have and hosts and not set(names) <= set(superlink_names(bundle.superlink_crt)):
        if not renew_superlink:
            raise CertError(f"{bundle.superlink_crt} does not cover {sorted(set(names) - set(superlink_names(bundle.superlink_crt)))}; "
                            "pass --renew-superlink to re-issue it (same CA; restart the SuperLink afterwards)")
    if have and renew_superlink:  # keep the names it had: a renewal adds names, it never drops one
        names = [*names, *superlink_names(bundle.superlink_crt)]
    if not have or renew_superlink:
        _make_superlink_cert(bundle, ca_key, ca_cert, names, days)
    if not (bundle.operator_crt.is_file() and bundle.operator_key.is_file()):
        _make_operator_cert(bundle, ca_key, ca_cert, days)
    if not (bundle.app_signing_key.is_file() and bundle.app_signing_pub.is_file()):
        _make_app_signing_key(bundle)
    if not bundle.superexec_secret.is_file():
        _write(bundle.superexec_secret, secrets.token_hex(32).encode(), True, bundle)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for site in dict.fromkeys([*bundle.sites, *rotate]):
        if site in rotate and bundle.site_key(site).is_file():
            for p in (bundle.site_key(site), bundle.site_pub(site)):
                if p.exists():
                    p.rename(p.with_name(f"{p.name}.old-{stamp}"))
        if not bundle.site_key(site).is_file():
            _make_site(bundle, site)
        if not bundle.site_secret(site).is_file():
            _write(bundle.site_secret(site), secrets.token_hex(32).encode(), True, bundle)
        if site not in bundle.sites:
            bundle.sites.append(site)
    return bundle
