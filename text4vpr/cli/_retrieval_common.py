"""Helpers shared by the retrieval subcommands (index, eval, localize): model, loader, ranks."""

from __future__ import annotations

import argparse

from text4vpr.cli.arg_types import non_negative_int, positive_int
from text4vpr.kernels import MODES


def add_model_loader_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder (save_pretrained output)")
    parser.add_argument("--shards", required=True, help="shard folder of the split to encode, or its URL prefix")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="locations per batch")
    parser.add_argument("--num-workers", type=non_negative_int, default=2, help="loader workers per rank")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="encoders' precision: auto = bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_text_normalization_arg(parser)


def add_text_normalization_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text-normalization", choices=("whitespace", "punkt"), default="whitespace",
                        help="description preprocessing: whitespace (default) or punkt, the published nltk "
                             "sent_tokenize + join (for a converted published model; pip install 'text4vpr[upstream]')")


def add_index_risk_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-index-mismatch", action="store_true",
                        help="rank with an index built by other weights or from other shards than those given "
                             "(a warning, not an error; the results are then meaningless)")


def add_exact_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--exact", action="store_true",
                        help="search the exact parts even when the index has an approximate (FAISS) part")


def precision_context(precision: str, device):
    """bf16 autocast (`--precision bf16`, or auto on CUDA) or nothing (fp32)."""
    import contextlib

    import torch

    bf16 = precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def show_progress(args: argparse.Namespace) -> bool:
    return not args.no_progress and is_main_rank()


def add_mode_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=MODES, default="upstream", help="group similarity (upstream is the published method's)")


def init_distributed():
    """Process group when launched with `accelerate launch`/torchrun; returns the device to use."""
    from accelerate import PartialState

    return PartialState().device


def load_model_on(directory: str, device):
    from text4vpr.models import Text4VPR

    return Text4VPR.from_pretrained(directory, map_location=device).eval()


def eval_loader(args: argparse.Namespace, model):
    from text4vpr.data.loader import LoaderConfig, build_loader

    cfg = LoaderConfig(
        shards=str(args.shards), tokenizer=str(args.tokenizer or args.model), batch_size=args.batch_size,
        image_size=model.config.image.image_size, num_workers=args.num_workers,
        text_normalization=args.text_normalization,
    )
    return build_loader(cfg, "eval")


def is_main_rank() -> bool:
    from text4vpr.utils.distributed import distributed_world

    return distributed_world()[0] == 0


def check_loader_args(args: argparse.Namespace) -> None:
    """The loader's flags, checked before any model is loaded: the text normalisation (its
    optional package), then the shard folder."""
    from text4vpr.data.tokenizer import check_text_normalization

    check_text_normalization(args.text_normalization, "--text-normalization")
    check_shards(args.shards)


def check_device(name: str, flag: str = "--device") -> None:
    """UsageError unless `name` is a device torch can use on this machine."""
    import torch

    from text4vpr.cli.errors import UsageError

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"{flag} {name}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch has no CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise UsageError(f"{flag} {name}: {why} on this machine; use {flag} cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"{flag} {name}: this machine has {torch.cuda.device_count()} GPU(s); use cuda:0 .. "
                         f"cuda:{torch.cuda.device_count() - 1}")


def check_shards(path: str, flag: str = "--shards") -> None:
    """UsageError unless `path` is a folder holding shards, or a URL prefix with a readable
    manifest (checked before any model is loaded)."""
    from pathlib import Path

    from text4vpr.cli.errors import UsageError
    from text4vpr.data.remote import is_url
    from text4vpr.data.shard_reader import load_manifest

    if is_url(path):
        load_manifest(path)  # one line naming the URL when it cannot be read
        return

    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"{flag} {path}: no such folder; pass a folder written by `text4vpr shards build`")
    if not any(p.glob("*.tar")):
        raise UsageError(f"{flag} {path}: no shards (*.tar) in this folder; build them with `text4vpr shards build`")


def add_chance(metrics: dict, query_coords, db_coords, max_pairs: int = 50_000_000) -> None:
    """Chance level beside the accuracy (as the trainer's report has it), when the query x
    database distance matrix it needs is affordable."""
    from text4vpr.retrieval.chance import chance_accuracy

    q, n = query_coords.shape[0], db_coords.shape[0]
    if q * n > max_pairs:
        print(f"chance level left out: {q} x {n} distances exceed {max_pairs}")
        return
    metrics["chance"] = chance_accuracy(query_coords, db_coords, tuple(metrics["ks"]), tuple(metrics["radii"]))
