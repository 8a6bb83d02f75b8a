"""Direction streams: Philox4x32-10, the frozen direction layout, stable ids and the group table.

The bottom layer of zo_fx: it imports nothing else from the package. Every random value
any other part uses is defined here (``docs/directions.md`` freezes the layout).
"""

from .ids import ParamIdCollisionError, assign_param_ids, stable_param_id
from .layout import (
    GAUSSIAN,
    KINDS,
    LOWRANK,
    MAX_SEED,
    RADEMACHER,
    check_direction_kind,
    check_kind,
    check_seed,
    direction,
    gaussian,
    rademacher,
    sample,
    sample_at,
)
from .philox import philox4x32_10
from .table import GroupTable

__all__ = [
    "GAUSSIAN", "KINDS", "LOWRANK", "MAX_SEED", "RADEMACHER", "GroupTable", "ParamIdCollisionError",
    "assign_param_ids", "check_direction_kind", "check_kind", "check_seed", "direction", "gaussian",
    "philox4x32_10", "rademacher", "sample", "sample_at", "stable_param_id",
]
