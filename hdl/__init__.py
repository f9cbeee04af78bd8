"""The RTL: Amaranth components of the three engines and their instruction-driven tops.

Sparse DSP chains, the vector/special-function unit, PIM banks with their channel controller,
and the in-storage attention engine, each a `wiring.Component` parameterized by the hardware
config and implementing exactly the integer numerics and cycle formulas of `trimem`; plus
Verilog emission and Yosys / nextpnr synthesis reports.
"""
