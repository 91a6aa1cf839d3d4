"""OpenAI's ``service_tier`` and the bus's priority lanes."""

from bus.subjects import LANES
from bus.account.tenants import Policy


def lane_for(service_tier: str | None, policy: Policy) -> str:
    """The lane a request runs in: the tenant's default, one lane up for ``priority`` and to
    ``batch`` for ``flex``, each only where the tenant's allowed lanes include it."""
    default = policy.default_lane
    index = LANES.index(default)
    wanted = {"priority": LANES[max(0, index - 1)], "flex": "batch"}.get(service_tier or "default", default)
    return wanted if wanted in policy.allowed_lanes else default


def tier_of(lane: str, default_lane: str) -> str:
    """The ``service_tier`` a response reports: relative to the caller's default lane."""
    if lane == default_lane:
        return "default"
    return "priority" if LANES.index(lane) < LANES.index(default_lane) else "flex"
