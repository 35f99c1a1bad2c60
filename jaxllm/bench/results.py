"""A benchmark run on disk: one directory per resolved config, named by its hash.

    <output_dir>/<config hash>/
        config.json     the resolved config, git commit, jax/jaxlib versions, machine
        requests.csv    one row per (system, request): metrics.REQUEST_COLUMNS
        steps.csv       one row per (system, engine step): StepStats fields
        summary.json    {"status": "ok" | "failed", per-system summaries, ratios, roofline, ...}

`load_run(path)` reads it back as pandas DataFrames. A run whose summary.json says "ok" is
complete (a sweep skips it on resume). Host only: never imports jax (versions are read from
package metadata).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
from importlib import metadata

import numpy as np
import pandas as pd


def git_commit() -> str | None:
    """The checkout's commit (with "-dirty" when it has uncommitted changes), None outside git."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) if sha else None


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Where a run ran: commit, package versions, machine."""
    return {
        "git_commit": git_commit(),
        "versions": {p: _version(p) for p in ("jax", "jaxlib", "transformers", "torch", "numpy", "pandas")},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None},
    }


def run_dir(cfg) -> str:
    return os.path.join(os.path.expanduser(cfg.output_dir), cfg.config_hash())


def json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return None if math.isnan(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    return str(o)


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=json_default)
    os.replace(tmp, path)  # a reader (or a resumed sweep) never sees half a file


def read_summary(path: str) -> dict | None:
    p = os.path.join(path, "summary.json")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def is_complete(path: str) -> bool:
    s = read_summary(path)
    return s is not None and s.get("status") == "ok"


@dataclasses.dataclass
class Run:
    """A run read back (or just made): its directory, config dict, tables and summary."""

    path: str
    config: dict
    requests: pd.DataFrame
    steps: pd.DataFrame
    summary: dict


def load_run(path: str) -> Run:
    """A run directory as DataFrames (missing tables are empty)."""
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)

    def table(name):
        p = os.path.join(path, name)
        return pd.read_csv(p) if os.path.exists(p) and os.path.getsize(p) > 1 else pd.DataFrame()

    return Run(path, config, table("requests.csv"), table("steps.csv"), read_summary(path) or {})
