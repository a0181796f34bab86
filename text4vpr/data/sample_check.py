"""The one check of a shard sample's JSON member, shared by the loader (on read) and
`text4vpr shards inspect`, so the two never disagree: types, lengths, finite coordinates on
the Earth's surface. Coordinates are ECEF metres (`data/geo.py`)."""

from __future__ import annotations

import math

from text4vpr.data.constants import NUM_VIEWS

# distance from the Earth's centre (m): the WGS84 ellipsoid spans 6,356.8 to 6,378.1 km;
# the margin admits any street from the Dead Sea shore to a high mountain pass
EARTH_RADIUS_M = (6.34e6, 6.39e6)


def coordinates_problem(xyz) -> str | None:
    """Why `xyz` cannot be a place on the Earth's surface in ECEF metres, or None."""
    if not (isinstance(xyz, list) and len(xyz) == 3
            and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in xyz)):
        return f"xyz {xyz!r} is not three numbers"
    if not all(math.isfinite(c) for c in xyz):
        return f"xyz {xyz!r} is not finite"
    r = math.sqrt(sum(c * c for c in xyz))
    if not EARTH_RADIUS_M[0] <= r <= EARTH_RADIUS_M[1]:
        return (f"xyz {xyz!r} is {r / 1000:.1f} km from the Earth's centre, not on its surface "
                "(ECEF metres expected, 6,357-6,378 km)")
    return None


def sample_problem(meta) -> str | None:
    """Why a decoded JSON member cannot be used, or None when it is sound."""
    if not isinstance(meta, dict):
        return "JSON member is not an object"
    index, positions, texts, mask = (meta.get(k) for k in ("index", "positions", "descriptions", "view_mask"))
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        return f"index {index!r} is not a non-negative integer"
    if not isinstance(meta.get("split"), str):
        return f"split {meta.get('split')!r} is not a string"
    if not (isinstance(positions, list) and positions
            and all(isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= NUM_VIEWS for p in positions)
            and len(set(positions)) == len(positions)):
        return f"positions {positions!r} are not distinct view numbers 1..{NUM_VIEWS}"
    if not (isinstance(texts, list) and len(texts) == len(positions) and all(isinstance(t, str) for t in texts)):
        return f"descriptions are not {len(positions)} strings, one per position"
    if mask != [p in positions for p in range(1, NUM_VIEWS + 1)]:
        return f"view_mask {mask!r} does not match positions {positions!r}"
    return coordinates_problem(meta.get("xyz"))


def read_sample_json(sample: dict) -> dict:
    """The sample's JSON member, decoded and checked; ValueError saying what is wrong."""
    import json

    if "json" not in sample:
        raise ValueError("no JSON member")
    try:
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"JSON member unreadable ({e})") from None
    problem = sample_problem(meta)
    if problem:
        raise ValueError(problem)
    return meta
