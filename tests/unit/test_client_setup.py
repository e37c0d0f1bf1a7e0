"""scripts/setup-dockerd, setup-containerd, setup-podman and setup-service, run for real as
subprocesses against temporary root directories: dry runs write nothing, real runs write what the
clients read, second runs change nothing, undo puts everything back, bad input changes nothing."""

from __future__ import annotations

import configparser
import json
import tomllib
from pathlib import Path

import pytest
from bed.setup_scripts import SCRIPTS, run_setup, systemd_environment

from regcache.config import DEFAULT_REGISTRIES
from regcache.ops.cli import dockerd_instructions
from regcache.ops.setup import client as client_setup
from regcache.ops.setup import fileplan

PEM = b"-----BEGIN CERTIFICATE-----\nMIIBregcachetest\n-----END CERTIFICATE-----\n"
DOCKER_DROPIN = "etc/systemd/system/docker.service.d/regcache.conf"
CONTAINERD_DROPIN = "etc/systemd/system/containerd.service.d/regcache.conf"
TRUSTED_CA = "usr/local/share/ca-certificates/regcache.crt"
DAEMON_JSON = "etc/docker/daemon.json"
USER_DAEMON_JSON = b'{"log-driver":"journald",\n  "registry-mirrors": ["https://mirror.example"]}\n'
TOOLS = ("dockerd", "containerd", "podman", "service")

Tree = dict[str, tuple[bytes | None, int, int]]


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    path.write_bytes(PEM)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A root with a file of the user's own, so an undo must leave something behind."""
    root = tmp_path / "root"
    (root / "etc" / "docker").mkdir(parents=True)
    (root / DAEMON_JSON).write_bytes(USER_DAEMON_JSON)
    return root


def snapshot(root: Path, mtimes: bool = True) -> Tree:
    """Every file and directory under `root`: bytes (None for a directory), mode, mtime."""
    return {
        str(path.relative_to(root)): (
            path.read_bytes() if path.is_file() else None,
            path.stat().st_mode,
            path.stat().st_mtime_ns if mtimes else 0,
        )
        for path in sorted(root.rglob("*"))
    }


def args_for(tool: str, ca: Path) -> list[str]:
    return [] if tool == "service" else ["--ca", str(ca)]


@pytest.mark.parametrize("tool", TOOLS)
def test_dry_run_prints_the_changes_and_writes_nothing(tool: str, root: Path, ca: Path) -> None:
    before = snapshot(root)
    result = run_setup(tool, *args_for(tool, ca), "--dry-run", root=root)
    assert snapshot(root) == before
    assert result.lines[0].startswith("dry run:")
    assert "create" in result.verbs()
    assert f"create {root}/var/lib/regcache-setup/state.json (undo record)" in result.lines
    assert all(verb in ("create", "skip") for verb in result.verbs()), result.stdout
    assert "    +++ after" in result.lines  # the content that would be written, as a diff


@pytest.mark.parametrize("tool", TOOLS)
def test_second_run_changes_nothing_and_undo_restores_the_tree(tool: str, root: Path, ca: Path) -> None:
    pristine = snapshot(root, mtimes=False)
    run_setup(tool, *args_for(tool, ca), root=root)
    after_first = snapshot(root)
    assert after_first != snapshot(root, mtimes=False)

    second = run_setup(tool, *args_for(tool, ca), root=root)
    assert set(second.verbs()) == {"unchanged"}, second.stdout
    assert not any(line.startswith("note:") for line in second.lines)
    assert snapshot(root) == after_first  # bytes, modes and mtimes

    undo = run_setup(tool, "--undo", root=root)
    assert "remove" in undo.verbs()
    assert snapshot(root, mtimes=False) == pristine
    assert run_setup(tool, "--undo", root=root).lines == [
        f"nothing to undo: {root}/var/lib/regcache-setup/state.json records no setup-{tool}"
    ]


def test_dockerd_dropin_gives_dockerd_the_proxy(root: Path, ca: Path) -> None:
    result = run_setup(
        "dockerd", "--ca", str(ca), "--proxy", "http://10.1.2.3:3128", "--no-proxy", "localhost,.corp", root=root
    )
    dropin = (root / DOCKER_DROPIN).read_text()
    assert systemd_environment(dropin) == {"HTTPS_PROXY": "http://10.1.2.3:3128", "NO_PROXY": "localhost,.corp"}
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string(dropin)
    assert unit["Unit"]["After"] == "regcache.service"
    assert (root / TRUSTED_CA).read_bytes() == PEM
    assert (root / DAEMON_JSON).read_bytes() == USER_DAEMON_JSON  # the drop-in method leaves it alone
    assert [line for line in result.lines if line.startswith("skip")] == [
        "skip update-ca-certificates (--root is not /)",
        "skip systemctl daemon-reload (--root is not /)",
        "skip systemctl restart docker.service (--root is not /)",
    ]


def test_proxy_credentials_stay_out_of_output_and_other_eyes(root: Path, ca: Path) -> None:
    proxy = "http://ci:s3cr%25t@10.1.2.3:3128"
    result = run_setup("dockerd", "--ca", str(ca), "--proxy", proxy, "--dry-run", root=root)
    assert "s3cr" not in result.stdout and "ci:***@" in result.stdout
    run_setup("dockerd", "--ca", str(ca), "--proxy", proxy, root=root)
    dropin = root / DOCKER_DROPIN
    assert systemd_environment(dropin.read_text())["HTTPS_PROXY"] == proxy  # `%` survives systemd's specifiers
    assert dropin.stat().st_mode & 0o777 == 0o600


def test_daemon_json_keeps_the_users_keys_and_undo_restores_its_bytes(root: Path, ca: Path) -> None:
    daemon_json = root / DAEMON_JSON
    daemon_json.chmod(0o640)
    pristine = snapshot(root, mtimes=False)
    run_setup("dockerd", "--ca", str(ca), "--method", "daemon-json", root=root)
    settings = json.loads(daemon_json.read_bytes())
    assert settings == {
        "log-driver": "journald",
        "registry-mirrors": ["https://mirror.example"],
        "proxies": {"https-proxy": "http://127.0.0.1:3128", "no-proxy": "localhost,127.0.0.1,::1"},
    }
    assert daemon_json.stat().st_mode & 0o777 == 0o640
    assert not (root / DOCKER_DROPIN).exists()

    written = snapshot(root)
    assert set(run_setup("dockerd", "--ca", str(ca), "--method", "daemon-json", root=root).verbs()) == {"unchanged"}
    assert snapshot(root) == written

    undo = run_setup("dockerd", "--undo", root=root)
    assert f"restore {daemon_json}" in undo.lines
    assert snapshot(root, mtimes=False) == pristine


def test_undo_of_a_daemon_json_changed_since_restores_only_our_key(root: Path, ca: Path) -> None:
    run_setup("dockerd", "--ca", str(ca), "--method", "daemon-json", root=root)
    daemon_json = root / DAEMON_JSON
    daemon_json.write_text(json.dumps({**json.loads(daemon_json.read_bytes()), "debug": True}))
    run_setup("dockerd", "--undo", root=root)
    assert json.loads(daemon_json.read_bytes()) == {**json.loads(USER_DAEMON_JSON), "debug": True}


def test_mirror_goes_first_in_registry_mirrors_and_undo_restores_its_bytes(root: Path, ca: Path) -> None:
    daemon_json = root / DAEMON_JSON
    pristine = snapshot(root, mtimes=False)
    mirror = "http://127.0.0.1:5055"
    result = run_setup("dockerd", "--ca", str(ca), "--mirror", mirror + "/", root=root)
    assert f"update {daemon_json}" in result.lines
    assert json.loads(daemon_json.read_bytes()) == {
        "log-driver": "journald",
        "registry-mirrors": [mirror, "https://mirror.example"],  # the user's own stays, behind ours
    }
    assert systemd_environment((root / DOCKER_DROPIN).read_text())["HTTPS_PROXY"] == "http://127.0.0.1:3128"

    written = snapshot(root)
    assert set(run_setup("dockerd", "--ca", str(ca), "--mirror", mirror, root=root).verbs()) == {"unchanged"}
    assert snapshot(root) == written

    run_setup("dockerd", "--undo", root=root)
    assert snapshot(root, mtimes=False) == pristine


def test_daemon_json_with_proxy_and_mirror_then_without_the_mirror(root: Path, ca: Path) -> None:
    daemon_json = root / DAEMON_JSON
    run_setup("dockerd", "--ca", str(ca), "--method", "daemon-json", "--mirror", "http://127.0.0.1:5055", root=root)
    settings = json.loads(daemon_json.read_bytes())
    assert settings["registry-mirrors"] == ["http://127.0.0.1:5055", "https://mirror.example"]
    assert settings["proxies"]["https-proxy"] == "http://127.0.0.1:3128"

    # Run again without --mirror: that key goes back to the user's own; the proxy stays.
    run_setup("dockerd", "--ca", str(ca), "--method", "daemon-json", root=root)
    settings = json.loads(daemon_json.read_bytes())
    assert settings["registry-mirrors"] == ["https://mirror.example"]
    assert "proxies" in settings

    # Changed since: the undo puts back only our keys.
    daemon_json.write_text(json.dumps({**settings, "debug": True}))
    run_setup("dockerd", "--undo", root=root)
    assert json.loads(daemon_json.read_bytes()) == {**json.loads(USER_DAEMON_JSON), "debug": True}


def test_the_steps_regcache_run_prints_are_what_setup_dockerd_writes(root: Path, ca: Path) -> None:
    mirror = "http://127.0.0.1:5055"
    steps = dockerd_instructions("http://127.0.0.1:3128", ca, mirror)
    run_setup("dockerd", "--ca", str(ca), "--mirror", mirror, root=root)
    for name, value in systemd_environment((root / DOCKER_DROPIN).read_text()).items():
        assert f'Environment="{name}={value}"' in steps
    run_setup("dockerd", "--ca", str(ca), "--method", "daemon-json", "--mirror", mirror, root=root)
    written = json.loads((root / DAEMON_JSON).read_bytes())
    assert json.dumps({"proxies": written["proxies"]}) in steps
    assert json.dumps({"registry-mirrors": written["registry-mirrors"][:1]}) in steps
    assert "registry-mirrors" not in dockerd_instructions("http://127.0.0.1:3128", ca)


def test_an_undo_record_from_before_several_json_keys_still_undoes() -> None:
    original = b'{"debug": true}\n'
    state = fileplan.empty_state()
    entry = fileplan.new_entry(fileplan.Current(original, 0o644), b"")
    state["files"] = {"/etc/docker/daemon.json": {**entry, "users": {"dockerd": ["docker"]}, "json_key": "proxies"}}
    now = fileplan.Current(b'{"debug": true, "proxies": {}, "live-restore": true}\n', 0o644)
    changes = fileplan.plan("dockerd", [], {"/etc/docker/daemon.json": now}, state)
    [action] = changes.actions
    assert action.verb == "update" and json.loads(action.after or b"") == {"debug": True, "live-restore": True}


def test_switching_method_moves_the_proxy(root: Path, ca: Path) -> None:
    run_setup("dockerd", "--ca", str(ca), root=root)
    result = run_setup("dockerd", "--ca", str(ca), "--method", "daemon-json", root=root)
    assert f"remove {root / DOCKER_DROPIN}" in result.lines
    assert "proxies" in json.loads((root / DAEMON_JSON).read_bytes())


def test_a_file_changed_since_setup_is_kept_on_undo(root: Path, ca: Path) -> None:
    run_setup("containerd", "--ca", str(ca), root=root)
    dropin = root / CONTAINERD_DROPIN
    dropin.write_text(dropin.read_text() + 'Environment="GODEBUG=x509ignoreCN=0"\n')
    undo = run_setup("containerd", "--undo", root=root)
    assert f"keep {dropin} (changed since it was written; remove by hand if unwanted)" in undo.lines
    assert dropin.exists() and not (root / TRUSTED_CA).exists()


def test_the_shared_ca_stays_until_the_last_user_is_undone(root: Path, ca: Path) -> None:
    run_setup("dockerd", "--ca", str(ca), root=root)
    assert run_setup("containerd", "--ca", str(ca), root=root).verbs()[0] == "unchanged"  # the CA
    environment = systemd_environment((root / CONTAINERD_DROPIN).read_text())
    assert environment == {"HTTPS_PROXY": "http://127.0.0.1:3128", "NO_PROXY": "localhost,127.0.0.1,::1"}

    undo_dockerd = run_setup("dockerd", "--undo", root=root)
    assert f"keep {root / TRUSTED_CA} (still used by setup-containerd)" in undo_dockerd.lines
    assert (root / TRUSTED_CA).read_bytes() == PEM
    undo_containerd = run_setup("containerd", "--undo", root=root)
    assert "skip update-ca-certificates --fresh (--root is not /)" in undo_containerd.lines
    assert not (root / TRUSTED_CA).exists()


def test_red_hat_trust_store(root: Path, ca: Path) -> None:
    (root / "etc" / "pki" / "ca-trust" / "source" / "anchors").mkdir(parents=True)
    result = run_setup("containerd", "--ca", str(ca), root=root)
    assert (root / "etc/pki/ca-trust/source/anchors/regcache.crt").read_bytes() == PEM
    assert "skip update-ca-trust extract (--root is not /)" in result.lines


def test_podman_trusts_the_ca_per_registry_and_gets_the_proxy(root: Path, ca: Path) -> None:
    result = run_setup("podman", "--ca", str(ca), root=root)
    certs = root / "etc" / "containers" / "certs.d"
    assert sorted(path.name for path in certs.iterdir()) == sorted(DEFAULT_REGISTRIES)
    assert all((certs / host / "ca.crt").read_bytes() == PEM for host in DEFAULT_REGISTRIES)
    conf = tomllib.loads((root / "etc/containers/containers.conf.d/regcache.conf").read_text())
    assert conf == {"engine": {"env": ["HTTPS_PROXY=http://127.0.0.1:3128", "NO_PROXY=localhost,127.0.0.1,::1"]}}
    assert result.lines[-1] == (
        "note: skopeo and buildah take the proxy from their environment: "
        "export HTTPS_PROXY=http://127.0.0.1:3128 NO_PROXY=localhost,127.0.0.1,::1"
    )

    narrowed = run_setup("podman", "--ca", str(ca), "--registry", "ghcr.io", "--registry", "reg.corp:5000", root=root)
    assert sorted(path.name for path in certs.iterdir()) == ["ghcr.io", "reg.corp:5000"]
    assert f"remove {certs / 'quay.io'}/" in narrowed.lines


def test_default_registries_are_regcaches() -> None:
    assert tuple(DEFAULT_REGISTRIES) == client_setup.FALLBACK_REGISTRIES
    assert client_setup.default_registries() == tuple(DEFAULT_REGISTRIES)


def test_service_unit_runs_regcache_and_keeps_an_existing_config(root: Path) -> None:
    config = root / "etc" / "regcache" / "regcache.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("size_limit: 10GiB\n")
    result = run_setup("service", "--listen-host", "10.0.0.5", "--port", "3200", root=root)
    assert f"unchanged {config}" in result.lines
    assert result.lines[-1].startswith("note: regcache will listen on 10.0.0.5 WITHOUT proxy authentication")
    unit = configparser.ConfigParser(interpolation=None)
    unit.read_string((root / "etc/systemd/system/regcache.service").read_text())
    repo = SCRIPTS.parent
    assert unit["Service"]["ExecStart"] == (
        f"{repo}/.venv/bin/regcache run --config /etc/regcache/regcache.yaml --confdir {repo}/certs "
        "--listen-host 10.0.0.5 --port 3200"
    )
    assert unit["Service"]["WorkingDirectory"] == str(repo)
    assert unit["Service"]["Restart"] == "on-failure"
    assert unit["Unit"]["After"] == "network-online.target"
    assert unit["Install"]["WantedBy"] == "multi-user.target"

    run_setup("service", "--undo", root=root)
    assert config.read_text() == "size_limit: 10GiB\n"
    assert not (root / "etc/systemd/system/regcache.service").exists()


def test_service_with_inline_proxyauth(root: Path) -> None:
    result = run_setup("service", "--listen-host", "0.0.0.0", "--proxyauth", "ci:hunter2", "--dry-run", root=root)
    assert "hunter2" not in result.stdout
    run_setup("service", "--listen-host", "0.0.0.0", "--proxyauth", "ci:hunter2", root=root)
    unit = root / "etc/systemd/system/regcache.service"
    assert unit.stat().st_mode & 0o777 == 0o600
    assert unit.read_text().count("-- --set proxyauth=ci:hunter2\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ca", "/nonexistent/ca.pem"], "CA certificate /nonexistent/ca.pem not found"),
        (["--proxy", "127.0.0.1:3128"], "--proxy must be a URL like http://127.0.0.1:3128"),
        (["--proxy", "http://host:port"], "--proxy must be a URL"),
        (["--no-proxy", "a\nb"], "--no-proxy must not contain control characters"),
        (["--mirror", "127.0.0.1:5055"], "--mirror must be a URL like http://127.0.0.1:5055"),
        (["--mirror", "http://u:p@127.0.0.1:5055"], "--mirror takes no user or password"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(args: list[str], message: str, root: Path, ca: Path) -> None:
    before = snapshot(root)
    result = run_setup("dockerd", "--ca", str(ca), *args, root=root, check=False)
    assert result.status == 2 and result.stdout == ""
    assert result.stderr.startswith(f"setup-dockerd: error: {message}"), result.stderr
    assert snapshot(root) == before


def test_invalid_daemon_json_is_refused_and_changes_nothing(root: Path, ca: Path) -> None:
    (root / DAEMON_JSON).write_text('{"debug": true,}\n')
    before = snapshot(root)
    result = run_setup("dockerd", "--ca", str(ca), "--method", "daemon-json", root=root, check=False)
    assert result.status == 2
    assert f"{'/' + DAEMON_JSON} is not valid JSON" in result.stderr and "nothing was changed" in result.stderr
    assert snapshot(root) == before


def test_a_private_key_is_not_a_ca_certificate(root: Path, tmp_path: Path) -> None:
    key = tmp_path / "mitmproxy-ca.pem"
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nMII\n-----END PRIVATE KEY-----\n" + PEM)
    result = run_setup("podman", "--ca", str(key), root=root, check=False)
    assert result.status == 2 and "holds a private key" in result.stderr


def test_commands_on_the_real_root_honour_no_restart(capsys: pytest.CaptureFixture[str]) -> None:
    """In process, as a dry run: which commands a change on / would run (nothing is run)."""
    commands = client_setup.daemon_commands(client_setup.DEBIAN_TRUST, "docker")
    changes = frozenset({("trust", "install"), ("systemd", "install"), ("docker", "install")})
    options = client_setup.build_parser(client_setup.TOOLS["dockerd"]).parse_args(["--dry-run", "--no-restart"])
    printer = fileplan.Printer(dry_run=True, redact=client_setup.redact)
    assert client_setup.run_commands(client_setup.triggered(commands, changes), options, Path("/"), printer) == 0
    assert capsys.readouterr().out.splitlines() == [
        "run update-ca-certificates",
        "run systemctl daemon-reload",
        "skip systemctl restart docker.service (--no-restart)",
    ]


def test_docker_major_version() -> None:
    assert client_setup.docker_major_version("Docker version 20.10.24+dfsg1, build 5d6db84") == 20
    assert client_setup.docker_major_version("Docker version 28.2.2, build e6534b4") == 28
    assert client_setup.docker_major_version("garbage") is None


def test_plan_tightens_a_secrets_mode_and_undo_loosens_it_again() -> None:
    """Pure planning: an existing file with the right bytes but readable by all is a change."""
    path = "/etc/containers/containers.conf.d/regcache.conf"
    spec = fileplan.WholeFile(path, b"x\n", mode=0o600)
    there = fileplan.Current(b"x\n", 0o644)
    setup = fileplan.plan("podman", [spec], {path: there}, fileplan.empty_state())
    assert [(a.verb, a.mode) for a in setup.actions] == [("update", 0o600)]

    undo = fileplan.plan("podman", [], {path: fileplan.Current(b"x\n", 0o600)}, setup.state_after)
    assert [(a.verb, a.after, a.mode) for a in undo.actions] == [("restore", b"x\n", 0o644)]
    assert undo.state_after == fileplan.empty_state()
