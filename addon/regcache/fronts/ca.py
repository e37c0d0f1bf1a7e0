"""The proxy's certificate authority, in mitmproxy's confdir: what it is (`read_ca`, for the
start-up log and `regcache ca show`), a new root (`create_root`, ECDSA P-256 unless asked for
RSA), and the upgrade of an existing RSA root that clients already trust (`upgrade`).

Why the key type matters: mitmproxy mints every leaf certificate with the CA's own key pair (the
leaf's public key is the CA's), so the CA's key signs every TLS handshake the proxy makes with a
client, and registry clients open a new connection for nearly every request. An ECDSA P-256
signature costs about half of an RSA-2048 one (~0.55 ms less per handshake here). mitmproxy
itself creates RSA CAs only, but serves whatever key its CA file holds.

The upgrade needs no client to change anything: a new ECDSA CA certificate *issued by the old RSA
root* (an intermediate, path length 0, not outliving the root). `mitmproxy-ca.pem` then holds the
ECDSA key, the intermediate and the root; mitmproxy serves a CA file with more than one
certificate as a chain, so clients that trust only the old root verify the new leaves. The RSA
signature on the intermediate is made once, here; clients verify it (cheap), nobody makes it again.

Files (mitmproxy's names, as its `CertStore.create_store` writes them):

- `mitmproxy-ca.pem`: the serving CA's private key, its certificate, then (upgraded) the root. 0600.
- `mitmproxy-ca.p12`: the same in PKCS#12. 0600.
- `mitmproxy-ca-cert.pem`, `.cer`, `-cert.p12`: the root certificate, what clients trust.
- `mitmproxy-ca-root.pem`: after an upgrade, the root's private key and certificate, kept to
  issue the next intermediate. 0600.

mitmproxy writes `mitmproxy-dhparam.pem` itself when it is missing. Every file is replaced
atomically (a temporary file, then a rename), so a crash leaves the old CA or the new one. A
private key is never logged or printed.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

BASENAME = "mitmproxy"  # mitmproxy's CONF_BASENAME
CA_FILE = f"{BASENAME}-ca.pem"
CA_P12 = f"{BASENAME}-ca.p12"
CA_CERT = f"{BASENAME}-ca-cert.pem"  # what clients trust
CA_CERT_FILES = (CA_CERT, f"{BASENAME}-ca-cert.cer")
CA_CERT_P12 = f"{BASENAME}-ca-cert.p12"
ROOT_KEY_FILE = f"{BASENAME}-ca-root.pem"  # an upgraded CA's root key
LIFETIME = datetime.timedelta(days=10 * 365)  # mitmproxy's CA_EXPIRY
BACKDATE = datetime.timedelta(days=2)  # as mitmproxy: clocks that lag a little still accept it
INTERMEDIATE_CN = f"{BASENAME} ECDSA"
# Why an RSA root should be upgraded, for the start-up log and `regcache ca show`.
UPGRADE_HINT = "makes every TLS handshake cheaper (an ECDSA intermediate under this root: clients keep trusting it)"

CaKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
KeyKind = Literal["ecdsa", "rsa"]


class CaError(Exception):
    """The confdir's CA cannot be used or changed as asked; the message says why, in one line."""


@dataclass(frozen=True)
class CaState:
    """What a confdir's CA is, from its certificates alone (the key is never read for this)."""

    confdir: Path
    key_type: str  # of the serving CA: "ECDSA P-256", "RSA-2048", ...
    name: str  # the serving CA's common name
    root_key_type: str
    root_name: str
    intermediate: bool  # the serving CA is issued by the root clients trust
    not_after: datetime.datetime  # the serving CA's

    @property
    def ecdsa(self) -> bool:
        return self.key_type.startswith("ECDSA")

    @property
    def upgradable(self) -> bool:
        """An RSA root: `regcache ca upgrade` would make every handshake cheaper, trust unchanged."""
        return not self.ecdsa and not self.intermediate

    def describe(self) -> str:
        if self.intermediate:
            return (
                f"{self.key_type} intermediate '{self.name}' under the {self.root_key_type} root "
                f"'{self.root_name}' that clients trust"
            )
        return f"{self.key_type} root '{self.name}'"


def key_type(key: object) -> str:
    """`ECDSA P-256`, `RSA-2048`, … for a public or private key."""
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return {"secp256r1": "ECDSA P-256", "secp384r1": "ECDSA P-384"}.get(key.curve.name, f"ECDSA {key.curve.name}")
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return f"RSA-{key.key_size}"
    return type(key).__name__


def read_ca(confdir: Path) -> CaState | None:
    """The CA in `confdir` (None: there is none yet). Raises CaError for a file with no certificate."""
    path = confdir / CA_FILE
    try:
        certificates = _certificates(path.read_bytes(), path)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise CaError(f"{path}: {err.strerror or err}") from err
    serving, root = certificates[0], certificates[-1]
    return CaState(
        confdir=confdir,
        key_type=key_type(serving.public_key()),
        name=_common_name(serving),
        root_key_type=key_type(root.public_key()),
        root_name=_common_name(root),
        intermediate=len(certificates) > 1,
        not_after=serving.not_valid_after_utc,
    )


def create_root(confdir: Path, kind: KeyKind = "ecdsa") -> None:
    """A new self-signed root (`kind` ecdsa: P-256, rsa: 2048 bits) in `confdir`, as every file
    mitmproxy would write for a new one. `mitmproxy-ca.pem` comes last: until it is there, this
    confdir has no CA (mitmproxy too looks for that file), so a crash half-way leaves none."""
    key: CaKey = ec.generate_private_key(ec.SECP256R1()) if kind == "ecdsa" else rsa.generate_private_key(65537, 2048)
    name = _name(BASENAME)
    now = datetime.datetime.now(datetime.UTC)
    certificate = _ca_builder(name, name, key.public_key(), None, now - BACKDATE, now + LIFETIME).sign(
        key, hashes.SHA256()
    )
    confdir.mkdir(parents=True, exist_ok=True)
    _write_trusted(confdir, certificate)
    _write_serving(confdir, key, [certificate])


def ensure_root(confdir: Path) -> bool:
    """An ECDSA root in `confdir` unless it has a CA already (then nothing changes). True: created."""
    if (confdir / CA_FILE).exists():
        return False
    create_root(confdir)
    return True


@dataclass(frozen=True)
class Upgrade:
    """What `upgrade` did: `done` False means the CA was ECDSA already (`state` says how)."""

    done: bool
    state: CaState


def upgrade(confdir: Path) -> Upgrade:
    """Give an RSA root's confdir an ECDSA intermediate issued by that root (module docstring).
    Idempotent: a CA whose key is ECDSA already is left as it is."""
    state = read_ca(confdir)
    if state is None:
        raise CaError(f"no CA in {confdir} ({CA_FILE}): `regcache run` creates an ECDSA one on its first start")
    if state.ecdsa:
        return Upgrade(False, state)
    path = confdir / CA_FILE
    root_key, certificates = _load_ca(path)
    root = certificates[0]
    if len(certificates) > 1 or root.issuer != root.subject or not _is_ca(root):
        raise CaError(f"{path}: not a self-signed root CA ({state.describe()}): only a root can be upgraded")
    now = datetime.datetime.now(datetime.UTC)
    if root.not_valid_after_utc <= now:
        raise CaError(f"{path}: the root expired on {root.not_valid_after_utc:%Y-%m-%d}: make a new one (ca new)")
    _keep_root_key(confdir, root_key, root)
    key = ec.generate_private_key(ec.SECP256R1())
    since = max(now - BACKDATE, root.not_valid_before_utc)
    until = min(now + LIFETIME, root.not_valid_after_utc)
    builder = _ca_builder(_name(INTERMEDIATE_CN), root.subject, key.public_key(), 0, since, until)
    intermediate = builder.add_extension(_authority_key_id(root), critical=False).sign(root_key, hashes.SHA256())
    _write_serving(confdir, key, [intermediate, root])
    upgraded = read_ca(confdir)
    assert upgraded is not None
    return Upgrade(True, upgraded)


def replace_root(confdir: Path, kind: KeyKind = "ecdsa") -> Path | None:
    """A new root in place of `confdir`'s CA, whose files move to a `replaced-TIME` directory
    beside them (returned; None: there was no CA). Clients must trust the new root."""
    old = [confdir / name for name in (CA_FILE, CA_P12, *CA_CERT_FILES, CA_CERT_P12, ROOT_KEY_FILE)]
    old = [path for path in old if path.exists()]
    backup = None
    if old:
        backup = confdir / f"replaced-{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%SZ}"
        backup.mkdir(mode=0o700)
        # The file that makes the CA goes first: from then on mitmproxy sees no CA, never half a one.
        for path in sorted(old, key=lambda p: p.name != CA_FILE):
            path.rename(backup / path.name)
    create_root(confdir, kind)
    return backup


# -- certificates ----------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, BASENAME),
        ]
    )


def _ca_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    path_length: int | None,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> x509.CertificateBuilder:
    """A CA certificate with the extensions mitmproxy gives its own (server auth, cert and CRL
    signing; mitmproxy 12 signs a CRL with the CA key)."""
    usage = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    return (
        x509.CertificateBuilder()
        .serial_number(x509.random_serial_number())
        .subject_name(subject)
        .issuer_name(issuer)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .public_key(public_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """The issuer's own key identifier, byte for byte (strict chain builders compare them)."""
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(_public_key(issuer))
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _public_key(certificate: x509.Certificate) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    key = certificate.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise CaError(f"a CA with a {key_type(key)} key is not supported")
    return key


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return bool(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _common_name(certificate: x509.Certificate) -> str:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else certificate.subject.rfc4514_string()


def _certificates(pem: bytes, path: Path) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError as err:
        raise CaError(f"{path}: no certificate in it ({err})") from err
    return certificates


def _load_ca(path: Path) -> tuple[CaKey, list[x509.Certificate]]:
    """The CA file's private key and certificates; CaError when the key is missing, encrypted,
    of another kind, or not the first certificate's."""
    pem = path.read_bytes()
    certificates = _certificates(pem, path)
    if b"PRIVATE KEY-----" not in pem:
        raise CaError(f"{path} holds no private key: a CA without its key cannot issue anything")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError as err:  # encrypted (mitmproxy's cert_passphrase)
        raise CaError(f"{path}: the private key is encrypted; decrypt it first") from err
    except (ValueError, UnsupportedAlgorithm) as err:
        raise CaError(f"{path}: cannot read its private key ({err})") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CaError(f"{path}: a {key_type(key)} key is not supported")
    if key.public_key() != certificates[0].public_key():
        raise CaError(f"{path}: the private key is not the key of its first certificate")
    return key, certificates


# -- files -----------------------------------------------------------------------------------


def _pem_key(key: CaKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def _pem(certificates: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def _p12(key: CaKey | None, certificates: list[x509.Certificate]) -> bytes:
    return pkcs12.serialize_key_and_certificates(
        BASENAME.encode(), key, certificates[0], certificates[1:] or None, serialization.NoEncryption()
    )


def _write_serving(confdir: Path, key: CaKey, certificates: list[x509.Certificate]) -> None:
    """The key mitmproxy signs with, and its certificate(s): the serving CA first."""
    _write_atomically(confdir / CA_P12, _p12(key, certificates), 0o600)
    _write_atomically(confdir / CA_FILE, _pem_key(key) + _pem(certificates), 0o600)


def _write_trusted(confdir: Path, root: x509.Certificate) -> None:
    for name in CA_CERT_FILES:
        _write_atomically(confdir / name, _pem([root]), 0o644)
    _write_atomically(confdir / CA_CERT_P12, _p12(None, [root]), 0o644)


def _keep_root_key(confdir: Path, key: CaKey, root: x509.Certificate) -> None:
    """The root's key and certificate in their own file, before the CA file stops holding them;
    never over another root's key."""
    path = confdir / ROOT_KEY_FILE
    if path.exists():
        kept = _certificates(path.read_bytes(), path)
        if kept[0] != root:
            raise CaError(f"{path} holds the key of another root ('{_common_name(kept[0])}'): move it away first")
    _write_atomically(path, _pem_key(key) + _pem([root]), 0o600)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """`path` holds `data` with `mode`, or (a crash) what it held before: a temporary file in the
    same directory, created with `mode` (a key is never readable by others, not for a moment)."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
