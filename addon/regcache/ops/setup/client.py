"""What each client of regcache needs on a node, and the command line of `regcache setup dockerd|
containerd|podman|service` and of its thin wrappers scripts/setup-dockerd, setup-containerd,
setup-podman and setup-service (Python 3 standard library only: the wrappers run as root on nodes
that may not have regcache's venv, importing this package from the checkout).

Owns: the files each set-up wants (`dockerd_files`, `containerd_files`, `podman_files`,
`service_files`: pure functions of the options), the commands that follow a change of them
(`Command`, run only when a file they depend on changed), checking the input (proxy URL, CA
file, registry hosts), and `main`. Planning, applying and undoing file changes is `fileplan`'s.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from regcache.ops.setup.fileplan import (
    STATE_PATH,
    JsonKey,
    Printer,
    SetupError,
    WholeFile,
    apply,
    in_root,
    missing_ancestors,
    plan,
    read_current,
    read_state,
)


def checkout_root() -> Path | None:
    """The regcache checkout this package runs from (addon/regcache/ops/setup/ in it), or None
    when it is installed elsewhere (a wheel in a venv)."""
    root = Path(__file__).resolve().parents[4]
    return root if (root / "addon" / "cache.py").is_file() and (root / "scripts" / "setup").is_file() else None


# A checkout: its certs/ and .venv, as scripts/run and scripts/setup make them. Installed: the
# directory `regcache run` is started in (its --confdir default is ./certs) and this venv.
REPO = checkout_root()
HOME = REPO or Path.cwd()
DEFAULT_PROXY = "http://127.0.0.1:3128"
DEFAULT_NO_PROXY = "localhost,127.0.0.1,::1"
DEFAULT_MIRROR = "http://127.0.0.1:5055"
DAEMON_JSON = "/etc/docker/daemon.json"
DEFAULT_CA = HOME / "certs" / "mitmproxy-ca-cert.pem"
SERVICE_TEMPLATE = Path(__file__).resolve().parent / "regcache.service"
DEFAULT_SERVICE_CONFIG = "/etc/regcache/regcache.yaml"

# A copy of the hosts of regcache.config.DEFAULT_REGISTRIES, for nodes where regcache.config cannot be
# imported (no PyYAML: a checkout without its venv); tests/unit/test_client_setup.py checks they agree.
FALLBACK_REGISTRIES = (
    "registry-1.docker.io",
    "index.docker.io",
    "ghcr.io",
    "quay.io",
    "gcr.io",
    "registry.k8s.io",
    "public.ecr.aws",
    "mcr.microsoft.com",
)
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?")


def default_registries() -> tuple[str, ...]:
    """The registry hosts regcache intercepts by default: from regcache.config when importable."""
    try:
        from regcache.config import DEFAULT_REGISTRIES
    except ImportError:
        return FALLBACK_REGISTRIES
    return tuple(DEFAULT_REGISTRIES)


# -- input ------------------------------------------------------------------------------------------


def checked_url(option: str, url: str, example: str) -> str:
    parts = urlsplit(url)
    problem = SetupError(f"{option} must be a URL like {example}")
    try:
        _ = parts.port  # a port that is not a number raises
    except ValueError:
        raise problem from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise problem
    return checked_text(option, url.rstrip("/"))


def checked_proxy(url: str) -> str:
    return checked_url("--proxy", url, f"{DEFAULT_PROXY} (http://USER:PASS@HOST:PORT with proxyauth)")


def checked_mirror(url: str) -> str:
    checked = checked_url("--mirror", url, DEFAULT_MIRROR)
    if urlsplit(checked).username is not None:
        raise SetupError("--mirror takes no user or password: the mirror relays each client's own token requests")
    return checked


def checked_text(option: str, value: str) -> str:
    """No control characters: every value ends up on one line of a configuration file."""
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise SetupError(f"{option} must not contain control characters")
    return value


def read_ca(path: Path) -> bytes:
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise SetupError(
            f"CA certificate {path} not found: start regcache once ({'scripts/run' if REPO else 'regcache run'} "
            "creates it), or pass --ca FILE"
        ) from None
    except OSError as err:
        raise SetupError(f"cannot read the CA certificate {path}: {err.strerror}") from err
    if b"PRIVATE KEY" in pem:
        raise SetupError(f"{path} holds a private key: pass the certificate only (mitmproxy-ca-cert.pem)")
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise SetupError(f"{path} is not a PEM certificate")
    return pem


def checked_hosts(hosts: list[str]) -> tuple[str, ...]:
    for host in hosts:
        if not _HOST.fullmatch(host):
            raise SetupError(f"--registry takes a host name, optionally with :PORT, got {host!r}")
    return tuple(dict.fromkeys(host.lower() for host in hosts))


def docker_major_version(text: str) -> int | None:
    """20 from `Docker version 20.10.24+dfsg1, build 5d6db84`."""
    found = re.search(r"version (\d+)\.", text)
    return int(found.group(1)) if found else None


# -- file contents (pure) ---------------------------------------------------------------------------


def proxy_environment(proxy: str, no_proxy: str) -> dict[str, str]:
    return {"HTTPS_PROXY": proxy, **({"NO_PROXY": no_proxy} if no_proxy else {})}


def daemon_json_proxies(proxy: str, no_proxy: str) -> dict[str, str]:
    """daemon.json `proxies` (Docker >= 23): what the drop-in's environment says."""
    return {"https-proxy": proxy, **({"no-proxy": no_proxy} if no_proxy else {})}


def secret_mode(*values: str) -> int:
    """0600 for a file that would hold a password (a proxy URL with USER:PASS@), else 0644."""
    return 0o600 if any(re.search(r"://[^/@]*:[^/@]*@", value) for value in values) else 0o644


def systemd_word(value: str, quote: bool = False) -> str:
    """`value` as one word of a systemd unit setting: `%` escaped (specifiers), quoted if needed."""
    value = value.replace("%", "%%")
    if not quote and not re.search(r'[\s"\'\\]', value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_dropin(script: str, environment: dict[str, str]) -> bytes:
    lines = [
        f"# Written by regcache's scripts/{script}; scripts/{script} --undo removes it.",
        "[Unit]",
        "# Start after regcache when it runs on this node (scripts/setup-service); no effect otherwise.",
        "After=regcache.service",
        "",
        "[Service]",
        *(f"Environment={systemd_word(f'{name}={value}', quote=True)}" for name, value in environment.items()),
    ]
    return ("\n".join(lines) + "\n").encode()


def containers_conf_dropin(environment: dict[str, str]) -> bytes:
    # JSON strings are valid TOML basic strings.
    values = ", ".join(json.dumps(f"{name}={value}") for name, value in environment.items())
    lines = [
        "# Written by regcache's scripts/setup-podman; scripts/setup-podman --undo removes it.",
        "# podman puts [engine] env into its own environment, so its pulls go through regcache.",
        "# An env list here replaces one from containers.conf files read before this one.",
        "[engine]",
        f"env = [{values}]",
    ]
    return ("\n".join(lines) + "\n").encode()


@dataclass(frozen=True)
class TrustStore:
    """Where the system's Go and OpenSSL clients take extra roots from, and how to rebuild it."""

    path: str
    install: tuple[str, ...]
    uninstall: tuple[str, ...]


DEBIAN_TRUST = TrustStore(
    "/usr/local/share/ca-certificates/regcache.crt",
    ("update-ca-certificates",),
    # --fresh: a plain run keeps the removed certificate's symlink when it counts no change.
    ("update-ca-certificates", "--fresh"),
)
RHEL_TRUST = TrustStore(
    "/etc/pki/ca-trust/source/anchors/regcache.crt", ("update-ca-trust", "extract"), ("update-ca-trust", "extract")
)


def trust_store(root: Path) -> TrustStore:
    """Red Hat's layout when the root has it and not Debian's; Debian's otherwise (also for an empty root)."""
    if in_root(root, "/etc/pki/ca-trust/source/anchors").is_dir() and not in_root(root, "/etc/ssl/certs").is_dir():
        return RHEL_TRUST
    return DEBIAN_TRUST


def trusted_ca(trust: TrustStore, ca: bytes, restart: str) -> WholeFile:
    return WholeFile(trust.path, ca, triggers=frozenset({"trust", restart}))


def dockerd_files(
    proxy: str, no_proxy: str, ca: bytes, method: str, trust: TrustStore, mirror: str | None = None
) -> list[WholeFile | JsonKey]:
    """The CA in the system trust store (dockerd ignores /etc/docker/certs.d for Docker Hub), the
    proxy in dockerd's environment: a systemd drop-in, or daemon.json `proxies` (Docker >= 23); with
    `mirror`, regcache's Docker Hub mirror first in daemon.json `registry-mirrors`."""
    values: tuple[tuple[str, object], ...] = ()
    files: list[WholeFile | JsonKey] = [trusted_ca(trust, ca, "docker")]
    if method == "daemon-json":
        values = (("proxies", daemon_json_proxies(proxy, no_proxy)),)
    else:
        content = systemd_dropin("setup-dockerd", proxy_environment(proxy, no_proxy))
        path = "/etc/systemd/system/docker.service.d/regcache.conf"
        files.append(WholeFile(path, content, secret_mode(proxy), frozenset({"systemd", "docker"})))
    prepended = (("registry-mirrors", (mirror,)),) if mirror else ()
    if values or prepended:
        mode = secret_mode(proxy) if values else 0o644
        files.append(JsonKey(DAEMON_JSON, values, prepended, mode, frozenset({"docker"})))
    return files


def containerd_files(proxy: str, no_proxy: str, ca: bytes, trust: TrustStore) -> list[WholeFile | JsonKey]:
    """The CA in the system trust store and the proxy in containerd's environment (its CRI plugin,
    i.e. the kubelet's pulls; `ctr` and `nerdctl` pull in their own process)."""
    content = systemd_dropin("setup-containerd", proxy_environment(proxy, no_proxy))
    path = "/etc/systemd/system/containerd.service.d/regcache.conf"
    return [
        trusted_ca(trust, ca, "containerd"),
        WholeFile(path, content, secret_mode(proxy), frozenset({"systemd", "containerd"})),
    ]


def podman_files(proxy: str, no_proxy: str, ca: bytes, hosts: tuple[str, ...]) -> list[WholeFile | JsonKey]:
    """containers/image (podman, skopeo, buildah) trusts /etc/containers/certs.d/HOST/*.crt for HOST,
    on top of the system roots; podman takes the proxy from containers.conf [engine] env."""
    certs = [WholeFile(f"/etc/containers/certs.d/{host}/ca.crt", ca) for host in hosts]
    conf = containers_conf_dropin(proxy_environment(proxy, no_proxy))
    return [*certs, WholeFile("/etc/containers/containers.conf.d/regcache.conf", conf, secret_mode(proxy))]


def regcache_command() -> Path:
    """The `regcache` command the service starts: the checkout's venv's, else this venv's."""
    return (REPO / ".venv" / "bin" if REPO else Path(sys.executable).parent) / "regcache"


def service_unit(template: str, config: str, listen_host: str, port: int, proxyauth: str | None) -> bytes:
    words = [str(regcache_command()), "run", "--config", config, "--confdir", str(HOME / "certs")]
    words += ["--listen-host", listen_host, "--port", str(port)]
    if proxyauth:
        words += ["--", "--set", f"proxyauth={proxyauth}"]
    values = {
        "@REPO@": str(HOME).replace("%", "%%"),
        "@EXEC_START@": " ".join(systemd_word(word) for word in words),
    }
    for name, value in values.items():
        template = template.replace(name, value)
    return template.encode()


SERVICE_CONFIG = b"""\
# regcache configuration for the regcache.service written by scripts/setup-service (kept by its
# --undo once you change it). Every key is optional; see regcache.example.yaml and the README.
cache_dir: /var/cache/regcache
"""


def service_files(config: str, listen_host: str, port: int, proxyauth: str | None) -> list[WholeFile | JsonKey]:
    """regcache.service, and a configuration file for it when there is none."""
    if not config.startswith("/"):
        raise SetupError(f"--config must be an absolute path, got {config}")
    unit = service_unit(SERVICE_TEMPLATE.read_text(), config, listen_host, port, proxyauth)
    mode = 0o600 if proxyauth and not proxyauth.startswith("@") else 0o644  # USER:PASS inline
    return [
        WholeFile("/etc/systemd/system/regcache.service", unit, mode, frozenset({"systemd", "service"})),
        WholeFile(config, SERVICE_CONFIG, only_if_missing=True),
    ]


# -- commands -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A command run after (or `before`) a change of a file with trigger `trigger`, when that
    change installs, uninstalls or does either (`on`). `restart`: skipped with --no-restart."""

    argv: tuple[str, ...]
    trigger: str
    on: str = "any"
    restart: bool = False
    before: bool = False


def trust_commands(trust: TrustStore) -> list[Command]:
    return [Command(trust.install, "trust", "install"), Command(trust.uninstall, "trust", "uninstall")]


def daemon_commands(trust: TrustStore, unit: str) -> list[Command]:
    return [
        *trust_commands(trust),
        Command(("systemctl", "daemon-reload"), "systemd"),
        Command(("systemctl", "restart", f"{unit}.service"), unit, restart=True),
    ]


SERVICE_COMMANDS = [
    Command(("systemctl", "disable", "--now", "regcache.service"), "service", "uninstall", before=True),
    Command(("systemctl", "daemon-reload"), "systemd"),
    Command(("systemctl", "enable", "regcache.service"), "service", "install"),
    Command(("systemctl", "restart", "regcache.service"), "service", "install", restart=True),
]


def triggered(commands: list[Command], changes: frozenset[tuple[str, str]]) -> list[Command]:
    return [c for c in commands if any(t == c.trigger and c.on in ("any", on) for t, on in changes)]


# -- the command line ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    """One scripts/setup-NAME: its options, the files it wants and the commands that follow."""

    name: str
    description: str
    add_options: Callable[[argparse.ArgumentParser], None]
    wanted: Callable[[argparse.Namespace, TrustStore], list[WholeFile | JsonKey]]
    commands: Callable[[TrustStore], list[Command]]
    notes: Callable[[argparse.Namespace], list[str]] = lambda options: []


def client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--proxy", default=DEFAULT_PROXY, help=f"regcache's URL (default {DEFAULT_PROXY})")
    parser.add_argument("--ca", type=Path, default=DEFAULT_CA, help=f"regcache's CA certificate (default {DEFAULT_CA})")
    parser.add_argument("--no-proxy", default=DEFAULT_NO_PROXY, help=f"NO_PROXY value (default {DEFAULT_NO_PROXY})")


def dockerd_options(parser: argparse.ArgumentParser) -> None:
    client_options(parser)
    parser.add_argument(
        "--method",
        choices=("dropin", "daemon-json"),
        default="dropin",
        help="proxy in a systemd drop-in (default, any Docker) or daemon.json `proxies` (Docker >= 23)",
    )
    parser.add_argument(
        "--mirror",
        metavar="URL",
        help=f"also put regcache's Docker Hub mirror (e.g. {DEFAULT_MIRROR}) first in daemon.json "
        "`registry-mirrors`: Docker Hub pulls then skip the proxy; other registries keep using it",
    )


def podman_options(parser: argparse.ArgumentParser) -> None:
    client_options(parser)
    parser.add_argument(
        "--registry", action="append", help="a registry host to trust the CA for (repeatable; default: regcache's)"
    )


def service_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_SERVICE_CONFIG, help="regcache's YAML (created when missing)")
    parser.add_argument("--listen-host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=3128, help="port to listen on (default 3128)")
    parser.add_argument("--proxyauth", help="mitmproxy proxyauth: @/etc/regcache/htpasswd (or USER:PASS)")


def checked_venv() -> None:
    """The service starts the venv's regcache: scripts/run would reinstall (needs a package index) on each start."""
    if not regcache_command().exists():
        hint = f"run {REPO}/scripts/setup once first" if REPO else "install regcache into this venv"
        raise SetupError(f"no {regcache_command()}: {hint}")


def service_notes(options: argparse.Namespace) -> list[str]:
    if options.listen_host in ("127.0.0.1", "::1", "localhost") or options.proxyauth:
        return []
    return [f"regcache will listen on {options.listen_host} WITHOUT proxy authentication: pass --proxyauth"]


def skopeo_note(options: argparse.Namespace) -> list[str]:
    exports = " ".join(f"{name}={value}" for name, value in proxy_environment(options.proxy, options.no_proxy).items())
    return [f"skopeo and buildah take the proxy from their environment: export {exports}"]


def dockerd_wanted(options: argparse.Namespace, trust: TrustStore) -> list[WholeFile | JsonKey]:
    mirror = checked_mirror(options.mirror) if options.mirror else None
    return dockerd_files(options.proxy, options.no_proxy, read_ca(options.ca), options.method, trust, mirror)


def containerd_wanted(options: argparse.Namespace, trust: TrustStore) -> list[WholeFile | JsonKey]:
    return containerd_files(options.proxy, options.no_proxy, read_ca(options.ca), trust)


def podman_wanted(options: argparse.Namespace, trust: TrustStore) -> list[WholeFile | JsonKey]:
    hosts = checked_hosts(options.registry) if options.registry else default_registries()
    return podman_files(options.proxy, options.no_proxy, read_ca(options.ca), hosts)


def service_wanted(options: argparse.Namespace, trust: TrustStore) -> list[WholeFile | JsonKey]:
    checked_venv()
    config = checked_text("--config", options.config)
    return service_files(config, checked_text("--listen-host", options.listen_host), options.port, options.proxyauth)


TOOLS = {
    "dockerd": Tool(
        "dockerd",
        "Point dockerd at regcache: CA into the system trust store, proxy into dockerd's environment, restart.",
        dockerd_options,
        dockerd_wanted,
        lambda trust: daemon_commands(trust, "docker"),
    ),
    "containerd": Tool(
        "containerd",
        "Point containerd at regcache: CA into the system trust store, proxy into its environment, restart.",
        client_options,
        containerd_wanted,
        lambda trust: daemon_commands(trust, "containerd"),
    ),
    "podman": Tool(
        "podman",
        "Point podman, skopeo and buildah at regcache: CA per registry in /etc/containers/certs.d, "
        "proxy in containers.conf.d.",
        podman_options,
        podman_wanted,
        lambda trust: [],
        skopeo_note,
    ),
    "service": Tool(
        "service",
        "Install regcache itself as a systemd service (regcache.service), enable and (re)start it.",
        service_options,
        service_wanted,
        lambda trust: SERVICE_COMMANDS,
        service_notes,
    ),
}


def build_parser(tool: Tool, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog or f"setup-{tool.name}", description=tool.description)
    tool.add_options(parser)
    parser.add_argument("--root", default="/", help="act on this directory as the filesystem root (runs no command)")
    parser.add_argument("--dry-run", action="store_true", help="print every change, write nothing, run nothing")
    parser.add_argument("--undo", action="store_true", help="remove what this tool added, restore what it edited")
    parser.add_argument(
        "--no-restart", action="store_true", help="do not restart the daemon (dockerd, containerd, regcache)"
    )
    return parser


def redact(text: str) -> str:
    text = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)
    return re.sub(r"(proxyauth=)(?!@)\S+", r"\1***", text)


def check_docker_version(options: argparse.Namespace, root: Path) -> None:
    """dockerd < 23 refuses to start with a daemon.json key it does not know, such as `proxies`."""
    dockerd = shutil.which("dockerd")
    if options.undo or getattr(options, "method", None) != "daemon-json" or root != Path("/") or not dockerd:
        return
    version = subprocess.run([dockerd, "--version"], capture_output=True, text=True, check=False).stdout
    major = docker_major_version(version)
    if major is not None and major < 23:
        raise SetupError(f"{version.strip()} does not know daemon.json `proxies` (Docker >= 23): use --method dropin")


def run_commands(commands: list[Command], options: argparse.Namespace, root: Path, printer: Printer) -> int:
    for index, command in enumerate(commands):
        text = " ".join(command.argv)
        if root != Path("/"):
            printer.say("skip", text, "--root is not /")
            continue
        if command.restart and options.no_restart:
            printer.say("skip", text, "--no-restart")
            continue
        printer.say("run", text)
        if options.dry_run:
            continue
        try:
            status = subprocess.run(command.argv, check=False).returncode
        except FileNotFoundError:
            status = 127
        if status != 0:
            rest = "; ".join(" ".join(c.argv) for c in commands[index + 1 :])
            not_run = f"; not run: {rest}" if rest else ""
            print(f"setup-{options.tool}: `{text}` failed (exit {status}){not_run}", file=sys.stderr)
            return 1
    return 0


def main(tool_name: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    """scripts/setup-TOOL, or `regcache setup TOOL` (`prog`: how --help names it)."""
    tool = TOOLS[tool_name]
    options = build_parser(tool, prog).parse_args(argv)
    options.tool = tool.name
    root = Path(options.root).resolve()
    try:
        if not root.is_dir():
            raise SetupError(f"--root {options.root} is not a directory")
        check_docker_version(options, root)
        if hasattr(options, "proxy"):
            options.proxy = checked_proxy(options.proxy)
            options.no_proxy = checked_text("--no-proxy", options.no_proxy)
        trust = trust_store(root)
        state = read_state(root)
        wanted = [] if options.undo else tool.wanted(options, trust)
        current = read_current(root, list(dict.fromkeys([*(spec.path for spec in wanted), *state["files"]])))
        state_dirs = missing_ancestors(root, STATE_PATH)  # none once the record exists
        changes = plan(tool.name, wanted, current, state, state_dirs)
    except SetupError as err:
        print(f"setup-{tool.name}: error: {err}", file=sys.stderr)
        return 2
    printer = Printer(options.dry_run, redact)
    if options.dry_run:
        print("dry run: nothing is written or run")
    if options.undo and not changes.actions:
        print(f"nothing to undo: {in_root(root, STATE_PATH)} records no setup-{tool.name}")
        return 0
    commands = triggered(tool.commands(trust), changes.triggered)
    if run_commands([c for c in commands if c.before], options, root, printer):
        return 1
    apply(changes, root, printer)
    status = run_commands([c for c in commands if not c.before], options, root, printer)
    if not options.undo and (options.dry_run or changes.state_changes):
        for note in tool.notes(options):
            print(redact(f"note: {note}"))
    return status
