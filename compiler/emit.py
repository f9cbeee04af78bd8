"""Emission: one program per engine for each entry, the shared memory images, test vectors.

An entry is one graph (a phase and length bucket) walked in its schedule order. Each step
lowers one op over one sub-batch of rows into instructions of docs/contract.md, allocating
SRAM, GBUF, PRES and CDRAM as it goes (values are freed after their last use) and handing
every instruction to `schedule.Streams`, which adds the dependency tokens. The entry reads
token ids and positions (int32 [M]) from HOST memory and writes the logits (fx int32
[M, vocab]) back there.

The images (embedding table, norm and bias tables, RoPE table, MXU weight tiles in HBM,
PIM weight shares per bank) are built once from the quantized graph and shared by all
entries; a timing-only compile has none.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from trimem import isa, layout, special
from trimem.bundle import Entry, MemoryImage, TensorSpec
from trimem.compiler import report
from trimem.compiler.ir import CompileError, Graph, OpKind
from trimem.compiler.place import nm_index
from trimem.compiler.schedule import Streams
from trimem.compiler.tile import FX_BYTES, Arena, MemoryMap, group_log2, kv_fields
from trimem.numerics import QuantWeight

E = isa.Engine
SPACES = isa.Space.__members__
"""Memory space by name, for the space fields of DMA.COPY."""
SCALE = layout.SCALE_CODE_BYTES
ROPE_BYTES = np.dtype("<i2").itemsize
"""Bytes of one RoPE table element (int16, `special.rope_table`)."""
STAGED = 2
"""Buffers of one kind (gamma, bias, GBUF input, PRES output, CDRAM copy) kept at once, so
the next one fills while the last is still in use."""


class _Value:
    """An SRAM value: fx rows, or a8 rows with their scale codes."""

    def __init__(self, data, row_bytes: int, scale=None):
        self.data, self.row_bytes, self.scale = data, row_bytes, scale

    def rows(self, r0: int, r1: int) -> tuple:
        """The (buffer, offset, nbytes) range of rows [r0, r1)."""
        return (self.data, r0 * self.row_bytes, (r1 - r0) * self.row_bytes)

    def scales(self, r0: int, r1: int) -> tuple:
        return (self.scale, r0 * SCALE, (r1 - r0) * SCALE)

    def addr(self, row: int, col_bytes: int = 0) -> int:
        return self.data.at(row * self.row_bytes + col_bytes)

    def buffers(self) -> list:
        return [b for b in (self.data, self.scale) if b is not None]


class Emitter:
    """Lowers one scheduled, tiled graph to the programs of one entry."""

    def __init__(self, graph: Graph, cfg, memory: MemoryMap):
        self.graph, self.cfg, self.memory = graph, cfg, memory
        self.streams = Streams()
        self.cost: dict = {}
        fpga, pim, csd = cfg.fpga, cfg.pim, cfg.csd
        hooks = {"on_alloc": self.streams.allocated, "on_free": self.streams.freed}
        self.arenas = {"SRAM": Arena("SRAM", fpga.sram_bytes,
                                     f"fpga.sram_bytes ({fpga.sram_bytes} B)", **hooks),
                       "HOST": Arena("HOST", 1 << isa.ADDR_BITS[isa.Space.HOST], "host memory",
                                     **hooks)}
        if pim is not None:
            self.arenas["GBUF"] = Arena("GBUF", pim.gbuf_bytes,
                                        f"one channel's pim.gbuf_bytes ({pim.gbuf_bytes} B)",
                                        align_to=FX_BYTES, **hooks)
            self.arenas["PRES"] = Arena("PRES", pim.result_total_bytes,
                                        f"the PIM result buffers ({pim.result_total_bytes} B)",
                                        align_to=FX_BYTES, **hooks)
        if csd is not None:
            self.arenas["CDRAM"] = Arena("CDRAM", csd.dram_bytes,
                                         f"csd.dram_bytes ({csd.dram_bytes} B)", **hooks)
        self.staged: dict = {}
        self.filled: dict = {}
        self.values: dict = {}
        self.slots: list = []
        self.slot_turn = 0
        self.host: dict = {}
        self.dma_cost: dict = {}

    # -- helpers -----------------------------------------------------------------------------

    def add(self, engine, name, reads=(), writes=(), **fields) -> None:
        self.streams.add(engine, name, reads, writes, **fields)

    def alloc(self, space: str, name: str, nbytes: int):
        return self.arenas[space].alloc(name, nbytes)

    def copy(self, src_space, src_addr, dst_space, dst_addr, nbytes, reads=(), writes=()):
        """One DMA.COPY, charged to the DMA roofline (cycles looked up once per size and
        endpoints: input rows go to every PIM channel's GBUF alike)."""
        self.streams.add(E.DMA, "DMA.COPY", reads, writes, src_space=SPACES[src_space],
                         src_addr=src_addr, dst_space=SPACES[dst_space], dst_addr=dst_addr,
                         nbytes=nbytes)
        self.charge("DMA", self._dma_cycles(src_space, dst_space, nbytes))

    def _dma_cycles(self, src_space: str, dst_space: str, nbytes: int) -> float:
        key = (src_space, dst_space, nbytes)
        cycles = self.dma_cost.get(key)
        if cycles is None:
            cycles = self.dma_cost[key] = report.dma_cycles(self.cfg, src_space, dst_space,
                                                             nbytes)
        return cycles

    def charge(self, engine: str, cycles: float) -> None:
        self.cost[engine] = self.cost.get(engine, 0.0) + cycles

    def stage(self, kind: str, key, space: str, nbytes: int, fill=None):
        """A buffer for `key` among the last STAGED of its kind (fewer when memory is short);
        `fill(buf)` runs on a miss."""
        cache = self.staged.setdefault(kind, OrderedDict())
        if key in cache:
            cache.move_to_end(key)
            return cache[key], False
        if len(cache) >= STAGED:
            self._evict(cache)
        while True:
            try:
                buf = self.alloc(space, f"{kind}:{key}", nbytes)
                break
            except CompileError:
                if not cache:
                    raise
                self._evict(cache)
        cache[key] = buf
        if fill is not None:
            fill(buf)
        return buf, True

    def _evict(self, cache: OrderedDict) -> None:
        _, old = cache.popitem(last=False)
        self.arenas[old.space].free(old)

    def new_value(self, op, fmt: str):
        m, n = self.graph.step.rows, _width(op)
        if fmt == "a8":
            value = _Value(self.alloc("SRAM", op.name, m * n), n,
                           self.alloc("SRAM", f"{op.name}.scale", m * SCALE))
        else:
            value = _Value(self.alloc("SRAM", op.name, m * n * FX_BYTES), n * FX_BYTES)
        self.values[op.name] = value
        return value

    # -- the entry ---------------------------------------------------------------------------

    def run(self) -> Entry:
        graph, cfg, memory = self.graph, self.cfg, self.memory
        m, vocab = graph.step.rows, graph.spec.vocab
        host = self.host
        for name, nbytes in (("ids", m), ("pos", m), ("logits", m * vocab)):
            host[name] = self.alloc("HOST", name, nbytes * FX_BYTES)
        for name in ("ids", "pos"):
            value = _Value(self.alloc("SRAM", name, m * FX_BYTES), FX_BYTES)
            self.values[name] = value
            self.copy("HOST", host[name].addr, "SRAM", value.data.addr, m * FX_BYTES,
                      [(host[name], 0, m * FX_BYTES)], [value.rows(0, m)])
        rope_bytes = graph.step.ctx * graph.spec.head_dim * ROPE_BYTES
        self.rope = self.alloc("SRAM", "rope table", rope_bytes)
        self.copy("HBM", memory.regions["rope"].addr, "SRAM", self.rope.addr, rope_bytes,
                  writes=[(self.rope, 0, rope_bytes)])
        if graph.meta["kv_home"] == "FLASH":
            self.cdram_pos = self.alloc("CDRAM", "pos", m * FX_BYTES)
            self.copy("HOST", host["pos"].addr, "CDRAM", self.cdram_pos.addr, m * FX_BYTES,
                      [(host["pos"], 0, m * FX_BYTES)], [(self.cdram_pos, 0, m * FX_BYTES)])
        slot = max((_slot_need(op) for op in graph.linears()), default=0)
        self.slots = [self.alloc("SRAM", f"weight slot {i}", slot) for i in range(2)] \
            if slot else []
        self._walk()
        sched = graph.meta["schedule"]
        meta = {"phase": graph.step.phase, "rows": m, "ctx": graph.step.ctx,
                "seq_slots": m if graph.step.phase == "decode" else 1,
                "interleave": sched["interleave"],
                "sub_batches": [list(b) for b in sched["sub_batches"]],
                "peak_bytes": {s: a.peak for s, a in self.arenas.items() if s != "HOST"},
                "roofline_cycles": {k: int(round(v)) for k, v in sorted(self.cost.items())}}
        inputs = [TensorSpec(n, "HOST", host[n].addr, "int32", (m,)) for n in ("ids", "pos")]
        outputs = [TensorSpec("logits", "HOST", host["logits"].addr, "int32", (m, vocab))]
        return Entry(entry_name(graph), graph.step.phase, self.streams.programs(), inputs,
                     outputs, meta)

    def _walk(self) -> None:
        graph = self.graph
        steps = graph.meta["schedule"]["steps"]
        batches = graph.meta["schedule"]["sub_batches"]
        ops = {op.name: op for op in graph.ops}
        last = {}
        for i, (name, _, _) in enumerate(steps):
            for value in ops[name].inputs:
                last[value] = i
        dying: dict = {}
        for value, i in last.items():
            dying.setdefault(i, []).append(value)
        lower = {OpKind.EMBED: self._embed, OpKind.RMSNORM: self._rmsnorm,
                 OpKind.LINEAR: self._linear, OpKind.LM_HEAD: self._linear,
                 OpKind.ROPE: self._rope, OpKind.KV_APPEND: self._kv_append,
                 OpKind.ATTENTION: self._attention, OpKind.SILU_MUL: self._binary,
                 OpKind.ADD: self._binary, OpKind.QUANT: self._quant}
        for i, (name, batch, engine) in enumerate(steps):
            op = ops[name]
            r0, r1 = batches[batch]
            lower[op.kind](op, r0, r1, engine)
            for value in dying.get(i, ()):
                if value not in ("ids", "pos") and value in self.values:
                    for buf in self.values.pop(value).buffers():
                        self.arenas["SRAM"].free(buf)

    def output(self, op, fmt: str):
        """The SRAM value of op's output, allocated on its first sub-batch."""
        return self.values.get(op.name) or self.new_value(op, fmt)

    # -- vector ops --------------------------------------------------------------------------

    def vpu(self, name, reads, writes, **fields) -> None:
        self.add(E.VPU, name, reads, writes, **fields)
        self.charge("VPU", report.vpu_cycles(self.cfg, name, fields))

    def _embed(self, op, r0, r1, engine):
        ids, out = self.values["ids"], self.output(op, "fx")
        self.vpu("VPU.EMBED", [ids.rows(r0, r1)], [out.rows(r0, r1)], m=r1 - r0,
                 n=op.attrs["n"], ids_addr=ids.addr(r0),
                 table_addr=self.memory.regions["embed"].addr, o_addr=out.addr(r0))

    def _rmsnorm(self, op, r0, r1, engine):
        n, name = op.attrs["n"], op.attrs["weight"]
        nbytes = (n + 1) * FX_BYTES

        def fill(buf):
            self.copy("HBM", self.memory.norms[name], "SRAM", buf.addr, nbytes,
                      writes=[(buf, 0, nbytes)])

        gamma, _ = self.stage("gamma", name, "SRAM", nbytes, fill)
        x, out = self.values[op.inputs[0]], self.output(op, "a8")
        self.vpu("VPU.RMSNORM", [x.rows(r0, r1), (gamma, 0, nbytes)],
                 [out.rows(r0, r1), out.scales(r0, r1)], m=r1 - r0, n=n, x_addr=x.addr(r0),
                 g_addr=gamma.addr, o_addr=out.addr(r0), s_addr=out.scale.at(r0 * SCALE))

    def _quant(self, op, r0, r1, engine):
        x, out = self.values[op.inputs[0]], self.output(op, "a8")
        self.vpu("VPU.QUANT", [x.rows(r0, r1)], [out.rows(r0, r1), out.scales(r0, r1)],
                 m=r1 - r0, n=op.attrs["n"], x_addr=x.addr(r0), o_addr=out.addr(r0),
                 s_addr=out.scale.at(r0 * SCALE))

    def _binary(self, op, r0, r1, engine):
        a, b = (self.values[v] for v in op.inputs)
        out = self.output(op, "fx")
        name = "VPU.ADD" if op.kind is OpKind.ADD else "VPU.SILUMUL"
        self.vpu(name, [a.rows(r0, r1), b.rows(r0, r1)], [out.rows(r0, r1)], m=r1 - r0,
                 n=op.attrs["n"], a_addr=a.addr(r0), b_addr=b.addr(r0), o_addr=out.addr(r0))

    def _rope(self, op, r0, r1, engine):
        x, pos, out = self.values[op.inputs[0]], self.values["pos"], self.output(op, "fx")
        a = op.attrs
        self.vpu("VPU.ROPE", [x.rows(r0, r1), pos.rows(r0, r1),
                              (self.rope, 0, self.rope.nbytes)], [out.rows(r0, r1)],
                 m=r1 - r0, heads=a["heads"], head_dim=a["head_dim"], x_addr=x.addr(r0),
                 pos_addr=pos.addr(r0), table_addr=self.rope.addr, o_addr=out.addr(r0))

    # -- KV cache and attention --------------------------------------------------------------

    def _row_groups(self, r0, r1) -> list:
        """(first row, rows, sequence slot) per instruction: decode rows are one sequence
        each, a prefill chunk is all of slot 0."""
        if self.graph.step.phase == "decode":
            return [(r, 1, r) for r in range(r0, r1)]
        return [(r0, r1 - r0, 0)]

    def _to_cdram(self, kind, name, r0, r1):
        value = self.values[name]
        nbytes = (r1 - r0) * value.row_bytes

        def fill(buf):
            self.copy("SRAM", value.addr(r0), "CDRAM", buf.addr, nbytes, [value.rows(r0, r1)],
                      [(buf, 0, nbytes)])

        buf, _ = self.stage(kind, (name, r0, r1), "CDRAM", nbytes, fill)
        return buf

    def _kv_append(self, op, r0, r1, engine):
        a = op.attrs
        k, v = self.values[op.inputs[0]], self.values[op.inputs[1]]
        base = self.memory.kv_region.addr
        self.values[op.name] = _Value(None, 0)
        common = {"layer": op.layer, "kv_heads": a["kv_heads"], "head_dim": a["head_dim"],
                  "kv_base": base, **kv_fields(self.memory.kv, a["head_dim"])}
        if engine == "VPU":
            pos = self.values["pos"]
            for r, m, seq in self._row_groups(r0, r1):
                self.vpu("VPU.KVAPP", [k.rows(r, r + m), v.rows(r, r + m), pos.rows(r, r + m)],
                         [], m=m, seq=seq, k_addr=k.addr(r), v_addr=v.addr(r),
                         pos_addr=pos.addr(r), **common)
            return
        kc = self._to_cdram("cdram k", op.inputs[0], r0, r1)
        vc = self._to_cdram("cdram v", op.inputs[1], r0, r1)
        for r, m, seq in self._row_groups(r0, r1):
            off = (r - r0) * k.row_bytes
            nbytes = m * k.row_bytes
            self.add(E.CSD, "CSD.KVAPP", [(kc, off, nbytes), (vc, off, nbytes),
                                          (self.cdram_pos, r * FX_BYTES, m * FX_BYTES)], [],
                     m=m, seq=seq, k_addr=kc.at(off), v_addr=vc.at(off),
                     pos_addr=self.cdram_pos.at(r * FX_BYTES), **common)
            self.charge("CSD", report.kv_append_cycles(self.cfg, op, m))

    def _attention(self, op, r0, r1, engine):
        a = op.attrs
        q, out = self.values[op.inputs[0]], self.output(op, "fx")
        fields = {"layer": op.layer, "q_heads": a["heads"], "kv_heads": a["kv_heads"],
                  "head_dim": a["head_dim"], "kv_base": self.memory.kv_region.addr,
                  "splits": a["splits"], "topk": a["topk"],
                  **kv_fields(self.memory.kv, a["head_dim"])}
        if engine == "VPU":
            pos = self.values["pos"]
            for r, m, seq in self._row_groups(r0, r1):
                self.add(E.VPU, "VPU.ATTN", [q.rows(r, r + m), pos.rows(r, r + m)],
                         [out.rows(r, r + m)], m=m, seq=seq, q_addr=q.addr(r),
                         pos_addr=pos.addr(r), o_addr=out.addr(r), **fields)
                self.charge("VPU", report.attention_cycles(self.cfg, op, m, "VPU"))
            return
        qc = self._to_cdram("cdram q", op.inputs[0], r0, r1)
        nbytes = (r1 - r0) * out.row_bytes
        oc, _ = self.stage("cdram o", (op.name, r0), "CDRAM", nbytes)
        for r, m, seq in self._row_groups(r0, r1):
            off = (r - r0) * q.row_bytes
            self.add(E.CSD, "CSD.ATTN", [(qc, off, m * q.row_bytes),
                                         (self.cdram_pos, r * FX_BYTES, m * FX_BYTES)],
                     [(oc, off, m * out.row_bytes)], m=m, seq=seq, q_addr=qc.at(off),
                     pos_addr=self.cdram_pos.at(r * FX_BYTES), o_addr=oc.at(off), **fields)
            self.charge("CSD", report.attention_cycles(self.cfg, op, m, "CSD"))
        self.copy("CDRAM", oc.addr, "SRAM", out.addr(r0), nbytes, [(oc, 0, nbytes)],
                  [out.rows(r0, r1)])

    # -- linears -----------------------------------------------------------------------------

    def _sink(self, op, r, n0, n1):
        """(space, address, (buffer, offset, nbytes)) where output row r, channels
        [n0, n1) go: the op's SRAM value, or HOST logits for the LM head."""
        n = op.attrs["n"]
        if op.kind is OpKind.LM_HEAD:
            off = (r * n + n0) * FX_BYTES
            return "HOST", self.host["logits"].at(off), (self.host["logits"], off,
                                                         (n1 - n0) * FX_BYTES)
        out = self.values[op.name]
        off = r * out.row_bytes + n0 * FX_BYTES
        return "SRAM", out.data.at(off), (out.data, off, (n1 - n0) * FX_BYTES)

    def _linear(self, op, r0, r1, engine):
        if op.kind is OpKind.LINEAR:
            self.output(op, "fx")
        if engine == "MXU":
            self._mxu(op, r0, r1)
        else:
            self._pim(op, r0, r1)
        bias = op.attrs["bias"]
        if bias is not None:
            self._bias(op, bias, r0, r1)

    def _weight_fields(self, op) -> dict:
        return {"k": op.attrs["k"], "bits": op.attrs["bits"], "nm": nm_index(self.cfg, op),
                "group_log2": group_log2(op)}

    def _mxu(self, op, r0, r1):
        x = self.values[op.inputs[0]]
        tiles = self.memory.mxu[op.attrs["weight"]]
        wf = self._weight_fields(op)
        head = op.kind is OpKind.LM_HEAD
        for j, (n0, n1, addr) in enumerate(tiles):
            nt = n1 - n0
            nbytes = _tile_bytes(op, nt)
            slot = self.slots[self.slot_turn % 2]
            self.slot_turn += 1
            self.copy("HBM", addr, "SRAM", slot.addr, nbytes, writes=[(slot, 0, nbytes)])
            if head:
                stage, _ = self.stage("logits", (op.name, r0, j), "SRAM",
                                      (r1 - r0) * nt * FX_BYTES)
                groups = [(r0, r1 - r0, stage.addr, (stage, 0, stage.nbytes))]
            elif len(tiles) == 1:
                out = self.values[op.name]
                groups = [(r0, r1 - r0, out.addr(r0), out.rows(r0, r1))]
            else:
                groups = [(r, 1, *self._sink(op, r, n0, n1)[1:]) for r in range(r0, r1)]
            for r, m, o_addr, target in groups:
                self.add(E.MXU, "MXU.GEMM", [x.rows(r, r + m), x.scales(r, r + m),
                                             (slot, 0, nbytes)], [target], m=m, n=nt,
                         a_addr=x.addr(r), s_addr=x.scale.at(r * SCALE), w_addr=slot.addr,
                         o_addr=o_addr, **wf)
            self.charge("MXU", len(groups) * report.gemm_cycles(self.cfg, op, groups[0][1], nt))
            if head:
                self._drain(op, stage, r0, r1, n0, n1)

    def _drain(self, op, src, r0, r1, n0, n1):
        """Copy output rows [r0, r1) x channels [n0, n1), row-major at `src` (SRAM or PRES),
        to where they belong: one copy when they are whole rows, else one per row."""
        nt, n = n1 - n0, op.attrs["n"]
        row = nt * FX_BYTES
        if nt == n:
            space, addr, (buf, off, _) = self._sink(op, r0, n0, n1)
            self.copy(src.space, src.addr, space, addr, (r1 - r0) * row,
                      [(src, 0, (r1 - r0) * row)], [(buf, off, (r1 - r0) * row)])
            return
        for r in range(r0, r1):
            space, addr, target = self._sink(op, r, n0, n1)
            self.copy(src.space, src.at((r - r0) * row), space, addr, row,
                      [(src, (r - r0) * row, row)], [target])

    def _pim(self, op, r0, r1):
        cfg, a = self.cfg, op.attrs
        x, k = self.values[op.inputs[0]], a["k"]
        wf = self._weight_fields(op)
        placed = self.memory.pim[a["weight"]]
        chunk = _pim_rows(cfg, k, max(t.n for t, _ in placed), r1 - r0)
        for c0 in range(r0, r1, chunk):
            c1 = min(r1, c0 + chunk)
            m = c1 - c0
            gbuf, new = self.stage("gbuf", (op.inputs[0], c0, c1), "GBUF", m * (k + SCALE))
            if new:
                self.filled[id(gbuf)] = set()
            filled = self.filled[id(gbuf)]
            for tile, offset in placed:
                channels = sorted(set(tile.channels) - filled)
                self._fill_gbuf(gbuf, channels, x, c0, c1, k)
                filled.update(channels)
                nbytes = m * tile.n * FX_BYTES
                pres, _ = self.stage("pres", (op.name, c0, tile.n0), "PRES", nbytes)
                self.add(E.PIM, "PIM.GEMV", [(gbuf, 0, m * (k + SCALE))], [(pres, 0, nbytes)],
                         m=m, n=tile.n, x_addr=gbuf.addr, s_addr=gbuf.at(m * k),
                         w_addr=offset, o_addr=pres.addr, ch_mask=tile.mask, **wf)
                self.charge("PIM", report.gemv_cycles(cfg, op, m, tile))
                self._drain(op, pres, c0, c1, tile.n0, tile.n1)

    def _fill_gbuf(self, gbuf, channels, x, c0, c1, k):
        """Copy rows [c0, c1) of `x` and their scales into `gbuf` of each of `channels`."""
        m = c1 - c0
        rows, scales = [x.rows(c0, c1)], [x.scales(c0, c1)]
        to_rows, to_scales = [(gbuf, 0, m * k)], [(gbuf, m * k, m * SCALE)]
        x_addr, s_addr = x.addr(c0), x.scale.at(c0 * SCALE)
        sram, dst = SPACES["SRAM"], SPACES["GBUF"]
        instrs = []
        for channel in channels:
            base = channel * self.cfg.pim.gbuf_bytes + gbuf.addr
            instrs += [("DMA.COPY", rows, to_rows, {"src_space": sram, "src_addr": x_addr,
                                                    "dst_space": dst, "dst_addr": base,
                                                    "nbytes": m * k}),
                       ("DMA.COPY", scales, to_scales, {"src_space": sram, "src_addr": s_addr,
                                                        "dst_space": dst,
                                                        "dst_addr": base + m * k,
                                                        "nbytes": m * SCALE})]
        self.streams.add_run(E.DMA, instrs)
        for _ in channels:
            self.charge("DMA", self._dma_cycles("SRAM", "GBUF", m * k))
            self.charge("DMA", self._dma_cycles("SRAM", "GBUF", m * SCALE))

    def _bias(self, op, bias, r0, r1):
        n = op.attrs["n"]
        nbytes = n * FX_BYTES

        def fill(buf):
            self.copy("HBM", self.memory.biases[bias], "SRAM", buf.addr, nbytes,
                      writes=[(buf, 0, nbytes)])

        buf, _ = self.stage("bias", bias, "SRAM", nbytes, fill)
        out = self.values[op.name]
        for r in range(r0, r1):
            self.vpu("VPU.ADD", [out.rows(r, r + 1), (buf, 0, nbytes)], [out.rows(r, r + 1)],
                     m=1, n=n, a_addr=out.addr(r), b_addr=buf.addr, o_addr=out.addr(r))


def _width(op) -> int:
    """Elements per row of op's output."""
    a = op.attrs
    if op.kind in (OpKind.ROPE, OpKind.ATTENTION):
        return a["heads"] * a["head_dim"]
    if op.kind is OpKind.KV_APPEND:
        return a["kv_heads"] * a["head_dim"]
    return a["n"]


def _tile_bytes(op, n) -> int:
    a = op.attrs
    return layout.weight_tile_bytes(n, a["k"], a["bits"], tuple(a["nm"]), a["group"])


def _slot_need(op) -> int:
    """Bytes of the largest MXU weight tile of a linear (0 if it never runs on the MXU)."""
    tiles = op.annotations["tiles"].get("MXU", ())
    return max((_tile_bytes(op, n1 - n0) for n0, n1 in tiles), default=0)


def _pim_rows(cfg, k, n_tile, m) -> int:
    """Rows per PIM.GEMV: as many as fit half the GBUF and PRES (so the next chunk can fill
    while one computes), else as many as fit them whole."""
    pim = cfg.pim
    fit = [min(pim.gbuf_bytes // share // (k + SCALE),
               pim.result_total_bytes // share // (n_tile * FX_BYTES)) for share in (2, 1)]
    rows = fit[0] if fit[0] >= 1 else fit[1]
    if rows < 1:
        raise CompileError(f"PIM tile of {n_tile} outputs over k={k} does not fit the GBUF "
                           f"({pim.gbuf_bytes} B) and PRES ({pim.result_total_bytes} B)")
    return min(rows, m)


def entry_name(graph: Graph) -> str:
    """The entry of a bucket: phase, rows and context, e.g. "decode_m1_c1024"."""
    st = graph.step
    return f"{st.phase}_m{st.rows}_c{st.ctx}"


def emit_entry(graph: Graph, cfg, memory: MemoryMap) -> Entry:
    """The Entry (programs, I/O, meta) of one scheduled, tiled graph."""
    return Emitter(graph, cfg, memory).run()


# ---- images --------------------------------------------------------------------------------

class _Packed:
    """A quantized weight packed once, cut into per-row pieces of each layout section.

    The packed layout (`layout.pack_weight_tile`) stores every section row by row with a
    fixed number of bytes per output channel, so the tile of any subset of rows is the
    concatenation of those rows' pieces, section after section.
    """

    def __init__(self, qw: QuantWeight, nm: tuple):
        n, k = qw.q.shape
        blob = layout.pack_weight_tile(qw, nm)
        sections = layout.weight_tile_sections(n, k, qw.bits, nm, qw.group)
        self.sections = [blob[off:off + size].reshape(n, -1) for off, size in sections.values()]

    def tile(self, rows) -> np.ndarray:
        """The packed tile of output channels `rows` (a slice or an index array)."""
        return np.concatenate([section[rows].reshape(-1) for section in self.sections])

    def shares(self, n0: int, n1: int, units: int) -> list:
        """Per unit u the packed tile of channels n0 + u, n0 + u + units, ... below n1 (the
        contract's PIM weight mapping). The first (n1 - n0) % units units get one channel
        more, so the shares come in two reshapes, the longer ones and the shorter ones."""
        per, extra = divmod(n1 - n0, units)
        longer, shorter = [], []
        for section in self.sections:
            rows, width = section[n0:n1], section.shape[1]
            head = rows[:per * units].reshape(per, units, width).transpose(1, 0, 2)
            tail = rows[per * units:, None]
            longer.append(np.concatenate([head[:extra], tail], axis=1)
                          .reshape(extra, (per + 1) * width))
            shorter.append(head[extra:].reshape(units - extra, per * width))
        return list(np.concatenate(longer, axis=1)) + list(np.concatenate(shorter, axis=1))


def _hbm_location(cfg, addr: int) -> dict:
    fpga = cfg.fpga
    return {"first_channel": addr // fpga.hbm_interleave_bytes % fpga.hbm_channels,
            "interleave_bytes": fpga.hbm_interleave_bytes, "channels": fpga.hbm_channels}


def _tables(graph: Graph, memory: MemoryMap) -> tuple:
    """(address, bytes) of the norm and bias tables, one contiguous HBM image."""
    parts = {}
    for op in graph.ops:
        a = op.attrs
        if op.kind is OpKind.RMSNORM:
            words = np.append(graph.quant[a["weight"]].astype(np.int64), a["eps_code"])
            parts[memory.norms[a["weight"]]] = words.astype("<i4").tobytes()
        if a.get("bias") is not None:
            parts[memory.biases[a["bias"]]] = np.asarray(graph.quant[a["bias"]],
                                                         "<i4").tobytes()
    start = min(parts)
    blob = np.zeros(max(at + len(b) for at, b in parts.items()) - start, np.uint8)
    for at, data in parts.items():
        blob[at - start:at - start + len(data)] = np.frombuffer(data, np.uint8)
    return start, blob


def _pim_images(graph: Graph, cfg, memory: MemoryMap, packs: dict) -> list:
    pim = cfg.pim
    per_bank = pim.banks_per_channel
    banks: dict = {}
    for op in graph.linears():
        placed = memory.pim.get(op.attrs["weight"], ())
        if not placed:
            continue
        packed = packs[op.attrs["weight"]]
        for tile, offset in placed:
            units = len(tile.channels) * per_bank
            for u, share in enumerate(packed.shares(tile.n0, tile.n1, units)):
                key = (tile.channels[u // per_bank], u % per_bank)
                banks.setdefault(key, []).append((offset, share))
    images = []
    for (channel, bank), parts in sorted(banks.items()):
        data = np.zeros(max(off + len(b) for off, b in parts), np.uint8)
        for off, blob in parts:
            data[off:off + len(blob)] = blob
        unit = channel * per_bank + bank
        images.append(MemoryImage(f"pim.c{channel}.b{bank}", "PIMDRAM", unit * pim.bank_bytes,
                                  data, {"channel": channel, "bank": bank}))
    return images


def build_images(graph: Graph, cfg, memory: MemoryMap) -> list:
    """The memory images every entry shares, from a quantized graph with weights."""
    spec, regions = graph.spec, memory.regions
    emb = graph.quant["embed"]
    table = np.concatenate([emb.q.view(np.uint8),
                            layout.pack_scale_codes(emb.mant, emb.exp).reshape(-1, SCALE)], 1)
    cos, sin = special.rope_table(spec.inv_freq, memory.kv["max_ctx"])
    rope = np.concatenate([cos, sin], axis=1).astype("<i2")
    start, tables = _tables(graph, memory)
    hbm = [("embed", regions["embed"].addr, table), ("tables", start, tables),
           ("rope", regions["rope"].addr, rope.view(np.uint8))]
    packs = {op.attrs["weight"]: _Packed(graph.quant[op.attrs["weight"]], tuple(op.attrs["nm"]))
             for op in graph.linears()}
    for op in graph.linears():
        name = op.attrs["weight"]
        tiles = memory.mxu.get(name)
        if not tiles:
            continue
        packed, base = packs[name], tiles[0][2]
        data = np.zeros(tiles[-1][2] + _tile_bytes(op, tiles[-1][1] - tiles[-1][0]) - base,
                        np.uint8)
        for n0, n1, addr in tiles:
            blob = packed.tile(slice(n0, n1))
            data[addr - base:addr - base + len(blob)] = blob
        hbm.append((f"hbm.{name}", base, data))
    images = [MemoryImage(name, "HBM", addr, data, _hbm_location(cfg, addr))
              for name, addr, data in hbm]
    if memory.pim:
        images += _pim_images(graph, cfg, memory, packs)
    return images
