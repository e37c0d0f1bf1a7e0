"""The proxy's CA (regcache/fronts/ca.py) and `regcache ca …`: real TLS handshakes with what
mitmproxy itself serves from the confdir (its TlsConfig addon builds the server side, a Python
`ssl` client verifies it against the one certificate it trusts), the files on disk and their modes.
"""

from __future__ import annotations

import contextlib
import datetime
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from mitmproxy import certs, tls
from mitmproxy.addons import tlsconfig
from mitmproxy.proxy import context
from mitmproxy.test import taddons, tflow
from OpenSSL import SSL

from regcache.fronts import ca
from regcache.ops import cli

# mitmproxy 11's TlsConfig hands pyOpenSSL objects to pyOpenSSL (its own business, fixed in 12).
pytestmark = pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")
HOST = "registry-1.docker.io"
KEY_FILES = (ca.CA_FILE, ca.CA_P12, ca.ROOT_KEY_FILE)


def rsa_confdir(path: Path) -> Path:
    """What an existing user has: the RSA CA mitmproxy made on its first start."""
    certs.CertStore.from_store(path, "mitmproxy", 2048)
    return path


def mitmproxy_handshake(confdir: Path, trusted: Path) -> x509.Certificate:
    """A TLS handshake between mitmproxy's client-facing side for HOST (as its TlsConfig addon sets
    it up from `confdir`) and a client that trusts only `trusted`; the leaf the client verified.
    Raises ssl.SSLCertVerificationError when the client refuses it."""
    addon = tlsconfig.TlsConfig()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, confdir=str(confdir))
        client_conn = tflow.tclient_conn()
        client_conn.sni = HOST
        data = tls.TlsData(client_conn, context=context.Context(client_conn, tctx.options))
        addon.tls_start_client(data)
    server = data.ssl_conn
    assert server is not None
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ssl.create_default_context(cafile=str(trusted)).wrap_bio(incoming, outgoing, server_hostname=HOST)
    for _ in range(10):
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        server.bio_write(outgoing.read())
        with contextlib.suppress(SSL.WantReadError):
            server.do_handshake()
        with contextlib.suppress(SSL.WantReadError):
            incoming.write(server.bio_read(65536))
    else:
        raise AssertionError("no handshake after 10 rounds")
    leaf = client.getpeercert(binary_form=True)
    assert leaf is not None
    return x509.load_der_x509_certificate(leaf)


def serving(confdir: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates((confdir / ca.CA_FILE).read_bytes())


def snapshot(confdir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(confdir.iterdir()) if p.is_file()}


def test_a_new_root_is_ecdsa_and_mitmproxy_mints_ecdsa_leaves_from_it(tmp_path: Path) -> None:
    assert ca.ensure_root(tmp_path / "conf")
    leaf = mitmproxy_handshake(tmp_path / "conf", tmp_path / "conf" / ca.CA_CERT)
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert HOST in str(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    state = ca.read_ca(tmp_path / "conf")
    assert state is not None and state.key_type == "ECDSA P-256" and not state.intermediate and not state.upgradable
    # Every file mitmproxy's create_store writes, so mitmproxy finds nothing missing.
    names = {p.name for p in (tmp_path / "conf").iterdir()}
    assert {ca.CA_FILE, ca.CA_P12, *ca.CA_CERT_FILES, ca.CA_CERT_P12} <= names
    assert (tmp_path / "conf" / ca.CA_CERT).read_bytes() == (tmp_path / "conf" / "mitmproxy-ca-cert.cer").read_bytes()


def test_ensure_root_leaves_an_existing_ca_alone(tmp_path: Path) -> None:
    confdir = rsa_confdir(tmp_path / "conf")
    before = snapshot(confdir)
    assert not ca.ensure_root(confdir)
    assert snapshot(confdir) == before


def test_the_upgraded_ca_is_trusted_by_clients_that_trust_only_the_old_rsa_root(tmp_path: Path) -> None:
    confdir = rsa_confdir(tmp_path / "conf")
    old_root = tmp_path / "old-root.pem"
    old_root.write_bytes((confdir / ca.CA_CERT).read_bytes())
    trusted = {name: (confdir / name).read_bytes() for name in (*ca.CA_CERT_FILES, ca.CA_CERT_P12)}
    old_key = serialization.load_pem_private_key((confdir / ca.CA_FILE).read_bytes(), None)

    result = ca.upgrade(confdir)

    assert result.done and result.state.intermediate and result.state.key_type == "ECDSA P-256"
    assert result.state.root_key_type == "RSA-2048"
    leaf = mitmproxy_handshake(confdir, old_root)  # the client trusts only what it trusted before
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    # What clients trust is unchanged, byte for byte.
    assert {name: (confdir / name).read_bytes() for name in trusted} == trusted
    intermediate, root = serving(confdir)
    assert root.public_bytes(serialization.Encoding.PEM) == old_root.read_bytes()
    assert intermediate.issuer == root.subject
    assert intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    assert intermediate.not_valid_after_utc <= root.not_valid_after_utc
    # The root's key is kept for the next intermediate, and the CA file's key is the new one.
    kept = (confdir / ca.ROOT_KEY_FILE).read_bytes()
    kept_key = serialization.load_pem_private_key(kept, None)
    assert isinstance(kept_key, rsa.RSAPrivateKey) and kept_key.private_numbers() == old_key.private_numbers()  # type: ignore[union-attr]
    assert x509.load_pem_x509_certificates(kept) == [root]


def test_a_new_root_is_refused_by_clients_of_the_old_one(tmp_path: Path) -> None:
    confdir = rsa_confdir(tmp_path / "conf")
    old_root = tmp_path / "old-root.pem"
    old_root.write_bytes((confdir / ca.CA_CERT).read_bytes())
    backup = ca.replace_root(confdir)
    assert backup is not None and (backup / ca.CA_FILE).exists()
    assert (backup / ca.CA_CERT).read_bytes() == old_root.read_bytes()
    with pytest.raises(ssl.SSLCertVerificationError):
        mitmproxy_handshake(confdir, old_root)
    assert isinstance(mitmproxy_handshake(confdir, confdir / ca.CA_CERT).public_key(), ec.EllipticCurvePublicKey)


def test_upgrade_is_idempotent(tmp_path: Path) -> None:
    confdir = rsa_confdir(tmp_path / "conf")
    assert ca.upgrade(confdir).done
    upgraded = snapshot(confdir)
    again = ca.upgrade(confdir)
    assert not again.done and again.state.intermediate
    assert snapshot(confdir) == upgraded
    # A new ECDSA root needs no upgrade either.
    ca.create_root(tmp_path / "new")
    fresh = snapshot(tmp_path / "new")
    assert not ca.upgrade(tmp_path / "new").done
    assert snapshot(tmp_path / "new") == fresh


def test_upgrade_refuses_a_ca_without_its_key_and_changes_nothing(tmp_path: Path) -> None:
    confdir = rsa_confdir(tmp_path / "conf")
    (confdir / ca.CA_FILE).write_bytes((confdir / ca.CA_CERT).read_bytes())  # the certificate only
    before = snapshot(confdir)
    with pytest.raises(ca.CaError, match="holds no private key"):
        ca.upgrade(confdir)
    assert snapshot(confdir) == before


def test_upgrade_refuses_an_encrypted_key(tmp_path: Path) -> None:
    confdir = rsa_confdir(tmp_path / "conf")
    pem = (confdir / ca.CA_FILE).read_bytes()
    key = serialization.load_pem_private_key(pem, None)
    locked = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    (confdir / ca.CA_FILE).write_bytes(locked + (confdir / ca.CA_CERT).read_bytes())
    before = snapshot(confdir)
    with pytest.raises(ca.CaError, match="encrypted"):
        ca.upgrade(confdir)
    assert snapshot(confdir) == before


def test_upgrade_refuses_what_is_not_a_self_signed_root(tmp_path: Path) -> None:
    # An RSA CA file with a chain (say, a company's intermediate): regcache issues nothing under it.
    confdir = rsa_confdir(tmp_path / "conf")
    other = rsa_confdir(tmp_path / "other")
    with (confdir / ca.CA_FILE).open("ab") as out:
        out.write((other / ca.CA_CERT).read_bytes())
    before = snapshot(confdir)
    with pytest.raises(ca.CaError, match="not a self-signed root"):
        ca.upgrade(confdir)
    assert snapshot(confdir) == before


def test_upgrade_never_overwrites_another_roots_key(tmp_path: Path) -> None:
    confdir = rsa_confdir(tmp_path / "conf")
    other = rsa_confdir(tmp_path / "other")
    (confdir / ca.ROOT_KEY_FILE).write_bytes((other / ca.CA_FILE).read_bytes())
    before = snapshot(confdir)
    with pytest.raises(ca.CaError, match="another root"):
        ca.upgrade(confdir)
    assert snapshot(confdir) == before


def test_private_keys_are_0600_and_nothing_temporary_is_left(tmp_path: Path) -> None:
    ca.create_root(tmp_path / "new")
    confdir = rsa_confdir(tmp_path / "conf")
    ca.upgrade(confdir)
    for directory in (tmp_path / "new", confdir):
        for path in directory.iterdir():
            mode = stat.S_IMODE(path.stat().st_mode)
            assert not path.name.startswith("."), path
            if path.name in KEY_FILES:
                assert mode == 0o600, (path, oct(mode))
            else:
                assert mode & 0o077 in (0, 0o044), (path, oct(mode))
                assert b"PRIVATE KEY" not in path.read_bytes(), path


def test_mitmproxy_signs_its_crl_with_the_serving_key(tmp_path: Path) -> None:
    """mitmproxy 12 makes a CRL with the CA key at start (leaves name it only when an upstream
    certificate names a CRL: never under regcache's lazy connection strategy). It must load."""
    confdir = rsa_confdir(tmp_path / "conf")
    ca.upgrade(confdir)
    store = certs.CertStore.from_store(confdir, "mitmproxy", 2048)
    assert isinstance(store.default_privatekey, ec.EllipticCurvePrivateKey)
    assert len(store.default_chain_certs) == 2  # intermediate + root: mitmproxy sends the chain
    crl = getattr(store, "default_crl", None)
    if crl is None:
        pytest.skip("this mitmproxy makes no CRL (mitmproxy 11)")
    intermediate = serving(confdir)[0]
    assert x509.load_der_x509_crl(crl).is_signature_valid(intermediate.public_key())  # type: ignore[arg-type]


def test_read_ca_names_the_key_type_and_kind(tmp_path: Path) -> None:
    assert ca.read_ca(tmp_path) is None
    state = ca.read_ca(rsa_confdir(tmp_path / "conf"))
    assert state is not None and state.upgradable and state.describe() == "RSA-2048 root 'mitmproxy'"
    assert state.not_after > datetime.datetime.now(datetime.UTC)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / ca.CA_FILE).write_text("nothing\n")
    with pytest.raises(ca.CaError, match="no certificate"):
        ca.read_ca(tmp_path / "bad")


# -- regcache ca ------------------------------------------------------------------------------


def test_ca_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    confdir = rsa_confdir(tmp_path / "conf")
    assert cli.main(["ca", "show", "--confdir", str(confdir)]) == 0
    assert "RSA-2048 root" in capsys.readouterr().out
    assert cli.main(["ca", "upgrade", "--confdir", str(confdir)]) == 0
    out = capsys.readouterr().out
    assert "ECDSA P-256 intermediate" in out and "clients change nothing" in out and "PRIVATE" not in out
    assert cli.main(["ca", "upgrade", "--confdir", str(confdir)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    # A new root in place of a trusted one only when asked; it says what to re-trust.
    assert cli.main(["ca", "new", "--confdir", str(confdir)]) == 1
    assert "--replace" in capsys.readouterr().err
    assert cli.main(["ca", "new", "--ecdsa", "--replace", "--confdir", str(confdir)]) == 0
    out = capsys.readouterr().out
    assert "setup dockerd" in out and "setup containerd" in out and "setup podman" in out
    assert str(confdir / ca.CA_CERT) in out and "PRIVATE" not in out


def test_ca_command_mistakes_get_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["ca", "upgrade", "--confdir", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CA in" in err and "Traceback" not in err
    confdir = rsa_confdir(tmp_path / "conf")
    (confdir / ca.CA_FILE).write_bytes((confdir / ca.CA_CERT).read_bytes())
    assert cli.main(["ca", "upgrade", "--confdir", str(confdir)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no private key" in err
