"""User mistakes at the command line and in the configuration: one line on stderr naming the
problem, a non-zero exit, never a traceback; and commands that only look at a cache create
nothing and change nothing.

A read-only store is made with `chattr +i` (immutable files and directories): these tests run as
root, and root writes through any file mode.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from bed.images import ImageSet
from bed.regcache_run import Mitmdump
from bed.skopeo import Skopeo

from regcache.ops.cli import mitmdump_args

from .conftest import regcache_cli


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a command that failed as it should."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    """Every file below `directory`: its sha256 and mtime."""
    return {
        str(path.relative_to(directory)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def test_configuration_mistakes_are_one_line(tmp_path: Path, proxy_confdir: Path) -> None:
    ipv6 = tmp_path / "ipv6.yaml"
    ipv6.write_text(yaml.safe_dump({"upstreams": {"registry-1.docker.io": "http://[::1"}}))
    where = ["--port", "0", "--confdir", str(proxy_confdir)]
    line = one_line_error(regcache_cli("run", "--config", str(ipv6), *where, check=False))
    assert line.startswith("regcache: bad configuration: upstreams.registry-1.docker.io: expected a base URL")
    assert one_line_error(regcache_cli("warm", "--config", str(ipv6), "alpine", check=False)).startswith(
        "regcache warm: upstreams.registry-1.docker.io: "
    )

    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(f"cache_dir: {tmp_path}/caché\n".encode("latin-1"))
    line = one_line_error(regcache_cli("run", "--config", str(latin1), *where, check=False))
    assert line.startswith(f"regcache: bad configuration: regcache_config: {latin1} is not UTF-8 text")
    line = one_line_error(regcache_cli("ls", "--config", str(latin1), check=False))
    assert line.startswith(f"regcache ls: regcache_config: {latin1} is not UTF-8 text")


def test_missing_inputs_are_one_line_and_create_no_cache(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    line = one_line_error(regcache_cli("import", "--cache-dir", str(cache), str(tmp_path / "nope.tar"), check=False))
    assert line == f"regcache import: {tmp_path / 'nope.tar'}: no such file or directory (the cache is unchanged)"
    line = one_line_error(regcache_cli("warm", "--cache-dir", str(cache), "-f", str(tmp_path / "x.txt"), check=False))
    assert line == f"regcache warm: cannot read -f {tmp_path / 'x.txt'}: No such file or directory"
    assert not cache.exists()


@pytest.mark.parametrize("command", ["stats", "ls", "verify", "pins", "export", "gc"])
def test_a_mistyped_cache_dir_is_not_created(command: str, tmp_path: Path) -> None:
    typo = tmp_path / "cahce"
    output = ["-o", str(tmp_path / "out")] if command == "export" else []
    line = one_line_error(regcache_cli(command, *output, "--cache-dir", str(typo), check=False))
    assert line == f"regcache {command}: cache_dir {typo} does not exist: there is no cache there"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["ls"], ["warm", "alpine"], ["import", "."], ["pin", "alpine"]])
def test_a_cache_dir_that_is_a_file(command: list[str], tmp_path: Path) -> None:
    file = tmp_path / "cache"
    file.write_text("not a directory")
    line = one_line_error(regcache_cli(*command, "--cache-dir", str(file), check=False))
    assert line.startswith(f"regcache {command[0]}: cache_dir {file} is not a directory")


@pytest.fixture
def recorded(images: ImageSet, regcache: Mitmdump, skopeo: Skopeo, tmp_path: Path) -> Path:
    """The cache_dir of a regcache that pulled oci-single and stopped (nothing has it open)."""
    assert skopeo.copy_to_dir(images.oci_single.ref, tmp_path / "pulled") == images.oci_single.digest
    regcache.stop()
    return regcache.workdir / "cache"


def test_unpin_of_an_image_not_pinned_writes_nothing(images: ImageSet, recorded: Path) -> None:
    ref = f"docker.io/{images.oci_single.ref}"
    before = snapshot(recorded)
    result = regcache_cli("unpin", "--cache-dir", str(recorded), ref)
    assert result.stdout == f"{ref} was not pinned\n"
    assert regcache_cli("pins", "--cache-dir", str(recorded)).stdout == ""
    assert json.loads(regcache_cli("ls", "--cache-dir", str(recorded), "--json").stdout)[0]["ref"] == ref
    assert snapshot(recorded) == before  # not a byte, not an mtime

    regcache_cli("pin", "--cache-dir", str(recorded), ref)
    assert regcache_cli("unpin", "--cache-dir", str(recorded), ref).stdout == f"unpinned {ref}\n"
    assert regcache_cli("pins", "--cache-dir", str(recorded)).stdout == ""


@pytest.fixture
def immutable() -> Iterator[Callable[[Path], None]]:
    """``make(path)``: `chattr -R +i` (undone after the test); skips where chattr cannot."""
    made: list[Path] = []

    def make(path: Path) -> None:
        result = subprocess.run(["chattr", "-R", "+i", str(path)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            subprocess.run(["chattr", "-R", "-i", str(path)], capture_output=True, check=False)
            pytest.skip(f"chattr +i does not work here: {result.stderr.strip()}")
        made.append(path)

    yield make
    for path in made:
        subprocess.run(["chattr", "-R", "-i", str(path)], check=True)


def test_a_read_only_store(
    images: ImageSet, recorded: Path, regcache: Mitmdump, immutable: Callable[[Path], None], tmp_path: Path
) -> None:
    """Start-up stops with one line naming cache_dir; the commands that only read still work."""
    immutable(recorded)
    before = snapshot(recorded)
    config, confdir = str(regcache.config_path), str(regcache.confdir)
    line = one_line_error(regcache_cli("run", "--config", config, "--port", "0", "--confdir", confdir, check=False))
    assert line == f"regcache: cache_dir {recorded} is not writable: Operation not permitted"
    script = subprocess.run(
        [str(Path(sys.executable).with_name("mitmdump")), *mitmdump_args(config, "127.0.0.1", 0, Path(confdir))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert script.returncode == 1
    assert f"regcache: cache_dir {recorded} is not writable: Operation not permitted" in script.stdout + script.stderr
    assert "Traceback" not in script.stdout + script.stderr

    ref = f"docker.io/{images.oci_single.ref}"
    listed = json.loads(regcache_cli("ls", "--cache-dir", str(recorded), "--json").stdout)
    assert [(row["ref"], row["digest"]) for row in listed] == [(ref, images.oci_single.digest)]
    stats = json.loads(regcache_cli("stats", "--cache-dir", str(recorded), "--json").stdout)
    assert stats["store"]["entries"]["blob"] == len(images.oci_single.blobs)
    assert " 0 corrupt" in regcache_cli("verify", "--cache-dir", str(recorded)).stdout
    assert regcache_cli("unpin", "--cache-dir", str(recorded), ref).stdout == f"{ref} was not pinned\n"
    bundle = tmp_path / "bundle"
    regcache_cli("export", "--cache-dir", str(recorded), "-o", str(bundle), ref)
    index = json.loads((bundle / "index.json").read_text())
    assert [entry["digest"] for entry in index["manifests"]] == [images.oci_single.digest]

    line = one_line_error(regcache_cli("pin", "--cache-dir", str(recorded), ref, check=False))
    assert line == f"regcache pin: cache_dir {recorded} is not writable: Operation not permitted"
    assert snapshot(recorded) == before
