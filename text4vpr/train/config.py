"""The training run's config: one section per component, each that component's dataclass,
loaded from YAML with dotted overrides (unknown keys and wrong types are errors naming the key)."""

from __future__ import annotations

from dataclasses import dataclass, field

from text4vpr.config import ConfigError, check_choice, check_each, check_range
from text4vpr.data.loader import LoaderConfig
from text4vpr.kernels import MODES
from text4vpr.loss_defaults import DEFAULT_BLOCK
from text4vpr.retrieval.defaults import GALLERY, KS, RADII
from text4vpr.train.optim import OptimConfig


@dataclass
class LossConfig:
    """The symmetric InfoNCE of docs/method.md#training-loss (sum of both directions) across all ranks."""

    temperature: float = 0.1
    learnable: bool = False
    tiled: bool = False  # blockwise loss, never materialises the N x N logits
    exclude_same_location: bool = False  # upstream keeps the other views as negatives
    block_size: int = DEFAULT_BLOCK  # tile side (tiled) / rows per backward chunk (plain)

    def __post_init__(self) -> None:
        check_range("loss.temperature", self.temperature, 0, low_open=True)  # logits are divided by it
        check_range("loss.block_size", self.block_size, 1)


@dataclass
class SyntheticConfig:
    """Generate a synthetic Street360Loc (cached) instead of reading real data."""

    locations: int = 0  # 0 = use the shard paths below instead
    image_size: int = 96
    seed: int = 0
    shard_size: int = 32  # locations per shard
    cache_dir: str = ".cache/text4vpr"

    def __post_init__(self) -> None:
        check_range("data.synthetic.locations", self.locations, 0)
        check_range("data.synthetic.image_size", self.image_size, 8)
        check_range("data.synthetic.shard_size", self.shard_size, 1)


@dataclass
class DataConfig:
    """Where the shards are; `loader` holds batch size, image size, workers, tokenizer path."""

    train_shards: str = ""
    val_shards: str = ""
    test_shards: str = ""  # the held-out split evaluated at the end ("" = val)
    allow_split_overlap: bool = False  # true: val/test may share locations with train (numbers then leak)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)

    def __post_init__(self) -> None:
        if self.loader.shards:  # each split's loader reads its own folder: one setting would be dropped
            raise ConfigError(f"data.loader.shards={self.loader.shards!r}: the trainer reads data.train_shards, "
                              "data.val_shards and data.test_shards; set those and leave data.loader.shards empty")


@dataclass
class ModelSection:
    """`preset` tiny|paper|custom; `config` overrides the preset field by field; `init_from`
    starts from a `save_pretrained` folder."""

    preset: str = "tiny"
    init_from: str = ""
    config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("model.preset", self.preset, ("tiny", "paper", "custom"))


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 10
    max_steps: int = 0  # > 0 stops after this many optimizer steps (overrides epochs)
    micro_batches: int = 1  # > 1: gradient caching over this many micro-batches per step
    mixed_precision: str = "bf16"  # no | bf16 | fp16
    gradient_checkpointing: bool = False
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    output_dir: str = "runs/demo"
    save_every_steps: int = 0  # 0 = at epoch ends only
    keep_last: int = 2
    resume: str = ""  # "" | auto | path to a checkpoint folder
    overwrite: bool = False  # clear a non-empty output_dir (a run directory) first; else it is refused
    max_nonfinite_in_row: int = 5
    log_every_steps: int = 10
    tensorboard: bool = True  # the tensorboard tracker, besides those in log_with
    log_with: list[str] = field(default_factory=list)  # Accelerate trackers: wandb, mlflow, comet_ml, aim, ...
    cpu: bool = False  # force CPU (Accelerator(cpu=True)): real gloo ranks under torchrun
    global_batchnorm: bool = True  # BatchNorm statistics over all ranks (exact multi-rank)
    frozen_cache: bool = False  # cache the frozen DINOv2 blocks' tokens per location (see frozen_cache.py)
    frozen_cache_dtype: str = "same"  # same (exact) | bfloat16 (half the memory, rounded)
    frozen_cache_device: str = "auto"  # auto (the training device) | cpu
    progress: bool = True
    log_locations: bool = False  # metrics.jsonl "batch" records: each step's global batch location ids (one gather)

    def __post_init__(self) -> None:
        check_choice("train.compile_mode", self.compile_mode, COMPILE_MODES)
        check_choice("train.mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        check_choice("train.frozen_cache_dtype", self.frozen_cache_dtype, ("same", "bfloat16"))
        if self.frozen_cache_device not in ("auto", "cpu") and not self.frozen_cache_device.startswith("cuda"):
            raise ConfigError(f"train.frozen_cache_device: {self.frozen_cache_device!r} is not auto | cpu | cuda[:N]")
        if self.cpu and self.frozen_cache_device.startswith("cuda"):
            raise ConfigError("train.frozen_cache_device=cuda with train.cpu=true: the run has no GPU; use auto or cpu")
        if self.micro_batches < 1:
            raise ConfigError(f"train.micro_batches must be >= 1, got {self.micro_batches}")
        for key in ("epochs", "max_steps", "save_every_steps", "keep_last", "log_every_steps"):
            check_range(f"train.{key}", getattr(self, key), 0)
        check_range("train.max_nonfinite_in_row", self.max_nonfinite_in_row, 1)
        if self.epochs == 0 and self.max_steps == 0:  # a run of no steps would report an untrained model
            raise ConfigError("train.epochs=0 with train.max_steps=0: the run would train nothing; set one of them >= 1")
        if self.compile and self.micro_batches > 1 and self.compile_mode in ("reduce-overhead", "max-autotune"):
            raise ConfigError(f"train.compile_mode={self.compile_mode} (CUDA graphs) with train.micro_batches > 1: "
                              "each graph replay overwrites the previous micro-batch's outputs that gradient caching "
                              "keeps; use compile_mode=default or max-autotune-no-cudagraphs")


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0 = at the end of each epoch
    ks: list[int] = field(default_factory=lambda: list(KS))
    radii: list[float] = field(default_factory=lambda: list(RADII))
    mode: str = "upstream"  # upstream | cosine | any-heading
    final: bool = True  # evaluate the best model on data.test_shards at the end
    html: bool = True  # the final evaluation also writes report.html (gallery of the worst queries)
    gallery: int = GALLERY  # worst queries shown in report.html (and a quarter as many random successes)

    def __post_init__(self) -> None:
        check_choice("eval.mode", self.mode, MODES)
        if self.gallery < 0:
            raise ConfigError(f"eval.gallery must be >= 0 (worst queries shown in report.html), got {self.gallery}")
        check_range("eval.every_steps", self.every_steps, 0)
        check_each("eval.ks", self.ks, 1)
        check_each("eval.radii", self.radii, 0, low_open=True)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
