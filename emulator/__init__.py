"""The emulator: functional and cycle-accurate execution of a bundle.

Every engine's instruction stream runs as an in-order queue; engines run concurrently, wait on
SYNC tokens and contend for shared memories and links, and an event-driven scheduler jumps
time to the next event. Instructions compute with the golden integer numerics of `trimem`, or
skip the data entirely in timing-only mode. It reports per-engine busy and stall cycles, bytes
per memory and link, energy, and a Perfetto trace.
"""
