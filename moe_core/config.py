"""Run configuration: presets, TOML files and validation.

One flat dataclass keeps the CLI flags, the TOML keys and the saved run config the same names.
The resolved config is written to each run as `config.toml`, grouped into sections for reading.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from moe_core.atomic import atomic_write_text
from moe_core.errors import UserError
from moe_core.presets import PRESETS

ROUTERS = ("topk", "noisy_topk")
INITS = ("kaiming", "xavier", "normal")
POS_ENCODINGS = ("learned", "rope")
SCHEDULES = ("cosine", "constant")
DEVICES = ("auto", "cpu", "cuda", "mps")
MOE_IMPLS = ("fast", "reference")


@dataclass
class Config:
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    # "learned" is the default so that run configs saved before RoPE existed load as they trained.
    pos_encoding: str = "learned"
    num_experts: int = 4
    top_k: int = 2
    router: str = "topk"
    capacity_factor: float = 0.0
    router_noise: float = 1.0  # scale of a noisy_topk router's learned noise (0 = none); live
    dropout: float = 0.0
    init: str = "kaiming"
    moe_impl: str = "fast"  # "reference" = the textbook per-expert mask loop (for learning and bench)
    # training
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    lr_schedule: str = "cosine"
    warmup_iters: int = 100
    max_iters: int = 2000
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    seed: int = 1337
    device: str = "auto"
    compile: bool = False
    # evaluation, logging, sampling, checkpoints
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    sample_interval: int = 500
    sample_tokens: int = 200
    ckpt_interval: int = 500
    keep_checkpoints: int = 3
    # data
    dataset: str = "shakespeare"
    columns: list[str] = field(default_factory=list)
    encoding: str = "utf-8"
    val_fraction: float = 0.1
    preset: str = "cpu"
    # experiment tracking (moe_core/track): where the run is sent besides its own folder
    track: list[str] = field(default_factory=list)
    track_project: str = "moe-tui"
    # the guard (moe_core/train/guard.py): rules on the figures a run reports, and what a trip does
    guard: bool = True
    on_alert: str = ""  # warn | pause | stop; "" = the front end's default (pause on a screen, else warn)
    guard_windows: int = 5  # log lines an expert stays dead (a layer collapsed) to trip, and normal to trip again
    guard_dead_share: float = 0.1  # an expert below this fraction of its fair share 1/E is dead
    guard_entropy: float = 0.3  # router entropy below this fraction of ln E: the layer has collapsed
    guard_spike: float = 3.0  # a window's loss this many times its running mean: a spike
    guard_slow: float = 2.0  # a window's step time this many times the median: slowing down
    guard_val_rises: int = 3  # evaluations in a row with a rising validation loss

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, tuple[str, ...]] = {
    "model": (
        "n_layer",
        "n_head",
        "n_embd",
        "block_size",
        "pos_encoding",
        "num_experts",
        "top_k",
        "router",
        "capacity_factor",
        "router_noise",
        "dropout",
        "init",
        "moe_impl",
    ),
    "train": (
        "batch_size",
        "lr",
        "min_lr_ratio",
        "lr_schedule",
        "warmup_iters",
        "max_iters",
        "weight_decay",
        "grad_clip",
        "aux_loss_coef",
        "z_loss_coef",
        "seed",
        "device",
        "compile",
    ),
    "schedule": (
        "eval_interval",
        "eval_iters",
        "log_interval",
        "sample_interval",
        "sample_tokens",
        "ckpt_interval",
        "keep_checkpoints",
    ),
    "data": ("dataset", "columns", "encoding", "val_fraction", "preset"),
    "tracking": ("track", "track_project"),
    "guard": (
        "guard",
        "on_alert",
        "guard_windows",
        "guard_dead_share",
        "guard_entropy",
        "guard_spike",
        "guard_slow",
        "guard_val_rises",
    ),
}
ALERT_ACTIONS = ("warn", "pause", "stop")

# Keys a run takes while it trains (`moe-tui set`, moe_core/train/settings.py), in the order the
# dashboard's dialog lists them: none changes the model's shape or its data.
LIVE_KEYS = (
    "lr",
    "min_lr_ratio",
    "warmup_iters",
    "max_iters",
    "weight_decay",
    "grad_clip",
    "aux_loss_coef",
    "z_loss_coef",
    "capacity_factor",
    "router_noise",
    "dropout",
    "eval_interval",
    "sample_interval",
    "ckpt_interval",
)

# Keys that may change when a run is resumed: they alter neither the model nor the data.
RESUMABLE_KEYS = (
    frozenset(SECTIONS["schedule"])
    | frozenset(SECTIONS["tracking"])
    | frozenset(SECTIONS["guard"])
    | frozenset(LIVE_KEYS)
    | {"device", "compile", "preset"}
)

FIELD_TYPES = {f.name: f.type for f in fields(Config)}


def _coerce(key: str, value: Any, origin: str) -> Any:
    """Check a value's type against the field, accepting ints for floats."""
    kind = FIELD_TYPES[key]
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[kind]
    if not ok:
        raise UserError(f"{origin}: '{key}' must be {kind}, got {value!r}; fix the value")
    return float(value) if kind == "float" else value


def read_toml(path: Path) -> dict[str, Any]:
    """Read a config file: flat keys, or keys grouped in [model], [train], [schedule], [data], [tracking]."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"config file {path} not found; check the path given to --config") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"config file {path} is not valid TOML ({err}); fix the syntax") from None
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and key not in SECTIONS:
            raise UserError(
                f"config file {path}: unknown section [{key}]; use [{'], ['.join(SECTIONS)}] or keys without a section"
            )
        items = value.items() if key in SECTIONS and isinstance(value, dict) else [(key, value)]
        for k, v in items:
            if k not in FIELD_TYPES:
                raise UserError(f"config file {path}: unknown key '{k}'; valid keys: {', '.join(FIELD_TYPES)}")
            flat[k] = _coerce(k, v, f"config file {path}")
    return flat


def write_toml(config: Config, path: Path, comment: str = "") -> None:
    """Write the resolved config grouped into sections (a tiny writer: values are simple); `comment`, a
    line under the heading (a fork's origin, say)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)

    values = config.to_dict()
    lines = ["# moe-tui run config (resolved: preset + config file + flags)"] + ([f"# {comment}"] if comment else [])
    for section, keys in SECTIONS.items():
        lines += ["", f"[{section}]"] + [f"{k} = {fmt(values[k])}" for k in keys]
    atomic_write_text(path, "\n".join(lines) + "\n")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here; use --device cpu or auto")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: Apple MPS is not available here; use --device cpu or auto")
    return device


def build_config(preset: str | None, file_values: dict[str, Any], overrides: dict[str, Any]) -> Config:
    """Preset, then config file, then flags: later wins. No preset: `gpu` on CUDA, else `cpu`."""
    device = overrides.get("device", file_values.get("device", "auto"))
    if device not in DEVICES:
        raise UserError(f"unknown device '{device}'; use one of {', '.join(DEVICES)}")
    if preset is None:
        preset = file_values.get("preset") or ("gpu" if resolve_device(device) == "cuda" else "cpu")
    if preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}'; use one of {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **file_values, **overrides, "preset": preset}
    config = Config(**values)
    validate(config)
    return config


def validate(c: Config) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(message)

    for f in fields(c):  # inf and nan pass every comparison below that they should fail
        value = getattr(c, f.name)
        need(
            not isinstance(value, float) or math.isfinite(value),
            f"--{f.name.replace('_', '-')} must be a finite number, got {value}",
        )

    for name in (
        "n_layer",
        "n_head",
        "n_embd",
        "block_size",
        "num_experts",
        "top_k",
        "batch_size",
        "max_iters",
        "eval_interval",
        "eval_iters",
        "log_interval",
        "sample_interval",
        "ckpt_interval",
        "keep_checkpoints",
    ):
        need(getattr(c, name) > 0, f"--{name.replace('_', '-')} must be a positive integer, got {getattr(c, name)}")
    need(c.sample_tokens >= 0, f"--sample-tokens must be 0 or more, got {c.sample_tokens}")
    need(
        c.n_embd % c.n_head == 0,
        f"--n-embd {c.n_embd} is not divisible by --n-head {c.n_head}; pick sizes where it is (e.g. 128 and 8)",
    )
    need(
        c.pos_encoding != "rope" or c.head_dim % 2 == 0,
        f"--pos-encoding rope rotates pairs of channels, so each head needs an even width, but --n-embd "
        f"{c.n_embd} / --n-head {c.n_head} = {c.n_embd / c.n_head:g}; pick sizes where it is even",
    )
    need(
        c.top_k <= c.num_experts,
        f"--top-k {c.top_k} is larger than --num-experts {c.num_experts}; use --top-k {c.num_experts} or fewer",
    )
    need(c.capacity_factor >= 0, f"--capacity-factor must be >= 0 (0 = dropless), got {c.capacity_factor}")
    need(c.router_noise >= 0, f"--router-noise must be >= 0 (0 = none), got {c.router_noise}")
    _validate_guard(c, need)
    need(c.lr > 0, f"--lr must be > 0, got {c.lr}")
    need(0 <= c.min_lr_ratio <= 1, f"min_lr_ratio must be between 0 and 1, got {c.min_lr_ratio}")
    need(0 <= c.dropout < 1, f"--dropout must be in [0, 1), got {c.dropout}")
    need(0 < c.val_fraction < 1, f"--val-fraction must be between 0 and 1, got {c.val_fraction}")
    need(c.warmup_iters >= 0, f"--warmup-iters must be >= 0, got {c.warmup_iters}")
    need(c.weight_decay >= 0, f"--weight-decay must be >= 0, got {c.weight_decay}")
    need(c.grad_clip >= 0, f"--grad-clip must be >= 0 (0 = off), got {c.grad_clip}")
    need(c.aux_loss_coef >= 0, f"--aux-loss-coef must be >= 0, got {c.aux_loss_coef}")
    need(c.z_loss_coef >= 0, f"--z-loss-coef must be >= 0, got {c.z_loss_coef}")
    for key, allowed in (
        ("router", ROUTERS),
        ("init", INITS),
        ("pos_encoding", POS_ENCODINGS),
        ("lr_schedule", SCHEDULES),
        ("device", DEVICES),
        ("moe_impl", MOE_IMPLS),
    ):
        need(
            getattr(c, key) in allowed,
            f"unknown {key.replace('_', '-')} '{getattr(c, key)}'; use one of {', '.join(allowed)}",
        )
    need(bool(c.track_project.strip()), "--track-project must not be empty; name a project (e.g. moe-tui)")
    # Whether the trackers in `track` are installed is checked where a run is trained (moe_core/session),
    # not here: a run recorded elsewhere stays readable and exportable on a machine without them.


def _validate_guard(c: Config, need: Callable[[bool, str], None]) -> None:
    """The guard's settings (moe_core/train/guard.py): what `validate` checks of the [guard] section."""
    need(
        c.on_alert in ("", *ALERT_ACTIONS), f"--on-alert must be one of {', '.join(ALERT_ACTIONS)}, got {c.on_alert!r}"
    )
    for name in ("guard_windows", "guard_val_rises"):
        need(getattr(c, name) > 0, f"{name} must be a positive integer, got {getattr(c, name)}")
    for name in ("guard_dead_share", "guard_entropy"):
        need(0 <= getattr(c, name) < 1, f"{name} must be in [0, 1), got {getattr(c, name)}")
    for name in ("guard_spike", "guard_slow"):
        need(getattr(c, name) > 1, f"{name} must be above 1 (a multiple of the usual), got {getattr(c, name)}")


def diff_for_resume(saved: Config, wanted: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Split requested changes into allowed ones and the keys that would change the model or data."""
    allowed, refused = {}, []
    for key, value in wanted.items():
        if getattr(saved, key) == value:
            continue
        if key in RESUMABLE_KEYS:
            allowed[key] = value
        else:
            refused.append(key)
    return allowed, refused
