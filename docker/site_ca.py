"""Give a Debian rootfs the CA certificates of a host bundle that it lacks.

    python3 docker/site_ca.py HOST_BUNDLE ROOTFS

Used by build-local.sh: on a machine whose HTTPS goes through a TLS-intercepting
proxy, pip inside the build trusts PyPI only with the proxy's CA. The extra
certificates go to ROOTFS/usr/local/share/ca-certificates/site-N.crt and
update-ca-certificates (run in the rootfs) adds them to its bundle. Rerunnable.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

END = "-----END CERTIFICATE-----"


def certificates(path: Path) -> list[str]:
    text = path.read_text()
    return [part.strip() + "\n" + END + "\n" for part in text.split(END) if "BEGIN" in part]


def main(host_bundle: str, rootfs_dir: str) -> int:
    rootfs = Path(rootfs_dir)
    have = {c.strip() for c in certificates(rootfs / "etc/ssl/certs/ca-certificates.crt")}
    extra = [c for c in certificates(Path(host_bundle)) if c.strip() not in have]
    target = rootfs / "usr/local/share/ca-certificates"
    target.mkdir(parents=True, exist_ok=True)
    for i, cert in enumerate(extra):
        (target / f"site-{i}.crt").write_text(cert)
    print(f"{len(extra)} site CA certificate(s) added to {rootfs}")
    if extra:
        subprocess.run(["chroot", str(rootfs), "update-ca-certificates"], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
