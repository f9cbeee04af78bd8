"""The host runtime: inference API, backends, comparison with PyTorch, and the CLI.

`Session` compiles or loads a bundle and generates text on a backend (the torch integer
reference, the emulator, or Verilator co-simulation), reporting simulated time, energy and
bytes next to wall time; `compare` runs the float PyTorch model beside it. The `trimem`
command line (`trimem.host.cli`) is the one place that wires every part together.
"""
