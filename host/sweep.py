"""Design-space sweeps: hardware parameters x models x quantization, each point compiled and
run in timing-only emulation, in a local process pool or on a Ray cluster.

A spec (YAML, see examples/sweep.yaml) names a base hardware preset, the config keys to vary
and the models, quantizations, sparsities and batch sizes to try; `search: grid` takes every
combination, `search: random` draws `samples` of them. Each point is keyed by a hash of its
settings and appended to `results.csv` as soon as it finishes, so an interrupted sweep resumes
where it stopped; a point that fails (an impossible config, a model the hardware cannot hold)
is recorded with its error and the sweep goes on. At the end the table is also written as
Parquet (when pyarrow is installed) and a Pareto plot of tokens/s against energy per token,
coloured by an area estimate, marks the points no other beats on all three.
"""
from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import random
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from trimem.config import load_config
from trimem.host.studies import emulate, variant

SPEC_KEYS = ("hw", "search", "samples", "seed", "params", "models", "quant", "sparsity",
             "batch", "ctx")
SEARCHES = ("grid", "random")
POINT_KEYS = ("model", "quant", "sparsity", "batch", "ctx")
METRICS = ("tokens_per_s", "seconds_per_token", "energy_j_per_token", "tokens_per_j",
           "area_mm2", "hbm_bytes_per_token", "wall_s")
"""Measured per point; all but wall_s are deterministic functions of the point."""
RESULTS = "results.csv"
MAC_UM2 = 282 + 137
"""Area of an int8 multiplier (282 um2) plus an int32 adder (137 um2) in 45 nm (Horowitz,
"Computing's energy problem", ISSCC 2014, the source of the presets' per-MAC energies)."""
SRAM_BIT_UM2 = 0.346
"""A 45 nm 6T SRAM cell (Mistry et al., IEDM 2007)."""


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep spec: the base preset, the varied config keys and the point axes."""
    hw: str
    search: str = "grid"
    samples: int = 8
    seed: int = 0
    params: dict = field(default_factory=dict)
    models: tuple = ("llama2-7b",)
    quant: tuple = ("w4a8kv4",)
    sparsity: tuple = ("dense",)
    batch: tuple = (1,)
    ctx: tuple = (512,)

    @property
    def columns(self) -> list[str]:
        """The results table's columns, in order."""
        return ["hash", "status", "error", *POINT_KEYS, *self.params, *METRICS]


def _axis(spec: dict, key: str, default: tuple) -> tuple:
    value = spec.get(key, default)
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not values:
        raise ValueError(f"sweep spec: {key!r} is an empty list; give at least one value")
    return values


def _check_param(key: str, value, search: str, base: dict) -> None:
    section, _, name = key.partition(".")
    if not name or not isinstance(base.get(section), dict) or name not in base[section]:
        raise ValueError(f"sweep spec: params key {key!r} is not a config key of the base "
                         f"preset; write section.key, e.g. 'fpga.dsp_chains'")
    if isinstance(value, dict):
        if search != "random" or set(value) - {"low", "high", "log"} or \
                not {"low", "high"} <= set(value):
            raise ValueError(f"sweep spec: params {key!r}: a range {value!r} needs `search: "
                             f"random` and keys low, high (and optional log: true)")
    elif not isinstance(value, list) or not value:
        raise ValueError(f"sweep spec: params {key!r} must be a non-empty list of values or "
                         f"a {{low, high}} range, got {value!r}")


def parse_spec(data: dict) -> SweepSpec:
    """Validate a spec dict (as read from YAML); errors name the key and the fix."""
    if not isinstance(data, dict):
        raise ValueError(f"sweep spec must be a mapping of keys, got {data!r}")
    unknown = [k for k in data if k not in SPEC_KEYS]
    if unknown:
        raise ValueError(f"sweep spec: unknown key {unknown[0]!r}; valid keys are "
                         f"{', '.join(SPEC_KEYS)}")
    if "hw" not in data:
        raise ValueError("sweep spec: missing 'hw'; name the base preset, e.g. "
                         "'hw: flightllm-u280'")
    search = data.get("search", "grid")
    if search not in SEARCHES:
        raise ValueError(f"sweep spec: search {search!r} is not one of {SEARCHES!r}")
    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise ValueError(f"sweep spec: params must map config keys to values, got {params!r}")
    base = load_config(data["hw"]).to_dict()
    for key, value in params.items():
        _check_param(key, value, search, base)
    samples, seed = data.get("samples", 8), data.get("seed", 0)
    for key, value in (("samples", samples), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"sweep spec: {key} must be a non-negative integer, got {value!r}")
    return SweepSpec(hw=str(data["hw"]), search=search, samples=samples, seed=seed,
                     params=dict(params), models=_axis(data, "models", ("llama2-7b",)),
                     quant=_axis(data, "quant", ("w4a8kv4",)),
                     sparsity=tuple(str(s) for s in _axis(data, "sparsity", ("dense",))),
                     batch=_axis(data, "batch", (1,)), ctx=_axis(data, "ctx", (512,)))


def load_spec(path) -> SweepSpec:
    """The spec in YAML file `path`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"sweep spec {str(path)!r} is not a file; give a YAML spec such as "
                         f"examples/sweep.yaml")
    return parse_spec(yaml.safe_load(path.read_text()))


# ---- points --------------------------------------------------------------------------------

def point_hash(point: dict) -> str:
    """Sixteen hex digits of the sha256 of the point's canonical JSON."""
    text = json.dumps(point, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _draw(rng: random.Random, value):
    if not isinstance(value, dict):
        return rng.choice(value)
    low, high = value["low"], value["high"]
    if value.get("log"):
        x = math.exp(rng.uniform(math.log(low), math.log(high)))
    else:
        x = rng.uniform(low, high)
    return round(x) if isinstance(low, int) and isinstance(high, int) else x


def points(spec: SweepSpec) -> list[dict]:
    """Every point of the spec (grid) or `samples` distinct draws (random), in a fixed order."""
    axes = {"model": spec.models, "quant": spec.quant, "sparsity": spec.sparsity,
            "batch": spec.batch, "ctx": spec.ctx}
    if spec.search == "grid":
        keys = list(spec.params)
        combos = itertools.product(*(spec.params[k] for k in keys), *axes.values())
        drawn = [dict(zip(keys, c[:len(keys)])) | dict(zip(POINT_KEYS, c[len(keys):]))
                 for c in combos]
    else:
        rng = random.Random(spec.seed)
        drawn = [{k: _draw(rng, v) for k, v in spec.params.items()}
                 | {k: rng.choice(v) for k, v in axes.items()} for _ in range(spec.samples)]
    out, seen = [], set()
    for d in drawn:
        point = {"hw": spec.hw, "params": {k: d[k] for k in spec.params},
                 **{k: d[k] for k in POINT_KEYS}}
        key = point_hash(point)
        if key not in seen:
            seen.add(key)
            out.append({"hash": key, **point})
    return out


def point_config(point: dict):
    """The base preset with the point's params set; a ConfigError names a bad combination."""
    return variant(point["hw"], point["params"], f"sweep-{point['hash']}")


def area_mm2(cfg) -> float:
    """Logic area in 45 nm-equivalent mm2: every MAC unit (DSP chains, VPU lanes, PIM bank
    lanes, CSD engine lanes) at MAC_UM2 and every on-chip SRAM bit (FPGA buffer, PIM global
    and result buffers) at SRAM_BIT_UM2. DRAM and flash arrays are left out: the memories are
    the same whichever engine computes beside them."""
    macs = sram = 0
    if (f := cfg.fpga) is not None:
        macs += f.macs_per_cycle + f.vpu_lanes
        sram += f.sram_bytes
    if (p := cfg.pim) is not None:
        macs += p.total_banks * p.mac_lanes
        sram += p.gbuf_total_bytes + p.result_total_bytes
    if (c := cfg.csd) is not None:
        macs += c.engine_lanes
    return (macs * MAC_UM2 + sram * 8 * SRAM_BIT_UM2) / 1e6


def evaluate(point: dict) -> dict:
    """The metrics of one point: timing-only emulation of one decode step."""
    cfg = point_config(point)
    sparsity = None if point["sparsity"] in ("dense", "None", "none") else point["sparsity"]
    run = emulate(cfg, point["model"], quant=point["quant"], sparsity=sparsity,
                  batch=point["batch"], ctx=point["ctx"])
    return {"tokens_per_s": run.tokens_per_s, "seconds_per_token": run.seconds / run.rows,
            "energy_j_per_token": run.energy_j / run.rows,
            "tokens_per_j": run.rows / run.energy_j if run.energy_j else math.inf,
            "area_mm2": area_mm2(cfg),
            "hbm_bytes_per_token": run.bytes.get("HBM", 0) / run.rows}


def run_point(point: dict) -> dict:
    """The results row of `point`: its settings and metrics, or its error."""
    row = {"hash": point["hash"], **{k: point[k] for k in POINT_KEYS}, **point["params"]}
    start = time.perf_counter()
    try:
        row.update(evaluate(point), status="ok", error="")
    except Exception as exc:  # a failed point is recorded, and the sweep goes on
        row.update(status="error", error=f"{type(exc).__name__}: {exc}")
    row["wall_s"] = time.perf_counter() - start
    return row


# ---- backends ------------------------------------------------------------------------------

def _pool(todo: list, workers: int):
    if workers <= 1:
        yield from map(run_point, todo)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run_point, p) for p in todo]
        for future in as_completed(futures):
            yield future.result()


def _ray(todo: list, address: str, workers: int):
    try:
        import ray
    except ImportError:
        raise ValueError("the Ray backend needs the ray package: install ray (pinned in "
                         "requirements.txt) or run without --ray") from None
    local = address == "local"
    ray.init(address=None if local else address, num_cpus=workers if local else None,
             include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        remote = ray.remote(run_point)
        pending = [remote.remote(p) for p in todo]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        ray.shutdown()


# ---- results -------------------------------------------------------------------------------

def read_results(path) -> list[dict]:
    """Complete rows of a results CSV, numbers parsed back to int or float."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)
                if None not in row.values()]


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _open_results(path: Path, columns: list[str]):
    """The results file for appending, its header written or checked; a last row cut short
    by an interruption is dropped."""
    if path.is_file() and path.stat().st_size:
        text = path.read_text()
        if not text.endswith("\n"):
            path.write_text(text[:text.rfind("\n") + 1])
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != columns:
            raise ValueError(f"{path} was written by a sweep with other columns {header!r}; "
                             f"give another output directory (-o) or remove the file")
        return path.open("a", newline="")
    f = path.open("w", newline="")
    csv.writer(f).writerow(columns)
    return f


def pareto(rows: list[dict]) -> list[bool]:
    """Per row: no other ok row has at least its tokens/s and at most its energy and area,
    better in one."""
    keys = [(r["tokens_per_s"], -r["energy_j_per_token"], -r["area_mm2"])
            if r["status"] == "ok" else None for r in rows]
    return [k is not None and not any(
        o is not None and o != k and all(a >= b for a, b in zip(o, k)) for o in keys)
        for k in keys]


def run_sweep(spec: SweepSpec, out_dir, *, ray: str | None = None, workers: int = 1,
              retry_errors: bool = False, progress=print) -> list[dict]:
    """Run every point of `spec` not yet in `out_dir/results.csv`; return all rows.

    `ray` is None (local process pool of `workers`), "local" (a Ray instance started here with
    `workers` CPUs) or the address of a running Ray cluster.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    finished = ("ok",) if retry_errors else ("ok", "error")
    done = {r["hash"] for r in read_results(path) if r["status"] in finished}
    every = points(spec)
    todo = [p for p in every if p["hash"] not in done]
    progress(f"sweep: {len(every)} points, {len(every) - len(todo)} already done, "
             f"{len(todo)} to run on {'ray ' + ray if ray else f'{workers} local worker(s)'}")
    results = _ray(todo, ray, workers) if ray else _pool(todo, workers)
    with _open_results(path, spec.columns) as f:
        writer = csv.DictWriter(f, spec.columns)
        for i, row in enumerate(results, 1):
            writer.writerow(row)
            f.flush()
            progress(f"[{i}/{len(todo)}] {row['hash']} {row['status']}"
                     + (f": {row['error']}" if row["status"] == "error" else
                        f": {row['tokens_per_s']:.4g} tokens/s"))
    wanted = {p["hash"] for p in every}
    latest = {r["hash"]: r for r in read_results(path) if r["hash"] in wanted}
    rows = list(latest.values())
    _write_parquet(rows, out)
    plot_pareto(rows, out / "pareto.png")
    return rows


def _write_parquet(rows: list[dict], out: Path) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return
    table = [dict(r, pareto=p) for r, p in zip(rows, pareto(rows))]
    columns = {k: [r.get(k) for r in table] for k in (table[0] if table else {})}
    columns = {k: [None if v == "" else v for v in vs] for k, vs in columns.items()}
    pq.write_table(pa.table(columns), out / "results.parquet")


def plot_pareto(rows: list[dict], path) -> None:
    """tokens/s against J/token, coloured by area; the Pareto-optimal points ringed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [(r, p) for r, p in zip(rows, pareto(rows)) if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(7, 5))
    if ok:
        sc = ax.scatter([r["energy_j_per_token"] for r, _ in ok],
                        [r["tokens_per_s"] for r, _ in ok],
                        c=[r["area_mm2"] for r, _ in ok], cmap="viridis")
        fig.colorbar(sc, ax=ax, label="area estimate (mm$^2$, 45 nm)")
        front = [r for r, p in ok if p]
        ax.scatter([r["energy_j_per_token"] for r in front], [r["tokens_per_s"] for r in front],
                   s=160, facecolors="none", edgecolors="red", label="Pareto-optimal")
        ax.legend()
    ax.set_xlabel("energy per token (J, emulated)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"sweep: {len(ok)} points ok, {len(rows) - len(ok)} failed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_table(rows: list[dict]) -> str:
    """Finished points, fastest first with Pareto-optimal ones starred, then the failures."""
    flags = pareto(rows)
    ok = sorted((r for r in zip(rows, flags) if r[0]["status"] == "ok"),
                key=lambda rf: -rf[0]["tokens_per_s"])
    lines = [f"{'':1} {'hash':<16} {'model':<14} {'quant':<9} {'sparsity':<8} {'batch':>5} "
             f"{'tokens/s':>10} {'mJ/token':>9} {'mm2':>8}  params"]
    for r, front in ok:
        params = " ".join(f"{k}={r[k]}" for k in r if "." in k)
        lines.append(f"{'*' if front else '':1} {r['hash']:<16} {r['model']:<14} "
                     f"{r['quant']:<9} {r['sparsity']:<8} {r['batch']:>5} "
                     f"{r['tokens_per_s']:>10.4g} {r['energy_j_per_token'] * 1e3:>9.4g} "
                     f"{r['area_mm2']:>8.4g}  {params}")
    failed = [r for r in rows if r["status"] != "ok"]
    lines += [f"! {r['hash']:<16} failed: {r['error']}" for r in failed]
    lines.append(f"{len(ok)} ok ({sum(f for _, f in ok)} Pareto-optimal), {len(failed)} failed")
    return "\n".join(lines)
