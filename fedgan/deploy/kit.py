"""What the operator hands out: the staging PKI for the root compose file, and
the site kit tarball that hospital IT copies.

Containers run as uid 10001 and read their keys from compose secrets, which
are bind mounts that keep the host file's owner and mode. So keys must be
owned by that uid. The kit's tarball records that owner itself (no root
needed to build it; `sudo tar -xzf` restores it); the staging PKI is chowned
when `make certs` runs as root and otherwise says the one command to run.
"""

from __future__ import annotations

import io
import os
import secrets
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from fedgan import pki
from fedgan.atomic import write_atomic
from fedgan.errors import FedGanError

# The uid and gid of the `fedgan` user in both images (server/ and client/ Dockerfiles).
CONTAINER_UID = 10001
# Service names the staging compose file uses as TLS names.
STAGING_AGGREGATOR_SANS = ("edge", "superlink")
# The site kit's files, from deploy/site/ (symlinks there point at the one
# copy of each template).
KIT_FILES = (
    "docker-compose.yml",
    "docker-compose.gpu.yml",
    ".env.example",
    "README.md",
    "sidecar.conf.template",
    "nginx.conf",
)


class KitError(FedGanError):
    """The kit or staging PKI cannot be built; names the file and the fix."""


@dataclass(frozen=True)
class StagingPki:
    root: Path
    sites: list[str]
    node_keys: Path
    # Keys the containers read as uid 10001 and that still need a chown.
    needs_chown: list[Path]


def _container_keys(paths: pki.PkiPaths, sites: list[str]) -> list[Path]:
    keys = [paths.server_key]
    for site_id in sites:
        s = paths.site(site_id)
        keys += [s.node_key, s.signing_key, s.client_key, s.sidecar_key]
    return keys


def staging_pki(root: Path, n_sites: int, extra_sans: list[str] | None = None) -> StagingPki:
    """CA, aggregator certificate (with the compose service names), sites
    site-1..N and ``nodes/<site>.pub`` for the SuperLink. Existing files are
    kept: running it twice changes nothing."""
    root = Path(root)
    paths = pki.PkiPaths(root)
    if not paths.ca_cert.exists():
        pki.init_ca(root, "FedGAN staging consortium")
    if not paths.server_cert.exists():
        pki.issue_aggregator(root, [*STAGING_AGGREGATOR_SANS, *(extra_sans or [])])
    sites = [f"site-{i}" for i in range(1, n_sites + 1)]
    nodes = root / "nodes"
    for site_id in sites:
        if not paths.site(site_id).client_cert.exists():
            pki.issue_site(root, site_id)
        write_atomic(nodes / f"{site_id}.pub", paths.site(site_id).node_pub.read_bytes())
    pki.list_members(root, sites)
    _grafana_password(root / "grafana" / "admin-password")
    needs: list[Path] = []
    for key in _container_keys(paths, sites):
        if key.stat().st_uid == CONTAINER_UID:
            continue
        if os.geteuid() == 0:
            os.chown(key, CONTAINER_UID, CONTAINER_UID)
        else:
            needs.append(key)
    return StagingPki(root, sites, nodes, needs)


def _grafana_password(path: Path) -> None:
    """A random admin password for the staging Grafana (a compose secret),
    so it never starts with the image's admin/admin. Kept if present. Mode
    0644 in a 0700 folder: Grafana reads it as its own uid (472)."""
    if path.exists():
        return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(path, secrets.token_urlsafe(24).encode(), mode=0o644)


def _kit_member(name: str, data: bytes, mode: int) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.uid = info.gid = CONTAINER_UID
    info.uname = info.gname = "fedgan"
    info.mtime = int(time.time())
    return info, io.BytesIO(data)


def site_kit(certs: Path, site_id: str, kit_dir: Path, out: Path) -> Path:
    """``fedgan-site-<id>.tar.gz``: the kit's compose files, README and
    templates, ``.env`` prefilled with the site id, and ``certs/`` with this
    site's certificates, the CA certificate, the CRL and the membership list:
    nothing of any other site, never the CA key. A site that made its own
    keys (`fedgan site keys`, the production ceremony) gets no key in its
    kit: it unpacks the kit beside the keys it holds. Only a staging site
    whose keys the CA made (`fedgan pki issue-site`) gets them in the kit.
    Owned by uid 10001 inside the archive."""
    paths = pki.PkiPaths(Path(certs))
    site = paths.site(site_id)
    public = {
        "ca.crt": (paths.ca_cert, 0o444),
        "crl.pem": (paths.crl, 0o444),
        "membership.json": (paths.membership, 0o444),
        "client.crt": (site.client_cert, 0o444),
        "sidecar.crt": (site.sidecar_cert, 0o444),
        "node_key.pub": (site.node_pub, 0o444),
        "signing.crt": (site.signing_cert, 0o444),
    }
    private = {
        "client.key": (site.client_key, 0o400),
        "sidecar.key": (site.sidecar_key, 0o400),
        "node_key": (site.node_key, 0o400),
        "signing.key": (site.signing_key, 0o400),
    }
    for src, _mode in public.values():
        if src == paths.membership and not src.is_file():
            raise KitError(f"{src} is missing; sign the membership list: fedgan pki membership")
        if not src.is_file():
            raise KitError(
                f"{src} is missing; certify the site first: fedgan pki sign <its requests/> "
                f"(staging: fedgan pki issue-site {site_id})"
            )
    held = [src for src, _mode in private.values() if src.is_file()]
    if held and len(held) != len(private):
        raise KitError(
            f"{site.dir} holds some of the site's private keys but not all; re-issue the site "
            "(staging) or remove them (production: the site keeps its own keys)"
        )
    wanted = {**public, **(private if held else {})}
    for name in KIT_FILES:
        if not (kit_dir / name).is_file():
            raise KitError(f"{kit_dir / name} is missing; run from the FedGAN checkout")
    top = f"fedgan-site-{site_id}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{top}.tar.gz"
    tmp = target.with_name(f".{target.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for dirname in (top, f"{top}/certs", f"{top}/state"):
            info = tarfile.TarInfo(dirname)
            info.type = tarfile.DIRTYPE
            info.mode = 0o700 if not dirname.endswith(top) else 0o755
            info.uid = info.gid = CONTAINER_UID
            info.uname = info.gname = "fedgan"
            info.mtime = int(time.time())
            tar.addfile(info)
        for name in KIT_FILES:
            data = (kit_dir / name).read_bytes()
            if name == ".env.example":
                tar.addfile(*_kit_member(f"{top}/.env.example", data, 0o644))
                data = _env_for(data.decode(), site_id).encode()
                name = ".env"
            tar.addfile(*_kit_member(f"{top}/{name}", data, 0o644))
        for name, (src, mode) in wanted.items():
            tar.addfile(*_kit_member(f"{top}/certs/{name}", src.read_bytes(), mode))
    os.replace(tmp, target)
    return target


def _env_for(template: str, site_id: str) -> str:
    lines = [
        f"SITE_ID={site_id}" if line.startswith("SITE_ID=") else line
        for line in template.splitlines()
    ]
    return "\n".join(lines) + "\n"
