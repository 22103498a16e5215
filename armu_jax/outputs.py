"""Where every mode's results go: one policy for output directories, files, tables and figures.

- claim(): the output directory a mode may write, checked before anything is computed: refused
  when it is a file, or when it already holds what the mode would write (`products`; without
  them, anything at all). Nothing is ever overwritten.
- build_directory: a directory (an export, the embedded cache) built beside its target and renamed.
- write_text / write_json / write_npy: atomic (storage.write_bytes: a temporary file and
  os.replace locally, one object upload on GCS), so a killed process leaves the old file or the
  new one, never half of one.
- markdown_table(): the markdown tables of every report.
- figure() / save_figure(): matplotlib with one backend (Agg, chosen once); save_figure returns
  the data drawn on each panel (lines, bars, reference lines), which the tests check.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from armu_jax import storage
from armu_jax.errors import RunFailure, UserError, first_line

DPI = 110


def claim(path, products: tuple[str, ...] | None = None, flag: str = "--output_dir",
          purpose: str = "", ignore: tuple[str, ...] = (), hint: str = "choose a new directory"):
    """The output directory, checked (nothing written): a new or empty directory (entries named in
    `ignore` aside), or with `products` one that holds none of them. A local path or a gs:// URL
    (storage.path: the bucket reachable and there). Raises UserError saying what to do (hint)."""
    if not path:
        raise UserError(f"{flag} is required{': ' + purpose if purpose else ''}")
    out = storage.path(path, flag)
    storage.check_bucket(out, flag)
    storage.refresh(out)
    if not storage.is_url(out) and out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file; pass a directory")
    if products is None:
        if out.is_dir() and any(p.name not in ignore for p in out.iterdir()):
            raise UserError(f"{flag} {out} exists and is not empty; {hint} (results are never overwritten)")
    else:
        taken = [name for name in products if (out / name).exists()]
        if taken:
            raise UserError(f"{out / taken[0]} exists; choose a new {flag} (results are never overwritten)")
    return out


def build_directory(target, build, replace: bool = False, clean_stale: bool = False, marker: str | None = None):
    """build(tmp) into a fresh directory beside target, then renamed to target: a failure or a kill
    never leaves a half-built target. replace: an earlier target is swapped out only once the new one
    is complete, and put back if the swap fails (else an existing target is refused). clean_stale:
    first remove what killed builds left beside it, and put back a target that a swap cut short had moved
    aside (only under a lock that excludes other builders).

    On GCS, where nothing renames a directory, build() writes into the target itself and `marker`
    (a file build() writes last, an export's config.json) says the directory is complete: an
    earlier target loses its marker first, then the rest, before the new one is written."""
    if storage.is_url(target):
        storage.refresh(target)
        if target.exists() and storage.files_under(target):
            if not replace:
                raise UserError(f"{target} exists; choose a new path (results are never overwritten)")
            if marker and (target / marker).exists():
                (target / marker).unlink()
            storage.remove_tree(target)
        build(target)
        return target
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if clean_stale:  # a killed build's half-built directory; a target moved aside by a swap cut short goes back
        for kept in target.parent.glob(f".{target.name}.old-*"):
            if not target.exists() and (kept / target.name).is_dir():
                os.replace(kept / target.name, target)
            shutil.rmtree(kept, ignore_errors=True)
        for stale in target.parent.glob(f".{target.name}.build-*"):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-", dir=target.parent))
    old = None
    try:
        build(tmp)
        if target.exists():
            if not replace:
                raise UserError(f"{target} exists; choose a new path (results are never overwritten)")
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
    except BaseException:
        if old is not None and not target.exists():
            os.replace(old / target.name, target)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _write(path, data: bytes):
    """storage.write_bytes, with a file that cannot be written (no space, a quota, read-only) as one line."""
    try:
        return storage.write_bytes(path, data)
    except OSError as err:
        raise RunFailure(f"{path} could not be written ({err.strerror or first_line(err)}); nothing half-written "
                         "is left: make room (or choose another --output_dir) and rerun") from None


def write_text(path, text: str):
    return _write(path, text.encode("utf-8"))


def write_json(path, obj, default=None):
    return write_text(path, json.dumps(obj, indent=2, default=default) + "\n")


def write_npy(path, array):
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return _write(path, buffer.getvalue())


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; cells are str()-ed as given (format numbers before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def figure(*args, **kwargs):
    """plt.subplots(*args, **kwargs) on the Agg backend (no display needed): (fig, axes)."""
    import matplotlib  # heavy: only when a figure is drawn
    if matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: only when a figure is drawn
    # A machine without the TeX-like math fonts gets a screenful of "findfont: ... not found" warnings
    # once per process (matplotlib falls back to DejaVu Sans, which is what the figures use anyway).
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    return plt.subplots(*args, **kwargs)


CI_LABEL = "_95% CI of "  # errorbar(..., label=CI_LABEL + name): an interval, kept out of the legend


def errorbars(ax, xs, values, intervals, color, name: str, scale: float = 1.0, offset: float = 0.0) -> None:
    """95% intervals [(low, high)] (None: none) drawn as error bars at xs (+ offset), named for plotted()."""
    keep = [(x + offset, v, ci) for x, v, ci in zip(xs, values, intervals) if ci is not None and v is not None]
    if not keep:
        return
    x, v, ci = zip(*keep)
    v = np.array(v, float) * scale
    low, high = np.array([c[0] for c in ci], float) * scale, np.array([c[1] for c in ci], float) * scale
    ax.errorbar(x, v, yerr=[np.maximum(v - low, 0), np.maximum(high - v, 0)], fmt="none", ecolor=color,
                elinewidth=1, capsize=2, label=CI_LABEL + name)


def plotted(fig) -> list[dict]:
    """What each panel of fig shows: {title, lines: {label: (x, y)}, bars: {label: heights}, hlines:
    {label: y} (horizontal reference lines, axhline), errorbars: {label: [(low, high)]} (intervals drawn
    with errorbar(..., label=CI_LABEL + label))}."""
    from matplotlib.container import ErrorbarContainer  # heavy: only when a figure is drawn
    panels = []
    for ax in fig.axes:
        lines, hlines, bars, errorbars = {}, {}, {}, {}
        caps = {id(c) for cont in ax.containers if isinstance(cont, ErrorbarContainer) for c in cont.lines[1]}
        for k, line in enumerate(ax.get_lines()):
            if id(line) in caps:  # an error bar's caps: reported with its interval
                continue
            label = line.get_label() if not line.get_label().startswith("_") else f"line{k}"
            x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
            x_in_data, _ = line.get_transform().contains_branch_seperately(ax.transData)
            if not x_in_data and len(set(y)) == 1:  # axhline: x in axes coordinates, one y in data
                hlines[label] = float(y[0])
            else:
                lines[label] = (x.tolist(), y.tolist())
        for k, container in enumerate(ax.containers):
            label = str(container.get_label())
            if isinstance(container, ErrorbarContainer):
                segments = container.lines[2][0].get_segments() if container.lines[2] else []
                errorbars[label.removeprefix(CI_LABEL)] = [(float(s[0][1]), float(s[1][1])) for s in segments]
                continue
            label = label if not label.startswith("_") else f"bars{k}"
            bars[label] = [float(p.get_height()) for p in container.patches]
        panels.append({"title": ax.get_title(), "lines": lines, "bars": bars, "hlines": hlines, "errorbars": errorbars})
    return panels


def save_figure(fig, path) -> list[dict]:
    """Save fig as PNG (atomically) and close it; returns plotted(fig)."""
    import matplotlib.pyplot as plt  # heavy: only when a figure is drawn
    data = plotted(fig)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")
    storage.write_bytes(path, buffer.getvalue())
    plt.close(fig)
    return data
