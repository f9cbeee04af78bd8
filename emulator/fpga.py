"""The FPGA engines: DMA (copies between memories over HBM channels and links), MXU (sparse
DSP-chain GEMM) and VPU (vector and special functions, FPGA-side attention).

Cycle counts come from `trimem.timing`, numbers from `trimem.numerics`, `trimem.special` and
`trimem.layout`; this module only wires them to memories and resources. Each instruction is
checked (shapes, patterns, bounds) in timing-only mode too, so both modes reject the same
programs and charge the same cycles.
"""
from __future__ import annotations

import functools

import numpy as np

from trimem import isa, layout, numerics, special, timing
from trimem.emulator import weights
from trimem.emulator.engine import EmulatorError, EngineModel

SRAM, HBM = isa.Space.SRAM, isa.Space.HBM
PIM_SPACES = (isa.Space.GBUF, isa.Space.PRES, isa.Space.PIMDRAM)
weight_tile_bytes = functools.lru_cache(maxsize=1024)(layout.weight_tile_bytes)
"""Tile sizes repeat across a program's GEMMs; remember them."""
FX = np.dtype("<i4")
"""fx activations, token ids, positions, RMSNorm gamma and eps are int32 little-endian."""
SCALES = layout.SCALE_CODE_BYTES
"""Bytes of one row's scale code."""
ROPE_TABLE = np.dtype("<i2")
"""RoPE table rows in SRAM: row p holds cos[p, :d/2] then sin[p, :d/2] (special.rope_table)."""


class FpgaEngine(EngineModel):
    """Shared by the FPGA engines: the FPGA clock and HBM channel helpers."""

    def __init__(self, machine):
        super().__init__(machine, machine.config.fpga.clock_mhz)
        self.fpga = machine.config.fpga
        self.hbm_per_byte = timing.cycles_per_byte(self.fpga.hbm_gbps_per_channel,
                                                   self.fpga.clock_mhz)
        self.sram = machine.memory(SRAM)
        self.hbm = [machine.resource(f"hbm{c}") for c in range(self.fpga.hbm_channels)]

    def hbm_loads(self, addrs, sizes) -> tuple[list, int]:
        """((HBM channel Resource, bytes) pairs, stream cycles) of the ranges (addrs, sizes)."""
        hbm = self.machine.memory(HBM)
        addrs = np.atleast_1d(addrs).tolist()
        sizes = np.broadcast_to(sizes, (len(addrs),)).tolist()
        per_channel = [0] * self.fpga.hbm_channels
        for addr, nbytes in zip(addrs, sizes):
            hbm.check(addr, nbytes)
            per_channel = [a + b for a, b in
                           zip(per_channel, timing.hbm_channel_bytes(self.fpga, addr, nbytes))]
        loads = [(self.hbm[c], b) for c, b in enumerate(per_channel) if b]
        return loads, timing.hbm_stream_cycles(per_channel, self.hbm_per_byte)

    def charge(self, *, sram: int = 0, hbm: int = 0, ops: int = 0) -> None:
        """Count SRAM and HBM bytes and lane operations, with their energy."""
        fpga, machine = self.fpga, self.machine
        if sram:
            machine.count("SRAM", sram)
        if hbm:
            machine.count("HBM", hbm)
        self.stats.energy_pj += (sram * fpga.energy_pj_per_sram_byte
                                 + hbm * fpga.energy_pj_per_hbm_byte
                                 + ops * fpga.energy_pj_per_mac)


# ---------------------------------------------------------------------------------------------
# DMA
# ---------------------------------------------------------------------------------------------

def _merge_sides(src_loads: list, src_rate, dst_loads: list, dst_rate) -> tuple[list, int]:
    """(loads, stream cycles) of a copy: each side streams at its own rate, and a resource on
    both sides (HBM -> HBM, or a PIM bus that is an HBM channel) carries both streams in turn."""
    cycles = [timing.stream_cycles(max([b for _, b in loads]), rate)
              for loads, rate in ((src_loads, src_rate), (dst_loads, dst_rate)) if loads]
    src_bytes = dict(src_loads) if src_loads and dst_loads else {}
    shared = [(r, b) for r, b in dst_loads if r in src_bytes]
    if not shared:
        return src_loads + dst_loads, max(cycles)
    cycles += [timing.stream_cycles(src_bytes[r], src_rate) + timing.stream_cycles(b, dst_rate)
               for r, b in shared]
    for r, b in dst_loads:
        src_bytes[r] = src_bytes.get(r, 0) + b
    return list(src_bytes.items()), max(cycles)


class DmaEngine(FpgaEngine):
    """DMA.COPY over the path between two spaces (docs/timing.md, "DMA").

    Each side of a copy loads resources: HBM the channels its byte range touches (each at
    hbm_gbps_per_channel, after hbm_latency_cycles), HOST the PCIe link, GBUF/PRES/PIMDRAM the
    bus of each PIM channel touched (pim.channel_gbps), CDRAM the P2P link (nothing more when
    the other side is HOST: PCIe carries it); SRAM is on chip and loads nothing. The copy
    holds every loaded resource for its data phase: cycles = both sides' latencies + the
    longest stream time of any one resource.
    """
    engine = isa.Engine.DMA

    def __init__(self, machine):
        super().__init__(machine)
        cfg, clock_mhz = machine.config, self.fpga.clock_mhz
        self.pcie = (machine.resource("pcie"),
                     timing.cycles_per_byte(cfg.links.pcie_gbps, clock_mhz),
                     timing.latency_cycles(cfg.links.pcie_latency_us, clock_mhz))
        self.p2p = (machine.resource("p2p"),
                    timing.cycles_per_byte(cfg.links.p2p_gbps, clock_mhz),
                    timing.latency_cycles(cfg.links.p2p_latency_us, clock_mhz))
        if cfg.pim is not None:
            self.pim = [machine.resource(f"pim{c}") for c in range(cfg.pim.channels)]
            self.pim_per_byte = timing.cycles_per_byte(cfg.pim.channel_gbps, clock_mhz)
            self.pim_span = {isa.Space.GBUF: cfg.pim.gbuf_bytes,
                             isa.Space.PRES: cfg.pim.result_bytes,
                             isa.Space.PIMDRAM: cfg.pim.channel_bytes}

    def _pim_loads(self, space, addr: int, nbytes: int) -> list:
        """(PIM channel bus, bytes) of a GBUF, PRES or PIMDRAM range: channel c owns the c-th
        span of the space (docs/contract.md)."""
        span, out = self.pim_span[space], []
        at, end = addr, addr + nbytes
        while at < end:
            stop = min(end, (at // span + 1) * span)
            out.append((self.pim[at // span], stop - at))
            at = stop
        return out

    def _side(self, space, addr: int, nbytes: int, other) -> tuple[int, list, object]:
        """(latency, [(resource, bytes)], cycles per byte) of one side of a copy."""
        if space == HBM:
            per_channel = timing.hbm_channel_bytes(self.fpga, addr, nbytes)
            loads = [(self.hbm[c], b) for c, b in enumerate(per_channel) if b]
            return self.fpga.hbm_latency_cycles, loads, self.hbm_per_byte
        if space == isa.Space.HOST or (space == isa.Space.CDRAM and other != isa.Space.HOST):
            resource, per_byte, latency = self.pcie if space == isa.Space.HOST else self.p2p
            return latency, [(resource, nbytes)], per_byte
        if space in PIM_SPACES:
            return 0, self._pim_loads(space, addr, nbytes), self.pim_per_byte
        if space == isa.Space.FLASH:
            raise EmulatorError("DMA.COPY cannot reach FLASH: only CSD instructions read or "
                                "program flash; copy to or from CDRAM instead")
        return 0, [], None

    def execute(self, ins, start):
        f = ins.fields
        src, dst, nbytes = f["src_space"], f["dst_space"], f["nbytes"]
        machine = self.machine
        src_mem, dst_mem = machine.memory(src), machine.memory(dst)
        src_mem.check(f["src_addr"], nbytes)
        dst_mem.check(f["dst_addr"], nbytes)
        if nbytes == 0:
            raise EmulatorError("DMA.COPY of nbytes = 0 moves nothing; drop the instruction")
        if src == dst == isa.Space.HOST:
            raise EmulatorError("DMA.COPY from HOST to HOST never reaches the accelerator; "
                                "copy on the host instead")
        src_latency, src_loads, src_rate = self._side(src, f["src_addr"], nbytes, dst)
        dst_latency, dst_loads, dst_rate = self._side(dst, f["dst_addr"], nbytes, src)
        if not src_loads and not dst_loads:
            raise EmulatorError(f"DMA.COPY {src.name} -> {dst.name} crosses no link or memory "
                                f"channel; engines read {src.name} in place, so use the "
                                f"source address instead of copying")
        loads, stream = _merge_sides(src_loads, src_rate, dst_loads, dst_rate)
        first = self.occupy(loads, start + src_latency + dst_latency, stream)
        self._account(src, dst, nbytes)
        if not machine.timing_only or src_mem.written(f["src_addr"], nbytes):
            dst_mem.write(f["dst_addr"], src_mem.read(f["src_addr"], nbytes))
        return first + stream

    def _account(self, src, dst, nbytes: int) -> None:
        """Bytes per memory and link, and their energy."""
        machine, sides = self.machine, (src, dst)
        for space in sides:
            if space not in (SRAM, HBM):
                machine.count(space.name, nbytes)
        for link, space in (("pcie", isa.Space.HOST), ("p2p", isa.Space.CDRAM)):
            if space in sides and (link == "pcie" or isa.Space.HOST not in sides):
                machine.count(link, nbytes)
        self.charge(sram=nbytes * sides.count(SRAM), hbm=nbytes * sides.count(HBM))
        pim_sides = sum(space in PIM_SPACES for space in sides)
        if pim_sides:
            self.stats.energy_pj += pim_sides * nbytes * machine.config.pim.energy_pj_per_byte


# ---------------------------------------------------------------------------------------------
# MXU
# ---------------------------------------------------------------------------------------------

class MxuEngine(FpgaEngine):
    """MXU.GEMM on the sparse DSP chains; A, scale codes, weight tile and O all in SRAM."""
    engine = isa.Engine.MXU

    def execute(self, ins, start):
        f, fpga, sram = ins.fields, self.fpga, self.sram
        cycles = timing.mxu_gemm_cycles(fpga, f)
        m, n, k = f["m"], f["n"], f["k"]
        nm = timing.nm_pattern(fpga, f["nm"])
        group = isa.group_size(f["group_log2"], k)
        tile_bytes = weight_tile_bytes(n, k, f["bits"], nm, group)
        reads = ((f["a_addr"], m * k), (f["s_addr"], m * SCALES),
                 (f["w_addr"], tile_bytes))
        for addr, nbytes in reads + ((f["o_addr"], m * n * FX.itemsize),):
            sram.check(addr, nbytes)
        macs = timing.mxu_gemm_macs(fpga, f)
        self.stats.macs += macs
        self.charge(sram=sum(b for _, b in reads) + m * n * FX.itemsize, ops=macs)
        if not self.machine.timing_only:
            a8 = layout.unpack_a8_rows(sram.read(f["a_addr"], m * k), k)
            mant, exp = layout.unpack_scale_codes(sram.read(f["s_addr"], m * SCALES))
            w = weights.TILES.unpack(sram.read(f["w_addr"], tile_bytes), n, k, f["bits"], nm,
                                     group)
            out = numerics.linear(a8, mant, exp, w.w_eff, w.mult, w.shift)
            sram.write(f["o_addr"], layout.pack_fx_rows(out))
        return start + cycles


# ---------------------------------------------------------------------------------------------
# VPU
# ---------------------------------------------------------------------------------------------

class VpuEngine(FpgaEngine):
    """The VPU ops: element-wise functions on SRAM rows, and EMBED, KVAPP, ATTN over HBM."""
    engine = isa.Engine.VPU

    def __init__(self, machine):
        super().__init__(machine)
        self.region_cache: dict[tuple, np.ndarray] = {}
        self.layout_cache: dict[tuple, dict] = {}
        self.ops = {"VPU.EMBED": self._embed, "VPU.RMSNORM": self._rmsnorm,
                    "VPU.QUANT": self._quant, "VPU.ADD": self._add,
                    "VPU.SILUMUL": self._silumul, "VPU.ROPE": self._rope,
                    "VPU.KVAPP": self._kvapp, "VPU.ATTN": self._attn}

    def execute(self, ins, start):
        return self.ops[ins.name](ins.fields, start)

    # -- helpers ---------------------------------------------------------------------------

    def _rows(self, addr: int, m: int, n: int) -> np.ndarray:
        """m x n fx rows from SRAM."""
        return self.sram.read_array(addr, FX, (m, n))

    def _check(self, *ranges) -> int:
        """Bounds-check SRAM (addr, nbytes) ranges; return their total bytes."""
        for addr, nbytes in ranges:
            self.sram.check(addr, nbytes)
        return sum(nbytes for _, nbytes in ranges)

    def _positions(self, f: dict) -> np.ndarray:
        """Token positions (int32) of the m rows: control data, read in both modes."""
        self.sram.check(f["pos_addr"], f["m"] * FX.itemsize)
        pos = self.sram.read_array(f["pos_addr"], FX, (f["m"],)).astype(np.int64)
        if pos.min() < 0:
            raise EmulatorError(f"token position {int(pos.min())} at pos_addr is negative; "
                                f"positions count from 0")
        return pos

    def _simple(self, name: str, f: dict, start: int, sram_bytes: int) -> int:
        compute = timing.vpu_compute_cycles(self.fpga, name, f)
        self.charge(sram=sram_bytes, ops=compute * self.fpga.vpu_lanes)
        return start + timing.vpu_cycles(self.fpga, name, f)

    def _streamed(self, start: int, addrs, sizes, compute: int) -> int:
        """Hold the HBM channels of the ranges while streaming them, overlapping `compute`
        lane cycles; return the end cycle (`timing.vpu_stream_cycles` after any wait)."""
        loads, stream = self.hbm_loads(addrs, sizes)
        latency = self.fpga.hbm_latency_cycles
        first = self.occupy(loads, start + latency, stream)
        self.charge(hbm=sum(b for _, b in loads))
        return first - latency + timing.vpu_stream_cycles(self.fpga, stream, compute)

    def _kv_layout(self, f: dict) -> dict:
        """`layout.kv_offset` keywords of this instruction's cache (cached per geometry)."""
        key = (f["layers"], f["kv_heads"], f["ctx_log2"], f["head_dim"], f["kv_bits"],
               f["kv_group_log2"])
        found = self.layout_cache.get(key)
        if found is None:
            found = self.layout_cache[key] = timing.kv_layout(self.machine.config, HBM, f)
        return found

    def _regions(self, f: dict) -> np.ndarray:
        """HBM address of token 0 of each (kind, kv head) region, int64 [2, kv_heads]."""
        key = (f["kv_base"], f["seq"], f["layer"], f["layers"], f["kv_heads"], f["ctx_log2"],
               f["head_dim"], f["kv_bits"], f["kv_group_log2"])
        found = self.region_cache.get(key)
        if found is None:
            kw = self._kv_layout(f)
            found = self.region_cache[key] = f["kv_base"] + np.array(
                [[layout.kv_offset(f["seq"], f["layer"], h, kind, 0, **kw)
                  for h in range(f["kv_heads"])] for kind in layout.KV_KINDS], np.int64)
        return found

    def _token_offsets(self, f: dict, tokens) -> np.ndarray:
        """Offsets of `tokens` from their region's token 0, int64 (the same in every region)."""
        kw = self._kv_layout(f)
        return np.array([layout.kv_offset(0, 0, 0, "K", int(t), **kw) for t in tokens],
                        np.int64)

    # -- element-wise ops on SRAM ----------------------------------------------------------

    def _rmsnorm(self, f, start):
        m, n = f["m"], f["n"]
        moved = self._check((f["x_addr"], FX.itemsize * m * n),
                            (f["g_addr"], FX.itemsize * (n + 1)),
                            (f["o_addr"], m * n), (f["s_addr"], SCALES * m))
        if not self.machine.timing_only:
            x = self._rows(f["x_addr"], m, n)
            gamma_eps = self.sram.read_array(f["g_addr"], FX, (n + 1,))
            a8, mant, exp = special.rmsnorm_quant(x, gamma_eps[:n], int(gamma_eps[n]))
            self.sram.write(f["o_addr"], layout.pack_a8_rows(a8))
            self.sram.write(f["s_addr"], layout.pack_scale_codes(mant, exp))
        return self._simple("VPU.RMSNORM", f, start, moved)

    def _quant(self, f, start):
        m, n = f["m"], f["n"]
        moved = self._check((f["x_addr"], FX.itemsize * m * n), (f["o_addr"], m * n),
                            (f["s_addr"], SCALES * m))
        if not self.machine.timing_only:
            a8, mant, exp = numerics.quantize_act(self._rows(f["x_addr"], m, n))
            self.sram.write(f["o_addr"], layout.pack_a8_rows(a8))
            self.sram.write(f["s_addr"], layout.pack_scale_codes(mant, exp))
        return self._simple("VPU.QUANT", f, start, moved)

    def _binary(self, name, fn, f, start):
        m, n = f["m"], f["n"]
        size = FX.itemsize * m * n
        moved = self._check((f["a_addr"], size), (f["b_addr"], size), (f["o_addr"], size))
        if not self.machine.timing_only:
            out = fn(self._rows(f["a_addr"], m, n), self._rows(f["b_addr"], m, n))
            self.sram.write_array(f["o_addr"], out.astype(FX))
        return self._simple(name, f, start, moved)

    def _add(self, f, start):
        return self._binary("VPU.ADD", special.add_sat, f, start)

    def _silumul(self, f, start):
        return self._binary("VPU.SILUMUL", special.silu_mul, f, start)

    def _rope(self, f, start):
        m, heads, d = f["m"], f["heads"], f["head_dim"]
        size = FX.itemsize * m * heads * d
        moved = self._check((f["x_addr"], size), (f["pos_addr"], FX.itemsize * m),
                            (f["o_addr"], size))
        pos = self._positions(f)
        row_bytes = d * ROPE_TABLE.itemsize
        self._check((f["table_addr"], (int(pos.max()) + 1) * row_bytes))
        if not self.machine.timing_only:
            table = self.sram.read_array(f["table_addr"], ROPE_TABLE, (int(pos.max()) + 1, d))
            x = self._rows(f["x_addr"], m, heads * d).reshape(m, heads, d)
            out = special.rope(x, pos, table[:, :d // 2], table[:, d // 2:])
            self.sram.write_array(f["o_addr"], out.astype(FX).reshape(m, heads * d))
        return self._simple("VPU.ROPE", f, start, moved + m * row_bytes)

    # -- ops over HBM ----------------------------------------------------------------------

    def _embed(self, f, start):
        m, n = f["m"], f["n"]
        row_bytes = n + SCALES
        moved = self._check((f["ids_addr"], FX.itemsize * m), (f["o_addr"], FX.itemsize * m * n))
        ids = self.sram.read_array(f["ids_addr"], FX, (m,)).astype(np.int64)
        if ids.min() < 0:
            raise EmulatorError(f"token id {int(ids.min())} is negative")
        addrs = f["table_addr"] + ids * row_bytes
        compute = timing.vpu_compute_cycles(self.fpga, "VPU.EMBED", f)
        end = self._streamed(start, addrs, row_bytes, compute)
        self.charge(sram=moved, ops=compute * self.fpga.vpu_lanes)
        if not self.machine.timing_only:
            hbm = self.machine.memory(HBM)
            raw = np.stack([hbm.read(addr, row_bytes) for addr in addrs.tolist()])
            mant, exp = layout.unpack_scale_codes(raw[:, n:].reshape(-1))
            out = numerics.dequantize_act(raw[:, :n].view(np.int8), mant, exp)
            self.sram.write_array(f["o_addr"], out.astype(FX))
        return end

    def _kvapp(self, f, start):
        m, heads, d = f["m"], f["kv_heads"], f["head_dim"]
        size = FX.itemsize * m * heads * d
        moved = self._check((f["k_addr"], size), (f["v_addr"], size))
        kv = self._kv_layout(f)
        token_bytes = layout.kv_token_bytes(d, kv["bits"], kv["group"])
        addrs = self._regions(f)[..., None] + self._token_offsets(f, self._positions(f))
        compute = timing.vpu_compute_cycles(self.fpga, "VPU.KVAPP", f)
        end = self._streamed(start, addrs.ravel(), token_bytes, compute)
        self.charge(sram=moved, ops=compute * self.fpga.vpu_lanes)
        if not self.machine.timing_only:
            self._kvapp_values(f, addrs)
        return end

    def _kvapp_values(self, f: dict, addrs: np.ndarray) -> None:
        """Quantize the m K and V rows per kv head and store them at `addrs` [2, heads, m]."""
        m, heads, d = f["m"], f["kv_heads"], f["head_dim"]
        kv = self._kv_layout(f)
        bits, group = kv["bits"], kv["group"]
        hbm = self.machine.memory(HBM)
        for kind_addrs, src in zip(addrs, (f["k_addr"], f["v_addr"])):
            x = self._rows(src, m, heads * d).reshape(m, heads, d).transpose(1, 0, 2)
            q, g, mant, exp = numerics.quantize_kv(x, bits, group)
            for h in range(heads):
                rows = layout.pack_kv_tokens(q[h], g[h], mant[h], exp[h], bits)
                for addr, row in zip(kind_addrs[h].tolist(), rows):
                    hbm.write(addr, row)

    def _attn(self, f, start):
        m, hq, hkv, d = f["m"], f["q_heads"], f["kv_heads"], f["head_dim"]
        if hq % hkv:
            raise EmulatorError(f"q_heads = {hq} is not a multiple of kv_heads = {hkv}")
        size = FX.itemsize * m * hq * d
        moved = self._check((f["q_addr"], size), (f["o_addr"], size))
        ctxs = (self._positions(f) + 1).tolist()
        kv = self._kv_layout(f)
        token_bytes = layout.kv_token_bytes(d, kv["bits"], kv["group"])
        spans = [int(off) + token_bytes
                 for off in self._token_offsets(f, [n - 1 for n in timing.attn_tokens(f, ctxs)])]
        regions = self._regions(f)
        sizes = np.repeat(np.array(spans, np.int64), hkv)
        compute = timing.attn_compute_cycles(self.fpga, f, ctxs)
        end = self._streamed(start, regions.ravel(), sizes, compute)
        macs = timing.attn_macs(f, ctxs)
        self.stats.macs += macs
        self.charge(sram=moved, ops=macs)
        if not self.machine.timing_only:
            self._attn_values(f, ctxs, regions)
        return end

    def _attn_values(self, f: dict, ctxs: list[int], regions: np.ndarray) -> None:
        """Read the cached tokens 0..max(ctxs)-1 of every region and run special.attention."""
        m, hq, hkv, d = f["m"], f["q_heads"], f["kv_heads"], f["head_dim"]
        kv = self._kv_layout(f)
        bits, group = kv["bits"], kv["group"]
        hbm = self.machine.memory(HBM)
        token_bytes = layout.kv_token_bytes(d, bits, group)
        offsets = self._token_offsets(f, range(max(ctxs)))
        gather = offsets[:, None] + np.arange(token_bytes)
        caches = []
        for kind_regions in regions.tolist():
            heads = [layout.unpack_kv_tokens(hbm.read(base, int(gather[-1, -1]) + 1)[gather],
                                             d, bits, group) for base in kind_regions]
            caches.append(tuple(np.stack(field) for field in zip(*heads)))
        q = self._rows(f["q_addr"], m, hq * d).reshape(m, hq, d)
        pos = np.asarray(ctxs, np.int64) - 1
        out = special.attention(q, caches[0], caches[1], pos, kv_heads=hkv, kv_bits=bits,
                                splits=f["splits"], topk=f["topk"])
        self.sram.write_array(f["o_addr"], np.asarray(out).astype(FX).reshape(m, hq * d))
