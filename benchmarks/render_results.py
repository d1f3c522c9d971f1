"""Render ``docs/results.md`` from the current benchmark outputs in ``benchmarks/results/`` (``archive/`` left out).

    python benchmarks/render_results.py                 # writes docs/results.md
    python benchmarks/render_results.py --check         # exit 1 if docs/results.md differs from a fresh render

Every table in the page is a benchmark's own ``<stem>.md`` copied verbatim (headings moved down three levels), so a
number in the docs is the number in the file; a result with no ``.md`` (a JSON list of rows) is tabulated from its
JSON as written. Each table is headed by the command that produced it and the files it came from. The command is

* the ``command`` recorded in the JSON where the benchmark records one (``setup_time.py``);
* else, for the config-driven benchmarks (their JSON records the resolved ``config``): ``--config NAME`` with
  ``NAME`` the longest config in ``benchmarks/configs/`` whose name starts the recorded ``stem``, plus one
  ``key=value`` override per value of the recorded config that differs from that config file today (so the command
  reproduces the recorded settings; keys the config file gained since are not undone);
* for ``flop_bound.py`` (a table only): ``--results`` the ``vit_blocks`` JSON whose start time and commit the table
  names, ``--cell`` its (tokens, batch) cell;
* for ``lr_sweep.py`` (JSON lines without a config): its default config ``demo``; the steps are in the table;
* else: not recorded, and the page says so.

PNG plots with the same stem are linked under their table; the logs of ``gpu_check.sh`` are listed at the end.
Reads files only (no benchmark runs); loading the configs imports :mod:`peft_tensor` (and torch).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python benchmarks/<script>.py): the checkout's root, for _common
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import CONFIG_DIR, REPO, RESULTS_DIR, load_bench_config

DOCS_OUT = REPO / "docs" / "results.md"

# (title, prefix of the stem, script): sections in this order; a stem goes to the first prefix it starts with
SECTIONS = [
    ("Efficiency (`efficiency.py`)", "efficiency_", "efficiency.py"),
    ("ViT blocks (`vit_blocks.py`)", "vit_blocks_", "vit_blocks.py"),
    ("Matmul bound of the exact schemes (`flop_bound.py`)", "flop_bound_", "flop_bound.py"),
    ("Adapter set-up time (`setup_time.py`)", "setup_time_", "setup_time.py"),
    ("Adapter sizes, default presets and whole networks (`adapter_sizes.py`)", "adapter_sizes_", "adapter_sizes.py"),
    ("Few-shot accuracy (`fewshot.py`)", "fewshot_", "fewshot.py"),
    ("Adapter-only learning-rate sweep (`lr_sweep.py`)", "lr_sweep_", "lr_sweep.py"),
    ("Learning panel: backbones x tasks (`learning_panel.py`)", "learning_panel_", "learning_panel.py"),
    ("Loader throughput (`loader_throughput.py`)", "loader_", "loader_throughput.py"),
]
DATA_SUFFIXES = (".json", ".jsonl", ".md", ".png")


# -- the files --------------------------------------------------------------------------------------------------------
def result_stems(results: Path) -> dict[str, dict[str, Path]]:
    """``{stem: {suffix: path}}`` of the result files directly in ``results`` (not in sub-folders)."""
    out: dict[str, dict[str, Path]] = {}
    for p in sorted(results.iterdir()):
        if p.is_file() and p.suffix in DATA_SUFFIXES:
            out.setdefault(p.stem, {})[p.suffix] = p
    return out


def _rel(path: Path, repo: Path) -> str:
    return path.resolve().relative_to(repo.resolve()).as_posix()


def _link(path: Path, repo: Path, page_dir: Path) -> str:
    """A markdown link to ``path`` as seen from the page's folder."""
    return f"[`{_rel(path, repo)}`]({Path(os.path.relpath(path.resolve(), page_dir.resolve())).as_posix()})"


def _read_json(files: dict):
    return json.loads(files[".json"].read_text()) if ".json" in files else None


# -- commands ---------------------------------------------------------------------------------------------------------
def _yaml_value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def config_overrides(recorded: dict, current: dict, prefix: str = "") -> tuple[list[str], list[str]]:
    """(``key.sub=value`` for each value of ``recorded`` that differs from ``current``, dicts compared key by key, a
    mapping of named entries (every value a dict: arms, backbones) whose entries differ as one ``key={...}``; the
    recorded keys ``current`` does not have at all: an older config layout, which no override reproduces)."""
    out, absent = [], []
    for key, value in recorded.items():
        path = f"{prefix}{key}"
        if key not in current:
            absent.append(path)
        elif isinstance(value, dict) and isinstance(current[key], dict):
            if set(value) != set(current[key]) and all(isinstance(v, dict) for v in
                                                       (*value.values(), *current[key].values())):
                # named entries (arms, backbones) added or left out: the recorded ones, whole (an override of a
                # mapping replaces it), so the command runs those entries and no others
                out.append(f"{path}={_yaml_value(value)}")
                continue
            more, gone = config_overrides(value, current[key], path + ".")
            out, absent = out + more, absent + gone
        elif current[key] != value:
            out.append(f"{path}={_yaml_value(value)}")
    return out, absent


def _shell_word(word: str) -> str:
    return f"'{word}'" if re.search(r"[\[\]{}\"' ,*?$()]", word) else word


def config_name(stem: str, configs: Path) -> str | None:
    """The longest config name in ``configs`` that starts ``stem``."""
    names = sorted((p.stem for p in configs.glob("*.yaml") if stem.startswith(p.stem)), key=len)
    return names[-1] if names else None


def config_command(script: str, recorded: dict, configs: Path) -> tuple[str, str]:
    stem = recorded.get("stem", "")
    name = config_name(stem, configs)
    if name is None:
        return f"python benchmarks/{script}", f"not recorded (no config in `benchmarks/configs/` starts `{stem}`)"
    overrides, absent = config_overrides(recorded, load_bench_config(name))
    cmd = " ".join(["python", f"benchmarks/{script}", "--config", name, *map(_shell_word, overrides)])
    how = (f"reconstructed: config `{name}` (the longest config name starting the recorded stem `{stem}`), "
           "overrides = the recorded config's values that differ from that config file today")
    if absent:
        how += (f"; {len(absent)} recorded keys are not in today's config (an older config layout, e.g. "
                f"{', '.join(f'`{k}`' for k in absent[:3])}), so this command does not reproduce those settings")
    return cmd, how


def flop_bound_command(md_text: str, stems: dict, repo: Path) -> tuple[str, str]:
    m = re.search(r"Measured run \((.+?), commit (\S+?)\)", md_text)
    cell = re.search(r"(\d+) tokens x (\d+)", md_text.splitlines()[0])
    if m and cell:
        started, commit = m.groups()
        for stem, files in stems.items():
            data = _read_json(files) if stem.startswith("vit_blocks_") else None
            if (isinstance(data, dict) and data.get("started") == started
                    and data.get("versions", {}).get("git_commit") == commit):
                cells = [(c["tokens"], c["batch"]) for c in data["cells"]]
                idx = cells.index((int(cell.group(1)), int(cell.group(2))))
                cmd = f"python benchmarks/flop_bound.py --results {_rel(files['.json'], repo)}"
                cmd += f" --cell {idx}" if idx else ""
                return cmd, (f"reconstructed: `--results` is the `vit_blocks` JSON with the start time ({started}) "
                             f"and commit ({commit}) the table names")
    return "python benchmarks/flop_bound.py", "not recorded (no `vit_blocks` JSON matches the run the table names)"


def command_for(stem: str, script: str, files: dict, stems: dict, repo: Path, configs: Path) -> tuple[str, str]:
    """(command, how it was obtained) of one result."""
    data = _read_json(files)
    if isinstance(data, dict) and data.get("command"):
        return data["command"], "recorded in the JSON (`command`)"
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        return config_command(script, data["config"], configs)
    recorded = re.search(r"^Command: `([^`]+)`", files[".md"].read_text(), re.M) if ".md" in files else None
    if recorded:
        return recorded.group(1), "recorded in the table file's `Command:` line (the rest of it is in the table)"
    if script == "flop_bound.py" and ".md" in files:
        return flop_bound_command(files[".md"].read_text(), stems, repo)
    if script == "lr_sweep.py":
        return ("python benchmarks/lr_sweep.py", "not recorded in the JSON lines; the script's default config `demo` "
                "(the fine-tuning steps of the runs are in the table)")
    return "", "not recorded in the file"


# -- the page ---------------------------------------------------------------------------------------------------------
def _demote(md_text: str, levels: int = 3) -> str:
    lines = md_text.rstrip("\n").split("\n")
    return "\n".join(("#" * levels + line) if line.startswith("#") else line for line in lines)


def rows_table(rows: list[dict]) -> str:
    """A JSON list of flat rows as a markdown table (floats rounded to 3 decimals, everything else as written)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else _yaml_value(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def result_block(stem: str, script: str, files: dict, stems: dict, repo: Path, configs: Path, page_dir: Path) -> str:
    cmd, how = command_for(stem, script, files, stems, repo, configs)
    sources = ", ".join(_link(files[s], repo, page_dir) for s in DATA_SUFFIXES[:3] if s in files)
    lines = [f"### `{stem}`", "", f"Command: `{cmd}`  " if cmd else "Command: not recorded  ",
             f"How the command was obtained: {how}.  ", f"Files: {sources}.", ""]
    data = _read_json(files)
    if isinstance(data, dict) and data.get("config", {}).get("stem") not in (None, stem):
        lines[-1:] = [f"The run wrote `{data['config']['stem']}.*`; the files were renamed `{stem}.*` afterwards.", ""]
    if ".md" in files:
        lines += [f"Table: {_link(files['.md'], repo, page_dir)}, verbatim.", "", _demote(files[".md"].read_text())]
    elif isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        lines += [f"Table: the rows of {_link(files['.json'], repo, page_dir)} (floats rounded to 3 decimals).", "",
                  rows_table(data)]
    else:
        lines += ["No table in the files."]
    if ".png" in files:
        lines += ["", f"![{stem}]({Path(os.path.relpath(files['.png'].resolve(), page_dir.resolve())).as_posix()})"]
    return "\n".join(lines) + "\n"


def render(results: Path = RESULTS_DIR, repo: Path = REPO, configs: Path = CONFIG_DIR,
           page_dir: Path = DOCS_OUT.parent) -> str:
    """The whole page (``page_dir``: the folder the page lives in, for relative links)."""
    stems = result_stems(results)
    out = ["# Benchmark results", "",
           "<!-- Generated by `python benchmarks/render_results.py`: do not edit by hand. "
           "tests/benchmarks/test_render_results.py fails when this page differs from a fresh render. -->", "",
           f"Rendered from the current outputs in `{_rel(results, repo)}/` (older runs are in `archive/`, not "
           "shown). Every table below is the benchmark's own markdown file copied verbatim (headings moved down), "
           "headed by the command that produced it and the files it came from. Commands: the one recorded in the "
           "JSON where there is one; otherwise reconstructed as stated under each table (`--config` from the "
           "recorded stem, overrides from the recorded config; see the docstring of `benchmarks/render_results.py`).",
           ""]
    placed: set = set()
    for title, prefix, script in SECTIONS:
        mine = [s for s in stems if s.startswith(prefix) and s not in placed]
        if not mine:
            continue
        placed.update(mine)
        out += [f"## {title}", ""]
        for stem in mine:
            out.append(result_block(stem, script, stems[stem], stems, repo, configs, page_dir))
    rest = [s for s in stems if s not in placed]
    if rest:
        out += ["## Other results", ""]
        for stem in rest:
            out.append(result_block(stem, "", stems[stem], stems, repo, configs, page_dir))
    logs = sorted(p for p in (results / "gpu_check").glob("*") if p.is_file())
    if logs:
        out += ["## GPU check logs (`gpu_check.sh`)", "",
                "Command: `bash benchmarks/gpu_check.sh` (its header says how to run it on a GPU machine). Logs: "
                + ", ".join(_link(p, repo, page_dir) for p in logs) + ".", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DOCS_OUT), help="the page to write (default docs/results.md)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if --out differs from a fresh render")
    args = ap.parse_args(argv)
    out = Path(args.out)
    text = render(page_dir=DOCS_OUT.parent)
    if args.check:
        same = out.is_file() and out.read_text() == text
        print(f"{out}: {'up to date' if same else 'differs from a fresh render: run benchmarks/render_results.py'}")
        return 0 if same else 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
