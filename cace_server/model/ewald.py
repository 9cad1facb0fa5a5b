"""Former home of the Ewald term; it lives in :mod:`cace_server.model.longrange` now."""

from cace_server.model.longrange import EwaldSum, LongRangeOptions

__all__ = ["EwaldSum", "LongRangeOptions"]
