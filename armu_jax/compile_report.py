"""--mode=compile: the step of a flagfile compiled ahead of time, for a TPU topology or this machine.

The step is the one train.run runs (step.build_step), lowered on abstract parameters of the
model's shapes, read from its config.json alone (no weights: configs/models/ has Zephyr-7B and
Llama-3-8B). With --topology (e.g. v5e:2x4) it is compiled for that TPU slice through libtpu's
topology description, which works on a machine without TPUs (`pip install 'jax[tpu]==0.10.2'`).
XLA's memory analysis gives the bytes per device, its cost analysis the FLOPs of a step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from armu_jax import outputs, sharding, storage
from armu_jax.config import RunConfig, validate
from armu_jax.data import DataSpec, UnlearningData, load_tokenizer
from armu_jax.errors import UserError
from armu_jax.families import read_model_config
from armu_jax.model import abstract_params
from armu_jax.model_config import ModelConfig
from armu_jax.params import truncate
from armu_jax.shapes import plan_steps
from armu_jax.shipped import resolve_model
from armu_jax.step import StepSpec, build_step, executable_flops

GIB = 1024 ** 3


@dataclass(frozen=True)
class Chip:
    hbm_bytes: int
    bf16_flops: float  # peak per chip


# Published per-chip HBM and bf16 peak (Cloud TPU system architecture pages).
CHIPS = {"v4": Chip(32 * GIB, 275e12), "v5e": Chip(16 * GIB, 197e12), "v5p": Chip(95 * GIB, 459e12),
         "v6e": Chip(32 * GIB, 918e12)}


def topology_devices(topology: str):
    """The devices of a TPU topology such as v5e:2x4 (no TPU needed, libtpu is)."""
    generation = topology.split(":")[0]
    if generation not in CHIPS or ":" not in topology:
        raise UserError(f"--topology={topology}: use GENERATION:SHAPE with a generation from "
                        f"{', '.join(CHIPS)}, e.g. v5e:2x4, v5e:4x4, v4:2x2x1, v5p:2x2x1")
    try:
        from jax.experimental import topologies  # a private or experimental jax module, loaded where it is used
        return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices
    except Exception as err:  # no libtpu, or a shape the generation does not have
        raise UserError(f"--topology={topology}: could not describe it ({str(err).splitlines()[0][:200]}); "
                        "install libtpu with pip install 'jax[tpu]==0.10.2' and use a valid slice shape") from None


def abstract_step(cfg: RunConfig, model_cfg: ModelConfig, devices=None):
    """(CompiledStep, frozen abstract params of layers 0..l) of cfg's step on its mesh over `devices`:
    built by step.build_step from shapes alone, nothing allocated."""
    spec = StepSpec.of(cfg, model_cfg, sharding.make_mesh(cfg.mesh, devices))
    frozen = truncate(abstract_params(spec.model), cfg.layer_id)
    vectors = np.ones((cfg.n_topics, model_cfg.hidden_size), np.float32) / np.sqrt(model_cfg.hidden_size)
    return build_step(spec, frozen).with_settings(cfg, vectors), frozen


def compile_step(cfg: RunConfig, model_cfg: ModelConfig, devices=None, dump_dir: str | None = None):
    """(compiled programs {"step", "retain"}, mesh, frozen abstract params, CompiledStep) of cfg's step for its
    largest batch shape."""
    step, frozen = abstract_step(cfg, model_cfg, devices)
    padded = lambda length: -(-length // cfg.pad_multiple) * cfg.pad_multiple
    shape = step.full_shape(padded(max(cfg.forget_max_len)), padded(cfg.retain_max_len))
    if dump_dir and storage.is_url(dump_dir):
        raise UserError(f"--xla_dump_dir={dump_dir}: XLA dumps to a local directory; pass a local path")
    options = {"xla_dump_to": str(Path(dump_dir).absolute())} if dump_dir else None
    programs = {"step": step.lower("step", shape).compile(compiler_options=options),
                "retain": step.lower("retain", shape.retain).compile(compiler_options=options)}
    return programs, step.mesh, frozen, step


def planned(cfg: RunConfig, model_cfg: ModelConfig, step) -> dict:
    """The run's step count and planned shapes (armu_jax.shapes) from its corpora and tokenizer when they are
    here; else the step count --max_num_batches allows and the budget of programs."""
    try:
        model_dir = resolve_model(cfg.model)
        data = UnlearningData.from_spec(DataSpec.of(cfg, model_dir, step.rows), load_tokenizer(model_dir))
    except (UserError, OSError, ValueError) as err:
        return {"steps": cfg.max_num_batches, "programs": cfg.step_programs, "shapes": None,
                "planned_from": f"not planned: {str(err).splitlines()[0][:160]}"}
    plan = plan_steps(data, data.num_steps(cfg.max_num_batches), step, model_cfg, cfg.step_programs)
    return {"steps": len(plan.steps), "programs": plan.programs, "shapes": [str(s) for s in plan.step_shapes],
            "planned_from": plan.describe()}


def report(cfg: RunConfig, model_cfg: ModelConfig) -> dict:
    devices = topology_devices(cfg.topology) if cfg.topology else None
    began = time.time()
    programs, mesh, frozen, step = compile_step(cfg, model_cfg, devices, cfg.xla_dump_dir)
    totals = {}
    for name, program in programs.items():
        mem = program.memory_analysis()
        totals[name] = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                        - mem.alias_size_in_bytes, mem)
    total, mem = max(totals.values(), key=lambda t: t[0])  # the larger program's (the step's, in practice)
    chip = CHIPS[cfg.topology.split(":")[0]] if cfg.topology else None
    # v4 slices are described one device per TensorCore (two per chip, each with half the HBM and
    # half the FLOPs); v5e has one core per chip and v5p one megacore device per chip.
    per_chip = len(devices) / len({tuple(d.coords) for d in devices}) if devices is not None else 1
    flops_per_device = sum(executable_flops(p) for p in programs.values())  # the partitioned programs: one device's
    return {
        "topology": cfg.topology or f"{jax.devices()[0].platform} (this machine)",
        "mesh": dict(mesh.shape), "devices": mesh.size, "dtype": cfg.dtype,
        "layer_id": cfg.layer_id, "batch_rows": sharding.batch_rows(mesh, cfg.batch_size),
        "params_billion": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen)) / 1e9,
        "per_device_bytes": {"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
                             "temporaries": mem.temp_size_in_bytes, "total": total},
        "devices_per_chip": per_chip,
        "device_memory_bytes": int(chip.hbm_bytes / per_chip) if chip else None,
        "fits": (total <= chip.hbm_bytes / per_chip) if chip else None,
        "flops_per_step": flops_per_device * mesh.size,
        "seconds_at_peak": flops_per_device / (chip.bf16_flops / per_chip) if chip else None,
        "compile_seconds": round(time.time() - began, 1),
        "plan": planned(cfg, model_cfg, step),
    }


def format_report(rep: dict) -> str:
    per = rep["per_device_bytes"]
    hbm = f"{rep['device_memory_bytes'] / GIB:.0f}" if rep["device_memory_bytes"] else "-"
    fits = {True: "yes", False: "NO", None: "-"}[rep["fits"]]
    peak = f"{1e3 * rep['seconds_at_peak']:.1f}" if rep["seconds_at_peak"] is not None else "-"
    mesh = ",".join(f"{k}:{v}" for k, v in rep["mesh"].items())
    return outputs.markdown_table(
        ["topology", "mesh", "GiB/device (args + temps)", "HBM GiB", "fits", "TFLOP/step", "ms at peak"],
        [[rep["topology"], mesh, f"{per['total'] / GIB:.2f} ({per['arguments'] / GIB:.2f} + "
          f"{per['temporaries'] / GIB:.2f})", hbm, fits, f"{rep['flops_per_step'] / 1e12:.2f}", peak]]) + (
        f"\n{rep['plan']['steps']} steps, at most {rep['plan']['programs']} step programs "
        f"({rep['plan']['planned_from']}); the table: the largest batch shape" if rep.get("plan") else "")


def compile_cli(cfg: RunConfig) -> dict:
    """--mode=compile: print the table and write <output_dir>/compile.json (never overwritten)."""
    model_cfg = read_model_config(resolve_model(cfg.model))
    validate(cfg, model_cfg)
    out = outputs.claim(cfg.output_dir, ("compile.json",)) if cfg.output_dir else None
    rep = report(cfg, model_cfg)
    print(format_report(rep))
    if out is not None:
        print(f"wrote {outputs.write_json(out / 'compile.json', rep)}")
    return rep
