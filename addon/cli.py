"""The `regcache` command: `regcache run` starts mitmdump with the addon and sane defaults.

The mitmdump argument list lives here (`mitmdump_args`) so that the README's command, the tests and
any service unit start the proxy the same way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from .config import ConfigError, load_settings

ADDON = Path(__file__).resolve().parent / "cache.py"
CA_CERT = "mitmproxy-ca-cert.pem"


def mitmdump_args(config: str | None, host: str, port: int, confdir: Path) -> list[str]:
    args = [
        "-s",
        str(ADDON),
        "--listen-host",
        host,
        "--listen-port",
        str(port),
        "--set",
        f"confdir={confdir}",
        # Lazy: the addon sees a request before mitmproxy dials the upstream, so it can answer
        # from the store when the upstream is unreachable.
        "--set",
        "connection_strategy=lazy",
        # Stream anything large that is not ours (our own blob flows are streamed per flow).
        "--set",
        "stream_large_bodies=1m",
        # Our own one line per registry request replaces mitmdump's flow dump.
        "--set",
        "flow_detail=0",
    ]
    if config:
        args += ["--set", f"regcache_config={Path(config).resolve()}"]
    return args


def dockerd_instructions(proxy: str, ca_cert: Path) -> str:
    return f"""\
Point dockerd at regcache (the proxy goes in dockerd's environment, not the docker CLI's):
  1. Trust the proxy CA (created on first start): {ca_cert}
       cp {ca_cert} /usr/local/share/ca-certificates/regcache.crt && update-ca-certificates
     or start dockerd with SSL_CERT_FILE=<a bundle of the system roots plus that certificate>.
  2. Give dockerd the proxy, e.g. a systemd drop-in /etc/systemd/system/docker.service.d/regcache.conf:
       [Service]
       Environment="HTTPS_PROXY={proxy}"
     or in /etc/docker/daemon.json (Docker 23+): {{"proxies": {{"https-proxy": "{proxy}"}}}}
  3. systemctl daemon-reload && systemctl restart docker
Other clients (skopeo, podman, containerd, crane): HTTPS_PROXY={proxy} plus the same CA.
"""


def run(options: argparse.Namespace) -> int:
    try:
        settings = load_settings(options.config)
    except ConfigError as err:
        print(f"regcache: bad configuration: {err}", file=sys.stderr)
        return 2
    confdir = Path(options.confdir).resolve()
    confdir.mkdir(parents=True, exist_ok=True)
    mitmdump = shutil.which("mitmdump", path=str(Path(sys.executable).parent)) or shutil.which("mitmdump")
    if mitmdump is None:
        print("regcache: mitmdump not found; install regcache's dependencies first", file=sys.stderr)
        return 2
    proxy = f"http://{options.listen_host}:{options.port}"
    print(f"regcache: proxy {proxy}, cache {settings.cache_dir}, config {options.config or '(defaults)'}")
    print(dockerd_instructions(proxy, confdir / CA_CERT), flush=True)
    args = mitmdump_args(options.config, options.listen_host, options.port, confdir) + options.mitmdump_args
    os.execv(mitmdump, [mitmdump, *args])
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="regcache", description="Docker/OCI registry pull-through cache")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="start the cache (mitmdump with the regcache addon)")
    run_parser.add_argument("--config", help="YAML configuration file (default: built-in defaults)")
    run_parser.add_argument("--listen-host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    run_parser.add_argument("--port", type=int, default=3128, help="port to listen on (default 3128)")
    run_parser.add_argument("--confdir", default="certs", help="mitmproxy confdir holding the CA (default ./certs)")
    run_parser.add_argument("mitmdump_args", nargs=argparse.REMAINDER, help="further mitmdump arguments after --")
    options = parser.parse_args(argv)
    if options.mitmdump_args[:1] == ["--"]:
        options.mitmdump_args = options.mitmdump_args[1:]
    return run(options)


if __name__ == "__main__":
    sys.exit(main())
