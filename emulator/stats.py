"""What a run did: cycles per engine by cause, bytes per memory and link, energy, and a trace.

`report(machine)` turns a finished `Machine` into plain data (the `trimem run --json` output);
`chrome_trace(machine)` gives the Chrome trace-event JSON that ui.perfetto.dev and
chrome://tracing open, with one track per engine and one per shared resource.
"""
from __future__ import annotations

from trimem.emulator.engine import PS_PER_US, Clock

PJ_PER_J = 10**12
PS_PER_S = 10**12


def reference_clock(machine) -> Clock:
    """The clock `cycles` are counted in: the FPGA's, else the first engine section's."""
    cfg = machine.config
    section = next(s for s in (cfg.fpga, cfg.pim, cfg.csd) if s is not None)
    return Clock(section.clock_mhz)


def unique_resources(machine) -> dict:
    """Resources by name, each shared one (a PIM channel that is an HBM channel) once."""
    seen, out = set(), {}
    for name, resource in machine.resources.items():
        if id(resource) not in seen:
            seen.add(id(resource))
            out[resource.name] = resource
    return out


def engine_report(machine, stream) -> dict:
    """Cycle breakdown of one engine in its own clock: busy + stall_mem + stall_dep + idle
    = cycles, the length of the whole run."""
    model = stream.model
    s = model.stats
    cycles = model.clock.cycle_at(machine.end_ps)
    return {"clock_mhz": model.clock.mhz, "cycles": cycles, "instructions": s.instructions,
            "busy": s.busy, "stall_mem": s.stall_mem, "stall_dep": s.stall_dep,
            "idle": cycles - s.occupied - s.stall_dep,
            "utilization": s.busy / cycles if cycles else 0.0,
            "macs": s.macs, "bytes": dict(sorted(s.bytes.items())),
            "energy_j": s.energy_pj / PJ_PER_J, **dict(s.counters)}


def report(machine) -> dict:
    """Plain-data summary of a finished run."""
    per_engine = {st.model.name: engine_report(machine, st) for st in machine.streams.values()}
    end = machine.end_ps
    resources = {name: {"busy_s": r.busy_ps / PS_PER_S, "bytes": r.bytes,
                        "utilization": r.busy_ps / end if end else 0.0}
                 for name, r in unique_resources(machine).items() if r.holds}
    return {
        "config": machine.config.name,
        "timing_only": machine.timing_only,
        "cycles": reference_clock(machine).cycle_at(end),
        "clock_mhz": reference_clock(machine).mhz,
        "seconds": end / PS_PER_S,
        "instructions": sum(e["instructions"] for e in per_engine.values()),
        "per_engine": per_engine,
        "bytes": dict(sorted(machine.traffic.items())),
        "resources": resources,
        "energy_j": sum(e["energy_j"] for e in per_engine.values()),
    }


def _us(ps: int) -> float:
    return ps / PS_PER_US


def chrome_trace(machine) -> dict:
    """Chrome trace-event JSON: a complete ("ph": "X") event per instruction on its engine's
    track and per resource hold on the resource's track; ts and dur in microseconds."""
    events = []
    tracks = [("engines", [(st.model.name, st) for st in machine.streams.values()]),
              ("resources", list(unique_resources(machine).items()))]
    for pid, (group, members) in enumerate(tracks, 1):
        events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                       "args": {"name": group}})
        for tid, (name, _) in enumerate(members, 1):
            events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                           "args": {"name": name}})
    for tid, st in enumerate(machine.streams.values(), 1):
        edge = st.model.clock.edge
        for index, (start, end) in enumerate(zip(st.starts, st.ends)):
            ins = st.program[index]
            events.append({"name": ins.name, "ph": "X", "pid": 1, "tid": tid,
                           "ts": _us(edge(start)), "dur": _us(edge(end) - edge(start)),
                           "args": {"index": index, "cycles": end - start, "asm": ins.text}})
    for tid, resource in enumerate(unique_resources(machine).values(), 1):
        for start, duration, engine, index in resource.holds:
            events.append({"name": f"{engine}[{index}]", "ph": "X", "pid": 2, "tid": tid,
                           "ts": _us(start), "dur": _us(duration)})
    return {"traceEvents": events, "displayTimeUnit": "ns"}
