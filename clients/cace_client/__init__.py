"""Client of a cace-server: HTTP with retries (:class:`CACEClient`) and an ASE calculator.

No torch: this package needs httpx, numpy and ase (msgpack for binary bodies).
"""

from cace_client.calculator import RemoteCACE
from cace_client.client import AsyncCACEClient, CACEClient, CACEServerError

__all__ = ["AsyncCACEClient", "CACEClient", "CACEServerError", "RemoteCACE"]
__version__ = "0.1.0"
