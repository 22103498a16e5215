"""Every setting, written once: a field of RunConfig with its flag kind, default and help.

The absl flags (and so `--flagfile`) are generated from these fields, and one function turns
flag values into the frozen RunConfig that library code takes. Library code and tests read a
flagfile with `from_flagfile(path, **overrides)` or start from the defaults with
`config_with(**overrides)`; neither touches the process-wide `absl.flags.FLAGS`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from absl import flags

from armu_jax.errors import UserError

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def setting(kind: str, default, help: str, choices=None, restartable: bool = False):
    """A RunConfig field. kind: bool, int, float, str, enum, list (strings), ints, floats, topic_floats or
    topic_ints (one value per forget topic, or one for all). restartable: may differ on --resume
    (output, logging, evaluation), every other setting must match the run's flags.txt."""
    return field(metadata={"kind": kind, "default": default, "help": help, "choices": choices,
                           "restartable": restartable})


@dataclass(frozen=True)
class RunConfig:
    mode: str = setting("enum", "train", "train: unlearn; eval: native JAX evaluation of --model; "
                        "lm_eval: lm-eval's hf backend on --model; compile: ahead-of-time compile report of "
                        "the step (memory per device, FLOPs); attack: robustness attacks on --run_dir's export; norms: "
                        "every layer's activation norm on the corpora (choosing c); sweep: layers x methods, each cell a run "
                        "evaluated on --eval_tasks; parity: the Flax port against transformers on --model "
                        "(logits, layers; exit 1 above the tolerance).",
                        ["train", "eval", "lm_eval", "compile", "attack", "norms", "sweep", "parity"], True)
    method: str = setting("enum", "adaptive_rmu", "Unlearning method.", ["rmu", "adaptive_rmu"])
    model: str = setting("str", "smollm2-135m", "HF model directory, or smollm2-135m (embedded default).")
    layer_id: int = setting("int", 7, "Unlearn layer l: its residual-stream output is steered.")
    update_layer_ids: tuple = setting("ints", None, "Layers whose parameters are updated (default l-2,l-1,l).")
    update_params: tuple = setting("list", ["default"], "Parameter names updated in those layers: projections "
                                   "(mlp.down_proj), norms (post_feedforward_layernorm) or biases (self_attn.q_proj.bias); "
                                   "default: the family's (mlp.down_proj; Gemma-2/3 and OLMo-2 add "
                                   "post_feedforward_layernorm, which re-normalises down_proj's output).")
    forget_corpora: tuple = setting("list", ["demo:bio", "demo:cyber"], "One forget corpus per topic.")
    retain_corpora: tuple = setting("list", ["demo:retain", "demo:retain"],
                                    "One retain corpus per topic (one value: all).")
    alpha: tuple = setting("topic_floats", ["1200"], "Retain weight per topic (one value: all).")
    steering_coeffs: tuple = setting("topic_floats", ["6.5"], "RMU steering coefficient c per topic (one value: all).")
    beta: float = setting("float", 5.0, "Adaptive RMU scale: coeff = beta * ||h_l^frozen||.")
    adaptive_coeff: str = setting("enum", "first_batch", "per_batch: paper (frozen norm of every forget batch); "
                                  "first_batch: public code.", ["per_batch", "first_batch"])
    norm_skip_first: bool = setting("bool", False, "Exclude each row's first real token (the attention sink) "
                                    "from the adaptive norm.")
    lr: float = setting("float", 5e-5, "Learning rate.")
    batch_size: int = setting("int", 4, "Texts per forget/retain batch.")
    max_num_batches: int = setting("int", 150, "Number of update steps (capped by the data).")
    forget_max_len: tuple = setting("topic_ints", ["512", "768"], "Max tokens per forget topic (one value: all).")
    retain_max_len: int = setting("int", 512, "Max tokens of retain texts.")
    min_len: int = setting("int", 0, "Keep texts with more than this many characters.")
    pad_multiple: int = setting("int", 128, "Pad batches to a multiple of this length (one compile per shape).")
    seed: int = setting("int", 42, "Seed of the control vectors.")
    loss_mask: str = setting("enum", "none", "none: reference (pads in the MSE); tokens: real tokens only; "
                             "tokens_after_first: real tokens except each row's first (the attention sink).",
                             ["none", "tokens", "tokens_after_first"])
    optimizer: str = setting("enum", "hf_adamw", "hf_adamw: reference arithmetic.", ["hf_adamw", "adamw"])
    dtype: str = setting("enum", "float32", "Parameter and compute dtype (training and evaluation).",
                         ["float32", "bfloat16"])
    export_dtype: str = setting("enum", None, "dtype of the HF export (default: --dtype).", DTYPE_NAMES, True)
    mesh: str = setting("str", "data:1", "Device mesh, e.g. data:1, fsdp:-1, data:2,fsdp:4.")
    multihost: bool = setting("bool", False, "Several processes (TPU pod workers, SLURM tasks): "
                              "jax.distributed.initialize() finds the others from the environment.", restartable=True)
    coordinator_address: str = setting("str", None, "Several processes started by hand: HOST:PORT of process 0 "
                                       "(with --num_processes and --process_id).", restartable=True)
    num_processes: int = setting("int", None, "Several processes started by hand: how many.", restartable=True)
    process_id: int = setting("int", None, "Several processes started by hand: this one's index, 0..N-1.",
                              restartable=True)
    topology: str = setting("str", None, "--mode=compile: a TPU slice to compile for, e.g. v5e:2x4, v5e:4x4, "
                            "v4:2x2x1 (needs libtpu; default: this machine's devices).", restartable=True)
    xla_dump_dir: str = setting("str", None, "--mode=compile: dump the compiled HLO here.", restartable=True)
    output_dir: str = setting("str", None, "Run directory (must be new or empty unless --resume/--overwrite).",
                            restartable=True)
    checkpoint_every: int = setting("int", 50, "Checkpoint every N steps (0: only at the end).", restartable=True)
    keep_checkpoints: int = setting("int", 3, "Newest checkpoints kept.", restartable=True)
    resume: bool = setting("bool", False, "Continue the run in --output_dir from its last checkpoint.", restartable=True)
    allow_flag_changes: bool = setting("bool", False, "With --resume: continue although settings differ from "
                                       "the run's flags.txt.", restartable=True)
    overwrite: bool = setting("bool", False, "Delete a non-empty --output_dir and start afresh.", restartable=True)
    control_vectors: str = setting("str", None, ".npy [n_topics, hidden] of unit rows, used instead of drawing.")
    log_every: int = setting("int", 1, "Print/log metrics every N steps.", restartable=True)
    eval_every: int = setting("int", 0, "Evaluate --eval_tasks every N steps during a run (0: never).",
                              restartable=True)
    eval_tasks: tuple = setting("list", ["demo"], "demo, demo_bio|cyber|retain, mmlu[:DIR], wmdp_bio:FILE, "
                                "wmdp_cyber:FILE, FILE.jsonl (WMDP format); with --mode=lm_eval also lm-eval "
                                "task names.", restartable=True)
    eval_limit: int = setting("int", 0, "Items per evaluation task (0: all).", restartable=True)
    eval_batch_size: int = setting("int", 16, "Sequences per evaluation batch.", restartable=True)
    export: bool = setting("bool", True, "Write the final HF export to <output_dir>/hf.", restartable=True)
    eval_nll_tokens: int = setting("int", 128, "Held-out NLL over each text's first N tokens.", restartable=True)
    sweep_layers: str = setting("str", None, "--mode=sweep: unlearn layers, START:STOP:STEP (Python range, "
                                "STOP excluded) or a list 3,7,11 (default: --layer_id). The updated layers keep "
                                "their offsets from --layer_id (default l-2, l-1, l).", restartable=True)
    sweep_methods: tuple = setting("list", ["rmu", "adaptive_rmu"], "--mode=sweep: methods.", restartable=True)
    sweep_steering_coeffs: tuple = setting("floats", None, "--mode=sweep: RMU's c values, each for every topic "
                                           "(default: --steering_coeffs).", restartable=True)
    sweep_betas: tuple = setting("floats", None, "--mode=sweep: Adaptive RMU's beta values (default: --beta).",
                                 restartable=True)
    sweep_alphas: tuple = setting("list", None, "--mode=sweep: alpha values, each for every topic or one per "
                                  "topic joined by / (1800/300) (default: --alpha).", restartable=True)
    norms_texts: int = setting("int", 64, "--mode=norms: texts of each corpus.", restartable=True)
    run_dir: str = setting("str", None, "--mode=attack: the unlearning run directory (flags.txt, control_vectors.npy, "
                           "hf/).", restartable=True)
    attacks: tuple = setting("list", ["ablate_u", "ablate_pca", "relearn_forget", "relearn_retain"],
                             "--mode=attack: ablate_u, ablate_pca, relearn_forget, relearn_retain.", restartable=True)
    ablate_k: int = setting("int", 4, "ablate_pca: principal directions of (unlearned - original) layer-l "
                            "activations on forget texts projected out.", restartable=True)
    relearn_texts: int = setting("int", 10, "Relearning and PCA: texts (K) the run did not train on, drawn with --seed.",
                                 restartable=True)
    relearn_steps: int = setting("int", 5, "Relearning: AdamW steps (S), each over all K texts.", restartable=True)
    relearn_lr: float = setting("float", 1e-5, "Relearning: learning rate.", restartable=True)
    relearn_weight_decay: float = setting("float", 0.01, "Relearning: AdamW's decoupled weight decay.",
                                          restartable=True)
    relearn_params: tuple = setting("list", ["all"], "Relearning: all (every parameter), or names such as "
                                    "mlp.down_proj in --relearn_layers.", restartable=True)
    relearn_layers: tuple = setting("ints", None, "Relearning: layers of --relearn_params (default: the run's "
                                    "updated layers).", restartable=True)
    relearn_max_len: int = setting("int", 128, "Relearning and PCA: tokens per text.", restartable=True)
    attack_controls: bool = setting("bool", True, "Also relearn the original model (the controls).",
                                    restartable=True)
    parity_texts: str = setting("str", None, "--mode=parity: texts to run (.txt one a line, or .jsonl with "
                                "\"text\"); default: four built-in texts.", restartable=True)
    parity_max_len: int = setting("int", 64, "--mode=parity: tokens per text (truncated).", restartable=True)
    profile_start_step: int = setting("int", -1, "Start an XLA profiler trace at this step (-1: off).",
                                      restartable=True)
    profile_num_steps: int = setting("int", 3, "Steps in the profiler trace.", restartable=True)
    profile_compile: bool = setting("bool", False, "Let the trace include the run's first step (its compilation); "
                                    "by default a window starting there begins one step later.", restartable=True)

    @property
    def n_topics(self) -> int:
        return len(self.forget_corpora)



SETTINGS = {f.name: f.metadata for f in dataclasses.fields(RunConfig)}
_DEFINE = {"bool": flags.DEFINE_bool, "int": flags.DEFINE_integer, "float": flags.DEFINE_float,
           "str": flags.DEFINE_string, "list": flags.DEFINE_list, "ints": flags.DEFINE_list,
           "topic_floats": flags.DEFINE_list, "topic_ints": flags.DEFINE_list, "floats": flags.DEFINE_list}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """One absl flag per RunConfig field (idempotent)."""
    for name, meta in SETTINGS.items():
        if name in flag_values:
            continue
        if meta["kind"] == "enum":
            flags.DEFINE_enum(name, meta["default"], meta["choices"], meta["help"], flag_values=flag_values)
        else:
            _DEFINE[meta["kind"]](name, meta["default"], meta["help"], flag_values=flag_values)


def _numbers(name: str, values, kind, n_topics: int | None) -> tuple:
    try:
        parsed = tuple(kind(v) for v in values)
    except ValueError:
        raise UserError(f"--{name}={','.join(map(str, values))}: not a list of numbers") from None
    if n_topics is None:
        return parsed
    if len(parsed) == 1:
        return parsed * n_topics
    if len(parsed) != n_topics:
        raise UserError(f"--{name} has {len(parsed)} values but there are {n_topics} forget topics; "
                        "give one value per topic or a single value for all")
    return parsed


def _parse(name: str, kind: str, value, n_topics: int):
    if value is None or kind in ("bool", "int", "float", "str", "enum"):
        return value
    if kind == "list":
        return tuple(str(v) for v in value)
    if kind == "ints":
        return _numbers(name, value, int, None)
    if kind == "floats":
        return _numbers(name, value, float, None)
    return _numbers(name, value, float if kind == "topic_floats" else int, n_topics)


def build(values: dict) -> RunConfig:
    """Flag values (lists of strings for list flags) -> a validated RunConfig."""
    n = len(values["forget_corpora"])
    if n == 0:
        raise UserError("--forget_corpora is empty; name at least one forget corpus")
    parsed = {name: _parse(name, SETTINGS[name]["kind"], values[name], n) for name in SETTINGS}
    retain = parsed["retain_corpora"]
    if len(retain) not in (1, n):
        raise UserError(f"--retain_corpora has {len(retain)} entries for {n} forget topics; "
                        "give one per topic or one for all")
    parsed["retain_corpora"] = retain * n if len(retain) == 1 else retain
    layer = parsed["layer_id"]
    if not parsed["update_layer_ids"]:
        parsed["update_layer_ids"] = tuple(i for i in (layer - 2, layer - 1, layer) if i >= 0)
    parsed["export_dtype"] = parsed["export_dtype"] or parsed["dtype"]
    cfg = RunConfig(**parsed)
    validate(cfg)
    return cfg


def _override(values: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        if key not in SETTINGS:
            raise UserError(f"unknown setting {key!r}")
        is_list = SETTINGS[key]["kind"] in ("list", "ints", "floats", "topic_floats", "topic_ints")
        if is_list and isinstance(value, str):
            value = value.split(",")
        values[key] = [str(v) for v in value] if is_list and value is not None else value
    return values


def from_flag_values(flag_values: flags.FlagValues = flags.FLAGS) -> RunConfig:
    """The parsed flags as a validated RunConfig (checks that need the model happen later)."""
    return build({name: flag_values[name].value for name in SETTINGS})


def config_with(**overrides) -> RunConfig:
    """The defaults with overrides (Python values; lists for list settings), for library use and tests."""
    return build(_override({name: meta["default"] for name, meta in SETTINGS.items()}, overrides))


def from_flagfile(path: str | Path, **overrides) -> RunConfig:
    """A flagfile's settings (over the defaults) with overrides, parsed without the global FLAGS."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"flagfile {path} does not exist")
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    try:
        flag_values(["armu_jax", f"--flagfile={path}"])
    except flags.Error as err:
        raise UserError(f"flagfile {path}: {err}") from None
    return build(_override({name: flag_values[name].value for name in SETTINGS}, overrides))


def flagfile_text(cfg: RunConfig) -> str:
    """cfg as a flagfile (what from_flagfile reads back to the same RunConfig), one flag a line."""
    lines = []
    for name, value in dataclasses.asdict(cfg).items():
        if name in ("resume", "overwrite", "allow_flag_changes") or value is None:
            continue
        if isinstance(value, (tuple, list)):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            value = str(value).lower()
        lines.append(f"--{name}={value}")
    return "\n".join(lines) + "\n"


def differences(saved: RunConfig, now: RunConfig) -> list[str]:
    """Settings (other than output, logging and evaluation) in which `now` differs from `saved`."""
    return [f"--{name}: run has {getattr(saved, name)!r}, now {getattr(now, name)!r}"
            for name, meta in SETTINGS.items()
            if not meta["restartable"] and getattr(saved, name) != getattr(now, name)]


def validate(cfg: RunConfig, model_cfg=None) -> None:
    """Checks on the config alone, and with the model's ModelConfig those that need the model."""
    if cfg.batch_size < 1:
        raise UserError(f"--batch_size={cfg.batch_size}: must be at least 1")
    if cfg.method == "adaptive_rmu" and cfg.beta <= 0:
        raise UserError(f"--beta={cfg.beta}: must be > 0 (the paper uses 2, 3, 5 or 10)")
    if cfg.max_num_batches < 1:
        raise UserError(f"--max_num_batches={cfg.max_num_batches}: must be at least 1")
    if cfg.pad_multiple < 1 or cfg.log_every < 1 or cfg.checkpoint_every < 0:
        raise UserError("--pad_multiple and --log_every must be >= 1, --checkpoint_every >= 0")
    if cfg.eval_every < 0 or cfg.eval_limit < 0 or cfg.eval_batch_size < 1 or cfg.eval_nll_tokens < 2:
        raise UserError("--eval_every and --eval_limit must be >= 0, --eval_batch_size >= 1, --eval_nll_tokens >= 2")
    if cfg.lr <= 0:
        raise UserError(f"--lr={cfg.lr}: must be > 0")
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    if any(a < 0 for a in cfg.alpha):
        raise UserError("--alpha values must be >= 0")
    if any(l < 0 for l in cfg.update_layer_ids) or cfg.layer_id < 0:
        raise UserError(f"--layer_id={cfg.layer_id} / --update_layer_ids must be >= 0")
    if max(cfg.update_layer_ids) > cfg.layer_id:
        raise UserError(f"--update_layer_ids={','.join(map(str, cfg.update_layer_ids))} include layers above "
                        f"--layer_id={cfg.layer_id}; updated layers must be at or below the unlearn layer")
    if model_cfg is None:
        return
    layers = model_cfg.num_hidden_layers
    if cfg.layer_id >= layers:
        raise UserError(f"--layer_id={cfg.layer_id} is outside the model's {layers} layers (valid: 0..{layers - 1})")
