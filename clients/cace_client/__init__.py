"""Client of a cace-server: HTTP with retries (:class:`CACEClient`) and an ASE calculator.

No torch: this package needs httpx, numpy, ase and tqdm (msgpack for binary bodies).
"""

from cace_client.calculator import RemoteCACE
from cace_client.client import AsyncCACEClient, CACEClient, CACEServerError
from cace_client.jobs import JobHandle

__all__ = ["AsyncCACEClient", "CACEClient", "CACEServerError", "JobHandle", "RemoteCACE"]
__version__ = "0.1.0"
