"""One validated schema for the whole pipeline.

YAML files, command-line overrides (``router.top_k=2``), Tune trials and Serve all build a
:class:`LoramixConfig`; nothing else parses settings. Every field carries a one-line docstring
that doubles as the reference documentation (``loramix config-help`` prints it).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from loramix import recipes
from loramix.names import check_expert_name
from loramix.section import Section
from loramix.serve_config import ServeConfig
from loramix.tune_config import TuneConfig

logger = logging.getLogger(__name__)

Recipe = Literal[tuple(recipes.RECIPES)]


class ConfigError(ValueError):
    """A configuration problem; the message lists every problem found, one per line."""


class SyntheticBaseConfig(Section):
    hidden_size: int = Field(128, ge=8)
    """Width of the demo Llama (only used when `model.base` is `synthetic`)."""
    intermediate_size: int = Field(256, ge=8)
    """MLP width of the demo Llama."""
    num_layers: int = Field(4, ge=1)
    """Transformer blocks of the demo Llama."""
    num_heads: int = Field(4, ge=1)
    """Attention heads of the demo Llama; must divide `hidden_size`."""
    pretrain_steps: int = Field(600, ge=0)
    """Steps of copy-task pre-training so experts have a competent base to adapt."""
    batch_size: int = Field(64, ge=1)
    """Batch size of the base pre-training."""
    lr: float = Field(3e-3, gt=0)
    """Peak learning rate of the base pre-training (warmup + cosine)."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> SyntheticBaseConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"`model.synthetic.num_heads` ({self.num_heads}) must divide "
                f"`model.synthetic.hidden_size` ({self.hidden_size}). Pick a divisor."
            )
        return self


class ModelConfig(Section):
    base: str = "synthetic"
    """`synthetic` builds the offline demo base; otherwise a local directory or hub id for `from_pretrained`."""
    tokenizer: str | None = None
    """Tokenizer directory or hub id; defaults to `model.base`."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of `model.base`; pin a commit so reruns use the same weights."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the base is loaded in: `float32` on CPU, `bfloat16` on GPUs."""
    synthetic: SyntheticBaseConfig = SyntheticBaseConfig()
    """Shape and pre-training of the demo base."""


class DomainConfig(Section):
    name: str
    """Expert name: letters, digits, `_ . -`; names the expert everywhere (files, API, report)."""
    train: str
    """Training data: a `.jsonl`/`.json` file, a `.parquet` file or a `datasets.save_to_disk` folder."""
    eval: str | None = None
    """Held-out data in the same formats; required for the `eval` stage."""
    adapter: str | None = None
    """A PEFT LoRA trained elsewhere on the same base, used as this expert (`train` rows then only teach the router)."""

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        return check_expert_name(name)


class DataConfig(Section):
    domains: list[DomainConfig] = Field(default_factory=list)
    """One entry per domain: `{name, train, eval}`."""
    prompt_field: str = "prompt"
    """Column holding the prompt text."""
    completion_field: str = "completion"
    """Column holding the completion text (the only tokens the loss is computed on)."""
    max_length: int = Field(64, ge=4)
    """Longest prompt+completion in tokens; longer rows are an error, not silently truncated."""
    eval_limit: int | None = Field(None, ge=1)
    """Score at most this many eval rows per domain (None: all)."""
    general: str | None = None
    """Eval rows of the base's general skill (the demo world: the copy task); every method is scored on it too."""

    @field_validator("domains")
    @classmethod
    def _unique_names(cls, domains: list[DomainConfig]) -> list[DomainConfig]:
        names = [d.name for d in domains]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"`data.domains` names must be unique, got duplicates {dupes}. Rename one.")
        return domains


class OptimConfig(Section):
    steps: int = Field(300, ge=1)
    """Optimizer steps."""
    batch_size: int = Field(64, ge=1)
    """Global batch size (split across `resources.num_workers`)."""
    lr: float = Field(8e-3, gt=0)
    """Peak learning rate (linear warmup, cosine decay)."""
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    """Fraction of `steps` spent warming up."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    grad_clip: float = Field(1.0, gt=0)
    """Clip the global gradient norm to this value."""


class LoraConfigBase(OptimConfig):
    steps: int = Field(2000, ge=1)
    """Most optimizer steps; training stops earlier once the validation loss stops improving."""
    rank: int = Field(8, ge=1)
    """LoRA rank r; higher = more capacity + memory."""
    alpha: float = Field(16.0, gt=0)
    """LoRA alpha; the update is scaled by alpha / r."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """LoRA dropout during expert training."""
    target_modules: list[str] | str = "all-linear"
    """Modules to adapt: `all-linear` or a list of names (PEFT `target_modules`)."""
    lora_plus_ratio: float = Field(1.0, ge=1)
    """LoRA+ (arXiv 2402.12354): the `lora_B` matrices learn at this many times `lr` (1: plain LoRA)."""
    val_fraction: float = Field(0.05, ge=0, lt=0.5)
    """Share of each LoRA's training rows held out for the validation loss (0: no early stopping)."""
    eval_every: int = Field(50, ge=1)
    """Steps between validation losses."""
    patience: int = Field(3, ge=0)
    """Validations without an improvement (1% and 0.001) before training stops (0: always run `steps`)."""
    takeoff: float = Field(0.5, gt=0, le=1)
    """Patience counts once the validation loss fell under this share of its first (or rose 1.5x); 1: patience alone."""
    cooldown: int = Field(100, ge=0)
    """Once patience runs out: from the best weights, this many steps of a falling learning rate (0: stop at once)."""


class ExpertConfig(LoraConfigBase):
    """A domain expert (and the multitask baseline, which gets the experts' total steps)."""


class UniversalConfig(LoraConfigBase):
    enabled: bool = False
    """Train MoDULA's universal LoRA first, on `universal.train`; the router weighs it beside the domain experts."""
    train: str | None = None
    """General data for the universal LoRA (the demo world: the copy task); unset: the union of the domains."""
    variant: Literal["flan", "res"] = "flan"
    """MoDULA-Flan: experts trained alone, universal one of them; MoDULA-Res: experts read the universal's output."""
    domain_files: list[str] | None = None
    """Domain train files it draws from (unset: all); expert commands pin them, so changes never retrain it."""
    domain_share: float = Field(0.0, ge=0, lt=1)
    """Share of its rows drawn equally from the domains (0: none); on general data alone Res experts read noise."""

    @property
    def draws_from_domains(self) -> bool:
        """It trains on domain rows: it has no general data of its own, or a share of its rows is theirs."""
        return not self.train or self.domain_share > 0


class RouterConfig(OptimConfig):
    steps: int = Field(200, ge=1)
    """Optimizer steps of router training (base and experts frozen)."""
    lr: float = Field(1e-2, gt=0)
    """Peak learning rate of the router."""
    top_k: int = Field(1, ge=1)
    """Experts kept per route (renormalised; straight-through gradients in training); at most the routed experts."""
    temperature: float = Field(1.0, gt=0)
    """Initial softmax temperature of the MoLE gates (learnable)."""
    balance_coef: float | None = Field(None, ge=0)
    """Weight of the balance loss -log prod q_i; unset: the recipe's (MoLE 0.5, the paper's alpha; MoDULA 0)."""
    context: Literal["token", "prompt", "prompt_only"] = "token"
    """MoDULA router input: the token's (`token`, the paper's), the prompt's + tokens so far mean, the prompt's mean."""
    label_coef: float = Field(0.0, ge=0)
    """MoLE/MoDULA: weight of a cross-entropy of each gate against the row's expert (0: the papers' label-free loss)."""
    warm_start: str | None = None
    """A mixture artifact whose router this one starts from: experts both have keep their learned rows, new
    ones start at zero. `add-domain` and the other expert commands set it to the run's current version."""


class TrainConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    """DeepSpeed ZeRO stage for expert training (0 = plain data parallel)."""
    log_every: int = Field(10, ge=1)
    """Report metrics every N optimizer steps."""
    checkpoint_every: int = Field(100, ge=1)
    """Write a resumable checkpoint every N optimizer steps."""
    max_failures: int = Field(2, ge=0)
    """Worker failures Ray Train retries before giving up on a stage."""
    storage_path: str | None = None
    """Ray Train checkpoint storage: a shared path or `s3://`/`gs://` URI (default `OUTPUT/ray_storage`)."""
    stall_timeout_s: float = Field(60.0, gt=0)
    """On a local Ray instance, stop with a message when nothing progressed this long while work waits for resources."""


class ResourcesConfig(Section):
    num_workers: int = Field(1, ge=1)
    """Data-parallel workers per expert trainer."""
    use_gpu: bool = False
    """One GPU per worker, NCCL backend; otherwise CPU + gloo."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs reserved per training worker."""


class LoramixConfig(Section):
    recipe: Recipe = "moa"
    """Mixture recipe: `moa` (sequence classifier), `mole` (gate per block), `modula` (token router)."""
    baselines: bool = True
    """Also train the multitask LoRA and score it and the PEFT merges (linear, ties, cat) beside the
    mixture; `false`: only base, oracle and mixture (faster, and no under-training check)."""
    seed: int = 0
    """Seed for data shuffling and initialisation."""
    output: str = "out/run"
    """Directory (or shared storage path) every stage writes under."""
    model: ModelConfig = ModelConfig()
    """Base model."""
    data: DataConfig = DataConfig()
    """Domain datasets."""
    expert: ExpertConfig = ExpertConfig()
    """Per-domain LoRA experts."""
    universal: UniversalConfig = UniversalConfig()
    """Universal LoRA (MoDULA)."""
    router: RouterConfig = RouterConfig()
    """Router over the frozen experts."""
    train: TrainConfig = TrainConfig()
    """Distributed training behaviour."""
    resources: ResourcesConfig = ResourcesConfig()
    """Ray resources."""
    tune: TuneConfig = TuneConfig()
    """Hyperparameter search (`loramix tune`)."""
    serve: ServeConfig = ServeConfig()
    """Serving (`loramix serve`); copied into the artifact so the endpoint deploys as trained."""

    @model_validator(mode="after")
    def _cross_checks(self) -> LoramixConfig:
        problems = recipes.get(self.recipe).check(self)
        n = len(recipes.routed_experts(self)) if self.data.domains else 0
        if n and self.router.top_k > n:
            what = "the domains + the universal LoRA" if self.universal.enabled else "the number of domains"
            problems.append(
                f"`router.top_k` must be in [1, {n}] ({what}), got {self.router.top_k}. Lower top_k or add domains."
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self


def format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = e.get("input")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; check the spelling against `loramix config-help`"
        lines.append(f"  `{key}`: {msg} (got {got!r})" if e["type"] != "missing" else f"  `{key}`: {msg}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a key path and a YAML-parsed value."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like `key.path=value`, e.g. `router.top_k=2`.")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of ``data`` with dotted-path overrides applied (``expert.rank=16``)."""
    return _apply(data, [(*parse_override(text), f"override `{text}`") for text in overrides])


def apply_values(data: dict, values: dict[str, Any]) -> dict:
    """Return a copy of ``data`` with ``{"expert.rank": 8, ...}`` set (a Tune trial's parameters)."""
    plain = {path: v.item() if hasattr(v, "item") else v for path, v in values.items()}  # numpy scalars from samplers
    return _apply(data, [(path.split("."), value, f"`{path}`") for path, value in plain.items()])


def _apply(data: dict, changes) -> dict:
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy through plain types
    for path, value, what in changes:
        node = data
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"{what}: `{'.'.join(path[: i + 1])}` is not a section.")
            node = node.setdefault(part, {})
        last = path[-1]
        if isinstance(node, list) and last.isdigit() and int(last) < len(node):
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"{what}: `{'.'.join(path[:-1])}` is not a section.")
    return data


def build_config(data: dict | None, overrides: list[str] = (), source: str = "<dict>") -> LoramixConfig:
    """Validate a plain dict (plus overrides) into a :class:`LoramixConfig`.

    Raises:
        ConfigError: listing every invalid or unknown key with the value received and what is allowed.
    """
    data = apply_overrides(data or {}, list(overrides))
    try:
        return LoramixConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_errors(err, source)) from None


def load_config(path: str | Path, overrides: list[str] = ()) -> LoramixConfig:
    """Read a YAML config file, apply ``key.path=value`` overrides and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist. Pass the path to a YAML file.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top, got {type(data).__name__}.")
    return build_config(data, overrides, source=str(path))


def data_paths(cfg: LoramixConfig) -> dict[str, str]:
    """Every data path of a config, by the dotted key a user would write."""
    paths = {}
    for i, d in enumerate(cfg.data.domains):
        paths[f"data.domains.{i}.train"] = d.train
        if d.eval:
            paths[f"data.domains.{i}.eval"] = d.eval
    pinned = [(f"universal.domain_files.{i}", f) for i, f in enumerate(cfg.universal.domain_files or ())]
    for key, value in (("data.general", cfg.data.general), ("universal.train", cfg.universal.train), *pinned):
        if value:
            paths[key] = value
    return paths


def with_paths(cfg: LoramixConfig, paths: dict[str, str]) -> LoramixConfig:
    """``cfg`` with the data paths ``{dotted key: path}`` replaced."""
    return build_config(cfg.model_dump(mode="json"), [f"{k}={json.dumps(v)}" for k, v in paths.items()])


def absolute_paths(cfg: LoramixConfig, root: str | Path | None = None) -> LoramixConfig:
    """Relative data, base and storage paths made absolute against ``root`` (default: the current
    directory): Ray tasks and Tune trials run in other directories, so they must not resolve them."""
    root = Path(root or Path.cwd())
    paths = {k: str((root / v).resolve()) for k, v in data_paths(cfg).items() if not Path(v).is_absolute()}
    cfg = with_paths(cfg, paths) if paths else cfg
    updates = {}
    for key in ("base", "tokenizer"):
        value = getattr(cfg.model, key)
        if value and value != "synthetic" and not Path(value).is_absolute() and (root / value).exists():
            updates[key] = str((root / value).resolve())  # a local folder (a hub id stays as it is)
    if updates:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update=updates)})
    storage = cfg.train.storage_path
    if storage and "://" not in storage and not Path(storage).is_absolute():
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"storage_path": str(root / storage)})})
    return cfg


def dump_config(cfg: LoramixConfig) -> str:
    """The resolved config as YAML (written next to every checkpoint); never the API key."""
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude={"serve": {"api_key"}}), sort_keys=False)


def config_help(model: type[BaseModel] = LoramixConfig, prefix: str = "") -> list[str]:
    """One line per field: dotted key, default and description (the config reference)."""
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines += config_help(ann, key + ".")
            continue
        default = field.default if field.default_factory is None else field.default_factory()
        lines.append(f"{key} = {default!r}: {field.description or ''}")
    return lines


def config_hash(cfg: LoramixConfig) -> str:
    """A short stable hash of the resolved config (recorded in reports and stage markers)."""
    return hashlib.sha256(dump_config(cfg).encode()).hexdigest()[:16]
