"""Reservations of shared channels and links: holds granted in emulator event order (issue cycle,
then engine id), each starting when all its resources are free, pending clients respected."""
import pytest
from amaranth.sim import Simulator

from trimem.config import load_config, load_config_dict
from trimem.hdl.reserve import Reservations, physical, resource_names

from tests.hdl.rejects import rejects

pytestmark = pytest.mark.sim


def run(clients, steps):
    """Drive `steps` (cycle -> {client: hold, or a pending dict}; a hold stays up until it is
    granted) and return every grant as (cycle, client, start)."""
    dut = Reservations(("a", "b", "c"), clients)
    grants, active = [], {}

    async def bench(ctx):
        for cycle in range(max(steps) + 8):
            active.update(steps.get(cycle, {}))
            for name in clients:
                port = getattr(dut, name)
                req = active.get(name)
                ctx.set(port.request.valid, req is not None and not req.get("pending"))
                ctx.set(port.pending, req is not None and bool(req.get("pending")))
                if req is None:
                    continue
                if req.get("pending"):
                    ctx.set(port.pending_issued, req["issued"])
                    ctx.set(port.pending_mask, req["mask"])
                else:
                    ctx.set(port.request.payload, req)
            for name in clients:
                port = getattr(dut, name)
                if ctx.get(port.request.valid) and ctx.get(port.request.ready):
                    grants.append((cycle, name, ctx.get(port.start)))
                    del active[name]
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    return grants


def hold(mask, issued, earliest, cycles):
    return {"mask": mask, "issued": issued, "earliest": earliest, "cycles": cycles}


def test_a_hold_starts_after_the_previous_hold_on_its_resource_ends():
    grants = run(("x",), {0: {"x": hold(0b001, 0, 3, 10)}, 2: {"x": hold(0b011, 2, 4, 5)},
                          5: {"x": hold(0b010, 5, 6, 1)}})
    assert grants == [(0, "x", 3), (2, "x", 13), (5, "x", 18)]


def test_disjoint_holds_of_two_clients_start_at_their_earliest_in_the_same_cycle():
    grants = run(("x", "y"), {1: {"x": hold(0b001, 1, 9, 4), "y": hold(0b110, 1, 2, 7)}})
    assert sorted(grants) == [(1, "x", 9), (1, "y", 2)]


def test_a_tie_of_issue_cycles_goes_to_the_client_listed_first():
    grants = run(("x", "y"), {1: {"x": hold(0b001, 1, 9, 4), "y": hold(0b001, 1, 2, 7)}})
    assert grants == [(1, "x", 9), (2, "y", 13)]


def test_an_earlier_issue_wins_over_a_client_listed_first():
    steps = {4: {"x": hold(0b100, 4, 5, 2), "y": hold(0b100, 3, 6, 3)}}
    assert run(("x", "y"), steps) == [(4, "y", 6), (5, "x", 9)]


def test_a_request_waits_for_an_earlier_pending_client_that_may_share_a_resource():
    steps = {2: {"y": {"pending": True, "issued": 2, "mask": 0b011}},
             3: {"x": hold(0b001, 3, 12, 2)}, 5: {"y": hold(0b001, 2, 10, 5)}}
    assert run(("x", "y"), steps) == [(5, "y", 10), (6, "x", 15)]


def test_a_pending_client_on_other_resources_does_not_hold_a_request_back():
    steps = {3: {"x": hold(0b100, 3, 4, 2), "y": {"pending": True, "issued": 2, "mask": 0b011}}}
    assert run(("x", "y"), steps) == [(3, "x", 4)]


def test_the_resources_are_named_as_the_emulator_names_them():
    small = load_config("trimem-small")
    assert resource_names(small) == ("hbm0", "hbm1", "pcie", "p2p", "pim0")
    assert physical(small, "pim0") == "pim0"


def test_pim_buses_in_the_hbm_stacks_are_their_hbm_channels():
    shared = load_config_dict({"inherits": "trimem-small", "name": "shared",
                               "pim": {"shared_with_hbm": True, "channels": 2, "rows": 2048}})
    assert resource_names(shared) == ("hbm0", "hbm1", "pcie", "p2p")
    assert [physical(shared, r) for r in ("pim0", "pim1", "p2p")] == ["hbm0", "hbm1", "p2p"]


@pytest.mark.parametrize("resources, clients, pattern", [
    ((), ("x",), r"^resources must be distinct names, got \(\)$"),
    (("a", "a"), ("x",), r"^resources must be distinct names, got \('a', 'a'\)$"),
    (("a",), ("x", "x"), r"^clients must be distinct names, got \('x', 'x'\)$")])
def test_bad_names_are_refused(resources, clients, pattern):
    rejects(pattern, lambda: Reservations(resources, clients))
