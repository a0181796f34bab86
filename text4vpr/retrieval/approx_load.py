"""Loading an approximate index: the exact index's checks, then each FAISS file's checksum,
then its deserialisation; the exact parts are memory-mapped for the re-rank.

Every check of `index.load_index` applies (header, model config hash, dimension, weights and
shards digests, parts present and shaped, part digests, finite coordinates): it runs with no
embedding rows read. A FAISS file is read whole, its sha256 compared with the header's, and
only those verified bytes are deserialised (`faiss.deserialize_index`; nothing is unpickled).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from text4vpr.retrieval.approx_index import SECTION, part_view_mask, rank_parts
from text4vpr.retrieval.index import RetrievalIndexError, load_index, read_header
from text4vpr.retrieval.part_rows import PartFormatError, PartRows
from text4vpr.utils.errors import InputError, file_records_problem
from text4vpr.utils.hashing import bytes_sha256

_SHA256 = re.compile(r"[0-9a-f]{64}")
_KINDS = {"ivf": "IndexIVF", "hnsw": "IndexHNSW"}  # kind -> FAISS class name prefix
_REBUILD = "rebuild it with `text4vpr index build --approximate`"


@dataclass
class ApproxPart:
    """One exact part searched here: its first global row, memory-mapped rows, masks, FAISS index."""

    offset: int
    rows: PartRows
    view_mask: torch.Tensor  # (n, V) bool
    faiss: object
    nlist: int  # IVF lists (0 for a graph)
    kind: str = "ivf"  # "ivf" or "hnsw"
    _groups: list | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def widest(self) -> int:
        """The breadth that reaches every row: every list (IVF), efSearch = the row count (HNSW)."""
        return self.nlist if self.kind == "ivf" else len(self)

    def search_params(self, breadth: int, sel=None):
        """FAISS search parameters for a breadth (lists probed or efSearch), capped at `widest`."""
        import faiss

        breadth = max(1, min(breadth, self.widest))
        if self.kind == "ivf":
            return faiss.SearchParametersIVF(sel=sel, nprobe=breadth)
        return faiss.SearchParametersHNSW(sel=sel, efSearch=breadth)

    def mask_groups(self) -> list[torch.Tensor]:
        """Local rows of each view-mask pattern present (sorted; computed once)."""
        if self._groups is None:
            code = (self.view_mask.long() << torch.arange(self.view_mask.shape[1])).sum(1)  # (n,) pattern id
            self._groups = [(code == c).nonzero().flatten() for c in torch.unique(code)]
        return self._groups


@dataclass
class ApproxIndex:
    """Every location's coords and ids, and the parts this process searches."""

    coords: torch.Tensor  # (N, 3) float64
    index: torch.Tensor  # (N,) int64
    header: dict
    parts: list[ApproxPart] = field(default_factory=list)
    nprobe: int = 1  # breadth for queries with every view
    nprobe_partial: int = 1  # breadth for partial-view queries (tuned apart: they need more)
    rerank: int = 64
    _keys: tuple | None = field(default=None, repr=False)
    _sorted_keys: tuple | None = field(default=None, repr=False)
    approximate = True  # what `evaluate` and `localize` dispatch on

    def __len__(self) -> int:
        return self.coords.shape[0]

    def tie_keys(self) -> torch.Tensor | None:
        """The ids equal scores are ranked by, as the exact path: location indices when unique, else None (rows)."""
        if self._keys is None:
            from text4vpr.retrieval.search import ranks_by_location

            self._keys = (self.index,) if ranks_by_location(self.index) else (None,)
        return self._keys[0]

    def sorted_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tie keys ascending, their rows), sorted once: maps tie-rule ids back to rows."""
        if self._sorted_keys is None:
            self._sorted_keys = tuple(torch.sort(self.tie_keys()))
        return self._sorted_keys

    def close(self) -> None:
        for p in self.parts:
            p.rows.close()


def has_approximate(path: str | Path) -> bool:
    return isinstance(read_header(path).get(SECTION), dict)


def _section_problem(header: dict) -> str | None:
    """What is wrong with the header's approximate section (None when sound)."""
    sec = header.get(SECTION)
    if not isinstance(sec, dict):
        return "no approximate section (built without --approximate)"
    for name in ("nprobe", "nprobe_partial", "rerank"):
        if name == "nprobe_partial" and name not in sec:  # written before partial views were tuned apart
            continue
        if not isinstance(sec.get(name), int) or isinstance(sec.get(name), bool) or sec[name] < 1:
            return f"approximate field {name!r} missing or not a positive int"
    problem = file_records_problem(sec.get("files"), "approximate file")
    if problem:
        return problem
    parts = header["parts"]
    covered = set()
    for i, f in enumerate(sec["files"]):
        p = f.get("part")
        if not (isinstance(p, int) and 0 <= p < len(parts)) or p in covered:
            return f"approximate file {i} names no part, or a part twice"
        if f["count"] != parts[p]["count"] or not (isinstance(f.get("sha256"), str) and _SHA256.fullmatch(f["sha256"])):
            return f"approximate file {i}: count or sha256 does not match part {p}"
        kind = f.get("kind", "ivf")  # indexes built before graphs have no kind: inverted files
        if kind not in _KINDS:
            return f"approximate file {i}: unknown kind {kind!r}"
        if kind == "ivf" and (not isinstance(f.get("nlist"), int) or f["nlist"] < 1):
            return f"approximate file {i}: nlist missing"
        covered.add(p)
    missing = [i for i, p in enumerate(parts) if p["count"] and i not in covered]
    return f"parts {missing} have no approximate file" if missing else None


def read_faiss_verified(file: Path, sha256: str, count: int, dim: int, kind: str = "ivf"):
    """Deserialise a FAISS file after its bytes matched the recorded sha256."""
    import faiss

    if not file.is_file():
        raise RetrievalIndexError(f"{file}: approximate index file missing; {_REBUILD}")
    data = file.read_bytes()
    if bytes_sha256(data) != sha256:
        raise RetrievalIndexError(f"{file}: content checksum differs from the header's (changed or damaged); {_REBUILD}")
    view, pos = memoryview(data), 0

    def read(size: int) -> bytes:  # FAISS pulls the verified bytes in chunks: no third copy of the file
        nonlocal pos
        chunk = view[pos : pos + size].tobytes()
        pos += len(chunk)
        return chunk

    try:
        index = faiss.read_index(faiss.PyCallbackIOReader(read))
    except RuntimeError as e:
        raise RetrievalIndexError(f"{file}: unreadable FAISS index ({str(e).splitlines()[0]}); {_REBUILD}") from None
    if index.ntotal != count or index.d != dim:
        raise RetrievalIndexError(f"{file}: holds {index.ntotal} vectors of {index.d} dims, header says {count} of {dim}")
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    if not type(inner).__name__.startswith(_KINDS[kind]):
        raise RetrievalIndexError(f"{file}: a FAISS {type(inner).__name__}, header says {kind}; {_REBUILD}")
    return index


def load_approx_index(path: str | Path, config_hash: str | None = None, embed_dim: int | None = None, *,
                      weights_digest: str | None = None, shards_digest: str | None = None,
                      allow_mismatch: bool = False, parts: list[int] | None = None) -> ApproxIndex:
    """Load the approximate index of `path` with every exact-index check; `parts` = the part
    numbers this process searches (default all; `rank_parts` under torch.distributed)."""
    path = Path(path)
    exact = load_index(path, config_hash, embed_dim, rows=(0, 0), weights_digest=weights_digest,
                       shards_digest=shards_digest, allow_mismatch=allow_mismatch)
    header = exact.header
    problem = _section_problem(header)
    if problem:
        raise RetrievalIndexError(f"{path}: {problem}; {_REBUILD}")
    sec = header[SECTION]
    files = {f["part"]: f for f in sec["files"]}
    offsets = np.cumsum([0] + [p["count"] for p in header["parts"]])
    out = ApproxIndex(exact.coords, exact.index, header, nprobe=sec["nprobe"],
                      nprobe_partial=sec.get("nprobe_partial", sec["nprobe"]), rerank=sec["rerank"])
    for i in range(len(header["parts"])) if parts is None else parts:
        if header["parts"][i]["count"] == 0:
            continue
        out.parts.append(_load_part(path, header, i, files[i], int(offsets[i])))
    return out


def _load_part(path: Path, header: dict, i: int, record: dict, offset: int) -> ApproxPart:
    from safetensors import SafetensorError

    file = path / header["parts"][i]["name"]
    try:
        rows = PartRows(file)
        mask = part_view_mask(file)
    except (PartFormatError, SafetensorError, OSError) as e:
        raise RetrievalIndexError(f"{file}: unreadable index part ({e}); {_REBUILD}") from None
    v, d = header["views"], header["embed_dim"]
    if rows.shape != (record["count"], v, d) or tuple(mask.shape) != (record["count"], v):
        raise RetrievalIndexError(f"{file}: holds {rows.shape}, header says ({record['count']}, {v}, {d})")
    kind = record.get("kind", "ivf")
    index = read_faiss_verified(path / record["name"], record["sha256"], record["count"], v * d, kind)
    return ApproxPart(offset, rows, mask, index, record.get("nlist", 0), kind)


def load_search_index(path: str | Path, config_hash: str | None = None, embed_dim: int | None = None, *,
                      exact: bool = False, rows: tuple[int, int] | None = None, **checks):
    """The approximate index when the folder has one (and `exact` is False), else the exact
    index (`rows` as in `load_index`); `checks` = the digest keyword arguments of both."""
    if not exact and has_approximate(path):
        from text4vpr.utils.distributed import distributed_world, raise_together

        rank, world = distributed_world()
        parts = rank_parts(len(read_header(path)["parts"]), rank, world)
        loaded, error = None, None
        try:  # each rank checks only its own FAISS files: a damaged one must stop every rank
            loaded = load_approx_index(path, config_hash, embed_dim, parts=parts, **checks)
        except InputError as e:
            error = e
        raise_together(error)
        return loaded
    return load_index(path, config_hash, embed_dim, rows=rows, **checks)
