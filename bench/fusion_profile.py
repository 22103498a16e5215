"""Where the JAX step's time goes, per XLA fusion: a profiler trace of the lean step (the run's step between
--log_every's) on one demo batch, each executed fusion's time joined to its HLO in the compiled program.

Prints the time per step by kind of fusion (dot fusions, elementwise, copies/transposes), the dots grouped by
shape with each shape's achieved GFLOP/s against this CPU's float32 matmul peak, and writes the whole table
as JSON with --out. Same model, layer and batch as bench/step_time.py.
Usage: python bench/fusion_profile.py [--batch 2] [--repeats 4] [--out fusions.json]
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import armu_jax  # noqa: E402,F401  (first, as in a run)

FUSION = re.compile(r"^\s*%?([\w.\-]+) = (\S+) fusion\(.*?calls=%?([\w.\-]+)", re.M)
COMPUTATION = re.compile(r"^%?([\w.\-]+) \([^\n]*\) -> [^\n]*\{\n(.*?)\n\}", re.M | re.S)
SHAPE = re.compile(r"\[([\d,]*)\]")


def dims(text: str) -> list[int]:
    match = SHAPE.search(text)
    return [int(d) for d in match.group(1).split(",") if d] if match else []


def dot_flops(body: str) -> tuple[float, str]:
    """2 x output elements x contraction length of the fusion's dot, and a label: forward or backward, the
    model's op it comes from (layer number dropped) and its [M, K] x [K, N] shape."""
    shapes = {m.group(1): dims(m.group(2)) for m in re.finditer(r"%?([\w.\-]+) = (\S+) parameter\(", body)}
    for line in body.splitlines():
        match = re.search(r"= (\S+) dot\(%?([\w.\-]+), %?([\w.\-]+)\)", line)
        contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
        if not match or not contract:
            continue
        out, lhs, rhs = dims(match.group(1)), shapes.get(match.group(2), []), shapes.get(match.group(3), [])
        k = math.prod(lhs[int(d)] for d in contract.group(1).split(",")) if lhs else 0
        op = re.search(r'op_name="([^"]*)"', line)
        where = source_of(op.group(1) if op else "").replace("/dot_general", "")
        return 2.0 * math.prod(out) * k, f"{where} {lhs}x{rhs}->{out}"
    return 0.0, ""


def source_of(op_name: str) -> str:
    """The model op an HLO instruction came from, forward or backward, its layer number dropped."""
    where = re.sub(r"^.*?(run_layers|hidden_upto)/(model[^/]*/)*", "", op_name)
    return f"{'backward' if 'transpose(' in op_name else 'forward'} {re.sub(r'layers_[0-9]+/', '', where)}"


def kind_of(name: str, body: str) -> str:
    if " dot(" in body or name.startswith("dot"):
        return "dot"
    if "transpose" in name or "copy" in name:
        return "copy/transpose"
    return "elementwise/reduce"


def profile(batch_index: int, repeats: int) -> dict:
    import jax
    from step_time import make_jax_side

    step = make_jax_side(512, 10)()
    compiled, frozen, data = step.compiled, step.frozen, step.data
    b = data.batch(batch_index)
    holder = {"state": step.holder["state"]}

    def run(times: int) -> None:
        for _ in range(times):
            holder["state"], metrics, _ = compiled.run(holder["state"], frozen, b.topic, b.forget, b.retain,
                                                       diagnostics=False)
            float(metrics["loss"])

    run(2)
    start = time.perf_counter()
    run(repeats)
    wall = (time.perf_counter() - start) / repeats
    hlo = compiled.executable("step", compiled.own_shape(b.forget, b.retain)).as_text()  # the retain side: its own
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            run(repeats)
        trace = next(Path(trace_dir).rglob("*.trace.json.gz"))
        events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    bodies = {m.group(1): m.group(2) for m in COMPUTATION.finditer(hlo)}
    calls = {m.group(1): bodies.get(m.group(3), "") for m in FUSION.finditer(hlo)}
    sources = dict(re.findall(r'^\s*%?([\w.\-]+) = [^\n]*?op_name="([^"]*)"', hlo, re.M))
    seconds = collections.Counter()
    for event in events:
        op = event.get("args", {}).get("hlo_op")
        if event.get("ph") == "X" and op:
            seconds[op] += event["dur"] / 1e6 / repeats
    rows = []
    for op, sec in seconds.items():
        body = calls.get(op, "")
        flops, label = dot_flops(body) if " dot(" in body else (0.0, "")
        rows.append({"op": op, "kind": kind_of(op, body), "seconds": sec, "flops": flops, "shape": label,
                     "source": source_of(sources.get(op, ""))})
    return {"wall_seconds": wall, "rows": rows, "tokens": [b.forget["input_ids"].shape, b.retain["input_ids"].shape]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2, help="which step's batch (bench/step_time.py's order)")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--out", help="write every fusion's row as JSON here")
    args = parser.parse_args()
    from step_time import matmul_peak
    result = profile(args.batch, args.repeats)
    peak = matmul_peak()
    rows = result["rows"]
    busy = sum(r["seconds"] for r in rows)
    print(f"lean step on batch {args.batch} (forget {result['tokens'][0]}, retain {result['tokens'][1]}): "
          f"{result['wall_seconds']:.3f} s wall; fusions busy {busy:.3f} s (thunks may overlap)")
    by_kind = collections.Counter()
    for r in rows:
        by_kind[r["kind"]] += r["seconds"]
    print("| kind | s/step | share |\n|---|---|---|")
    for kind, sec in by_kind.most_common():
        print(f"| {kind} | {sec:.3f} | {100 * sec / busy:.0f}% |")
    shapes = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for r in rows:
        if r["kind"] == "dot":
            entry = shapes[r["shape"]]
            entry[0] += 1
            entry[1] += r["seconds"]
            entry[2] += r["flops"]
    print(f"\nthis CPU's float32 matmul peak through XLA: {peak / 1e9:.1f} GFLOP/s")
    print("| dot | count | s/step | GFLOP/s | of peak |\n|---|---|---|---|---|")
    for shape, (count, sec, flops) in sorted(shapes.items(), key=lambda kv: -kv[1][1])[:15]:
        rate = flops / sec if sec else 0.0
        print(f"| {shape} | {count} | {sec:.3f} | {rate / 1e9:.1f} | {100 * rate / peak:.0f}% |")
    sources = collections.Counter()
    for r in rows:
        if r["kind"] != "dot":
            sources[r["source"]] += r["seconds"]
    print("\n| the rest, by the model op it came from | s/step |\n|---|---|")
    for source, sec in sources.most_common(12):
        print(f"| {source} | {sec:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({**result, "peak_flops": peak}, indent=1, default=str))


if __name__ == "__main__":
    main()
