"""Simulation of the RTL against the emulator.

cocotb testbenches for each HDL component, run with cocotb's Python runner on Verilator, and a
batched Verilator co-simulation harness that runs whole bundles on the `trimem-small` system
top; both compare outputs bit for bit and cycle counts exactly with the emulator.
"""
