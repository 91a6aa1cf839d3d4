"""OpenAI's ``service_tier`` and the bus's priority lanes."""

from bus.settings import EdgeSettings

_TIER_OF_LANE = {"critical": "priority", "high": "priority", "normal": "default", "batch": "flex"}


def lane_for(service_tier: str | None, edge: EdgeSettings) -> str:
    """The lane a request runs in: the default, moved up or down where allowed."""
    wanted = {"priority": "high", "flex": "batch"}.get(service_tier or "default", edge.default_lane)
    return wanted if wanted in edge.allowed_lanes else edge.default_lane


def tier_of(lane: str) -> str:
    """The ``service_tier`` a response reports for a lane."""
    return _TIER_OF_LANE[lane]
