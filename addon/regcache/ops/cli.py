"""The `regcache` command: `run` (the proxy with the addon and sane defaults), `export` and
`import` (bundles of cached images as OCI image layouts, see `bundle`), `warm` (see `warm`),
`pin` / `unpin` / `pins` (images that eviction never removes), looking after a cache:
`stats`, `ls`, `purge`, `verify`, `gc` (the store walks are `admin`'s; here they are shown as
rich tables and progress bars), `setup dockerd|containerd|podman|service` (pointing a node's
clients at regcache: `setup.client`'s, which scripts/setup-* run too), `ca show|upgrade|new` (the
proxy's CA: `fronts.ca`'s) and `--version`.

The proxy's argument list lives here (`proxy_args`; `mitmdump_args` for plain mitmdump) so that the
README's commands, the tests and any service unit start the proxy the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from regcache import __version__
from regcache.addresses import base_url
from regcache.config import ConfigError, Settings, load_settings, parse_duration, read_text
from regcache.fronts import ca
from regcache.fronts.master import serve
from regcache.oci.manifest import BadManifest
from regcache.ops import cluster_cli
from regcache.ops.admin import (
    carry_out,
    find_corrupt,
    list_images,
    parse_ref_pattern,
    plan_gc,
    plan_purge,
    summarize_usage,
    verify_total,
)
from regcache.ops.bundle import (
    BundleError,
    collect_for_export,
    import_bundle,
    parse_image_ref,
    write_bundle,
)
from regcache.ops.setup import client as client_setup
from regcache.ops.show import console, print_images, print_plan, report_verification, size_text, usage_rows
from regcache.ops.warm import default_platforms, warm_all
from regcache.services.blobs import FREE_SPACE_RESERVE
from regcache.store.access import DiskAccessRecords
from regcache.store.base import Store
from regcache.store.disk import DiskStore, require_store, require_writable
from regcache.store.errors import StoreError

# mitmdump's entry script, beside the package in a checkout (the source root addon/); not installed.
ADDON = Path(__file__).resolve().parents[2] / "cache.py"
CA_CERT = ca.CA_CERT


def proxy_args(config: str | None, host: str, port: int, confdir: Path) -> list[str]:
    """The proxy options of `regcache run` (mitmdump's command line syntax)."""
    args = [
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
    ]
    if config:
        args += ["--set", f"regcache_config={Path(config).resolve()}"]
    return args


def mitmdump_args(config: str | None, host: str, port: int, confdir: Path) -> list[str]:
    """The same proxy with mitmdump itself: `mitmdump ARGS` (all of mitmdump's addons loaded)."""
    # Our own one line per registry request replaces mitmdump's flow dump.
    return ["-s", str(ADDON), *proxy_args(config, host, port, confdir), "--set", "flow_detail=0"]


def mirror_instructions(mirrors: Mapping[str, tuple[str, int]]) -> str:
    """How to use the registry mirrors instead of the proxy (Docker Hub: dockerd's registry-mirrors)."""
    lines = []
    for host, (listen_host, port) in mirrors.items():
        if port == 0:
            lines.append(f"  {host}: on a free port of {listen_host} (logged at start)")
            continue
        url = base_url(listen_host, port)
        lines.append(f"  {host}: {url}")
        if host == "registry-1.docker.io":
            lines.append(f'    dockerd (Docker Hub only): /etc/docker/daemon.json {{"registry-mirrors": ["{url}"]}}')
    if not lines:
        return ""
    heading = 'Or, with no proxy and no CA, regcache\'s plain-HTTP registry mirrors (README, "Registry mirror"):'
    return "\n".join([heading, *lines]) + "\n"


def docker_hub_mirror(mirrors: Mapping[str, tuple[str, int]]) -> str | None:
    """The URL of the Docker Hub mirror, when it has a fixed port."""
    listen = mirrors.get("registry-1.docker.io")
    return base_url(*listen) if listen is not None and listen[1] != 0 else None


def regcache_command() -> str:
    """This install's `regcache` command, as a root shell can run it (sudo's PATH may not have
    the venv): the running script's absolute path, else `PYTHON -m regcache`."""
    script = Path(sys.argv[0])
    if script.name == "regcache" and script.exists():
        return str(script.resolve())
    return f"{sys.executable} -m regcache"


def dockerd_instructions(proxy: str, ca_cert: Path, mirror: str | None = None) -> str:
    also = f" --mirror {mirror}" if mirror else ""
    regcache = regcache_command()
    no_proxy = client_setup.DEFAULT_NO_PROXY
    # The lines `setup dockerd` writes, from the same functions (quoting and `%` escapes included).
    environment = "".join(
        f"       Environment={client_setup.systemd_word(f'{name}={value}', quote=True)}\n"
        for name, value in client_setup.proxy_environment(proxy, no_proxy).items()
    )
    proxies = json.dumps({"proxies": client_setup.daemon_json_proxies(proxy, no_proxy)})
    mirrors = json.dumps({"registry-mirrors": [mirror]})
    mirror_step = f"     and the Docker Hub mirror first in /etc/docker/daemon.json: {mirrors}\n" if mirror else ""
    return f"""\
Point dockerd at regcache (the proxy goes in dockerd's environment, not the docker CLI's):
  sudo {regcache} setup dockerd --proxy {proxy} --ca {ca_cert}{also}
does it all (--dry-run shows the changes, --undo takes them back); by hand:
  1. Trust the proxy CA (created on first start): {ca_cert}
       cp {ca_cert} /usr/local/share/ca-certificates/regcache.crt && update-ca-certificates
     or start dockerd with SSL_CERT_FILE=<a bundle of the system roots plus that certificate>.
  2. Give dockerd the proxy, e.g. a systemd drop-in /etc/systemd/system/docker.service.d/regcache.conf:
       [Service]
{environment}     or in /etc/docker/daemon.json (Docker 23+):
       {proxies}
{mirror_step}  3. systemctl daemon-reload && systemctl restart docker
containerd and podman/skopeo/buildah: {regcache} setup containerd, {regcache} setup podman (README).
"""


def run(options: argparse.Namespace) -> int:
    try:
        settings = load_settings(options.config)
    except ConfigError as err:
        print(f"regcache: bad configuration: {err}", file=sys.stderr)
        return 2
    try:
        require_writable(settings.cache_dir)
    except StoreError as err:
        print(f"regcache: {err}", file=sys.stderr)
        return 2
    confdir = Path(options.confdir).resolve()
    # A new confdir gets an ECDSA root before mitmproxy would make its RSA one (fronts/ca.py: every
    # TLS handshake signs with the CA's key).
    ca.ensure_root(confdir)
    proxy = f"http://{options.listen_host}:{options.port}"
    print(f"regcache: proxy {proxy}, cache {settings.cache_dir}, config {options.config or '(defaults)'}")
    instructions = dockerd_instructions(proxy, confdir / CA_CERT, docker_hub_mirror(settings.mirrors))
    print(instructions + mirror_instructions(settings.mirrors), flush=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")  # log lines reach a redirected log file at once
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    serve(proxy_args(options.config, options.listen_host, options.port, confdir) + options.mitmdump_args)
    return 0


class UsageError(Exception):
    """A mistake on the command line; the message says what."""


def open_store(
    options: argparse.Namespace, settings: Settings | None = None, *, read_only: bool = False, existing: bool = False
) -> Store:
    """The store of `--cache-dir`, else of the configuration. `read_only`: for looking only, which
    changes nothing in it. `existing`: it must be there already (read-only stores must): a command
    that looks after a cache does not create an empty one where a path was mistyped."""
    settings = settings or load_settings(options.config)
    cache_dir = Path(options.cache_dir).expanduser() if options.cache_dir else settings.cache_dir
    if existing:
        require_store(cache_dir)
    # Not the owner: a running regcache may be using the same store (and its staging area).
    return DiskStore(cache_dir, settings.size_limit, owner=False, read_only=read_only)


def access_records_for_reading(store: Store) -> DiskAccessRecords | None:
    """The store's access records, to tell which images are public; None where they cannot be
    opened (a read-only store): every image then counts as private, which fails closed."""
    try:
        return DiskAccessRecords(store.cache_dir)
    except (OSError, sqlite3.Error) as err:
        print(f"regcache: access records not readable ({err}): every image is exported as private", file=sys.stderr)
        return None


def export(options: argparse.Namespace) -> int:
    store = open_store(options, read_only=True)
    refs = [parse_image_ref(image) for image in options.images] if options.images else None
    records = access_records_for_reading(store)
    try:
        contents = collect_for_export(store, refs, records)
    finally:
        if records is not None:
            records.close()
    for skipped in contents.skipped:
        print(f"regcache export: skipped: {skipped}", file=sys.stderr)
    write_bundle(store, contents, Path(options.output))
    print(f"regcache: exported {contents.summary()} to {options.output}")
    return 0


def import_(options: argparse.Namespace) -> int:
    as_ref = parse_image_ref(options.as_ref) if options.as_ref else None
    if not Path(options.bundle).exists():
        raise UsageError(f"{options.bundle}: no such file or directory")
    store = open_store(options)
    records = DiskAccessRecords(store.cache_dir)
    try:
        contents = import_bundle(
            store, Path(options.bundle), as_ref, pin=options.pin, records=records, public=options.public
        )
    finally:
        records.close()
    print(f"regcache: imported {contents.summary()} into {store.cache_dir}")
    for ref, _, record in contents.tags:
        print(f"  {ref} -> {record.digest}")
    return 0


def image_list(path: str) -> list[str]:
    """The images in a `warm -f` file: one per line, `#` comments, blank lines skipped."""
    try:
        lines = read_text(path).splitlines()
    except OSError as err:
        raise UsageError(f"cannot read -f {path}: {err.strerror or err}") from err
    except ValueError as err:
        raise UsageError(f"-f {err}") from err
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def warm(options: argparse.Namespace) -> int:
    settings = load_settings(options.config)
    images = list(options.images) + (image_list(options.file) if options.file else [])
    if not images:
        raise UsageError("name at least one image (or -f FILE)")
    if settings.shared is not None and not options.local:
        return cluster_cli.warm(options, settings, images)
    refs = [parse_image_ref(image) for image in images]
    store = open_store(options, settings)
    platforms = set(options.platform) if options.platform else default_platforms(settings)
    results = asyncio.run(warm_all(settings, store, refs, platforms))
    failed = [r for r in results if isinstance(r, str)]
    for result in results:
        if isinstance(result, str):
            print(f"regcache warm: FAILED {result}", file=sys.stderr)
        else:
            print(f"warmed {result.ref} -> {result.digest} ({result.manifests} manifests, {result.blobs} blobs)")
    return 1 if failed else 0


def pin(options: argparse.Namespace) -> int:
    store = open_store(options, existing=True)
    for image in options.images:
        ref = parse_image_ref(image)
        stored = [r for r in store.tag_records(ref).values() if store.get_manifest(r.digest) is not None]
        if not stored:
            raise BundleError(f"{ref} is not in the cache: pull, warm or import it first")
        newest = max(stored, key=lambda record: record.recorded_at)
        store.pin(ref, newest.digest)
        print(f"pinned {ref} -> {newest.digest}")
    return 0


def unpin(options: argparse.Namespace) -> int:
    refs = [parse_image_ref(image) for image in options.images]
    looking = open_store(options, read_only=True)
    pinned = looking.pins()
    looking.close()  # before a writable store of the same cache is opened (DiskStore)
    for ref in refs:
        if str(ref) not in pinned:
            print(f"{ref} was not pinned")
    if unpinned := [ref for ref in refs if str(ref) in pinned]:  # only then is the store written
        store = open_store(options)
        for ref in unpinned:
            store.unpin(ref)
            print(f"unpinned {ref}")
    return 0


def pins(options: argparse.Namespace) -> int:
    for ref, digest in sorted(open_store(options, read_only=True).pins().items()):
        print(f"{ref} {digest}")
    return 0


def stats(options: argparse.Namespace) -> int:
    settings = load_settings(options.config)
    store = open_store(options, settings, read_only=True)
    totals = store.entry_totals()
    usage = summarize_usage(store.counters())
    free = store.free_space()
    full = free < FREE_SPACE_RESERVE  # no blob is cached then
    if options.json:
        document = {
            "store": {
                "bytes": sum(size for _, size in totals.values()),
                "size_limit": store.size_limit,
                "entries": {kind: count for kind, (count, _) in totals.items()},
            },
            "disk": {"free": free, "full": full},
            **asdict(usage),
            "repositories": [asdict(r) for r in usage.repositories[: options.top]],
            "hit_ratio": usage.hit_ratio,
        }
        print(json.dumps(document, indent=2))
        return 0
    summary = Table(title=f"regcache {store.cache_dir}", show_header=False)
    summary.add_column(style="bold")
    summary.add_column()
    stored = sum(size for _, size in totals.values())
    summary.add_row("size", f"{size_text(stored)} of {size_text(store.size_limit)} (size_limit)")
    nothing_new = f": nothing new is cached (regcache keeps {size_text(FREE_SPACE_RESERVE)} free)" if full else ""
    summary.add_row("disk", f"{'FULL, ' if full else ''}{size_text(free)} free{nothing_new}")
    summary.add_row("entries", ", ".join(f"{kind} {count}" for kind, (count, _) in totals.items() if count))
    for label, value in usage_rows(usage):
        summary.add_row(label, value)
    out = console()
    out.print(summary)
    if usage.repositories:
        top = Table(title=f"top repositories (of {len(usage.repositories)})")
        for column in ("repository", "pulls", "pulls saved", "requests", "from cache"):
            top.add_column(column, justify="left" if column == "repository" else "right")
        for repo in usage.repositories[: options.top]:
            share = f"{repo.from_store / repo.requests:.0%}" if repo.requests else "-"
            top.add_row(repo.repository, str(repo.pulls), str(repo.pulls_saved), str(repo.requests), share)
        out.print(top)
    return 0


def ls(options: argparse.Namespace) -> int:
    settings = load_settings(options.config)
    pattern = parse_ref_pattern(options.ref, settings.registries) if options.ref else None
    rows = list_images(open_store(options, settings, read_only=True), pattern)
    print_images(rows, pattern, options.json)
    return 0


def purge(options: argparse.Namespace) -> int:
    settings = load_settings(options.config)
    store = open_store(options, settings, existing=True)
    pattern = parse_ref_pattern(options.ref, settings.registries)
    plan = plan_purge(store, pattern)
    for ref in plan.kept_pinned:
        print(f"kept {ref}: pinned (regcache unpin {ref} first)")
    if not plan.keys:
        print(f"nothing in the cache to purge for {pattern}")
        return 0
    size = plan.bytes if options.dry_run else carry_out(store, plan)[1]
    print_plan(plan, f"purge {pattern}", options.dry_run, size)
    return 0


def verify(options: argparse.Namespace) -> int:
    store = open_store(options, read_only=True)
    columns = (TextColumn("verifying"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("verify", total=verify_total(store))
        verification = find_corrupt(store, lambda count: progress.advance(task, count))
    store.close()  # before a writable store of the same cache is opened (DiskStore)
    if verification.corrupt and not options.dry_run:  # only then is the store written
        open_store(options).remove(found.key for found in verification.corrupt)
    return report_verification(verification, options.dry_run)


def gc(options: argparse.Namespace) -> int:
    settings = load_settings(options.config)
    store = open_store(options, settings, existing=True)
    min_age = parse_duration("--min-age", options.min_age)
    if settings.max_age:
        if options.dry_run:
            unused = store.unused(settings.max_age)
            print(f"would expire (unused for max_age): {len(unused)} entries, {size_text(sum(s for _, s in unused))}")
        else:
            removed, freed = store.expire_unused(settings.max_age)
            print(f"expired (unused for max_age): {removed} entries, {size_text(freed)}")
    plan = plan_gc(store, min_age)
    # Staging files are measured before they go: after, they would count as 0 B.
    size = plan.bytes if options.dry_run else carry_out(store, plan)[1]
    print_plan(plan, "orphans and leftovers", options.dry_run, size)
    stored = sum(size for _, size in store.entry_totals().values())
    if options.dry_run:
        over = max(0, stored - store.size_limit)
        print(f"store: {size_text(stored)} of size_limit {size_text(store.size_limit)}; over by {size_text(over)}")
    else:
        removed, freed = store.evict()
        print(f"evicted (size_limit): {removed} entries, {size_text(freed)}")
    return 0


def ca_show(options: argparse.Namespace) -> int:
    confdir = Path(options.confdir).resolve()
    state = ca.read_ca(confdir)
    if state is None:
        print(f"no CA in {confdir} yet: `regcache run --confdir {options.confdir}` creates an ECDSA one")
        return 0
    print(f"{confdir / ca.CA_FILE}: {state.describe()}, valid until {state.not_after:%Y-%m-%d}")
    print(f"clients trust: {confdir / ca.CA_CERT}")
    if state.upgradable:
        print(f"`regcache ca upgrade --confdir {options.confdir}` {ca.UPGRADE_HINT}")
    return 0


def ca_upgrade(options: argparse.Namespace) -> int:
    confdir = Path(options.confdir).resolve()
    result = ca.upgrade(confdir)
    if not result.done:
        print(f"nothing to do: the CA in {confdir} signs with ECDSA already ({result.state.describe()})")
        return 0
    print(f"upgraded {confdir / ca.CA_FILE}: {result.state.describe()}")
    print(f"the root's key is kept in {confdir / ca.ROOT_KEY_FILE} (mode 0600, for the next intermediate)")
    print(f"clients change nothing ({confdir / ca.CA_CERT} is unchanged); restart regcache to use it")
    return 0


def ca_new(options: argparse.Namespace) -> int:
    confdir = Path(options.confdir).resolve()
    kind: ca.KeyKind = "rsa" if options.rsa else "ecdsa"
    existing = ca.read_ca(confdir)
    if existing is not None and not options.replace:
        raise UsageError(
            f"{confdir} has a CA already ({existing.describe()}), which clients trust: `regcache ca upgrade` "
            "keeps that trust; --replace makes a new root that every client must be given again"
        )
    backup = ca.replace_root(confdir, kind)
    state = ca.read_ca(confdir)
    assert state is not None
    print(f"new CA in {confdir / ca.CA_FILE}: {state.describe()}; clients trust {confdir / ca.CA_CERT}")
    if backup is not None:
        print(f"the old CA's files are in {backup}")
        print(retrust_instructions(confdir / ca.CA_CERT), end="")
    return 0


def retrust_instructions(ca_cert: Path) -> str:
    """What every node must do to trust a new root: the set-up tools again, with the new certificate."""
    regcache = regcache_command()
    proxy = client_setup.DEFAULT_PROXY
    return f"""\
Clients trust the old root until they get the new one. On each node, as the client was set up
(with your proxy URL), then restart regcache:
  sudo {regcache} setup dockerd --proxy {proxy} --ca {ca_cert}
  sudo {regcache} setup containerd --proxy {proxy} --ca {ca_cert}
  sudo {regcache} setup podman --proxy {proxy} --ca {ca_cert}
and replace the old certificate wherever else it was copied (SSL_CERT_FILE bundles, hosts.toml, buildkitd.toml).
"""


def setup(options: argparse.Namespace) -> int:
    """`regcache setup TOOL ARGS`: the client set-up tools (standard library only, setup/client.py)."""
    return client_setup.main(options.tool, options.setup_args, prog=f"regcache setup {options.tool}")


def _store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML configuration whose cache_dir (or shared store) to use")
    parser.add_argument("--cache-dir", help="the cache directory (default: cache_dir of --config, or the default)")
    parser.add_argument(
        "--local",
        action="store_true",
        help="with shared in the configuration: this machine's cache_dir only (default: the cluster's store)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="regcache", description="Docker/OCI registry pull-through cache")
    parser.add_argument("--version", action="version", version=f"regcache {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="start the cache (mitmproxy with the regcache addon)")
    run_parser.add_argument("--config", help="YAML configuration file (default: built-in defaults)")
    run_parser.add_argument("--listen-host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    run_parser.add_argument("--port", type=int, default=3128, help="port to listen on (default 3128)")
    run_parser.add_argument("--confdir", default="certs", help="mitmproxy confdir holding the CA (default ./certs)")
    run_parser.add_argument(
        "mitmdump_args",
        nargs=argparse.REMAINDER,
        help="further mitmproxy arguments after -- (as for mitmdump: --set KEY=VALUE, --mode, -s SCRIPT)",
    )
    run_parser.set_defaults(handler=run)

    export_parser = commands.add_parser(
        "export", help="write cached images to an OCI image layout (directory, or a tar if OUT ends in .tar)"
    )
    _store_options(export_parser)
    export_parser.add_argument("-o", "--output", required=True, help="bundle to write (DIR or FILE.tar)")
    export_parser.add_argument("images", nargs="*", help="images to export, e.g. docker.io/library/alpine:3.20 (all)")
    export_parser.set_defaults(handler=export)

    import_parser = commands.add_parser(
        "import", help="merge a bundle (or any OCI image layout, e.g. from skopeo) into the cache"
    )
    _store_options(import_parser)
    import_parser.add_argument("bundle", help="OCI image layout directory or tar")
    import_parser.add_argument(
        "--as", dest="as_ref", help="the image reference a layout without regcache annotations stands for"
    )
    import_parser.add_argument("--pin", action="store_true", help="pin every imported image (never evicted)")
    import_parser.add_argument(
        "--public",
        action="store_true",
        help="mark every imported repository readable anonymously, those the bundle says are private "
        "too (default: only entries regcache exported as public; a layout from another tool stays private)",
    )
    import_parser.set_defaults(handler=import_)

    for name, handler, text in (
        ("pin", pin, "pin images at the digest their tag last resolved to: eviction never removes them"),
        ("unpin", unpin, "remove pins"),
    ):
        pin_parser = commands.add_parser(name, help=text)
        _store_options(pin_parser)
        pin_parser.add_argument("images", nargs="+", help="images, e.g. docker.io/library/alpine:3.20")
        pin_parser.set_defaults(handler=handler)
    pins_parser = commands.add_parser("pins", help="list pinned images and their digests")
    _store_options(pins_parser)
    pins_parser.set_defaults(handler=pins)

    warm_parser = commands.add_parser("warm", help="fetch images from upstream into the cache (no container runtime)")
    _store_options(warm_parser)
    warm_parser.add_argument("images", nargs="*", help="images, e.g. docker.io/library/alpine:3.20 or alpine:3.20")
    warm_parser.add_argument("-f", "--file", help="a file of images, one per line (# comments)")
    warm_parser.add_argument(
        "--platform",
        action="append",
        help="only this platform of multi-arch images, e.g. linux/arm64 (repeatable; default: the platforms "
        "setting when it is a list, else all)",
    )
    warm_parser.set_defaults(handler=warm)

    stats_parser = commands.add_parser("stats", help="store size, hit ratio, pulls saved, top repositories")
    _store_options(stats_parser)
    stats_parser.add_argument("--top", type=int, default=10, help="how many repositories to show (default 10)")
    stats_parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    stats_parser.set_defaults(handler=stats)

    ls_parser = commands.add_parser("ls", help="list cached images: tag, digest, size, last use")
    _store_options(ls_parser)
    ls_parser.add_argument("ref", nargs="?", help="only this registry, repository or tag, e.g. docker.io/library")
    ls_parser.add_argument("--json", action="store_true", help="print JSON (full digests, sizes in bytes)")
    ls_parser.set_defaults(handler=ls)

    purge_parser = commands.add_parser(
        "purge", help="remove a tag, repository or registry, and the content only it needed (pins are kept)"
    )
    _store_options(purge_parser)
    purge_parser.add_argument(
        "ref",
        help="docker.io/library/alpine:3.20 (a tag), docker.io/library/alpine (a repository), ghcr.io (a registry)",
    )
    purge_parser.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    purge_parser.set_defaults(handler=purge)

    verify_parser = commands.add_parser(
        "verify", help="rehash every stored manifest and blob; remove corrupt ones (exit 1 if any)"
    )
    _store_options(verify_parser)
    verify_parser.add_argument("--dry-run", "--keep", dest="dry_run", action="store_true", help="only report them")
    verify_parser.add_argument(
        "--sample", type=int, help="shared store: rehash only this many objects of the bucket, picked at random"
    )
    verify_parser.set_defaults(handler=verify)

    gc_parser = commands.add_parser(
        "gc", help="expire unused content (max_age), remove orphans and staging leftovers, trim to size_limit"
    )
    _store_options(gc_parser)
    gc_parser.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    gc_parser.add_argument(
        "--min-age",
        default="1h",
        help="leave orphans and staging files younger than this alone: pulls in progress (default 1h; 0 = all)",
    )
    gc_parser.set_defaults(handler=gc)

    setup_parser = commands.add_parser(
        "setup", help="point this node's dockerd, containerd or podman at regcache, or install it as a service"
    )
    setup_parser.add_argument("tool", choices=sorted(client_setup.TOOLS), help="what to set up (--help after it)")
    setup_parser.add_argument(
        "setup_args", nargs=argparse.REMAINDER, help="its options: --proxy, --ca, --dry-run, --undo, --root, ..."
    )
    setup_parser.set_defaults(handler=setup)

    _ca_commands(
        commands.add_parser("ca", help="the proxy's CA: show it, upgrade an RSA one to ECDSA, or make a new one")
    )

    options = parser.parse_args(argv)
    if options.command == "run" and options.mitmdump_args[:1] == ["--"]:
        options.mitmdump_args = options.mitmdump_args[1:]
    try:
        return int(handler_for(options)(options))
    except (ConfigError, BundleError, BadManifest, StoreError, UsageError, ca.CaError, OSError, sqlite3.Error) as err:
        # One line, never a traceback: these are the user's paths, files and settings.
        unchanged = " (the cache is unchanged)" if options.command == "import" else ""
        print(f"regcache {options.command}: {describe(err)}{unchanged}", file=sys.stderr)
        return 1


def _ca_commands(ca_parser: argparse.ArgumentParser) -> None:
    actions = ca_parser.add_subparsers(dest="ca_command", required=True)
    for name, handler, text in (
        ("show", ca_show, "what the CA is: key type, root or intermediate, what clients trust"),
        ("upgrade", ca_upgrade, "an ECDSA intermediate issued by the RSA root clients trust (they change nothing)"),
        ("new", ca_new, "a new root (ECDSA P-256 unless --rsa); with --replace, in place of the existing CA"),
    ):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("--confdir", default="certs", help="mitmproxy confdir holding the CA (default ./certs)")
        action.set_defaults(handler=handler)
        if name == "new":
            kind = action.add_mutually_exclusive_group()
            kind.add_argument("--ecdsa", action="store_true", help="an ECDSA P-256 key (the default)")
            kind.add_argument("--rsa", action="store_true", help="an RSA-2048 key, as mitmproxy makes")
            action.add_argument(
                "--replace",
                action="store_true",
                help="replace the existing CA (its files move to replaced-TIME/); every client must trust the new one",
            )


def handler_for(options: argparse.Namespace) -> Callable[[argparse.Namespace], int]:
    """The command's handler: with `shared` in the configuration (and no --local), the cluster's."""
    handler: Callable[[argparse.Namespace], int] = options.handler
    if options.command not in cluster_cli.HANDLERS or options.local:
        return handler
    settings = load_settings(options.config)
    if settings.shared is None:
        return handler
    cluster_handler = cluster_cli.HANDLERS[options.command]
    return lambda given: cluster_handler(given, settings)


def describe(err: Exception) -> str:
    """An error as one line: `PATH: No such file or directory` for an OSError."""
    if isinstance(err, OSError) and err.strerror:
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    if isinstance(err, sqlite3.Error):
        return f"cannot read the store's index: {err}"
    return str(err).replace("\n", " ")


if __name__ == "__main__":
    sys.exit(main())
