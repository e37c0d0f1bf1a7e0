"""The proxy's CA end to end (regcache/fronts/ca.py): a new confdir gets an ECDSA root, and after
`regcache ca upgrade` on a confdir mitmproxy made (RSA), clients that trust only the old root pull
through the proxy unchanged: a real dockerd (its trust fixed when it started) and skopeo, with
`regcache run` and with `mitmdump -s addon/cache.py`.
"""

from __future__ import annotations

import shutil
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

from bed.dockerd import Dockerd
from bed.images import ImageSet, PushedImage
from bed.regcache_run import Mitmdump
from bed.skopeo import Skopeo
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from mitmproxy.certs import CertStore

from .conftest import regcache_cli

HOST = "registry-1.docker.io"


def served_leaf(proxy: Mitmdump, trusted: Path) -> x509.Certificate:
    """The certificate the proxy shows for HOST to a client trusting only `trusted` (which verifies it)."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1024)
            assert chunk, f"the proxy closed the connection: {head!r}"
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head
        context = ssl.create_default_context(cafile=str(trusted))
        with context.wrap_socket(sock, server_hostname=HOST) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def pulls(image: PushedImage, skopeo: Skopeo, dockerd: Dockerd, tmp_path: Path) -> None:
    """skopeo and dockerd pull `image` through the proxy, byte for byte."""
    assert skopeo.copy_to_dir(image.ref, tmp_path / f"skopeo-{skopeo.workdir.name}") == image.amd64_digest
    dockerd.pull(image.ref)
    assert dockerd.image_id(image.ref) == image.config.digest
    dockerd.rmi(image.ref)


def test_a_new_confdir_gets_an_ecdsa_root_that_dockerd_and_skopeo_pull_through(
    images: ImageSet,
    regcache_with: Callable[..., Mitmdump],
    skopeo_factory: Callable[..., Skopeo],
    dockerd_factory: Callable[..., Dockerd],
    tmp_path: Path,
) -> None:
    proxy = regcache_with(confdir=tmp_path / "conf")
    leaf = served_leaf(proxy, proxy.ca_cert)
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert "proxy CA" in proxy.log() and "ECDSA P-256 root" in proxy.log()
    dockerd = dockerd_factory(proxy.url, proxy.ca_cert)
    try:
        pulls(images.docker_multi, skopeo_factory(proxy.url, proxy.ca_cert), dockerd, tmp_path)
    finally:
        dockerd.close()


def test_after_ca_upgrade_clients_that_trust_only_the_old_rsa_root_pull_through_the_proxy(
    images: ImageSet,
    regcache_with: Callable[..., Mitmdump],
    skopeo_factory: Callable[..., Skopeo],
    dockerd_factory: Callable[..., Dockerd],
    tmp_path: Path,
) -> None:
    confdir = tmp_path / "conf"
    CertStore.from_store(confdir, "mitmproxy", 2048)  # an existing user's confdir: mitmproxy's RSA CA
    old_root = tmp_path / "old-root.pem"  # what the clients were given, kept apart from the confdir
    shutil.copy(confdir / "mitmproxy-ca-cert.pem", old_root)
    proxy = regcache_with(confdir=confdir)
    assert isinstance(served_leaf(proxy, old_root).public_key(), rsa.RSAPublicKey)
    assert "regcache ca upgrade" in proxy.log()  # the start-up log says what would help
    dockerd = dockerd_factory(proxy.url, old_root)  # its trust is fixed now, at its start
    try:
        proxy.stop()
        upgraded = regcache_cli("ca", "upgrade", "--confdir", str(confdir))
        assert "ECDSA P-256 intermediate" in upgraded.stdout and "PRIVATE" not in upgraded.stdout
        assert (confdir / "mitmproxy-ca-cert.pem").read_bytes() == old_root.read_bytes()
        log_mark = proxy.mark()
        proxy.start()  # the same port: dockerd's HTTPS_PROXY
        leaf = served_leaf(proxy, old_root)
        assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
        assert "ECDSA P-256 intermediate" in proxy.log()[log_mark:]
        pulls(images.docker_multi, skopeo_factory(proxy.url, old_root), dockerd, tmp_path)
    finally:
        dockerd.close()
    # mitmdump with the addon script serves the same confdir files the same way.
    mitmdump = regcache_with(mitmdump=True, confdir=confdir)
    assert isinstance(served_leaf(mitmdump, old_root).public_key(), ec.EllipticCurvePublicKey)
    skopeo = skopeo_factory(mitmdump.url, old_root)
    assert skopeo.copy_to_dir(images.oci_single.ref, tmp_path / "mitmdump") == images.oci_single.digest
