"""Run the tutorial: execute notebooks/NN_*.ipynb in order in a profile and collect the results report.

Each notebook writes its tables with :func:`add_result` into ``<run>/results/<section>.md``; the runner
concatenates them into ``results.md`` (``figures/results.md`` for the full CPU profile).
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

from .io import atomic_write_text
from .profiles import Profile, current_run_dir, get_profile
from .records import REPO_ROOT

__all__ = ["NOTEBOOKS_DIR", "notebook_paths", "add_result", "run_tutorial", "collect_report", "markdown_table",
           "scrub_paths", "source"]

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"


def notebook_paths(only: list[str] | None = None) -> list[Path]:
    paths = sorted(p for p in NOTEBOOKS_DIR.glob("[0-9][0-9]*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.name.startswith(o) for o in only)]
        if not paths:
            raise ValueError(f"no notebook in {NOTEBOOKS_DIR} starts with any of {only}")
    return paths


def add_result(section: str, markdown: str, run_dir: str | Path | None = None) -> Path:
    """Record a results section (markdown) of this run; later calls with the same section replace it."""
    path = Path(run_dir or current_run_dir()) / "results" / f"{section}.md"
    return atomic_write_text(path, markdown.rstrip() + "\n")


def _report_blocks(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """An existing results.md split into its notebook sections (key: the notebook's number, e.g. "04", "00b",
    from "## 04 · ...") and the rows of its run-time table (notebook -> seconds, as written)."""
    blocks, times, key, lines = {}, {}, None, []
    for line in text.splitlines() + ["## end"]:
        if line.startswith("## "):
            if key == "Run":
                for row in lines:
                    cells = [c.strip() for c in row.strip().strip("|").split("|")]
                    if len(cells) == 2 and cells[0].endswith(".ipynb"):
                        times[cells[0]] = cells[1]
            elif key is not None:
                blocks[key] = "\n".join(lines).rstrip() + "\n"
            key, lines = line[3:].split(" ", 1)[0], [line]
        elif key is not None:
            lines.append(line)
    return blocks, times


def collect_report(profile: Profile, run_dir: Path, timings: dict[str, float] | None = None) -> Path:
    """results.md from this run's sections; a notebook this run did not execute (``tutorial --only``) keeps its
    section and run time from the results.md already there, so a partial rerun never drops the others."""
    target = profile.figures_dir(run_dir) / "results.md"
    old_blocks, old_times = _report_blocks(target.read_text()) if target.is_file() else ({}, {})
    sections = {p.stem.split("_", 1)[0]: p.read_text() for p in sorted((run_dir / "results").glob("*.md"))}
    merged = {**{k: v for k, v in old_blocks.items() if k not in sections}, **sections}
    parts = [f"# Fine-R1 tutorial results (profile `{profile.name}`)\n",
             "Produced by `python -m finer1_lib tutorial`. Micro-world numbers: compare shapes with the paper, "
             "not values.\n"]
    parts += [merged[k] for k in sorted(merged)]
    times = {**old_times, **{k: f"{v:.0f}" for k, v in (timings or {}).items()}}
    if times:
        parts.append("## Run time\n\n| notebook | seconds |\n|---|---|\n"
                     + "".join(f"| {k} | {times[k]} |\n" for k in sorted(times)))
    return atomic_write_text(target, "\n".join(parts))


def scrub_paths(text: str, run_dir: str | Path | None = None) -> str:
    """``text`` with this machine's folders made relative: the repository root becomes a repo-relative path
    (``<clone>/figures/x.png`` -> ``figures/x.png``) and a run folder outside the repository becomes
    ``$FINER1_RUN_DIR``, so executed notebooks show no machine path."""
    roots = []
    if run_dir is not None:
        run = Path(run_dir).resolve()
        if not run.is_relative_to(REPO_ROOT.resolve()):
            roots.append((str(run), "$FINER1_RUN_DIR"))
    for root in {str(REPO_ROOT.resolve()), str(REPO_ROOT)}:
        roots.append((root + "/", ""))
        roots.append((root, "."))
    for old, new in sorted(roots, key=lambda r: -len(r[0])):  # longest first: a run folder inside another root
        # a whole folder name only: <repo> must not turn a sibling <repo>2 into .2
        text = re.sub(re.escape(old) + (r"" if old.endswith("/") else r"(?![\w.-])"), new.replace("\\", "\\\\"), text)
    return text


def run_tutorial(profile: Profile | str | None = None, out: str | Path | None = None,
                 only: list[str] | None = None, timeout: int = 3600) -> Path:
    """Execute the notebooks in order; executed copies go to ``<out>/notebooks`` (and, for the full profile,
    back into ``notebooks/`` so the repository shows the outputs of the last full run). Returns the report."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    profile = get_profile(profile)
    run_dir = Path(out) if out else profile.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ["FINER1_PROFILE"] = profile.name  # the kernels inherit these
    os.environ["FINER1_RUN_DIR"] = str(run_dir.resolve())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    timings = {}
    for path in notebook_paths(only):
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
        print(f"[tutorial] {path.name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            client.execute()
        except CellExecutionError as err:
            failed = next((i for i, c in enumerate(nb.cells) if c.cell_type == "code" and any(
                o.get("output_type") == "error" for o in c.get("outputs", []))), None)
            raise RuntimeError(f"notebook {path.name} failed in cell {failed}: "
                               f"{str(err).strip().splitlines()[-1]}") from None
        finally:
            text = scrub_paths(nbformat.writes(nb), run_dir)
            atomic_write_text(run_dir / "notebooks" / path.name, text)
        if profile.figures_in_repo:  # the full profile's outputs are the ones a reader sees in the repo
            atomic_write_text(path, text)
        timings[path.name] = time.perf_counter() - t0
        print(f"[tutorial] {path.name} done in {timings[path.name]:.0f} s", flush=True)
    return collect_report(profile, run_dir, timings)


def markdown_table(frame, floatfmt: str = ".2f") -> str:
    """A pandas frame as a GitHub markdown table (no extra dependency), index included."""
    cols = [frame.index.name or ""] + [str(c) for c in frame.columns]
    def fmt(v) -> str:
        text = format(v, floatfmt) if isinstance(v, float) else str(v)
        return " ".join(text.split())  # a cell is one line

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in zip(frame.index, frame.to_numpy(dtype=object).tolist()):  # iterrows would make ints floats
        lines.append("| " + " | ".join([fmt(idx)] + [fmt(v) for v in row]) + " |")
    return "\n".join(lines)


def source(obj, docstring: str = "first line") -> str:
    """The library's own source of a function or class, for a notebook to print where the algorithm is taught
    (one copy of the code: the notebook shows what runs). ``docstring``: "full", "first line" (default: the
    summary line only, the rest of the docstring replaced by "...") or "none"."""
    import ast
    import inspect
    import textwrap

    if docstring not in ("full", "first line", "none"):
        raise ValueError(f"docstring must be 'full', 'first line' or 'none', got {docstring!r}")
    text = textwrap.dedent(inspect.getsource(obj))
    if docstring == "full":
        return text
    node = ast.parse(text).body[0]
    first = node.body[0] if getattr(node, "body", None) else None
    if not (isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant)
            and isinstance(first.value.value, str)):
        return text
    lines = text.splitlines(keepends=True)
    start, end = first.lineno - 1, first.end_lineno
    indent = lines[start][:len(lines[start]) - len(lines[start].lstrip())]
    keep = []
    if docstring == "first line":
        summary = first.value.value.strip().splitlines()[0].strip()
        more = len(first.value.value.strip().splitlines()) > 1
        keep = [f'{indent}"""{summary}{" ..." if more else ""}"""\n']
    return "".join(lines[:start] + keep + lines[end:])
