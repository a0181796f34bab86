"""Retrieval index: database image vectors of a split, written in parts, checked on load.

Layout of an index folder:
- `header.json`: format, model config hash, the model's weights digest and the shards
  manifest digest it was built from, D (embed dim), V (views), dtype, total count and the
  parts with their counts and sha256 (checked on load);
- `part-XXXXX.safetensors` (one per rank that built it): `embeddings` (n, V, D),
  `view_mask` (n, V) bool, `coords` (n, 3) float64 ECEF metres, `index` (n,) int64 location
  index; its metadata repeats the config hash and both digests. Global row ids run through
  the parts in order.

Loading checks that the index belongs to the model (config hash, weights digest) and, when
given, to the shards (manifest digest); parts readable, shaped as the header says, with
finite vectors and coordinates (docs/retrieval.md has the table of checks).

Built in parallel: each rank encodes its share of the eval loader (every location exactly
once) and writes its part; one gather of the counts at the end, then rank 0 writes the
header. Every file is written atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from text4vpr.data.shard_reader import file_sha256
from text4vpr.data.street360loc import NUM_VIEWS
from text4vpr.kernels.common import check_finite
from text4vpr.retrieval.provenance import check_digests, shards_digest, weights_digest
from text4vpr.utils.atomic import atomic_save_file, atomic_write_json
from text4vpr.utils.distributed import Deferred
from text4vpr.utils.errors import InputError, file_records_problem
from text4vpr.utils.progress import progress

FORMAT = "text4vpr-index"
FORMAT_VERSION = 3  # 2: weights and shards digests recorded; 3: each part's sha256
HEADER = "header.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RetrievalIndexError(InputError, ValueError):
    """The index is missing, damaged, or does not belong to the model in hand."""


@dataclass
class Index:
    """A loaded index: every location's coords and ids, and the embeddings of rows [lo, hi)
    (all rows, or one rank's share: `load_index(..., rows=rank_rows(...))`)."""

    embeddings: torch.Tensor  # (hi - lo, V, D)
    view_mask: torch.Tensor  # (hi - lo, V) bool
    coords: torch.Tensor  # (N, 3) float64, every row
    index: torch.Tensor  # (N,) int64, every row
    header: dict = field(default_factory=dict)
    rows: tuple[int, int] | None = None  # (lo, hi) of the embeddings held; None = all rows

    def __post_init__(self) -> None:
        if self.rows is None:
            self.rows = (0, self.coords.shape[0])

    def __len__(self) -> int:
        """All rows of the index (not just those whose embeddings are held)."""
        return self.coords.shape[0]


def rank_rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """The rows [lo, hi) of an n-row index that rank `rank` of `world` searches (equal shares)."""
    return rank * n // world, (rank + 1) * n // world


def part_name(rank: int) -> str:
    return f"part-{rank:05d}.safetensors"


@torch.no_grad()
def encode_database(model, loader, dtype: torch.dtype = torch.float32, device=None, views: int = NUM_VIEWS,
                    show_progress: bool = False) -> dict[str, torch.Tensor]:
    """Image vectors of every location this rank's eval loader yields, on CPU."""
    device = device or next(model.parameters()).device
    model.eval()
    out = {"embeddings": [], "view_mask": [], "coords": [], "index": []}
    batches = Deferred(progress(loader, "index", show_progress))  # a read error: raised on every rank below
    for batch in batches:
        mask = batch["view_mask"].to(device)
        emb = model.encode_images(batch["images"].to(device), mask)  # (B, V, D)
        out["embeddings"].append(emb.to(dtype).cpu())
        out["view_mask"].append(batch["view_mask"].bool().cpu())
        out["coords"].append(batch["coords"].to(torch.float64).cpu())
        out["index"].append(batch["index"].to(torch.int64).cpu())
    batches.settle()
    if not out["embeddings"]:
        d, v = model.embed_dim, views  # this rank got no locations: an empty part
        return {"embeddings": torch.zeros(0, v, d, dtype=dtype), "view_mask": torch.zeros(0, v, dtype=torch.bool),
                "coords": torch.zeros(0, 3, dtype=torch.float64), "index": torch.zeros(0, dtype=torch.int64)}
    return {name: torch.cat(parts) for name, parts in out.items()}


def write_part(out_dir: str | Path, rank: int, tensors: dict[str, torch.Tensor], config_hash: str,
               digests: dict[str, str] | None = None) -> Path:
    """One rank's part; `digests` = {"weights_digest", "shards_digest"} of what it was built from."""
    path = Path(out_dir) / part_name(rank)
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    atomic_save_file(contiguous, path, metadata={"format": FORMAT, "config_hash": config_hash, **_digests(digests)})
    return path


def _digests(digests: dict[str, str] | None) -> dict[str, str]:
    d = digests or {}
    return {name: str(d.get(name) or "") for name in ("weights_digest", "shards_digest")}


def write_header(out_dir: str | Path, config_hash: str, dim: int, views: int, dtype: str, counts: list[int],
                 digests: dict[str, str] | None = None) -> dict:
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config_hash": config_hash,
        **_digests(digests),
        "embed_dim": dim,
        "views": views,
        "dtype": dtype,
        "count": int(sum(counts)),
        # each part's sha256, checked on load: a flipped bit in coordinates would change the metrics
        "parts": [{"name": part_name(r), "count": int(c), "sha256": file_sha256(Path(out_dir) / part_name(r))}
                  for r, c in enumerate(counts)],
    }
    atomic_write_json(Path(out_dir) / HEADER, header)
    return header


def build_index(model, loader, out_dir: str | Path, dtype: str = "float32", show_progress: bool = False,
                shards: str | Path | None = None) -> dict:
    """Encode this rank's locations and write its part; rank 0 writes the header. Returns the header.
    `shards`: the shard folder the loader reads, whose manifest digest the index records.

    Under torch.distributed every rank calls this with its own eval loader; the only
    collective is one gather of the part sizes at the end.
    """
    from text4vpr.utils.distributed import distributed_world

    if dtype not in _DTYPES:
        raise ValueError(f"index dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    rank, world = distributed_world()
    model = getattr(model, "module", model)  # DDP / Accelerate wrapper -> the Text4VPR model
    tensors = encode_database(model, loader, _DTYPES[dtype], show_progress=show_progress)
    digests = {"weights_digest": weights_digest(model), "shards_digest": shards_digest(shards) if shards else ""}
    write_part(out_dir, rank, tensors, model.config_hash(), digests)
    counts = [len(tensors["index"])]
    if world > 1:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, counts[0])
        counts = gathered
    v, d = tensors["embeddings"].shape[1:]
    header = {"count": sum(counts)}
    if rank == 0:
        header = write_header(out_dir, model.config_hash(), int(d), int(v), dtype, counts, digests)
    if world > 1:
        torch.distributed.barrier()  # the header exists for everyone once this returns
    return header


def read_header(path: str | Path) -> dict:
    path = Path(path)
    if not (path / HEADER).is_file():
        raise RetrievalIndexError(f"{path}: no {HEADER}; not a text4vpr index folder (build one with `text4vpr index build`)")
    try:
        header = json.loads((path / HEADER).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RetrievalIndexError(f"{path / HEADER}: unreadable ({e}); rebuild the index with `text4vpr index build`") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        got = header.get("format") if isinstance(header, dict) else f"a JSON {type(header).__name__}"
        raise RetrievalIndexError(f"{path / HEADER}: not a text4vpr index (format={got!r}); rebuild it with `text4vpr index build`")
    problem = _header_problem(header)
    if problem:
        raise RetrievalIndexError(f"{path / HEADER}: {problem}; rebuild the index with `text4vpr index build`")
    return header


_HEADER_FIELDS = {"count": int, "embed_dim": int, "views": int, "config_hash": str, "parts": list}


def _header_problem(header: dict) -> str | None:
    """What is missing or mistyped in a header (None when the fields the reader uses are sound);
    part names must be plain file names inside the index folder."""
    for name, kind in _HEADER_FIELDS.items():
        if not isinstance(header.get(name), kind) or isinstance(header.get(name), bool):
            return f"field {name!r} missing or not a {kind.__name__}"
    return file_records_problem(header["parts"], "part")


def check_pairing(header: dict, config_hash: str | None = None, embed_dim: int | None = None, where: str = "index") -> None:
    """Raise RetrievalIndexError when the index was built by another model or with another dimension."""
    if embed_dim is not None and header["embed_dim"] != embed_dim:
        raise RetrievalIndexError(f"{where}: built with embedding dimension {header['embed_dim']}, the model has {embed_dim}")
    if config_hash is not None and header["config_hash"] != config_hash:
        raise RetrievalIndexError(
            f"{where}: built by another model (config hash {header['config_hash'][:12]}..., "
            f"this model {config_hash[:12]}...); rebuild it with `text4vpr index build`"
        )


def load_index(path: str | Path, config_hash: str | None = None, embed_dim: int | None = None,
               device: str | torch.device = "cpu", rows: tuple[int, int] | None = None, *,
               weights_digest: str | None = None, shards_digest: str | None = None,
               allow_mismatch: bool = False) -> Index:
    """Load an index, checking pairing with the model (config hash, dimension, weights digest)
    and the shards (manifest digest; each digest checked when given), part presence, sizes,
    readability and finiteness. `allow_mismatch` turns a digest mismatch into a warning.

    `rows=(lo, hi)` reads only those rows' embeddings and view masks (safetensors slices, so
    a rank of a sharded search holds its share, not the whole database); coords and ids are
    always read in full (the metrics need every location's position).
    """
    path = Path(path)
    header = read_header(path)
    check_pairing(header, config_hash, embed_dim, str(path))
    expected = {"weights_digest": weights_digest, "shards_digest": shards_digest}
    check_digests(header, expected, str(path), allow_mismatch)
    total = int(header["count"])
    lo, hi = rows if rows is not None else (0, total)
    if not 0 <= lo <= hi <= total:
        raise RetrievalIndexError(f"{path}: rows {lo}..{hi} outside the index's {total} rows")
    parts, start = [], 0
    for part in header["parts"]:
        a, b = (min(max(r - start, 0), part["count"]) for r in (lo, hi))  # the part's rows in [lo, hi)
        parts.append(_read_part(path, part, header, a, b, device))
        start += part["count"]
    index = Index(*(torch.cat([p[name] for p in parts]) for name in ("embeddings", "view_mask", "coords", "index")),
                  header=header, rows=(lo, hi))
    try:
        check_finite(index.embeddings, "index embeddings")
    except ValueError as e:
        raise RetrievalIndexError(f"{path}: {e}") from None
    index.view_mask = index.view_mask.bool()
    return index


def _read_part(path: Path, part: dict, header: dict, a: int, b: int, device) -> dict[str, torch.Tensor]:
    """One part: embeddings and view masks of its rows [a, b), coords and ids of all."""
    from safetensors import SafetensorError

    file = path / part["name"]
    if not file.is_file():
        raise RetrievalIndexError(f"{path}: index part {part['name']} is missing ({len(header['parts'])} parts expected)")
    if file_sha256(file) != part.get("sha256"):
        why = "sha256 differs from header.json's (damaged or edited)" if part.get("sha256") else "no sha256 in header.json"
        raise RetrievalIndexError(f"{file}: {why}; rebuild the index with `text4vpr index build`")
    try:
        out = _read_part_file(file, part, header, a, b, device)
    except (SafetensorError, OSError, KeyError) as e:  # truncated, damaged, or without a tensor
        raise RetrievalIndexError(f"{file}: unreadable index part ({e}); rebuild the index with `text4vpr index build`") from None
    bad = ~torch.isfinite(out["coords"]).all(dim=1)
    if bool(bad.any()):
        raise RetrievalIndexError(f"{file}: {int(bad.sum())} non-finite coordinates (NaN or inf), first at row "
                                  f"{int(bad.nonzero()[0])}; rebuild the index with `text4vpr index build`")
    return out


def _read_part_file(file: Path, part: dict, header: dict, a: int, b: int, device) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        if any(k in meta for k in ("weights_digest", "shards_digest")) and _digests(meta) != _digests(header):
            raise RetrievalIndexError(f"{file}: built by another run than {HEADER} says (its digests differ); "
                                      "rebuild the index with `text4vpr index build`")
        shape = tuple(f.get_slice("embeddings").get_shape())
        if shape != (part["count"], header["views"], header["embed_dim"]):
            raise RetrievalIndexError(f"{file}: holds {shape}, header says "
                                      f"({part['count']}, {header['views']}, {header['embed_dim']})")
        # only these rows are read; clone() so that no tensor outlives the open file's mapping
        out = {name: f.get_slice(name)[a:b].clone() for name in ("embeddings", "view_mask")}
        out.update({name: f.get_tensor(name).clone() for name in ("coords", "index")})
    return out
