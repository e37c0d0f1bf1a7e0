"""Image references: a tag in a registry's cache namespace (`TagRef`), repository names, and how
users write references (`alpine`, `ghcr.io/org/app:1`).

Pure functions only. `repository_of` is the one spelling of a repository as access records,
metrics and bundles name it: `docker.io/library/alpine`.
"""

from __future__ import annotations

from dataclasses import dataclass

DOCKER_HUB = "docker.io"


def repository_of(namespace: str, name: str) -> str:
    """`docker.io` + `library/alpine` → `docker.io/library/alpine`."""
    return f"{namespace}/{name}"


@dataclass(frozen=True)
class TagRef:
    """A tag in one registry's cache namespace, e.g. docker.io / library/alpine / 3.20."""

    namespace: str
    name: str
    tag: str

    @property
    def repository(self) -> str:
        return repository_of(self.namespace, self.name)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}:{self.tag}"


def split_registry(text: str) -> tuple[str, str]:
    """(registry namespace, repository[:tag]) of a reference as users write it: a first component
    with a dot or a port, or `localhost`, names the registry; anything else is Docker Hub's."""
    first, _, rest = text.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        namespace, remainder = first.lower(), rest
    else:
        namespace, remainder = DOCKER_HUB, text
    if namespace in ("index.docker.io", "registry-1.docker.io"):
        namespace = DOCKER_HUB
    return namespace, remainder


def repository_name(namespace: str, name: str) -> str:
    """Docker Hub's official images live under `library/`: `alpine` → `library/alpine`."""
    return f"library/{name}" if namespace == DOCKER_HUB and "/" not in name else name
