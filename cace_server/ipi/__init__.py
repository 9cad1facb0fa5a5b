"""i-PI socket protocol (pure codec) and the asyncio driver connections built on it."""

from cace_server.ipi.address import IpiAddress, parse_address
from cace_server.ipi.driver import (
    ConnectionState,
    ConnectionStatus,
    DriverConnection,
    DriverOptions,
    Evaluator,
    Source,
)
from cace_server.ipi.pool import DriverPool
from cace_server.ipi.protocol import DriverDecoder, ProtocolError, ServerDecoder

__all__ = [
    "ConnectionState",
    "ConnectionStatus",
    "DriverConnection",
    "DriverDecoder",
    "DriverOptions",
    "DriverPool",
    "Evaluator",
    "IpiAddress",
    "ProtocolError",
    "ServerDecoder",
    "Source",
    "parse_address",
]
