"""Street360Loc reader: xlsx annotation files -> validated location records plus a report.

Policy (see docs/data.md): file-level problems (unreadable file, missing columns, wrong
types) raise `Street360LocError` naming the file; a bad view is dropped and a bad location
skipped, each listed with its reason in the `ValidationReport`; suspicious but usable
content is kept and flagged. Counts always add up: rows in = rows written + rows listed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from text4vpr.data.image_checks import DEFAULT_MAX_PIXELS, image_header_problem
from text4vpr.data.sample_check import coordinates_problem
from text4vpr.utils.errors import InputError

REQUIRED_COLUMNS = ("index", "pos", "x", "y", "z", "text_description")
NUM_VIEWS = 4
COORD_TOLERANCE_M = 0.01  # the four rows of a location may differ by at most 1 cm per axis
DEFAULT_REFUSAL_PATTERNS = (
    r"\bI'?m sorry\b",
    r"\bI (?:can't|cannot|can not)\b",
    r"\bI'?m (?:unable|not able)\b",
    r"\bunable to (?:view|see|assist|provide)\b",
)
DEFAULT_SHORT_CHARS = 50


class Street360LocError(InputError, ValueError):
    """A file-level problem, or any skip under `strict`: names the file (and row)."""


@dataclass(frozen=True)
class View:
    pos: int
    description: str
    image: Path
    row: int  # spreadsheet row number (header is row 1)


@dataclass(frozen=True)
class Location:
    index: int
    xyz: tuple[float, float, float]  # ECEF metres, float64
    views: tuple[View, ...]  # sorted by pos, only valid views
    split: str  # "train" for train_description.xlsx, else the file stem
    source: str  # xlsx file name

    @property
    def view_mask(self) -> list[bool]:
        """True for pos 1..4 that have a view."""
        have = {v.pos for v in self.views}
        return [p in have for p in range(1, NUM_VIEWS + 1)]


@dataclass
class ValidationReport:
    """Everything dropped, skipped or flagged while reading, with reasons."""

    rows_in: int = 0
    rows_written: int = 0
    locations_in: int = 0
    locations_written: int = 0
    dropped_views: list[dict] = field(default_factory=list)  # one entry per dropped row
    skipped_locations: list[dict] = field(default_factory=list)  # entry lists the rows it removed
    flags: list[dict] = field(default_factory=list)  # kept, but suspicious

    def rows_listed(self) -> int:
        return len(self.dropped_views) + sum(len(s["rows"]) for s in self.skipped_locations)

    def balanced(self) -> bool:
        return self.rows_in == self.rows_written + self.rows_listed()

    def counts(self) -> dict:
        by_flag: dict[str, int] = {}
        for f in self.flags:
            by_flag[f["flag"]] = by_flag.get(f["flag"], 0) + 1
        return {
            "rows_in": self.rows_in,
            "rows_written": self.rows_written,
            "rows_dropped": len(self.dropped_views),
            "rows_in_skipped_locations": self.rows_listed() - len(self.dropped_views),
            "locations_in": self.locations_in,
            "locations_written": self.locations_written,
            "locations_skipped": len(self.skipped_locations),
            "flags": by_flag,
        }

    def to_dict(self) -> dict:
        return {
            "counts": self.counts(),
            "balanced": self.balanced(),
            "dropped_views": self.dropped_views,
            "skipped_locations": self.skipped_locations,
            "flags": self.flags,
        }

    def summary(self) -> str:
        c = self.counts()
        flags = ", ".join(f"{k} {v}" for k, v in sorted(c["flags"].items())) or "none"
        return (
            f"{c['locations_written']}/{c['locations_in']} locations, {c['rows_written']}/{c['rows_in']} views kept; "
            f"{c['rows_dropped']} views dropped, {c['locations_skipped']} locations skipped; flags: {flags}"
        )


@dataclass(frozen=True)
class ReadOptions:
    """Validation settings (the CLI flags of `text4vpr shards build`)."""

    min_views: int = 1
    strict: bool = False
    drop_overlap: bool = False
    check_images: bool = True  # existence + readable header; full decoding is checked when sharding
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger views are dropped and reported
    # locations whose index appears in these files are skipped and reported (e.g. val minus train)
    exclude_from: tuple[str, ...] = ()
    refusal_patterns: tuple[str, ...] = DEFAULT_REFUSAL_PATTERNS
    short_chars: int = DEFAULT_SHORT_CHARS


def split_name(xlsx: str | Path) -> str:
    """`train_description.xlsx` -> `train`; any other file -> its stem."""
    stem = Path(xlsx).stem
    return stem[: -len("_description")] if stem.endswith("_description") else stem


def image_path(images_dir: str | Path, index: int, pos: int) -> Path:
    return Path(images_dir) / f"{index:06d}_{pos}.jpg"


def _load_frame(path: Path):
    """Read one xlsx and check columns and types; file-level problems raise."""
    import pandas as pd

    try:
        frame = pd.read_excel(path, engine="openpyxl")
    except Exception as e:  # openpyxl/zipfile raise many kinds
        raise Street360LocError(f"{path}: cannot read as an xlsx file ({type(e).__name__}: {e})") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise Street360LocError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
    for col in ("index", "pos"):
        _check_integer_column(path, frame, col)
    for col in ("x", "y", "z"):
        values = pd.to_numeric(frame[col], errors="coerce")
        bad = values.isna() & frame[col].notna()
        if bad.any():
            row = int(bad.idxmax())
            raise Street360LocError(f"{path}: column '{col}' must be numeric; row {row + 2} has {frame[col][row]!r}")
    return frame


def _check_integer_column(path: Path, frame, col: str) -> None:
    for i, value in enumerate(frame[col].tolist()):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value == int(value)
        if not ok:
            raise Street360LocError(f"{path}: column '{col}' must be integers; row {i + 2} has {value!r}")


class _Reader:
    """Holds the options, patterns and report while reading a list of files."""

    def __init__(self, images_dir: Path | None, options: ReadOptions):
        self.images_dir = images_dir
        self.opts = options
        self.refusal = re.compile("|".join(options.refusal_patterns), re.IGNORECASE) if options.refusal_patterns else None
        self.report = ValidationReport()
        self.seen_index: dict[int, str] = {}  # index -> first file it appeared in
        self.excluded: dict[int, str] = {}  # index -> the --exclude-from file holding it
        for path in map(Path, options.exclude_from):
            for index in _load_frame(path)["index"].astype(int).tolist():
                self.excluded.setdefault(index, path.name)

    def fail_or_record(self, kind: str, entry: dict) -> None:
        """Record a drop/skip, or raise under strict."""
        if self.opts.strict:
            rows = entry.get("rows") or [entry.get("row")]
            raise Street360LocError(f"{entry['file']}: row(s) {rows}: index {entry['index']}: {entry['reason']} (--strict)")
        (self.report.dropped_views if kind == "view" else self.report.skipped_locations).append(entry)

    def read_file(self, path: Path) -> list[Location]:
        frame = _load_frame(path)
        self.report.rows_in += len(frame)
        groups: dict[int, list[tuple[int, dict]]] = {}
        for i, rec in enumerate(frame.to_dict("records")):
            groups.setdefault(int(rec["index"]), []).append((i + 2, rec))
        self.report.locations_in += len(groups)
        out = []
        for index, rows in groups.items():
            loc = self.read_location(path, index, rows)
            if loc is not None:
                out.append(loc)
        return out

    def read_location(self, path: Path, index: int, rows: list[tuple[int, dict]]) -> Location | None:
        name = path.name
        if index in self.excluded:
            reason = f"index also in {self.excluded[index]} (--exclude-from)"
            self.fail_or_record("location", {"file": name, "index": index, "rows": [r for r, _ in rows], "reason": reason})
            return None
        first = self.seen_index.get(index)
        if first is not None and first != name:
            self.report.flags.append({"file": name, "index": index, "flag": "overlap", "detail": f"index also in {first}"})
            if self.opts.drop_overlap:
                self.fail_or_record("location", {"file": name, "index": index, "rows": [r for r, _ in rows], "reason": f"overlap: index also in {first} (--drop-overlap)"})
                return None
        else:
            self.seen_index[index] = name
        views, kept_rows = self.valid_views(name, index, rows)
        reason = self.location_problem(views, kept_rows)
        if reason is not None:
            self.fail_or_record("location", {"file": name, "index": index, "rows": [r for r, _ in kept_rows], "reason": reason})
            return None
        self.flag_content(name, index, views)
        rec = kept_rows[0][1]
        self.report.rows_written += len(views)
        self.report.locations_written += 1
        xyz = (float(rec["x"]), float(rec["y"]), float(rec["z"]))
        off = coordinates_problem(list(xyz))
        if off:  # e.g. every coordinate 0,0,0: distances would all be 0 and every query "correct"
            self.report.flags.append({"file": name, "index": index, "flag": "off_earth", "detail": off})
        return Location(index, xyz, tuple(sorted(views, key=lambda v: v.pos)), split_name(path), name)

    def valid_views(self, name: str, index: int, rows) -> tuple[list[View], list[tuple[int, dict]]]:
        """Drop bad rows (reported); return the kept views and their rows."""
        views, kept, seen_pos = [], [], set()
        for row, rec in rows:
            reason, text, pos = None, rec["text_description"], int(rec["pos"])
            img = image_path(self.images_dir, index, pos) if self.images_dir is not None else Path(f"{index:06d}_{pos}.jpg")
            if not isinstance(text, str) or not text.strip():
                reason = "empty description"
            elif not 1 <= pos <= NUM_VIEWS:
                reason = f"pos {pos} outside 1..{NUM_VIEWS}"
            elif pos in seen_pos:
                reason = f"duplicate pos {pos}"
            elif self.opts.check_images and self.images_dir is not None:
                reason = image_header_problem(img, self.images_dir, self.opts.max_pixels)
            if reason is not None:
                self.fail_or_record("view", {"file": name, "row": row, "index": index, "pos": pos, "reason": reason})
                continue
            seen_pos.add(pos)
            views.append(View(pos, text, img, row))
            kept.append((row, rec))
        return views, kept

    def location_problem(self, views: list[View], rows) -> str | None:
        if not views:
            return "no valid views"
        coords = [(float(r["x"]), float(r["y"]), float(r["z"])) for _, r in rows]
        if not all(math.isfinite(c) for xyz in coords for c in xyz):
            return "non-finite coordinates"
        spread = max(max(c[k] for c in coords) - min(c[k] for c in coords) for k in range(3))
        if spread > COORD_TOLERANCE_M:
            return f"coordinates differ by {spread:.3f} m within the location (limit {COORD_TOLERANCE_M} m)"
        if len(views) < self.opts.min_views:
            return f"{len(views)} views < --min-views {self.opts.min_views}"
        return None

    def flag_content(self, name: str, index: int, views: list[View]) -> None:
        for v in views:
            if self.refusal is not None and self.refusal.search(v.description):
                self.report.flags.append({"file": name, "row": v.row, "index": index, "pos": v.pos, "flag": "refusal", "detail": v.description[:80]})
            elif len(v.description.strip()) < self.opts.short_chars:
                self.report.flags.append({"file": name, "row": v.row, "index": index, "pos": v.pos, "flag": "short", "detail": v.description})


def read_street360loc(
    xlsx: str | Path | Sequence[str | Path],
    images_dir: str | Path | None,
    options: ReadOptions = ReadOptions(),
) -> tuple[list[Location], ValidationReport]:
    """Read and validate one or more `*_description.xlsx` files, in the order given.

    `images_dir` holds `{index:06d}_{pos}.jpg`; None skips image checks (text-only use).
    An index seen in an earlier file is flagged `overlap` (and skipped with drop_overlap).
    """
    paths = [Path(xlsx)] if isinstance(xlsx, (str, Path)) else [Path(p) for p in xlsx]
    if options.min_views < 1 or options.min_views > NUM_VIEWS:
        raise ValueError(f"min_views must be in 1..{NUM_VIEWS}, got {options.min_views}")
    reader = _Reader(Path(images_dir) if images_dir is not None else None, options)
    locations: list[Location] = []
    for path in paths:
        locations += reader.read_file(path)
    assert reader.report.balanced(), "validation report does not add up"
    return locations, reader.report

