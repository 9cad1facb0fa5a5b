"""Long-range (latent-charge Ewald) term: direct and mesh back ends, parity and smooth modes."""

from cace_server.model.longrange.kspace import MODES, PARITY, SMOOTH
from cace_server.model.longrange.module import METHODS, EwaldSum, LongRangeOptions
from cace_server.model.longrange.plan import LongRangePlan

__all__ = ["METHODS", "MODES", "PARITY", "SMOOTH", "EwaldSum", "LongRangeOptions", "LongRangePlan"]
