// The batched co-simulation harness: a Verilated top driven from C++ in whole runs.
//
// Built into a shared library with the top (trimem/sims/harness.py) and driven through ctypes:
// every call below runs many cycles (a program load, a memory image, a run to HALT, a replay
// of a stimulus table), so Python is never called per cycle. Ports are addressed by index into
// the table that the generated header "ports.h" binds (top-level ports, then probes: internal
// signals made public by the build's Verilator control file). Values cross the boundary as
// little-endian arrays of 32-bit words.
//
// One cycle is: inputs set, clk low and eval (combinational outputs settle: this is what the
// design sees during the cycle, and what `replay` and `run` sample), clk high and eval (the
// edge). Memory ports follow the SRAM window protocol of trimem.hdl.frontend: a read answers
// in the cycle after its address, a write lands at the edge of its cycle.

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "verilated.h"
#include "Vtop.h"
#include "Vtop___024root.h"

struct Port {
    void* ptr;
    int width;  // bits
    int bytes;  // storage: 1, 2, 4, 8, or 4 * words for wide signals
    bool input;
};

template <class T>
static Port port(T* ptr, int width, bool input) {
    return {ptr, width, static_cast<int>(sizeof(T)), input};
}

template <std::size_t N>
static Port port(VlWide<N>* ptr, int width, bool input) {
    return {ptr->m_storage, width, static_cast<int>(4 * N), input};
}

// A memory of the design, written and read behind its ports ("backdoor"): `depth` elements of
// `width` bits, each stored in `elem_bytes` bytes, little-endian.
struct Mem {
    uint8_t* ptr;
    int width;
    int elem_bytes;
    uint64_t depth;
};

template <class T, std::size_t N>
static Mem mem(VlUnpacked<T, N>* m, int width) {
    return {reinterpret_cast<uint8_t*>(m->m_storage), width, static_cast<int>(sizeof(T)), N};
}

#include "ports.h"  // TM_PORT_COUNT, TM_PORT_NAMES, TM_MEM_COUNT, TM_MEM_NAMES, tm_bind

static int words_of(int width) { return (width + 31) / 32; }

static uint64_t mask64(int width) { return width >= 64 ? ~0ull : (1ull << width) - 1; }

static void poke(const Port& p, const uint32_t* w) {
    if (p.bytes > 8) {
        int n = words_of(p.width);
        uint32_t* dst = static_cast<uint32_t*>(p.ptr);
        std::memcpy(dst, w, 4 * n);
        if (p.width % 32) dst[n - 1] &= (1u << (p.width % 32)) - 1;
        return;
    }
    uint64_t v = w[0];
    if (p.width > 32) v |= static_cast<uint64_t>(w[1]) << 32;
    v &= mask64(p.width);
    switch (p.bytes) {
        case 1: *static_cast<uint8_t*>(p.ptr) = static_cast<uint8_t>(v); break;
        case 2: *static_cast<uint16_t*>(p.ptr) = static_cast<uint16_t>(v); break;
        case 4: *static_cast<uint32_t*>(p.ptr) = static_cast<uint32_t>(v); break;
        default: *static_cast<uint64_t*>(p.ptr) = v; break;
    }
}

static void peek(const Port& p, uint32_t* w) {
    if (p.bytes > 8) {
        std::memcpy(w, p.ptr, 4 * words_of(p.width));
        return;
    }
    uint64_t v = 0;
    switch (p.bytes) {
        case 1: v = *static_cast<uint8_t*>(p.ptr); break;
        case 2: v = *static_cast<uint16_t*>(p.ptr); break;
        case 4: v = *static_cast<uint32_t*>(p.ptr); break;
        default: v = *static_cast<uint64_t*>(p.ptr); break;
    }
    w[0] = static_cast<uint32_t>(v);
    if (p.width > 32) w[1] = static_cast<uint32_t>(v >> 32);
}

static uint64_t value64(const Port& p) {
    uint32_t w[2] = {0, 0};
    if (p.bytes > 8) {
        std::memcpy(w, p.ptr, p.width > 32 ? 8 : 4);
        return w[0] | static_cast<uint64_t>(w[1]) << 32;
    }
    peek(p, w);
    return w[0] | static_cast<uint64_t>(w[1]) << 32;
}

static void poke64(const Port& p, uint64_t v) {
    std::vector<uint32_t> w(words_of(p.width) + 2, 0);
    w[0] = static_cast<uint32_t>(v);
    w[1] = static_cast<uint32_t>(v >> 32);
    poke(p, w.data());
}

// Memory models at the top's ports, for tops whose memories live outside them: a read port
// (`addr` out, `data` in: the data of an address in the cycle after it) and a write port
// (`addr`, `data`, `mask` with a bit per data byte, `en`: written at the cycle's edge), as
// the window ports of trimem.hdl.frontend. Addresses are offset by `base`.
struct ReadModel {
    int memory, addr, data;
    uint64_t base, latched;
};

struct WriteModel {
    int memory, addr, data, mask, en;
    uint64_t base;
};

struct Harness {
    VerilatedContext context;
    Vtop* top;
    Port ports[TM_PORT_COUNT];
    Mem mems[TM_MEM_COUNT + 1];
    std::vector<std::vector<uint8_t>> memories;
    std::vector<ReadModel> reads;
    std::vector<WriteModel> writes;
    uint64_t cycle = 0;

    Harness() {
        context.randReset(0);
        top = new Vtop(&context, "TOP");
        tm_bind(top, ports, mems);
        top->clk = 0;
        top->rst = 0;
        top->eval();
    }
    ~Harness() {
        top->final();
        delete top;
    }
    void settle() {
        top->clk = 0;
        top->eval();
    }
    void edge() {
        if (!reads.empty() || !writes.empty()) serve();
        top->clk = 1;
        top->eval();
        ++cycle;
        for (ReadModel& r : reads) answer(r);
    }
    void tick() {
        settle();
        edge();
    }
    // In the settled cycle: take the writes and latch the read addresses.
    void serve();
    void answer(ReadModel& r);
};

void Harness::serve() {
    std::vector<uint32_t> w;
    for (const WriteModel& m : writes) {
        if (!value64(ports[m.en])) continue;
        const Port& p = ports[m.data];
        w.assign(words_of(p.width) + 2, 0);
        peek(p, w.data());
        const uint8_t* bytes = reinterpret_cast<const uint8_t*>(w.data());
        uint64_t mask = value64(ports[m.mask]);
        uint64_t addr = value64(ports[m.addr]) - m.base;
        std::vector<uint8_t>& mem = memories[m.memory];
        for (int b = 0; b < p.width / 8; ++b)
            if (mask >> b & 1 && addr + b < mem.size()) mem[addr + b] = bytes[b];
    }
    for (ReadModel& r : reads) r.latched = value64(ports[r.addr]) - r.base;
}

void Harness::answer(ReadModel& r) {
    const Port& p = ports[r.data];
    const std::vector<uint8_t>& mem = memories[r.memory];
    std::vector<uint32_t> w(words_of(p.width) + 2, 0);
    uint8_t* bytes = reinterpret_cast<uint8_t*>(w.data());
    for (int b = 0; b < p.width / 8; ++b)
        if (r.latched + b < mem.size()) bytes[b] = mem[r.latched + b];
    poke(p, w.data());
}

static bool valid_port(int port) { return port >= 0 && port < TM_PORT_COUNT; }

static bool valid_mem(int m) { return m >= 0 && m < TM_MEM_COUNT; }

extern "C" {

int tm_port_count() { return TM_PORT_COUNT; }

const char* tm_port_name(int port) { return valid_port(port) ? TM_PORT_NAMES[port] : ""; }

void* tm_open() { return new Harness(); }

void tm_close(void* h) { delete static_cast<Harness*>(h); }

int tm_port_width(void* h, int port) {
    return valid_port(port) ? static_cast<Harness*>(h)->ports[port].width : -1;
}

int tm_port_input(void* h, int port) {
    return valid_port(port) ? static_cast<Harness*>(h)->ports[port].input : -1;
}

uint64_t tm_cycle(void* h) { return static_cast<Harness*>(h)->cycle; }

void tm_poke(void* h, int port, const uint32_t* words) {
    poke(static_cast<Harness*>(h)->ports[port], words);
}

void tm_peek(void* h, int port, uint32_t* words) {
    Harness* s = static_cast<Harness*>(h);
    s->settle();
    peek(s->ports[port], words);
}

// Hold reset for `cycles` cycles, then release it.
void tm_reset(void* h, int cycles) {
    Harness* s = static_cast<Harness*>(h);
    s->top->rst = 1;
    for (int i = 0; i < cycles; ++i) s->tick();
    s->top->rst = 0;
}

// Run `cycles` cycles with the inputs held.
void tm_step(void* h, uint64_t cycles) {
    Harness* s = static_cast<Harness*>(h);
    for (uint64_t i = 0; i < cycles; ++i) s->tick();
}

// Replay a stimulus table: in cycle c the inputs `in_ports` take the words of row c of `in`
// (`in_stride` words per row, each port's words in order). When `when` < 0 or port `when` is
// nonzero in the cycle, the cycle number goes to `records` and the outputs `out_ports` to the
// next row of `out` (`out_stride` words), at most `max_records` rows. Returns the rows written.
uint64_t tm_replay(void* h, uint64_t cycles, int n_in, const int* in_ports, const uint32_t* in,
                   int in_stride, int n_out, const int* out_ports, uint32_t* out,
                   int out_stride, int when, uint64_t* records, uint64_t max_records) {
    Harness* s = static_cast<Harness*>(h);
    uint64_t rows = 0;
    for (uint64_t c = 0; c < cycles; ++c) {
        const uint32_t* row = in + c * in_stride;
        for (int i = 0; i < n_in; ++i) {
            const Port& p = s->ports[in_ports[i]];
            poke(p, row);
            row += words_of(p.width);
        }
        s->settle();
        if (rows < max_records && (when < 0 || value64(s->ports[when]))) {
            uint32_t* dst = out + rows * out_stride;
            for (int i = 0; i < n_out; ++i) {
                const Port& p = s->ports[out_ports[i]];
                peek(p, dst);
                dst += words_of(p.width);
            }
            records[rows++] = c;
        }
        s->edge();
    }
    return rows;
}

// Run with the inputs held until port `stop` is nonzero in a cycle (that cycle is not run) or
// `max_cycles` have run. Every change of a watched port's low 64 bits, as sampled in a cycle,
// is logged as (cycle since the call, watch index, new value) in `events` (3 words each, at
// most `max_events`). Returns the cycles run; *n_events gets the events logged (those beyond
// `max_events` are counted, not stored) and *stopped whether `stop` was seen.
uint64_t tm_run(void* h, uint64_t max_cycles, int stop, int n_watch, const int* watch,
                uint64_t* events, uint64_t max_events, uint64_t* n_events, int* stopped) {
    Harness* s = static_cast<Harness*>(h);
    std::vector<uint64_t> last(n_watch);
    s->settle();
    for (int i = 0; i < n_watch; ++i) last[i] = value64(s->ports[watch[i]]);
    uint64_t logged = 0;
    *stopped = 0;
    uint64_t c = 0;
    for (; c < max_cycles; ++c) {
        s->settle();
        for (int i = 0; i < n_watch; ++i) {
            uint64_t v = value64(s->ports[watch[i]]);
            if (v != last[i]) {
                if (logged < max_events) {
                    events[3 * logged] = c;
                    events[3 * logged + 1] = i;
                    events[3 * logged + 2] = v;
                }
                ++logged;
                last[i] = v;
            }
        }
        if (value64(s->ports[stop])) {
            *stopped = 1;
            break;
        }
        s->edge();
    }
    *n_events = logged;
    return c;
}

// Write `n` bytes at `addr` through a window write port: ports[0..3] = addr, data, mask, en;
// `beat` bytes per cycle, one mask bit per byte.
void tm_write(void* h, const int* ports, int beat, uint64_t addr, const uint8_t* data,
              uint64_t n) {
    Harness* s = static_cast<Harness*>(h);
    const Port& pa = s->ports[ports[0]];
    const Port& pd = s->ports[ports[1]];
    const Port& pm = s->ports[ports[2]];
    const Port& pe = s->ports[ports[3]];
    std::vector<uint32_t> words(words_of(8 * beat) + 2, 0);
    for (uint64_t at = 0; at < n; at += beat) {
        uint64_t len = n - at < static_cast<uint64_t>(beat) ? n - at : beat;
        std::fill(words.begin(), words.end(), 0);
        std::memcpy(words.data(), data + at, len);
        poke64(pa, addr + at);
        poke(pd, words.data());
        poke64(pm, len >= 64 ? ~0ull : (1ull << len) - 1);
        poke64(pe, 1);
        s->tick();
    }
    poke64(pe, 0);
}

// Read `n` bytes from `addr` through a window read port: ports[0..1] = addr, data.
void tm_read(void* h, const int* ports, int beat, uint64_t addr, uint8_t* out, uint64_t n) {
    Harness* s = static_cast<Harness*>(h);
    const Port& pa = s->ports[ports[0]];
    const Port& pd = s->ports[ports[1]];
    std::vector<uint32_t> words(words_of(8 * beat) + 2, 0);
    for (uint64_t at = 0; at < n; at += beat) {
        uint64_t len = n - at < static_cast<uint64_t>(beat) ? n - at : beat;
        poke64(pa, addr + at);
        s->tick();
        s->settle();
        peek(pd, words.data());
        std::memcpy(out + at, words.data(), len);
    }
}

// Parse a $readmemh file of `width` bytes per line (most significant byte first) into bytes,
// little-endian; returns false on a malformed line.
static bool read_hex(const char* path, int width, std::vector<uint8_t>& bytes) {
    std::ifstream file(path);
    if (!file) return false;
    std::string line;
    std::vector<uint8_t> row(width);
    while (std::getline(file, line)) {
        std::string text = line.substr(0, line.find("//"));
        text.erase(0, text.find_first_not_of(" \t\r"));
        text.erase(text.find_last_not_of(" \t\r") + 1);
        if (text.empty()) continue;
        if (text.size() != static_cast<size_t>(2 * width)) return false;
        for (int i = 0; i < width; ++i) {
            unsigned value;
            if (std::sscanf(text.c_str() + 2 * i, "%2x", &value) != 1) return false;
            row[width - 1 - i] = static_cast<uint8_t>(value);
        }
        bytes.insert(bytes.end(), row.begin(), row.end());
    }
    return true;
}

// Write a bundle's $readmemh image at `addr` through a window write port (as tm_write).
// Returns the bytes written, or -1 when the file is missing or malformed.
int64_t tm_write_hex(void* h, const int* ports, int beat, uint64_t addr, const char* path,
                     int width) {
    std::vector<uint8_t> bytes;
    if (!read_hex(path, width, bytes)) return -1;
    tm_write(h, ports, beat, addr, bytes.data(), bytes.size());
    return static_cast<int64_t>(bytes.size());
}

// Write instruction words through a program-load port: ports[0..1] = valid, payload (word
// address in the low `addr_bits` bits, the word above them). `words` holds `count` words of
// `word_bytes` bytes each.
void tm_load_program(void* h, const int* ports, int addr_bits, const uint8_t* words, int count,
                     int word_bytes) {
    Harness* s = static_cast<Harness*>(h);
    const Port& pv = s->ports[ports[0]];
    const Port& pp = s->ports[ports[1]];
    std::vector<uint32_t> payload(words_of(pp.width) + 2, 0);
    for (int i = 0; i < count; ++i) {
        std::fill(payload.begin(), payload.end(), 0);
        payload[0] = static_cast<uint32_t>(i);
        for (int b = 0; b < word_bytes; ++b) {
            int bit = addr_bits + 8 * b;
            uint64_t byte = words[static_cast<size_t>(i) * word_bytes + b];
            payload[bit / 32] |= static_cast<uint32_t>(byte << (bit % 32));
            if (bit % 32 > 24)
                payload[bit / 32 + 1] |= static_cast<uint32_t>(byte >> (32 - bit % 32));
        }
        poke(pp, payload.data());
        poke64(pv, 1);
        s->tick();
    }
    poke64(pv, 0);
}

// Load a bundle's program (.hex, one `word_bytes` word per line) as tm_load_program.
// Returns the words loaded, or -1 when the file is missing or malformed.
int tm_load_program_hex(void* h, const int* ports, int addr_bits, const char* path,
                        int word_bytes) {
    std::vector<uint8_t> bytes;
    if (!read_hex(path, word_bytes, bytes)) return -1;
    int count = static_cast<int>(bytes.size() / word_bytes);
    tm_load_program(h, ports, addr_bits, bytes.data(), count, word_bytes);
    return count;
}

int tm_mem_count() { return TM_MEM_COUNT; }

const char* tm_mem_name(int m) { return valid_mem(m) ? TM_MEM_NAMES[m] : ""; }

// Width in bits, storage bytes per element and depth of memory `m`.
void tm_mem_info(void* h, int m, int* width, int* elem_bytes, uint64_t* depth) {
    const Mem& x = static_cast<Harness*>(h)->mems[m];
    *width = x.width;
    *elem_bytes = x.elem_bytes;
    *depth = x.depth;
}

// Write `n` bytes at byte `addr` of memory `m` seen as consecutive `width / 8`-byte elements
// (element i holds bytes [i * width / 8, (i + 1) * width / 8), little-endian). Returns -1 when
// the range does not fit.
int tm_mem_write(void* h, int m, uint64_t addr, const uint8_t* data, uint64_t n) {
    const Mem& x = static_cast<Harness*>(h)->mems[m];
    uint64_t wb = x.width / 8;
    if (x.width % 8 || addr + n > wb * x.depth) return -1;
    for (uint64_t i = 0; i < n; ++i) {
        uint64_t at = addr + i;
        x.ptr[(at / wb) * x.elem_bytes + at % wb] = data[i];
    }
    return 0;
}

// Read `n` bytes at byte `addr` of memory `m` (as tm_mem_write). Returns -1 when out of range.
int tm_mem_read(void* h, int m, uint64_t addr, uint8_t* out, uint64_t n) {
    const Mem& x = static_cast<Harness*>(h)->mems[m];
    uint64_t wb = x.width / 8;
    if (x.width % 8 || addr + n > wb * x.depth) return -1;
    for (uint64_t i = 0; i < n; ++i) {
        uint64_t at = addr + i;
        out[i] = x.ptr[(at / wb) * x.elem_bytes + at % wb];
    }
    return 0;
}

// Write a bundle's $readmemh image at byte `addr` of memory `m` (as tm_mem_write). Returns
// the bytes written, or -1 for a missing or malformed file or a range that does not fit.
int64_t tm_mem_write_hex(void* h, int m, uint64_t addr, const char* path, int width) {
    std::vector<uint8_t> bytes;
    if (!read_hex(path, width, bytes)) return -1;
    if (tm_mem_write(h, m, addr, bytes.data(), bytes.size()) < 0) return -1;
    return static_cast<int64_t>(bytes.size());
}

// A memory model of `size` bytes for tm_attach_read / tm_attach_write; returns its id.
int tm_model(void* h, uint64_t size) {
    Harness* s = static_cast<Harness*>(h);
    s->memories.emplace_back(size, 0);
    return static_cast<int>(s->memories.size() - 1);
}

int tm_model_write(void* h, int model, uint64_t addr, const uint8_t* data, uint64_t n) {
    std::vector<uint8_t>& mem = static_cast<Harness*>(h)->memories[model];
    if (addr + n > mem.size()) return -1;
    std::memcpy(mem.data() + addr, data, n);
    return 0;
}

int tm_model_read(void* h, int model, uint64_t addr, uint8_t* out, uint64_t n) {
    const std::vector<uint8_t>& mem = static_cast<Harness*>(h)->memories[model];
    if (addr + n > mem.size()) return -1;
    std::memcpy(out, mem.data() + addr, n);
    return 0;
}

// Serve read port (addr, data) from `model`: the bytes at addr - base, a cycle later.
void tm_attach_read(void* h, int model, int addr, int data, uint64_t base) {
    static_cast<Harness*>(h)->reads.push_back({model, addr, data, base, 0});
}

// Take the writes of write port (addr, data, mask, en) into `model`, at addr - base.
void tm_attach_write(void* h, int model, int addr, int data, int mask, int en, uint64_t base) {
    static_cast<Harness*>(h)->writes.push_back({model, addr, data, mask, en, base});
}

}  // extern "C"
