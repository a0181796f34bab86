"""Checks of a shard build's inputs as a whole: refuse a build that would silently leave out
much of the data (a partly extracted image folder builds without error otherwise)."""

from __future__ import annotations

from collections import Counter

from text4vpr.data.street360loc import ValidationReport

INTENDED = ("--exclude-from", "--drop-overlap")  # skips the user asked for


def _lost(entries: list[dict]) -> list[dict]:
    return [e for e in entries if not any(flag in str(e.get("reason", "")) for flag in INTENDED)]


def skipped_share_problem(report: ValidationReport, max_share: float, images_dir=None) -> str | None:
    """Why the share of locations skipped (or views dropped) is too high, with the reasons
    counted and the first missing paths; None when within `max_share`."""
    locations, views = _lost(report.skipped_locations), _lost(report.dropped_views)
    n_loc = max(1, report.locations_in - (len(report.skipped_locations) - len(locations)))
    n_views = max(1, report.rows_in - sum(len(s["rows"]) for s in report.skipped_locations if s not in locations))
    share_loc, share_views = len(locations) / n_loc, len(views) / n_views
    if max(share_loc, share_views) <= max_share:
        return None
    reasons = Counter(str(e.get("reason", "?")).split(" (")[0] for e in views + locations)
    why = ", ".join(f"{reason}: {count}" for reason, count in reasons.most_common(4))
    missing = [f"{e['index']:06d}_{e['pos']}.jpg" for e in views if "missing" in str(e.get("reason", ""))][:3]
    where = f"; first missing: {', '.join(missing)} in {images_dir}" if missing and images_dir is not None else ""
    return (f"{len(locations)} of {n_loc} locations skipped ({share_loc:.0%}) and {len(views)} of {n_views} views "
            f"dropped ({share_views:.0%}), more than --max-skipped-share {max_share:g} ({why}){where}; "
            "complete the image folder, or pass --max-skipped-share 1 to build what is there")
