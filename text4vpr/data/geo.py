"""WGS84 geodetic <-> ECEF conversion and local east-north-up offsets.

Street360Loc stores positions as ECEF metres; the synthetic generator lays out streets in a
local ENU frame, and the retrieval side reports latitude/longitude. Written out here (no
pyproj) so the data layer has no geodesy dependency.
"""

from __future__ import annotations

import numpy as np

WGS84_A = 6378137.0  # semi-major axis (m)
WGS84_F = 1.0 / 298.257223563  # flattening
WGS84_E2 = WGS84_F * (2.0 - WGS84_F)  # first eccentricity squared


def geodetic_to_ecef(lat_deg, lon_deg, height_m=0.0) -> np.ndarray:
    """Latitude/longitude (degrees) and ellipsoidal height (m) -> ECEF (..., 3) float64 metres."""
    lat = np.radians(np.asarray(lat_deg, dtype=np.float64))
    lon = np.radians(np.asarray(lon_deg, dtype=np.float64))
    h = np.asarray(height_m, dtype=np.float64)
    n = WGS84_A / np.sqrt(1.0 - WGS84_E2 * np.sin(lat) ** 2)  # prime vertical radius
    x = (n + h) * np.cos(lat) * np.cos(lon)
    y = (n + h) * np.cos(lat) * np.sin(lon)
    z = (n * (1.0 - WGS84_E2) + h) * np.sin(lat)
    return np.stack(np.broadcast_arrays(x, y, z), axis=-1)


def ecef_to_geodetic(xyz, iterations: int = 8) -> np.ndarray:
    """ECEF (..., 3) metres -> (..., 3) of latitude (deg), longitude (deg), height (m).

    Fixed-point iteration on latitude in a form that stays stable at the poles and equator;
    8 iterations reach well below a millimetre for points near the Earth's surface.
    """
    xyz = np.asarray(xyz, dtype=np.float64)
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    lon = np.arctan2(y, x)
    p = np.hypot(x, y)
    lat = np.arctan2(z, p * (1.0 - WGS84_E2))
    for _ in range(iterations):
        n = WGS84_A / np.sqrt(1.0 - WGS84_E2 * np.sin(lat) ** 2)
        lat = np.arctan2(z + WGS84_E2 * n * np.sin(lat), p)
    sin_lat = np.sin(lat)
    h = p * np.cos(lat) + z * sin_lat - WGS84_A * np.sqrt(1.0 - WGS84_E2 * sin_lat**2)
    return np.stack([np.degrees(lat), np.degrees(lon), h], axis=-1)


def enu_to_ecef(east, north, up, lat0_deg: float, lon0_deg: float, h0_m: float = 0.0) -> np.ndarray:
    """Local east/north/up offsets (m) around a reference point -> ECEF (..., 3) metres."""
    lat0, lon0 = np.radians(lat0_deg), np.radians(lon0_deg)
    sl, cl, so, co = np.sin(lat0), np.cos(lat0), np.sin(lon0), np.cos(lon0)
    e, n, u = (np.asarray(v, dtype=np.float64) for v in (east, north, up))
    dx = -so * e - sl * co * n + cl * co * u
    dy = co * e - sl * so * n + cl * so * u
    dz = cl * n + sl * u
    origin = geodetic_to_ecef(lat0_deg, lon0_deg, h0_m)
    return origin + np.stack(np.broadcast_arrays(dx, dy, dz), axis=-1)


def ecef_distance(a, b) -> np.ndarray:
    """Euclidean distance (m) between ECEF points, broadcasting over leading dims."""
    return np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64), axis=-1)
