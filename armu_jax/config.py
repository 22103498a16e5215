"""Every setting, written once: a field of RunConfig with its flag kind, default and help.

The absl flags (and so `--flagfile`) are generated from these fields, and one function turns
flag values into the frozen RunConfig that library code takes. Library code and tests read a
flagfile with `from_flagfile(path, **overrides)` or start from the defaults with
`config_with(**overrides)`; neither touches the process-wide `absl.flags.FLAGS`.
"""
from __future__ import annotations

import atexit
import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from absl import flags

from armu_jax import storage
from armu_jax.errors import UserError

DTYPE_NAMES = ("float32", "bfloat16", "float16")


# The groups, in the order of --help and docs/flags.md. "training" is what an unlearning run is: --resume
# compares it with the run's flags.txt; every other group may change between a run and its resumption.
GROUPS = {
    "mode": "What to do.",
    "training": "The unlearning run: method, model, data, optimisation (--resume requires the same).",
    "hosts": "Several processes (TPU pod workers, SLURM tasks, or started by hand).",
    "output": "The run directory, checkpoints, export, logging and profiling.",
    "evaluation": "The native evaluator and lm-eval (--mode=eval, lm_eval, sweep, attack, --eval_every).",
    "compile": "--mode=compile: the ahead-of-time compile report.",
    "sweep": "--mode=sweep: layers x methods x settings, each cell a run.",
    "tune": "--mode=tune: a constrained search over the training settings (Optuna), many workers on one study; "
            "--tune_storage also spreads a sweep's cells over workers.",
    "norms": "--mode=norms: every layer's activation norm on the corpora.",
    "attack": "--mode=attack: ablation and relearning attacks on a run's export.",
    "parity": "--mode=parity: the Flax port against transformers.",
}


def setting(group: str, kind: str, default, help: str, choices=None, bound: str | None = None):
    """A RunConfig field. group: one of GROUPS. kind: bool, int, float, str, enum, list (strings), ints,
    floats, topic_floats or topic_ints (one value per forget topic, or one for all). bound: ">=N" or
    ">N", checked for the value (every value of a list) before anything runs."""
    assert group in GROUPS, group
    return field(metadata={"group": group, "kind": kind, "default": default, "help": help, "choices": choices,
                           "bound": bound})


@dataclass(frozen=True)
class RunConfig:
    # -- mode
    mode: str = setting("mode", "enum", "train", "train: unlearn; eval: native JAX evaluation of --model; "
                        "lm_eval: lm-eval's hf backend on --model; compile: ahead-of-time compile report of "
                        "the step (memory per device, FLOPs); attack: robustness attacks on --run_dir's export; norms: "
                        "every layer's activation norm on the corpora (choosing c); sweep: layers x methods, each cell a run "
                        "evaluated on --eval_tasks; parity: the Flax port against transformers on --model "
                        "(logits, layers; exit 1 above the tolerance); tune: search the settings named by --tune_space "
                        "(trials scored on the validation split, the chosen one on the test split).",
                        ["train", "eval", "lm_eval", "compile", "attack", "norms", "sweep", "parity", "tune"])
    # -- training
    method: str = setting("training", "enum", "adaptive_rmu", "Unlearning method.", ["rmu", "adaptive_rmu"])
    model: str = setting("training", "str", "smollm2-135m", "HF model directory, or an embedded model: smollm2-135m (the default) or gemma3-270m.")
    layer_id: int = setting("training", "int", 7, "Unlearn layer l: its residual-stream output is steered.", bound=">=0")
    update_layer_ids: tuple = setting("training", "ints", None, "Layers whose parameters are updated (default l-2,l-1,l).", bound=">=0")
    update_params: tuple = setting("training", "list", ["default"], "Parameter names updated in those layers: projections "
                                   "(mlp.down_proj), norms (post_feedforward_layernorm) or biases (self_attn.q_proj.bias); "
                                   "default: the family's (mlp.down_proj; Gemma-2/3 and OLMo-2 add "
                                   "post_feedforward_layernorm, which re-normalises down_proj's output).")
    forget_corpora: tuple = setting("training", "list", ["demo:bio", "demo:cyber"], "One forget corpus per topic.")
    retain_corpora: tuple = setting("training", "list", ["demo:retain", "demo:retain"],
                                    "One retain corpus per topic (one value: all).")
    alpha: tuple = setting("training", "topic_floats", ["1200"], "Retain weight per topic (one value: all).", bound=">=0")
    steering_coeffs: tuple = setting("training", "topic_floats", ["6.5"], "RMU steering coefficient c per topic (one value: all).", bound=">=0")
    beta: float = setting("training", "float", 5.0, "Adaptive RMU scale: coeff = beta * ||h_l^frozen||.", bound=">0")
    adaptive_coeff: str = setting("training", "enum", "first_batch", "per_batch: paper (frozen norm of every forget batch); "
                                  "first_batch: public code.", ["per_batch", "first_batch"])
    norm_skip_first: bool = setting("training", "bool", False, "Exclude each row's first real token (the attention sink) "
                                    "from the adaptive norm.")
    lr: float = setting("training", "float", 5e-5, "Learning rate.", bound=">0")
    batch_size: int = setting("training", "int", 4, "Texts per forget/retain batch.", bound=">=1")
    max_num_batches: int = setting("training", "int", 150, "Number of update steps (capped by the data).", bound=">=1")
    forget_max_len: tuple = setting("training", "topic_ints", ["512", "768"], "Max tokens per forget topic (one value: all).", bound=">=1")
    retain_max_len: int = setting("training", "int", 512, "Max tokens of retain texts.", bound=">=1")
    min_len: int = setting("training", "int", 0, "Keep texts with more than this many characters.", bound=">=0")
    pad_multiple: int = setting("training", "int", 128, "Pad batches to a multiple of this length (one compile per shape).", bound=">=1")
    pack_tokens: bool = setting("training", "bool", True, "Run the per-token work of the step (projections, MLPs) on "
                                "the real tokens and one pad token standing for every pad position, packed to a "
                                "multiple of --pad_multiple (armu_jax.packing; same results, fewer FLOPs); false: "
                                "on every padded position, as the reference.")
    step_programs: int = setting("training", "int", 6, "At most this many programs a run compiles for its step "
                                 "(one per planned batch shape, and one per retain shape): before step 0 the run "
                                 "plans a few shapes its batches are padded up to (armu_jax.shapes) and compiles "
                                 "them side by side while the weights load.", bound=">=2")
    seed: int = setting("training", "int", 42, "Seed of the control vectors.", bound=">=0")
    data_seed: int = setting("training", "int", None, "Shuffle each corpus with this seed before it is chunked "
                             "(default: none, the reference's file order); with --seeds, seed k adds k.", bound=">=0")
    loss_mask: str = setting("training", "enum", "none", "none: reference (pads in the MSE); tokens: real tokens only; "
                             "tokens_after_first: real tokens except each row's first (the attention sink).",
                             ["none", "tokens", "tokens_after_first"])
    optimizer: str = setting("training", "enum", "hf_adamw", "hf_adamw: reference arithmetic.", ["hf_adamw", "adamw"])
    dtype: str = setting("training", "enum", "float32", "Parameter and compute dtype (training and evaluation).",
                         ["float32", "bfloat16"])
    mesh: str = setting("training", "str", "data:1", "Device mesh, e.g. data:1, fsdp:-1, data:2,fsdp:4.")
    control_vectors: str = setting("training", "str", None, ".npy [n_topics, hidden] of unit rows, used instead of drawing.")
    # -- hosts
    multihost: bool = setting("hosts", "bool", False, "Several processes (TPU pod workers, SLURM tasks): "
                              "jax.distributed.initialize() finds the others from the environment.")
    coordinator_address: str = setting("hosts", "str", None, "Several processes started by hand: HOST:PORT of process 0 "
                                       "(with --num_processes and --process_id).")
    num_processes: int = setting("hosts", "int", None, "Several processes started by hand: how many.", bound=">=1")
    process_id: int = setting("hosts", "int", None, "Several processes started by hand: this one's index, 0..N-1.", bound=">=0")
    # -- output
    export_dtype: str = setting("output", "enum", None, "dtype of the HF export (default: --dtype).", DTYPE_NAMES)
    output_dir: str = setting("output", "str", None, "Run directory (must be new or empty unless --resume/--overwrite).")
    checkpoint_every: int = setting("output", "int", 50, "Checkpoint every N steps (0: only at the end).", bound=">=0")
    keep_checkpoints: int = setting("output", "int", 3, "Newest checkpoints kept.", bound=">=1")
    resume: bool = setting("output", "bool", False, "Continue the run in --output_dir from its last checkpoint.")
    allow_flag_changes: bool = setting("output", "bool", False, "With --resume: continue although settings differ from "
                                       "the run's flags.txt.")
    overwrite: bool = setting("output", "bool", False, "Delete a non-empty --output_dir and start afresh.")
    seeds: int = setting("output", "int", 1, "Runs per setting: K runs whose control vectors are drawn with --seed, "
                         "--seed+1, ... (and data orders with --data_seed+k when it is given): a run writes "
                         "<output_dir>/seed_<s>/ each, a sweep runs every cell K times and a tune's trial is K runs, "
                         "reported as the mean with an interval over seeds and questions (--mode=train, sweep and "
                         "tune only).", bound=">=1")
    log_every: int = setting("output", "int", 10, "The cadence of the frozen-side metrics (cosines and norms of the "
                             "updated against the frozen model): on steps 0, N, 2N, ... and the last; every step "
                             "logs loss, forget and retain losses, coefficient and gradient norm. 1: all of them every "
                             "step (the frozen forget forward then runs every step also where the loss needs none).",
                             bound=">=1")
    export: bool = setting("output", "bool", True, "Write the final HF export to <output_dir>/hf.")
    profile_start_step: int = setting("output", "int", -1, "Start an XLA profiler trace at this step (-1: off).", bound=">=-1")
    profile_num_steps: int = setting("output", "int", 3, "Steps in the profiler trace.", bound=">=1")
    profile_compile: bool = setting("output", "bool", False, "Let the trace include the run's first step (its compilation); "
                                    "by default a window starting there begins one step later.")
    # -- evaluation
    eval_every: int = setting("evaluation", "int", 0, "Evaluate --eval_tasks every N steps during a run (0: never).", bound=">=0")
    eval_tasks: tuple = setting("evaluation", "list", ["demo"], "demo, demo_bio|cyber|retain, mmlu[:DIR], "
                                "wmdp_neighbours[:DIR], wmdp_report[:DIR], wmdp_bio:FILE, wmdp_cyber:FILE, FILE.jsonl "
                                "(WMDP format); with --mode=lm_eval also lm-eval task names.")
    eval_limit: int = setting("evaluation", "int", 0, "Items per evaluation task (0: all), the first of --eval_split's.", bound=">=0")
    eval_split: str = setting("evaluation", "enum", "test", "Which items of each task are scored: test (every reported "
                              "number), validation (what --mode=tune searches on; the other half), all (the whole "
                              "benchmark). One split for the project (armu_jax/tasks.py).",
                              ["test", "validation", "all"])
    eval_batch_size: int = setting("evaluation", "int", 16, "Sequences per evaluation batch.", bound=">=1")
    eval_nll_tokens: int = setting("evaluation", "int", 128, "Held-out NLL over each text's first N tokens.", bound=">=2")
    eval_generate: int = setting("evaluation", "int", 0, "--mode=eval: greedy continuations of N held-out prompts per "
                                 "task (the first words of its texts or questions), with their fluency: repetition and "
                                 "the NLL of the text under --eval_fluency_model (0: none).", bound=">=0")
    eval_generate_tokens: int = setting("evaluation", "int", 32, "--mode=eval: new tokens per continuation.", bound=">=1")
    eval_fluency_model: str = setting("evaluation", "str", None, "--mode=eval: the model whose NLL of a continuation "
                                      "measures its fluency (e.g. the original model; default: the model evaluated).")
    # -- compile
    topology: str = setting("compile", "str", None, "--mode=compile: a TPU slice to compile for, e.g. v5e:2x4, v5e:4x4, "
                            "v4:2x2x1 (needs libtpu; default: this machine's devices).")
    xla_dump_dir: str = setting("compile", "str", None, "--mode=compile: dump the compiled HLO here.")
    # -- sweep
    sweep_layers: str = setting("sweep", "str", None, "--mode=sweep: unlearn layers, START:STOP:STEP (Python range, "
                                "STOP excluded) or a list 3,7,11 (default: --layer_id). The updated layers keep "
                                "their offsets from --layer_id (default l-2, l-1, l).")
    sweep_methods: tuple = setting("sweep", "list", ["rmu", "adaptive_rmu"], "--mode=sweep: methods.")
    sweep_steering_coeffs: tuple = setting("sweep", "floats", None, "--mode=sweep: RMU's c values, each for every topic "
                                           "(default: --steering_coeffs).", bound=">=0")
    sweep_betas: tuple = setting("sweep", "floats", None, "--mode=sweep: Adaptive RMU's beta values (default: --beta).", bound=">0")
    sweep_alphas: tuple = setting("sweep", "list", None, "--mode=sweep: alpha values, each for every topic or one per "
                                  "topic joined by / (1800/300) (default: --alpha).")
    cells_per_step: int = setting("sweep", "int", 1, "--mode=sweep: train up to K cells of one layer side by side in one "
                                  "compiled step (vmapped over their methods' numbers, control vectors and states; the "
                                  "batches and the frozen model's activations shared); each cell's metrics, checkpoints "
                                  "and result are those of the cell run alone.", bound=">=1")
    # -- tune
    tune_space: str = setting("tune", "str", None, "--mode=tune: the searched settings, comma-separated, each "
                              "setting:low:high[:log] or setting:a|b|c (a topic's value: alpha.1:30:3000:log), e.g. "
                              "layer_id:3:9,beta:2:12:log,lr:1e-3:1e-2:log,method:rmu|adaptive_rmu; the rest from the flagfile.")
    tune_trials: int = setting("tune", "int", 20, "--mode=tune: finished (complete or pruned) trials in the study; every "
                               "worker stops when the study has them.", bound=">=1")
    tune_storage: str = setting("tune", "str", None, "Optuna storage of the study: an RDB URL (sqlite:///PATH, "
                                "postgresql://...), or journal:PATH (a journal file on a shared filesystem); default: "
                                "sqlite:///<output_dir>/study.db. Given with --mode=sweep, the sweep's cells are spread "
                                "over every worker started with the same command.")
    tune_study: str = setting("tune", "str", None, "Study name in the storage (default: tune, or sweep with --mode=sweep).")
    tune_retain_budget: str = setting("tune", "str", "acc:2,nll:0.05", "--mode=tune: the retain tasks' allowed loss against "
                                      "the original model, acc:POINTS and/or nll:NAT_PER_TOKEN (a constraint).")
    tune_max_trial_seconds: float = setting("tune", "float", 0.0, "--mode=tune: a run's time limit (its steps x their "
                                            "median step time, compilation excluded; a constraint; 0: none).", bound=">=0")
    tune_prune_every: int = setting("tune", "int", 30, "--mode=tune: report the forget tasks' held-out NLL every N steps "
                                    "from half of the run on and stop trials in the worst quarter (0: no pruning).", bound=">=0")
    tune_startup_trials: int = setting("tune", "int", 5, "--mode=tune: random trials before TPE (and before pruning).",
                                       bound=">=0")
    tune_attack: str = setting("tune", "enum", "none", "--mode=tune: score each trial's model also after this "
                               "attack (--relearn_* settings, texts the run did not use) and count the worse of "
                               "the two in the objective, so the chosen setting is one that holds.",
                               ["none", "relearn_retain", "relearn_forget"])
    tune_seed: int = setting("tune", "int", 0, "--mode=tune: the study's seed: trial k's random draws are seeded "
                             "from it and k, so workers started together never draw alike and the study is "
                             "reproducible from it.", bound=">=0")
    tune_heartbeat_seconds: int = setting("tune", "int", 60, "Workers' heartbeat: a trial whose worker is silent for "
                                          "2x this is failed and retried (once per trial).", bound=">=1")
    # -- norms
    norms_texts: int = setting("norms", "int", 64, "--mode=norms: texts of each corpus.", bound=">=1")
    norms_batch_size: int = setting("norms", "int", 16, "--mode=norms: texts per forward batch.", bound=">=1")
    # -- attack
    run_dir: str = setting("attack", "str", None, "--mode=attack: the unlearning run directory (flags.txt, control_vectors.npy, "
                           "hf/).")
    attacks: tuple = setting("attack", "list", ["ablate_u", "ablate_pca", "relearn_forget", "relearn_retain"],
                             "--mode=attack: ablate_u, ablate_pca, relearn_forget, relearn_retain, relearn_rtt "
                             "(relearn on the forget tasks' validation facts, score their test items), kshot "
                             "(--kshot answered validation questions before each forget question).")
    kshot: int = setting("attack", "int", 5, "kshot: answered forget-topic examples (validation items) before each "
                         "question.", bound=">=1")
    ablate_k: int = setting("attack", "int", 4, "ablate_pca: principal directions of (unlearned - original) layer-l "
                            "activations on forget texts projected out.", bound=">=1")
    relearn_texts: int = setting("attack", "int", 10, "Relearning and PCA: texts (K) the run did not train on, drawn "
                                 "with --attack_seed.", bound=">=1")
    relearn_steps: int = setting("attack", "int", 5, "Relearning: AdamW steps (S), each over all K texts.", bound=">=0")
    relearn_lr: float = setting("attack", "float", 1e-5, "Relearning: learning rate.", bound=">=0")
    relearn_weight_decay: float = setting("attack", "float", 0.01, "Relearning: AdamW's decoupled weight decay.", bound=">=0")
    relearn_params: tuple = setting("attack", "list", ["layers"], "Relearning: layers (every parameter of "
                                    "--relearn_layers), all (every parameter of the model; AdamW then holds 4 more "
                                    "copies of it), or names such as mlp.down_proj in --relearn_layers.")
    relearn_layers: tuple = setting("attack", "ints", None, "Relearning: layers of --relearn_params (default: the run's "
                                    "updated layers).", bound=">=0")
    relearn_max_len: int = setting("attack", "int", 128, "Relearning and PCA: tokens per text.", bound=">=2")
    attack_seed: int = setting("attack", "int", 42, "--mode=attack: seed of the draw of the unused texts "
                               "(relearning and PCA).", bound=">=0")
    attack_controls: bool = setting("attack", "bool", True, "Also relearn the original model (the controls).")
    # -- parity
    parity_texts: str = setting("parity", "str", None, "--mode=parity: texts to run (.txt one a line, or .jsonl with "
                                "\"text\"); default: four built-in texts.")
    parity_max_len: int = setting("parity", "int", 64, "--mode=parity: tokens per text (truncated).", bound=">=1")

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


def check_flagfile(path: str | Path) -> None:
    """A flagfile is UTF-8 text whose lines are --flags, comments (#, //) or blank; absl would skip any
    other line without a word."""
    path = storage.path(path, "--flagfile")
    if not path.is_file():
        raise UserError(f"flagfile {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"flagfile {path} is not UTF-8 text (byte {err.start + 1}); save it as UTF-8") from None
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if text and not text.startswith(("-", "#", "//")):
            raise UserError(f"flagfile {path}:{number}: {text[:60]!r} is not a flag; write it as --name=value")


def local_flagfile(path) -> str:
    """A flagfile absl can open: a local path as it is, a gs:// one copied to a temporary file
    (removed at exit)."""
    if not storage.is_url(path):
        return str(path)
    handle, name = tempfile.mkstemp(prefix="armu_jax-flags-", suffix=".txt")
    os.close(handle)
    atexit.register(lambda: os.path.exists(name) and os.unlink(name))
    Path(name).write_text(storage.path(path).read_text(encoding="utf-8"), encoding="utf-8")
    return name


def from_flagfile(path: str | Path, **overrides) -> RunConfig:
    """A flagfile's settings (over the defaults) with overrides, parsed without the global FLAGS
    (a flagfile in a bucket is read through a local copy: absl opens local files only)."""
    path = storage.path(path, "--flagfile")
    check_flagfile(path)
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    try:
        flag_values(["armu_jax", f"--flagfile={local_flagfile(path)}"])
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


def seed_configs(cfg: RunConfig) -> list[RunConfig]:
    """The --seeds runs of cfg: seed + k (and data_seed + k when given), k = 0..K-1, each with seeds=1."""
    return [dataclasses.replace(cfg, seed=cfg.seed + k, seeds=1,
                                data_seed=None if cfg.data_seed is None else cfg.data_seed + k) for k in range(cfg.seeds)]


def differences(saved: RunConfig, now: RunConfig) -> list[str]:
    """The training settings in which `now` differs from `saved` (what --resume refuses)."""
    return [f"--{name}: run has {getattr(saved, name)!r}, now {getattr(now, name)!r}"
            for name, meta in SETTINGS.items()
            if meta["group"] == "training" and getattr(saved, name) != getattr(now, name)]


def bound_error(name: str, value, bound: str | None) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return f"--{name}={value}: must be a finite number"
    if bound is None:
        return None
    strict = not bound.startswith(">=")
    limit = bound.lstrip(">=")
    ok = value > float(limit) if strict else value >= float(limit)
    return None if ok else f"--{name}={value}: must be {_bound_text(bound)}"


def check_bounds(cfg: RunConfig) -> None:
    """Every numeric setting against its bound (and finite): one line naming the first that is not."""
    for name, meta in SETTINGS.items():
        value = getattr(cfg, name)
        if value is None or meta["kind"] in ("bool", "str", "enum", "list"):
            continue
        for v in value if isinstance(value, tuple) else (value,):
            error = bound_error(name, v, meta["bound"])
            if error:
                raise UserError(error)


def check_training(cfg: RunConfig) -> None:
    if cfg.update_layer_ids and max(cfg.update_layer_ids) > cfg.layer_id:
        raise UserError(f"--update_layer_ids={','.join(map(str, cfg.update_layer_ids))} include layers above "
                        f"--layer_id={cfg.layer_id}; updated layers must be at or below the unlearn layer")
    if not cfg.update_layer_ids:
        raise UserError("--update_layer_ids is empty; name at least one layer at or below --layer_id")
    if cfg.loss_mask == "tokens_after_first" or cfg.norm_skip_first:
        short = min((*cfg.forget_max_len, cfg.retain_max_len))
        if short < 2:
            raise UserError(f"a maximum length of {short} token with --loss_mask=tokens_after_first or "
                            "--norm_skip_first leaves no token to weigh; use lengths of at least 2")


def check_host_arguments(coordinator_address, num_processes, process_id) -> None:
    """The hosts group: the three hand-started settings go together, and the index is in range."""
    explicit = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise UserError("--coordinator_address, --num_processes and --process_id go together; give all three, "
                        "or none and --multihost to read them from the cluster (TPU VM, SLURM)")
    if coordinator_address is not None and not 0 <= process_id < num_processes:
        raise UserError(f"--process_id={process_id} must be in 0..{num_processes - 1} (--num_processes)")


def check_hosts(cfg: RunConfig) -> None:
    check_host_arguments(cfg.coordinator_address, cfg.num_processes, cfg.process_id)


def check_evaluation(cfg: RunConfig) -> None:
    if cfg.mode == "lm_eval" and cfg.mesh != SETTINGS["mesh"]["default"]:
        raise UserError(f"--mesh={cfg.mesh} applies to the JAX evaluator (--mode=eval); lm-eval's hf backend "
                        "places the torch model itself (on CUDA when torch has it)")


def check_output(cfg: RunConfig) -> None:
    if cfg.seeds > 1 and cfg.mode not in ("train", "sweep", "tune"):
        raise UserError(f"--seeds={cfg.seeds} applies to --mode=train, sweep and tune only (--mode={cfg.mode} "
                        "scores one model)")
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    if cfg.profile_start_step >= 0 and cfg.output_dir and storage.is_url(cfg.output_dir):
        raise UserError(f"--profile_start_step with --output_dir={cfg.output_dir}: the profiler writes its trace to a "
                        "local directory; profile a run with a local --output_dir")


ATTACKS = ("ablate_u", "ablate_pca", "relearn_forget", "relearn_retain", "relearn_rtt", "kshot")


def check_attack(cfg: RunConfig) -> None:
    unknown = [a for a in cfg.attacks if a not in ATTACKS]
    if unknown or not cfg.attacks:
        raise UserError(f"--attacks: unknown attack {unknown[0] if unknown else '(none given)'}; "
                        f"choose from {', '.join(ATTACKS)}")


def check_sweep(cfg: RunConfig) -> None:
    bad = [m for m in cfg.sweep_methods if m not in ("rmu", "adaptive_rmu")]
    if bad or not cfg.sweep_methods:
        raise UserError(f"--sweep_methods={','.join(cfg.sweep_methods)}: choose from rmu, adaptive_rmu")
    for spec in cfg.sweep_alphas or ():
        sweep_alpha(spec, cfg.n_topics)
    if cfg.mode == "sweep" and not cfg.output_dir:
        raise UserError("--mode=sweep needs --output_dir (the sweep's directory: cells/, sweep.csv, sweep.png)")
    if cfg.mode == "sweep" and cfg.overwrite:
        raise UserError("--mode=sweep continues the sweep in --output_dir; to start afresh choose a new --output_dir")
    if cfg.cells_per_step > 1 and cfg.mode != "sweep":
        raise UserError(f"--cells_per_step={cfg.cells_per_step} applies to --mode=sweep only (a tune's trials run one at "
                        "a time: each is chosen from the ones before)")
    if cfg.cells_per_step > 1 and cfg.tune_storage:
        raise UserError(f"--cells_per_step={cfg.cells_per_step} with --tune_storage: workers claim one cell at a time; "
                        "spread the cells over workers or train them side by side in one process, not both")


def sweep_alpha(spec: str, n_topics: int) -> tuple[float, ...]:
    """One --sweep_alphas entry: a value for every topic, or one per topic joined by /."""
    try:
        values = tuple(float(v) for v in spec.split("/"))
    except ValueError:
        values = ()
    if len(values) not in (1, n_topics) or any(not v >= 0 or not math.isfinite(v) for v in values):
        raise UserError(f"--sweep_alphas entry {spec!r}: give a number >= 0 or {n_topics} joined by / (one per topic)")
    return values * n_topics if len(values) == 1 else values


# Each group's checks beyond the bounds (which stand beside each setting); run on every RunConfig.
CHECKS = {"training": check_training, "hosts": check_hosts, "output": check_output, "evaluation": check_evaluation,
          "attack": check_attack,
          "sweep": check_sweep}  # the tune's grammar is checked by the tune (search.check), where it lives


def validate(cfg: RunConfig, model_cfg=None) -> None:
    """Checks on the config alone, and with the model's ModelConfig those that need the model."""
    check_bounds(cfg)
    for check in CHECKS.values():
        check(cfg)
    if model_cfg is None:
        return
    layers = model_cfg.num_hidden_layers
    if cfg.layer_id >= layers:
        raise UserError(f"--layer_id={cfg.layer_id} is outside the model's {layers} layers (valid: 0..{layers - 1})")


# ----------------------------------------------------------------------------- the reference

def _bound_text(bound: str) -> str:
    return f"at least {bound[2:]}" if bound.startswith(">=") else f"> {bound[1:]}"


def _default_text(meta: dict) -> str:
    value = meta["default"]
    if value is None:
        return "(none)"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


def help_text() -> str:
    """`python -m armu_jax.main --help`: the tool's settings by group (absl's own: --helpfull)."""
    lines = ["python -m armu_jax.main [--flagfile=FILE] [--SETTING=VALUE ...]", "",
             "Settings by group (docs/flags.md has the same reference; --helpfull adds absl's own flags)."]
    for group, about in GROUPS.items():
        lines += ["", f"{group}: {about}"]
        for name, meta in SETTINGS.items():
            if meta["group"] != group:
                continue
            extra = f" One of: {', '.join(meta['choices'])}." if meta["choices"] else ""
            bound = f" Must be {_bound_text(meta['bound'])}." if meta["bound"] else ""
            lines.append(f"  --{name} (default: {_default_text(meta)})")
            lines.append(f"      {meta['help']}{extra}{bound}")
    return "\n".join(lines) + "\n"


def flags_reference() -> str:
    """docs/flags.md, generated from the settings (a test fails when the file is stale)."""
    lines = ["# Flag reference", "",
             "Generated from `armu_jax/config.py` by `python -m armu_jax.config > docs/flags.md`; do not edit by hand.",
             "Every setting is a flag of `python -m armu_jax.main` and a line of a flagfile (`--flagfile=FILE`).",
             "`python -m armu_jax.main --help` prints the same by group.", ""]
    for group, about in GROUPS.items():
        lines += [f"## {group}", "", about, "", "| flag | default | help |", "|---|---|---|"]
        for name, meta in SETTINGS.items():
            if meta["group"] != group:
                continue
            extra = f" One of: {', '.join(f'`{c}`' for c in meta['choices'])}." if meta["choices"] else ""
            bound = f" Must be {_bound_text(meta['bound'])}." if meta["bound"] else ""
            text = (meta["help"] + extra + bound).replace("|", "\\|")
            lines.append(f"| `--{name}` | `{_default_text(meta)}` | {text} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(flags_reference(), end="")
