"""Container health check: GET /healthz of the server in this container.

Used by the images' HEALTHCHECK (slim images have no curl). It reads the same
CACE_SERVER_* variables as the server: the port from CACE_SERVER_PORT, the address
from CACE_SERVER_HOST (a wildcard bind address is checked on loopback). With the HTTP
API switched off (CACE_SERVER_HTTP=false, an i-PI-only server) there is nothing to
ask, so it reports healthy. Exit 0 when /healthz says ok, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request


def main() -> int:
    if os.environ.get("CACE_SERVER_HTTP", "true").strip().lower() in ("0", "false", "no", "off"):
        return 0
    host = os.environ.get("CACE_SERVER_HOST", "127.0.0.1").strip() or "127.0.0.1"
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host in ("::", "[::]"):
        host = "[::1]"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    port = os.environ.get("CACE_SERVER_PORT", "8000").strip() or "8000"
    url = f"http://{host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            body = json.loads(response.read())
    except Exception as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if body.get("status") != "ok":
        print(f"unhealthy: {url} answered {body!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
