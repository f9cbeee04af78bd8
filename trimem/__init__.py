"""Trimem: co-design and emulation of LLM inference on three near-memory engines.

This package is the contract every other part speaks: the hardware configuration schema and
presets (`config`), the instruction set (`isa`), the golden integer numerics (`numerics`,
`special`), memory layouts (`layout`) and the bundle format (`bundle`). It imports none of
`trimem.compiler`, `trimem.emulator`, `trimem.hdl`, `trimem.sims` or `trimem.host`.
"""
__version__ = "0.1.0"
