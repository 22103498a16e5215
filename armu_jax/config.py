"""Command-line flags (absl, usable from --flagfile) and the one frozen RunConfig they become."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace

from absl import flags

from armu_jax.errors import UserError

FLAGS = flags.FLAGS


def define_flags() -> None:
    if "method" in FLAGS:
        return
    flags.DEFINE_enum("mode", "train", ["train", "eval", "lm_eval"],
                      "train: unlearn; eval: native JAX evaluation of --model; lm_eval: lm-eval's hf backend on --model.")
    flags.DEFINE_enum("method", "adaptive_rmu", ["rmu", "adaptive_rmu"], "Unlearning method.")
    flags.DEFINE_string("model", "smollm2-135m", "HF model directory, or smollm2-135m (embedded default).")
    flags.DEFINE_integer("layer_id", 7, "Unlearn layer l: its residual-stream output is steered.")
    flags.DEFINE_list("update_layer_ids", None, "Layers whose parameters are updated (default l-2,l-1,l).")
    flags.DEFINE_list("update_params", ["mlp.down_proj"], "Parameter names updated in those layers.")
    flags.DEFINE_list("forget_corpora", ["demo:bio", "demo:cyber"], "One forget corpus per topic.")
    flags.DEFINE_list("retain_corpora", ["demo:retain", "demo:retain"], "One retain corpus per topic.")
    flags.DEFINE_list("alpha", ["1200"], "Retain weight per topic (one value is used for all topics).")
    flags.DEFINE_list("steering_coeffs", ["6.5"], "RMU steering coefficient c per topic (one value: all).")
    flags.DEFINE_float("beta", 5.0, "Adaptive RMU scale: coeff = beta * ||h_l^frozen||.")
    flags.DEFINE_enum("adaptive_coeff", "first_batch", ["per_batch", "first_batch"],
                      "per_batch: paper (frozen norm of every forget batch); first_batch: public code.")
    flags.DEFINE_bool("norm_skip_first", False, "Exclude each row's first real token (the attention sink) from the adaptive norm.")
    flags.DEFINE_float("lr", 5e-5, "Learning rate.")
    flags.DEFINE_integer("batch_size", 4, "Texts per forget/retain batch.")
    flags.DEFINE_integer("max_num_batches", 150, "Number of update steps (capped by the data).")
    flags.DEFINE_list("forget_max_len", ["512", "768"], "Max tokens per forget topic (one value: all).")
    flags.DEFINE_integer("retain_max_len", 512, "Max tokens of retain texts.")
    flags.DEFINE_integer("min_len", 0, "Keep texts with more than this many characters.")
    flags.DEFINE_integer("pad_multiple", 128, "Pad batches to a multiple of this length (one compile per shape).")
    flags.DEFINE_integer("seed", 42, "Seed of the control vectors.")
    flags.DEFINE_enum("loss_mask", "none", ["none", "tokens", "tokens_after_first"],
                      "none: reference (pads in the MSE); tokens: real tokens only; tokens_after_first: "
                      "real tokens except each row's first (the attention sink).")
    flags.DEFINE_enum("optimizer", "hf_adamw", ["hf_adamw", "adamw"], "hf_adamw: reference arithmetic.")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")
    flags.DEFINE_string("export_dtype", None, "dtype of the HF export (default: --dtype).")
    flags.DEFINE_string("mesh", "data:1", "Device mesh, e.g. data:1, fsdp:-1, data:2,fsdp:4.")
    flags.DEFINE_string("output_dir", None, "Run directory (must be new or empty unless --resume/--overwrite).")
    flags.DEFINE_integer("checkpoint_every", 50, "Checkpoint every N steps (0: only at the end).")
    flags.DEFINE_integer("keep_checkpoints", 3, "Newest checkpoints kept.")
    flags.DEFINE_bool("resume", False, "Continue the run in --output_dir from its last checkpoint.")
    flags.DEFINE_bool("overwrite", False, "Delete a non-empty --output_dir and start afresh.")
    flags.DEFINE_string("control_vectors", None, ".npy [n_topics, hidden] of unit rows, used instead of drawing.")
    flags.DEFINE_integer("log_every", 1, "Print/log metrics every N steps.")
    flags.DEFINE_integer("eval_every", 0, "Evaluate --eval_tasks every N steps during a run (0: never).")
    flags.DEFINE_list("eval_tasks", ["demo"], "demo, demo_bio|cyber|retain, mmlu[:DIR], wmdp_bio:FILE, "
                      "wmdp_cyber:FILE, FILE.jsonl (WMDP format); with --mode=lm_eval also lm-eval task names.")
    flags.DEFINE_integer("eval_limit", 0, "Items per evaluation task (0: all).")
    flags.DEFINE_integer("eval_batch_size", 16, "Sequences per evaluation batch.")
    flags.DEFINE_bool("export", True, "Write the final HF export to <output_dir>/hf.")
    flags.DEFINE_integer("profile_start_step", -1, "Start an XLA profiler trace at this step (-1: off).")
    flags.DEFINE_integer("profile_num_steps", 3, "Steps in the profiler trace.")


@dataclass(frozen=True)
class RunConfig:
    mode: str
    method: str
    model: str
    layer_id: int
    update_layer_ids: tuple[int, ...]
    update_params: tuple[str, ...]
    forget_corpora: tuple[str, ...]
    retain_corpora: tuple[str, ...]
    alpha: tuple[float, ...]
    steering_coeffs: tuple[float, ...]
    beta: float
    adaptive_coeff: str
    norm_skip_first: bool
    lr: float
    batch_size: int
    max_num_batches: int
    forget_max_len: tuple[int, ...]
    retain_max_len: int
    min_len: int
    pad_multiple: int
    seed: int
    loss_mask: str
    optimizer: str
    dtype: str
    export_dtype: str
    mesh: str
    output_dir: str | None
    checkpoint_every: int
    keep_checkpoints: int
    resume: bool
    overwrite: bool
    control_vectors: str | None
    log_every: int
    eval_every: int
    eval_tasks: tuple[str, ...]
    eval_limit: int
    eval_batch_size: int
    export: bool
    profile_start_step: int
    profile_num_steps: int

    @property
    def n_topics(self) -> int:
        return len(self.forget_corpora)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)


def _numbers(name: str, values, kind, n_topics: int) -> tuple:
    try:
        parsed = tuple(kind(v) for v in values)
    except ValueError:
        raise UserError(f"--{name}={','.join(values)}: not a list of numbers") from None
    if len(parsed) == 1:
        return parsed * n_topics
    if len(parsed) != n_topics:
        raise UserError(f"--{name} has {len(parsed)} values but there are {n_topics} forget topics; "
                        "give one value per topic or a single value for all")
    return parsed


def from_flags() -> RunConfig:
    """The parsed flags as a validated RunConfig (checks that need the model happen later)."""
    return build({name: FLAGS[name].value for name in _flag_names()})


def config_with(**overrides) -> RunConfig:
    """The flag defaults with overrides (Python values; lists for list flags), for library use and tests."""
    define_flags()
    values = {name: FLAGS[name].default for name in _flag_names()}
    for key, value in overrides.items():
        if key not in values:
            raise UserError(f"unknown setting {key!r}")
        values[key] = [str(v) for v in value] if isinstance(value, (list, tuple)) else value
    return build(values)


def _flag_names() -> list[str]:
    return [f.name for f in FLAGS.get_flags_for_module(__name__)]


def build(values: dict) -> RunConfig:
    v = SimpleNamespace(**values)
    n = len(v.forget_corpora)
    if n == 0:
        raise UserError("--forget_corpora is empty; name at least one forget corpus")
    if len(v.retain_corpora) == 1:
        retain = tuple(v.retain_corpora) * n
    elif len(v.retain_corpora) == n:
        retain = tuple(v.retain_corpora)
    else:
        raise UserError(f"--retain_corpora has {len(v.retain_corpora)} entries for {n} forget topics; "
                        "give one per topic or one for all")
    layer = v.layer_id
    update_layers = (tuple(_numbers("update_layer_ids", v.update_layer_ids, int, len(v.update_layer_ids)))
                     if v.update_layer_ids else tuple(i for i in (layer - 2, layer - 1, layer) if i >= 0))
    cfg = RunConfig(
        mode=v.mode, method=v.method, model=v.model, layer_id=layer,
        update_layer_ids=update_layers, update_params=tuple(v.update_params),
        forget_corpora=tuple(v.forget_corpora), retain_corpora=retain,
        alpha=_numbers("alpha", v.alpha, float, n),
        steering_coeffs=_numbers("steering_coeffs", v.steering_coeffs, float, n),
        beta=v.beta, adaptive_coeff=v.adaptive_coeff, norm_skip_first=v.norm_skip_first,
        lr=v.lr, batch_size=v.batch_size, max_num_batches=v.max_num_batches,
        forget_max_len=_numbers("forget_max_len", v.forget_max_len, int, n),
        retain_max_len=v.retain_max_len, min_len=v.min_len, pad_multiple=v.pad_multiple,
        seed=v.seed, loss_mask=v.loss_mask, optimizer=v.optimizer, dtype=v.dtype,
        export_dtype=v.export_dtype or v.dtype, mesh=v.mesh, output_dir=v.output_dir,
        checkpoint_every=v.checkpoint_every, keep_checkpoints=v.keep_checkpoints,
        resume=v.resume, overwrite=v.overwrite, control_vectors=v.control_vectors,
        log_every=v.log_every, eval_every=v.eval_every, eval_tasks=tuple(v.eval_tasks),
        eval_limit=v.eval_limit, eval_batch_size=v.eval_batch_size, export=v.export,
        profile_start_step=v.profile_start_step, profile_num_steps=v.profile_num_steps,
    )
    validate(cfg)
    return cfg


def validate(cfg: RunConfig, num_layers: int | None = None) -> None:
    """Checks on the config alone, and with num_layers those that need the model."""
    if cfg.batch_size < 1:
        raise UserError(f"--batch_size={cfg.batch_size}: must be at least 1")
    if cfg.method == "adaptive_rmu" and cfg.beta <= 0:
        raise UserError(f"--beta={cfg.beta}: must be > 0 (the paper uses 2, 3, 5 or 10)")
    if cfg.max_num_batches < 1:
        raise UserError(f"--max_num_batches={cfg.max_num_batches}: must be at least 1")
    if cfg.pad_multiple < 1 or cfg.log_every < 1 or cfg.checkpoint_every < 0:
        raise UserError("--pad_multiple and --log_every must be >= 1, --checkpoint_every >= 0")
    if cfg.eval_every < 0 or cfg.eval_limit < 0 or cfg.eval_batch_size < 1:
        raise UserError("--eval_every and --eval_limit must be >= 0, --eval_batch_size >= 1")
    if cfg.lr <= 0:
        raise UserError(f"--lr={cfg.lr}: must be > 0")
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    if any(a < 0 for a in cfg.alpha):
        raise UserError("--alpha values must be >= 0")
    if cfg.export_dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--export_dtype={cfg.export_dtype}: use float32, bfloat16 or float16")
    if cfg.mode == "train" and not cfg.output_dir:
        raise UserError("--output_dir is required: the run directory for metrics, checkpoints and the export")
    if any(l < 0 for l in cfg.update_layer_ids) or cfg.layer_id < 0:
        raise UserError(f"--layer_id={cfg.layer_id} / --update_layer_ids must be >= 0")
    if max(cfg.update_layer_ids) > cfg.layer_id:
        raise UserError(f"--update_layer_ids={','.join(map(str, cfg.update_layer_ids))} include layers above "
                        f"--layer_id={cfg.layer_id}; updated layers must be at or below the unlearn layer")
    if num_layers is not None and cfg.layer_id >= num_layers:
        raise UserError(f"--layer_id={cfg.layer_id} is outside the model's {num_layers} layers "
                        f"(valid: 0..{num_layers - 1})")
