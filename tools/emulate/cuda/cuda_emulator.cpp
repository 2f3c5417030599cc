// A CPU emulator of the parts of the CUDA driver API, NVRTC and cuBLASLt that DispNative uses, in one shared library
// (build.sh). Point DISPNATIVE_CUDA_LIBRARY, DISPNATIVE_NVRTC_LIBRARY and DISPNATIVE_CUBLASLT_LIBRARY at it and the
// engine's whole CUDA path (kernels, GEMMs, graphs, self-test, GPU tests) runs on a machine without a GPU.
//
// - "NVRTC" rewrites the kernel source's inline PTX into calls of emu_device.h, compiles it with g++ into a shared
//   object (the "CUBIN"), and adds one wrapper per extern "C" entry point that unpacks cuLaunchKernel's arguments.
// - A launch runs the blocks one after another; each CUDA thread is a fiber with its own stack. __syncthreads and
//   warp collectives (shuffles, mma.sync.m16n8k16, ldmatrix .x4 and .x4.trans) suspend the fiber until every thread that
//   must arrive has arrived. A deadlock, collectives that diverge within a warp, or a lane leaving before its warp's
//   collective fail the launch with a message instead of hanging. Each thread runs as far as it can before the next
//   one starts, so a missing barrier shows up as wrong results; DISPNATIVE_EMU_SCHEDULE=reverse runs the threads
//   and the blocks from the last one down, to catch the races that the first order hides (and a block that counts on
//   finishing after the others). Atomics are plain read-modify-writes: a fiber switches only at a collective, or at
//   __nanosleep, with which a spin-wait lets the others run. A cooperative launch (cuLaunchCooperativeKernel) runs
//   all its blocks at once, each with its own shared memory, so a grid-wide barrier can complete; spin-waits that
//   never end (such a barrier in a normal launch) fail the launch.
// - A vector load or store (reinterpret_cast to uint4*, float4* and the like) at an address that is not a multiple of
//   its size fails the launch, as it faults on a GPU (x86 would read it quietly).
// - Device memory is host memory from mmap, filled with 0xff bytes (NaN as floats, -1 as ints), as shared memory is
//   at the start of every block, so that a read of memory nothing wrote shows up; each buffer is followed by a guard
//   page so that running off its end faults, and a fault inside a kernel names the kernel, block and thread.
//   DISPNATIVE_EMU_MEMORY caps the bytes (out-of-memory paths).
// - cuBLASLt matmuls are plain f32 loops over the column-major operands their layouts describe, with the
//   validation that cuBLASLt does (shapes, leading dimensions, the alignment the heuristic was asked for).
// - Streams are asynchronous, as on a GPU: launches, matmuls, device-to-device copies and copies from or to pinned
//   host memory (cuMemAllocHost) wait in one queue, in submission order, until a synchronization (cuStreamSynchronize,
//   cuEventSynchronize, cuMemFree, cuMemFreeHost, cuStreamDestroy, cuModuleUnload, a copy from or to pageable host
//   memory) runs them; so the host reading a pinned download, or rewriting a pinned upload's source, before it
//   synchronizes shows up. A kernel's failure is reported by the synchronization that ran it. Mapped pinned memory
//   (cuMemHostAlloc, DEVICEMAP) is its own device address; filled with 0xff bytes, so a host read before the kernel
//   that writes it has run shows up too.
// - Stream capture records launches, copies and matmuls; a graph launch queues them.
// It checks what the engine asks of CUDA, not the speed or the numerics of a real GPU.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dlfcn.h>
#include <fstream>
#include <map>
#include <mutex>
#include <regex>
#include <sstream>
#include <string>
#include <sys/mman.h>
#include <thread>
#include <unistd.h>
#include <vector>

#include "emu_texts.h"   // EMU_DEVICE_H, EMU_API_H: emu_device.h and emu_api.h as strings (build.sh)

#define EXPORT extern "C" __attribute__((visibility("default")))

namespace {

std::recursive_mutex g_lock;
using Guard = std::lock_guard<std::recursive_mutex>;

void warn(const char* fmt, ...)
{
    va_list ap; va_start(ap, fmt);
    fprintf(stderr, "[cuda-emulator] "); vfprintf(stderr, fmt, ap); fprintf(stderr, "\n");
    va_end(ap);
}

// ---------------------------------------------------------------------------------------------------------------
// Fibers: x86-64 System V context switch (callee-saved registers and the stack pointer).
extern "C" void emu_switch_context(void** save_sp, void* load_sp);
asm(R"(
.text
.globl emu_switch_context
.hidden emu_switch_context
.type emu_switch_context,@function
emu_switch_context:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size emu_switch_context, .-emu_switch_context
)");

#include "emu_api.h"

enum State { RUNNABLE, AT_BARRIER, AT_COLLECTIVE, DONE };

struct Fiber
{
    void* sp = nullptr;
    char* stack = nullptr;
    EmuThread thread{};
    State state = DONE;
    int kind = 0;
    unsigned mask = 0;
    unsigned long long in[10]{}, out[4]{};
    int count = 0;
    int block = 0;          // index of its block among those running at once (a cooperative launch's grid)
    int wgmma_issued = 0;   // lane 0 of a warp: the wgmma its warp has issued in this block (warpgroup_check)
    bool yielded = false;   // its last switch back came from __nanosleep (a spin-wait), not from progress
};

constexpr size_t StackBytes = 128 << 10;
constexpr int Multiprocessors = 132;   // the emulated device's SMs (an H100's)

struct LaunchState
{
    void (*entry)(void**) = nullptr;
    void** args = nullptr;
    const char* name = "";
    std::vector<Fiber> fibers;
    void* scheduler_sp = nullptr;
    Fiber* current = nullptr;
    std::string error;
    bool running = false;
} g_run;

EmuApi g_api;

[[noreturn]] void fiber_main()
{
    Fiber* f = g_run.current;
    g_run.entry(g_run.args);
    f->state = DONE;
    emu_switch_context(&f->sp, g_run.scheduler_sp);
    __builtin_unreachable();
}

void yield_to_scheduler()
{
    Fiber* f = g_run.current;
    emu_switch_context(&f->sp, g_run.scheduler_sp);
}

void api_syncthreads()
{
    g_run.current->state = AT_BARRIER;
    yield_to_scheduler();
}

void api_collective(int kind, unsigned mask, const unsigned long long* in, int count, unsigned long long* out)
{
    Fiber* f = g_run.current;
    f->state = AT_COLLECTIVE;
    f->kind = kind;
    f->mask = mask;
    f->count = count;
    for (int i = 0; i < count; i++) f->in[i] = in[i];
    yield_to_scheduler();
    if (out) for (int i = 0; i < 4; i++) out[i] = f->out[i];
}

void api_yield()
{
    g_run.current->yielded = true;   // stays RUNNABLE
    yield_to_scheduler();
}

void api_fail(const char* message)
{
    if (g_run.error.empty()) g_run.error = message;
    g_run.current->state = AT_BARRIER;   // parks the fiber; the scheduler stops the launch
    yield_to_scheduler();
}

float bf16_to_f32(unsigned short b) { unsigned u = (unsigned)b << 16; float f; memcpy(&f, &u, 4); return f; }
unsigned short f32_to_bf16(float v)
{
    unsigned u; memcpy(&u, &v, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// A 16-bit element of a register (half 0: the low bits) as f32, bf16 or f16.
float half_of(unsigned reg, int half, bool bf16)
{
    unsigned short v = (unsigned short)(half ? reg >> 16 : reg & 0xffffu);
    return bf16 ? bf16_to_f32(v) : emu_h2f(v);
}

// Lane (4g + t)'s share of a 16 x 16 A fragment (mma.sync m16n8k16's, and per warp wgmma's from registers): rows g and
// g + 8, columns 2t, 2t + 1 (r0, r1) and 2t + 8, 2t + 9 (r2, r3).
void a_fragment(float (&A)[16][16], int lane, const unsigned long long* r, bool bf16)
{
    int g = lane >> 2, t = lane & 3;
    for (int h = 0; h < 2; h++)
    {
        A[g][2 * t + h] = half_of((unsigned)r[0], h, bf16);
        A[g + 8][2 * t + h] = half_of((unsigned)r[1], h, bf16);
        A[g][2 * t + 8 + h] = half_of((unsigned)r[2], h, bf16);
        A[g + 8][2 * t + 8 + h] = half_of((unsigned)r[3], h, bf16);
    }
}

// One warp's share of wgmma.mma_async.m64nNk16 (emu_wgmma): its 16 rows of D = A·B (+ D). A: its 16 rows, from the
// lanes' registers (mma.sync's A fragment) or through descriptor A; B (16 × N) through descriptor B. Descriptors as
// the PTX ISA gives them (start address, leading and stride byte offsets, each >> 4; swizzle mode in bits 62-63);
// only the 128-byte swizzle is implemented: a 16-byte chunk's address bits 4-6 are XORed with bits 7-9. Canonical
// layouts: K-major, element (row r, k) at start + (r / 8)·SBO + (r % 8)·128 + 2k (k < 16: within a 128-byte row);
// MN-major, element (k, n) at start + (k / 8)·SBO + (k % 8)·128 + (n / 64)·LBO + 2(n % 64).
bool resolve_wgmma(Fiber* warp, bool bf16)
{
    unsigned long long meta = warp[0].in[0];
    for (int l = 1; l < 32; l++)
        for (int i : {0, 2, 7})
            if (warp[l].in[i] != warp[0].in[i]) { g_run.error = "wgmma: lanes disagree on the shape, flags or descriptors"; return false; }
    int n = (int)(meta & 1023), w = (int)(meta >> 16 & 3);
    bool tnsp_a = meta >> 10 & 1, tnsp_b = meta >> 11 & 1, a_regs = meta >> 12 & 1, scale_d = meta >> 13 & 1;
    bool ok = true;
    // The 16-bit element at byte offset `offset` from the descriptor's start, after the swizzle.
    auto element = [&](unsigned long long desc, unsigned offset) -> float {
        if ((desc >> 62) != 1) { g_run.error = "wgmma: only the 128-byte swizzle is emulated (descriptor mode " + std::to_string(desc >> 62) + ")"; ok = false; return 0.f; }
        unsigned address = (unsigned)((desc & 0x3fff) << 4) + offset;
        address ^= ((address >> 7) & 7u) << 4;
        if (address + 2 > g_api.dynamic_shared_bytes) { g_run.error = "wgmma: operand address " + std::to_string(address) + " past the dynamic shared memory"; ok = false; return 0.f; }
        unsigned short v; memcpy(&v, g_api.dynamic_shared + address, 2);
        return half_of(v, 0, bf16);
    };
    auto lbo = [](unsigned long long desc) { return (unsigned)((desc >> 16) & 0x3fff) << 4; };
    auto sbo = [](unsigned long long desc) { return (unsigned)((desc >> 32) & 0x3fff) << 4; };
    if (!a_regs && tnsp_a) { g_run.error = "wgmma: an M-major A is not emulated"; return false; }
    static float A[16][16], B[16][256];
    if (a_regs)
        for (int l = 0; l < 32; l++) a_fragment(A, l, warp[l].in + 3, bf16);
    unsigned long long da = warp[0].in[2], db = warp[0].in[7];
    if (!a_regs)
        for (int i = 0; i < 16; i++)
            for (int k = 0; k < 16; k++)
            {
                int row = 16 * w + i;
                A[i][k] = element(da, (row / 8) * sbo(da) + (row % 8) * 128 + 2 * k);
            }
    for (int k = 0; k < 16; k++)
        for (int c = 0; c < n; c++)
            B[k][c] = tnsp_b ? element(db, (k / 8) * sbo(db) + (k % 8) * 128 + (c / 64) * lbo(db) + 2 * (c % 64))
                             : element(db, (c / 8) * sbo(db) + (c % 8) * 128 + 2 * k);
    if (!ok) return false;
    for (int l = 0; l < 32; l++)
    {
        int g = l >> 2, t = l & 3;
        float* d = (float*)(uintptr_t)warp[l].in[1];
        for (int i = 0; i < n / 2; i++)
        {
            int row = g + 8 * ((i >> 1) & 1), col = 8 * (i >> 2) + 2 * t + (i & 1);
            float s = scale_d ? d[i] : 0.f;
            for (int k = 0; k < 16; k++) s += A[row][k] * B[k][col];
            d[i] = s;
        }
    }
    return true;
}

// wgmma is warpgroup-wide (.sync.aligned): the four warps of a warpgroup must each issue every one, which the
// per-warp emulation above cannot see as it goes. Checked when a block finishes: every warpgroup's warps issued as
// many, and a block that issued any has whole warpgroups.
bool warpgroup_check(const Fiber* block, int threads)
{
    int warps = (threads + 31) / 32;
    bool any = false;
    for (int w = 0; w < warps; w++) any |= block[w * 32].wgmma_issued > 0;
    if (!any) return true;
    if (threads % 128 != 0) { g_run.error = "wgmma in a block of " + std::to_string(threads) + " threads: not whole warpgroups of 128"; return false; }
    for (int w = 0; w < warps; w += 4)
        for (int i = 1; i < 4; i++)
            if (block[(w + i) * 32].wgmma_issued != block[w * 32].wgmma_issued)
            {
                g_run.error = "warp " + std::to_string(w + i) + " issued " + std::to_string(block[(w + i) * 32].wgmma_issued) + " wgmma, warp "
                    + std::to_string(w) + " of its warpgroup " + std::to_string(block[w * 32].wgmma_issued) + ": all four warps must issue each one";
                return false;
            }
    return true;
}

// Resolves one warp's collective once all lanes of its mask wait in it. Returns false (and sets the error) when
// the lanes cannot meet: one has left the kernel, or they wait in different collectives.
bool resolve_collective(Fiber* warp, int lanes, int first)
{
    Fiber& lead = warp[first];
    unsigned mask = lead.mask;
    for (int l = 0; l < lanes; l++)
    {
        if (!(mask >> l & 1u)) continue;
        Fiber& f = warp[l];
        if (f.state == DONE)
        {
            g_run.error = "lane " + std::to_string(l) + " left the kernel while lane " + std::to_string(first) +
                " waits for it in a warp collective (mask " + std::to_string(mask) + ")";
            return false;
        }
        if (f.state != AT_COLLECTIVE) return true;   // not there yet
        if (f.kind != lead.kind || f.mask != mask)
        {
            g_run.error = "divergent warp collectives: lane " + std::to_string(first) + " kind " + std::to_string(lead.kind) +
                ", lane " + std::to_string(l) + " kind " + std::to_string(f.kind);
            return false;
        }
    }
    for (int l = lanes; l < 32; l++)
        if (mask >> l & 1u) { g_run.error = "collective mask names lanes past the block's last thread"; return false; }

    switch (lead.kind)
    {
    case EMU_SHUFFLE:
        for (int l = 0; l < lanes; l++)
        {
            if (!(mask >> l & 1u)) continue;
            unsigned src = (unsigned)warp[l].in[1];
            if (src >= 32 || !(mask >> src & 1u))
            {
                g_run.error = "shuffle from lane " + std::to_string(src) + ", outside the mask, by lane " + std::to_string(l);
                return false;
            }
            warp[l].out[0] = warp[src].in[0];
        }
        break;
    case EMU_SYNCWARP:
        break;
    case EMU_MMA_BF16:
    case EMU_MMA_F16:
    {
        if (mask != 0xffffffffu || lanes != 32) { g_run.error = "mma.sync needs the full warp"; return false; }
        bool bf16 = lead.kind == EMU_MMA_BF16;
        float A[16][16], B[16][8], C[16][8];
        for (int l = 0; l < 32; l++)
        {
            int g = l >> 2, t = l & 3;
            const unsigned long long* r = warp[l].in;
            a_fragment(A, l, r, bf16);
            for (int h = 0; h < 2; h++)
            {
                B[2 * t + h][g] = half_of((unsigned)r[4], h, bf16);
                B[2 * t + 8 + h][g] = half_of((unsigned)r[5], h, bf16);
            }
            float c[4];
            for (int i = 0; i < 4; i++) { unsigned u = (unsigned)r[6 + i]; memcpy(&c[i], &u, 4); }
            C[g][2 * t] = c[0]; C[g][2 * t + 1] = c[1]; C[g + 8][2 * t] = c[2]; C[g + 8][2 * t + 1] = c[3];
        }
        for (int i = 0; i < 16; i++)
            for (int j = 0; j < 8; j++)
            {
                float s = C[i][j];
                for (int k = 0; k < 16; k++) s += A[i][k] * B[k][j];
                C[i][j] = s;
            }
        for (int l = 0; l < 32; l++)
        {
            int g = l >> 2, t = l & 3;
            float c[4] = {C[g][2 * t], C[g][2 * t + 1], C[g + 8][2 * t], C[g + 8][2 * t + 1]};
            for (int i = 0; i < 4; i++) { unsigned u; memcpy(&u, &c[i], 4); warp[l].out[i] = u; }
        }
        break;
    }
    case EMU_LDMATRIX_X4:
    case EMU_LDMATRIX_X4_TRANS:
    {
        if (mask != 0xffffffffu || lanes != 32) { g_run.error = "ldmatrix needs the full warp"; return false; }
        for (int l = 0; l < 32; l++)
            if (warp[l].in[0] % 16 != 0) { g_run.error = "ldmatrix row address of lane " + std::to_string(l) + " is not 16-byte aligned"; return false; }
        // Matrix m's row r is at the address of lane 8m + r. Lane l gets M[g][2t], M[g][2t+1]; with .trans
        // M[2t][g], M[2t+1][g].
        for (int l = 0; l < 32; l++)
        {
            int g = l >> 2, t = l & 3;
            for (int m = 0; m < 4; m++)
            {
                if (lead.kind == EMU_LDMATRIX_X4)
                {
                    const unsigned short* r = (const unsigned short*)(uintptr_t)warp[8 * m + g].in[0];
                    warp[l].out[m] = (unsigned)r[2 * t] | ((unsigned)r[2 * t + 1] << 16);
                    continue;
                }
                const unsigned short* r0 = (const unsigned short*)(uintptr_t)warp[8 * m + 2 * t].in[0];
                const unsigned short* r1 = (const unsigned short*)(uintptr_t)warp[8 * m + 2 * t + 1].in[0];
                warp[l].out[m] = (unsigned)r0[g] | ((unsigned)r1[g] << 16);
            }
        }
        break;
    }
    case EMU_WGMMA_BF16:
    case EMU_WGMMA_F16:
        if (mask != 0xffffffffu || lanes != 32) { g_run.error = "wgmma needs the full warp"; return false; }
        if (!resolve_wgmma(warp, lead.kind == EMU_WGMMA_BF16)) return false;
        warp[0].wgmma_issued++;
        break;
    default:
        g_run.error = "unknown warp collective " + std::to_string(lead.kind);
        return false;
    }
    for (int l = 0; l < lanes; l++)
        if (mask >> l & 1u) warp[l].state = RUNNABLE;
    return true;
}

std::string describe_states(int threads)
{
    std::ostringstream s;
    int counts[4] = {0, 0, 0, 0};
    for (int i = 0; i < threads; i++) counts[g_run.fibers[i].state]++;
    s << counts[AT_BARRIER] << " thread(s) at __syncthreads, " << counts[AT_COLLECTIVE] << " in warp collectives, "
      << counts[DONE] << " finished";
    return s.str();
}

// DISPNATIVE_EMU_SCHEDULE=reverse: threads and blocks run last to first.
bool schedule_reversed()
{
    static const bool reverse = [] { const char* e = getenv("DISPNATIVE_EMU_SCHEDULE"); return e && strcmp(e, "reverse") == 0; }();
    return reverse;
}

// Shared memory of a cooperative launch, whose blocks run at once: each block has its own dynamic shared memory, and
// the module's static __shared__ section holds one block's arrays at a time, swapped when the scheduler moves on to a
// thread of another block.
struct GridShared
{
    char* section = nullptr;
    size_t section_bytes = 0;
    std::vector<std::vector<char>> dynamic, saved;   // per block, 0xff-filled at the start
    int loaded = -1;

    void enter(int b)
    {
        g_api.dynamic_shared = dynamic[b].data();
        if (b == loaded) return;
        if (section_bytes)
        {
            if (loaded >= 0) memcpy(saved[loaded].data(), section, section_bytes);
            memcpy(section, saved[b].data(), section_bytes);
        }
        loaded = b;
    }
};

// Runs the blocks `ids` of `threads` threads each at once (their threads are fibers[b * threads + i]) to completion:
// one block for a normal launch, whose blocks run one after another; a cooperative launch's whole grid, with `shared`
// switching shared memory between blocks. False with g_run.error set when they cannot finish.
// A cooperative grid runs one block at a time for as long as it moves (its threads run, meet at __syncthreads and warp
// collectives, and go on), and the next block only when every thread of this one is done or spin-waits: a block runs
// ahead to its next grid barrier before the others start, so that a missing barrier (a block reading what others write
// in the same phase) reads what no block has written yet.
bool run_blocks(const std::vector<EmuDim3>& ids, int threads, GridShared* shared)
{
    int blocks = (int)ids.size(), total = blocks * threads;
    if ((int)g_run.fibers.size() < total) g_run.fibers.resize(total);
    static unsigned long long blocks_run = 0;
    for (int b = 0; b < blocks; b++)
    {
        unsigned long long serial = ++blocks_run;
        for (int i = 0; i < threads; i++)
        {
            Fiber& f = g_run.fibers[b * threads + i];
            if (!f.stack) f.stack = (char*)malloc(StackBytes);
            unsigned bx = g_api.block_dim.x, by = g_api.block_dim.y;
            f.thread.thread_idx = {(unsigned)i % bx, ((unsigned)i / bx) % by, (unsigned)i / (bx * by)};
            f.thread.block_idx = ids[b];
            f.thread.linear = (unsigned)i;
            f.thread.serial = serial;
            f.block = b;
            f.wgmma_issued = 0;
            f.state = RUNNABLE;
            uint64_t* sp = (uint64_t*)(((uintptr_t)(f.stack + StackBytes)) & ~(uintptr_t)15);
            *--sp = 0;                              // fiber_main's return address (never used): keeps the ABI alignment
            *--sp = (uint64_t)(uintptr_t)&fiber_main;
            for (int r = 0; r < 6; r++) *--sp = 0;  // rbp rbx r12 r13 r14 r15
            f.sp = sp;
        }
    }
    bool reverse = schedule_reversed();
    int focus = reverse ? blocks - 1 : 0;   // the block that runs (all of them at once in a pass: blocks == 1)
    int idle_blocks = 0;                    // blocks in a row that did not move when their turn came
    bool ran_in_round = false;
    long long spinning = 0;                 // rounds in a row in which only spin-waits ran
    std::vector<char> done_blocks(blocks, 0);
    for (;;)
    {
        bool ran = false, progressed = false;
        for (int n = 0; n < threads; n++)
        {
            Fiber& f = g_run.fibers[focus * threads + (reverse ? threads - 1 - n : n)];
            if (f.state != RUNNABLE) continue;
            if (shared) shared->enter(f.block);
            g_run.current = &f;
            g_api.current = &f.thread;
            f.yielded = false;
            emu_switch_context(&g_run.scheduler_sp, f.sp);
            ran = true;
            progressed |= !f.yielded;
            if (!g_run.error.empty()) return false;
        }
        for (int w = 0; w * 32 < threads; w++)
        {
            int lanes = std::min(32, threads - w * 32);
            Fiber* warp = &g_run.fibers[focus * threads + w * 32];
            for (int l = 0; l < lanes; l++)
                if (warp[l].state == AT_COLLECTIVE)
                {
                    if (!resolve_collective(warp, lanes, l)) return false;
                    if (warp[l].state == RUNNABLE) progressed = true;
                    break;
                }
        }
        // A block whose every thread waits at __syncthreads (or has finished) goes on.
        int done = 0, barrier = 0;
        for (int i = 0; i < threads; i++)
        {
            done += g_run.fibers[focus * threads + i].state == DONE;
            barrier += g_run.fibers[focus * threads + i].state == AT_BARRIER;
        }
        if (barrier > 0 && barrier + done == threads)
        {
            for (int i = 0; i < threads; i++)
                if (g_run.fibers[focus * threads + i].state == AT_BARRIER) g_run.fibers[focus * threads + i].state = RUNNABLE;
            progressed = true;
        }
        if (done == threads && !done_blocks[focus])
        {
            if (!warpgroup_check(&g_run.fibers[focus * threads], threads)) return false;
            done_blocks[focus] = 1;
            progressed = true;
        }
        bool finished = true;
        for (int b = 0; b < blocks && finished; b++) finished = done_blocks[b];
        if (finished) return true;
        ran_in_round |= ran;
        if (progressed) { spinning = 0; idle_blocks = 0; ran_in_round = false; continue; }
        focus = reverse ? (focus + blocks - 1) % blocks : (focus + 1) % blocks;
        if (++idle_blocks < blocks) continue;   // the others' turn before this counts as a round without progress
        idle_blocks = 0;
        bool any_ran = ran_in_round;
        ran_in_round = false;
        if (any_ran && ++spinning < (1 << 20)) continue;
        g_run.error = any_ran ? "threads spin-wait (__nanosleep) and nothing else moves: a wait that cannot end (a grid barrier "
                                "in a launch whose blocks do not all run at once?)"
                              : "deadlock: " + describe_states(total);
        return false;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Device memory: mmap'd, 0xff-filled, a PROT_NONE guard page after each buffer; buffers start 256-aligned.
struct Allocation { char* map; size_t map_bytes; size_t bytes; };
std::map<uintptr_t, Allocation> g_allocations;
size_t g_allocated = 0;
size_t g_memory_limit = 0;
const size_t Page = 4096;

size_t memory_limit()
{
    if (g_memory_limit == 0)
    {
        const char* env = getenv("DISPNATIVE_EMU_MEMORY");
        g_memory_limit = env && *env ? strtoull(env, nullptr, 10) : (size_t)8 << 30;
    }
    return g_memory_limit;
}

uintptr_t device_alloc(size_t bytes)
{
    size_t rounded = (std::max<size_t>(bytes, 1) + 255) & ~(size_t)255;
    if (g_allocated + rounded > memory_limit()) return 0;
    size_t data_pages = (rounded + Page - 1) / Page * Page;
    size_t map_bytes = data_pages + Page;
    void* m = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return 0;
    char* map = (char*)m;
    mprotect(map + data_pages, Page, PROT_NONE);
    char* start = map + data_pages - rounded;
    memset(start, 0xff, rounded);
    g_allocations[(uintptr_t)start] = {map, map_bytes, bytes};
    g_allocated += rounded;
    return (uintptr_t)start;
}

// The allocation holding [p, p + bytes), or null.
const Allocation* find_allocation(uintptr_t p, size_t bytes)
{
    auto it = g_allocations.upper_bound(p);
    if (it == g_allocations.begin()) return nullptr;
    --it;
    if (p + bytes > it->first + ((it->second.bytes + 255) & ~(size_t)255)) return nullptr;
    return &it->second;
}

std::string describe_address(uintptr_t p)
{
    auto it = g_allocations.upper_bound(p);
    std::ostringstream s;
    s << "0x" << std::hex << p << std::dec;
    if (it != g_allocations.begin())
    {
        --it;
        s << " (" << (long long)(p - it->first) << " bytes from the start of a " << it->second.bytes << "-byte device buffer)";
    }
    return s.str();
}

struct sigaction g_old_segv, g_old_bus;
void on_fault(int sig, siginfo_t* info, void*)
{
    if (g_run.running)
    {
        const EmuThread& t = g_run.current->thread;
        fprintf(stderr, "[cuda-emulator] kernel %s: invalid memory access at %s by block (%u,%u,%u) thread (%u,%u,%u)\n",
            g_run.name, describe_address((uintptr_t)info->si_addr).c_str(), t.block_idx.x, t.block_idx.y, t.block_idx.z,
            t.thread_idx.x, t.thread_idx.y, t.thread_idx.z);
        _exit(99);
    }
    struct sigaction* old = sig == SIGSEGV ? &g_old_segv : &g_old_bus;
    sigaction(sig, old, nullptr);   // not ours: let the previous handler (the .NET runtime's) see it again
}

void install_fault_handler()
{
    static bool done = false;
    if (done) return;
    done = true;
    struct sigaction sa{};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
}

// ---------------------------------------------------------------------------------------------------------------
// Modules, functions, launches.
// shared_begin..shared_end: the module's static __shared__ arrays (emu_device.h), refilled with 0xff for each block.
struct Module { void* handle; char* shared_begin; char* shared_end; };
struct Function
{
    void (*entry)(void**); const int* params; std::string name; const Module* module;
    unsigned max_dynamic_shared = 48 * 1024;
};

// What cuLaunchKernel refuses before anything runs.
int check_launch(const Function& fn, EmuDim3 grid, EmuDim3 block, unsigned shared_bytes)
{
    long long threads = (long long)block.x * block.y * block.z;
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0 || threads > 1024 || block.z > 64 || grid.y > 65535 || grid.z > 65535)
    {
        warn("launch of %s with grid (%u,%u,%u), block (%u,%u,%u): invalid configuration", fn.name.c_str(), grid.x, grid.y, grid.z, block.x, block.y, block.z);
        return 9;   // CUDA_ERROR_INVALID_CONFIGURATION
    }
    if (shared_bytes > fn.max_dynamic_shared)
    {
        warn("launch of %s asks for %u bytes of dynamic shared memory, above its limit of %u (more than 48 KiB needs "
             "cuFuncSetAttribute)", fn.name.c_str(), shared_bytes, fn.max_dynamic_shared);
        return 1;
    }
    return 0;
}

// Runs a launch that check_launch accepted when it was submitted: its blocks one after another, or, cooperative, all
// at once.
int execute_launch(const Function& fn, EmuDim3 grid, EmuDim3 block, unsigned shared_bytes, void** args, bool cooperative)
{
    long long threads = (long long)block.x * block.y * block.z;
    static std::vector<char> dynamic_shared;
    dynamic_shared.resize(std::max(1u, shared_bytes));
    g_api.block_dim = block;
    g_api.grid_dim = grid;
    g_api.dynamic_shared = dynamic_shared.data();
    g_api.dynamic_shared_bytes = shared_bytes;
    g_run.entry = fn.entry;
    g_run.args = args;
    g_run.name = fn.name.c_str();
    g_run.error.clear();
    install_fault_handler();
    g_run.running = true;
    bool ok = true;
    bool reverse = schedule_reversed();
    if (cooperative)
    {
        std::vector<EmuDim3> ids;
        for (unsigned z = 0; z < grid.z; z++)
            for (unsigned y = 0; y < grid.y; y++)
                for (unsigned x = 0; x < grid.x; x++) ids.push_back({x, y, z});
        GridShared gs;
        gs.section = fn.module->shared_begin;
        gs.section_bytes = fn.module->shared_begin ? fn.module->shared_end - fn.module->shared_begin : 0;
        gs.dynamic.assign(ids.size(), std::vector<char>(std::max(1u, shared_bytes), (char)0xff));
        gs.saved.assign(ids.size(), std::vector<char>(gs.section_bytes, (char)0xff));
        ok = run_blocks(ids, (int)threads, &gs);
        if (!ok)
            warn("kernel %s, cooperative grid (%u,%u,%u), %lld threads per block: %s", fn.name.c_str(), grid.x, grid.y, grid.z, threads,
                g_run.error.c_str());
    }
    for (unsigned zi = 0; zi < grid.z && ok && !cooperative; zi++)
        for (unsigned yi = 0; yi < grid.y && ok; yi++)
            for (unsigned xi = 0; xi < grid.x && ok; xi++)
            {
                unsigned x = reverse ? grid.x - 1 - xi : xi, y = reverse ? grid.y - 1 - yi : yi, z = reverse ? grid.z - 1 - zi : zi;
                // Each block starts with shared memory that holds nothing it wrote: 0xff bytes, NaN as floats.
                memset(dynamic_shared.data(), 0xff, dynamic_shared.size());
                if (fn.module->shared_begin) memset(fn.module->shared_begin, 0xff, fn.module->shared_end - fn.module->shared_begin);
                if (!run_blocks({{x, y, z}}, (int)threads, nullptr))
                {
                    warn("kernel %s, block (%u,%u,%u) of (%u,%u,%u), %lld threads: %s", fn.name.c_str(), x, y, z, grid.x, grid.y,
                        grid.z, threads, g_run.error.c_str());
                    ok = false;
                }
            }
    g_run.running = false;
    return ok ? 0 : 719;   // CUDA_ERROR_LAUNCH_FAILED
}

// ---------------------------------------------------------------------------------------------------------------
// cuBLASLt.
struct LtDesc { int compute, scale, transa = 0, transb = 0; };
struct LtLayout { int type; uint64_t rows, cols; int64_t ld; int batch = 1; int64_t stride = 0; int order = 0; };
struct LtPref { uint64_t workspace = 0; uint32_t align[4] = {256, 256, 256, 256}; };

int element_size(int type) { return type == 0 ? 4 : type == 2 || type == 14 ? 2 : 0; }
float load_element(const char* base, int type, int64_t index)
{
    switch (type)
    {
    case 0: return ((const float*)base)[index];
    case 2: return emu_h2f(((const unsigned short*)base)[index]);
    default: return bf16_to_f32(((const unsigned short*)base)[index]);
    }
}
void store_element(char* base, int type, int64_t index, float v)
{
    switch (type)
    {
    case 0: ((float*)base)[index] = v; break;
    case 2: ((unsigned short*)base)[index] = emu_f2h(v); break;
    default: ((unsigned short*)base)[index] = f32_to_bf16(v); break;
    }
}

// Checks a matmul's descriptors as cuBLASLt does and returns its m, n, k; 0 or a cuBLAS status.
int matmul_shape(const LtDesc& d, const LtLayout& a, const LtLayout& b, const LtLayout& c, const LtLayout& dd, uint64_t& m, uint64_t& n, uint64_t& k)
{
    if (d.compute != 68 || d.scale != 0) { warn("matmul: compute type %d / scale type %d not emulated", d.compute, d.scale); return 15; }
    for (const LtLayout* l : {&a, &b, &c, &dd})
    {
        if (element_size(l->type) == 0) { warn("matmul: data type %d not emulated", l->type); return 15; }
        if (l->order != 0) { warn("matmul: only column-major layouts are emulated"); return 15; }
        if (l->ld < (int64_t)l->rows || l->rows == 0 || l->cols == 0)
        {
            warn("matmul: layout %llux%llu with leading dimension %lld is invalid", (unsigned long long)l->rows, (unsigned long long)l->cols, (long long)l->ld);
            return 7;
        }
    }
    if (a.type != b.type || c.type != dd.type) { warn("matmul: A/B or C/D types differ"); return 15; }
    if (c.type != a.type && c.type != 0) { warn("matmul: output type %d from inputs %d not supported", c.type, a.type); return 15; }
    m = d.transa ? a.cols : a.rows;
    k = d.transa ? a.rows : a.cols;
    uint64_t kb = d.transb ? b.cols : b.rows;
    n = d.transb ? b.rows : b.cols;
    if (kb != k || c.rows != m || c.cols != n || dd.rows != m || dd.cols != n)
    {
        warn("matmul: shapes disagree: op(A) %llux%llu, op(B) %llux%llu, C %llux%llu, D %llux%llu", (unsigned long long)m,
            (unsigned long long)k, (unsigned long long)kb, (unsigned long long)n, (unsigned long long)c.rows, (unsigned long long)c.cols,
            (unsigned long long)dd.rows, (unsigned long long)dd.cols);
        return 7;
    }
    if (a.batch != b.batch || a.batch != c.batch || a.batch != dd.batch) { warn("matmul: batch counts differ"); return 7; }
    return 0;
}

struct Matmul
{
    LtDesc desc; LtLayout a, b, c, d;
    float alpha, beta;
    uintptr_t pa, pb, pc, pd;
    uint32_t align;
    uint32_t delay_us;   // the emulated algorithm's extra cost (see cublasLtMatmulAlgoGetHeuristic)
};

int execute_matmul(const Matmul& mm)
{
    uint64_t m, n, k;
    if (int rc = matmul_shape(mm.desc, mm.a, mm.b, mm.c, mm.d, m, n, k)) return rc;
    int ea = element_size(mm.a.type), ed = element_size(mm.d.type);
    for (auto [p, what] : {std::pair{mm.pa, "A"}, {mm.pb, "B"}, {mm.pc, "C"}, {mm.pd, "D"}})
        if (p % mm.align != 0)
        {
            warn("matmul: %s at 0x%llx is not aligned to the %u bytes its algorithm was chosen for", what, (unsigned long long)p, mm.align);
            return 7;
        }
    for (int bi = 0; bi < mm.a.batch; bi++)
    {
        const char* A = (const char*)mm.pa + bi * mm.a.stride * ea;
        const char* B = (const char*)mm.pb + bi * mm.b.stride * ea;
        const char* C = (const char*)mm.pc + bi * mm.c.stride * ed;
        char* D = (char*)mm.pd + bi * mm.d.stride * ed;
        // The operands the product reads, as contiguous f32 rows: Ar[i][kk] = op(A)(i, kk), Br[j][kk] = op(B)(kk, j).
        uint64_t span_a = mm.a.ld * (mm.a.cols - 1) + mm.a.rows, span_b = mm.b.ld * (mm.b.cols - 1) + mm.b.rows;
        uint64_t span_d = mm.d.ld * (mm.d.cols - 1) + mm.d.rows;
        if (!find_allocation((uintptr_t)A, span_a * ea) || !find_allocation((uintptr_t)B, span_b * ea) || !find_allocation((uintptr_t)D, span_d * ed)
            || (mm.beta != 0 && !find_allocation((uintptr_t)C, span_d * ed)))
        {
            warn("matmul: batch %d's operands run outside their device buffers (A %s, B %s, D %s)", bi, describe_address((uintptr_t)A).c_str(),
                describe_address((uintptr_t)B).c_str(), describe_address((uintptr_t)D).c_str());
            return 7;
        }
        std::vector<float> Ar(m * k), Br(n * k);
        for (uint64_t i = 0; i < m; i++)
            for (uint64_t kk = 0; kk < k; kk++)
                Ar[i * k + kk] = load_element(A, mm.a.type, mm.desc.transa ? kk + i * mm.a.ld : i + kk * mm.a.ld);
        for (uint64_t j = 0; j < n; j++)
            for (uint64_t kk = 0; kk < k; kk++)
                Br[j * k + kk] = load_element(B, mm.b.type, mm.desc.transb ? j + kk * mm.b.ld : kk + j * mm.b.ld);
        for (uint64_t j = 0; j < n; j++)
            for (uint64_t i = 0; i < m; i++)
            {
                const float* x = &Ar[i * k];
                const float* y = &Br[j * k];
                float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                uint64_t kk = 0;
                for (; kk + 8 <= k; kk += 8)
                    for (int u = 0; u < 8; u++) acc[u] += x[kk + u] * y[kk + u];
                float s = 0;
                for (; kk < k; kk++) s += x[kk] * y[kk];
                for (int u = 0; u < 8; u++) s += acc[u];
                float v = mm.alpha * s;
                if (mm.beta != 0) v += mm.beta * load_element(C, mm.c.type, i + j * mm.c.ld);
                store_element(D, mm.d.type, i + j * mm.d.ld, v);
            }
    }
    return 0;
}

// ---------------------------------------------------------------------------------------------------------------
// Streams, capture and graphs.
struct Operation
{
    enum Kind { LAUNCH, COPY, MATMUL, EVENT } kind;
    const Function* fn = nullptr;
    EmuDim3 grid{}, block{};
    unsigned shared = 0;
    bool cooperative = false;
    std::vector<std::vector<char>> args;
    uintptr_t dst = 0, src = 0; size_t bytes = 0;
    Matmul mm{};
    struct Event* event = nullptr;
};
struct Stream { bool capturing = false; std::vector<Operation> captured; };
struct Graph { std::vector<Operation> ops; };
struct Event { std::chrono::steady_clock::time_point at; bool recorded = false, pending = false; };

int run_operation(const Operation& op)
{
    switch (op.kind)
    {
    case Operation::LAUNCH:
    {
        std::vector<void*> ptrs;
        for (auto& a : op.args) ptrs.push_back((void*)a.data());
        return execute_launch(*op.fn, op.grid, op.block, op.shared, ptrs.data(), op.cooperative);
    }
    case Operation::COPY: memmove((void*)op.dst, (const void*)op.src, op.bytes); return 0;
    case Operation::MATMUL:
        if (op.mm.delay_us) std::this_thread::sleep_for(std::chrono::microseconds(op.mm.delay_us));
        return execute_matmul(op.mm);
    case Operation::EVENT: op.event->at = std::chrono::steady_clock::now(); op.event->pending = false; return 0;
    }
    return 1;
}

// The work submitted and not yet run (every stream's, in submission order: one valid order of a GPU's streams).
std::vector<Operation> g_queue;

// Runs the queued work; the first failure drops the rest (the GPU's context would be unusable after it).
int synchronize()
{
    std::vector<Operation> ops;
    ops.swap(g_queue);
    for (auto& op : ops)
        if (int rc = run_operation(op))
        {
            for (auto& rest : ops) if (rest.kind == Operation::EVENT) rest.event->pending = false;
            return rc;
        }
    return 0;
}

// Queues the operation, or records it when the stream is being captured.
int submit(void* stream, Operation op)
{
    Stream* s = (Stream*)stream;
    if (s && s->capturing) { s->captured.push_back(std::move(op)); return 0; }
    g_queue.push_back(std::move(op));
    return 0;
}

bool g_initialized = false;

// ---------------------------------------------------------------------------------------------------------------
// NVRTC: inline PTX → emu_device.h calls, g++ → shared object, one argument-unpacking wrapper per entry point.
struct Program { std::string source, name; std::vector<std::pair<std::string, std::string>> headers; std::string log; std::vector<char> image; };

// The operand expressions of an asm statement's output and input lists.
bool split_asm(const std::string& body, std::string& text, std::vector<std::string>& outs, std::vector<std::string>& ins)
{
    std::vector<std::string> sections(1);
    int depth = 0; bool in_string = false;
    for (size_t i = 0; i < body.size(); i++)
    {
        char ch = body[i];
        if (in_string) { sections.back() += ch; if (ch == '\\') sections.back() += body[++i]; else if (ch == '"') in_string = false; continue; }
        if (ch == '"') in_string = true;
        if (ch == '(') depth++;
        if (ch == ')') depth--;
        if (ch == ':' && depth == 0) { sections.emplace_back(); continue; }
        sections.back() += ch;
    }
    text.clear();
    std::regex literal("\"((?:[^\"\\\\]|\\\\.)*)\"");
    for (auto it = std::sregex_iterator(sections[0].begin(), sections[0].end(), literal); it != std::sregex_iterator(); ++it) text += (*it)[1].str();
    auto operands = [](const std::string& s) {
        std::vector<std::string> r;
        std::regex op("\"[^\"]*\"\\s*\\(");
        for (auto it = std::sregex_iterator(s.begin(), s.end(), op); it != std::sregex_iterator(); ++it)
        {
            size_t start = it->position() + it->length(), i = start; int d = 1;
            while (i < s.size() && d > 0) { if (s[i] == '(') d++; else if (s[i] == ')') d--; i++; }
            r.push_back(s.substr(start, i - 1 - start));
        }
        return r;
    };
    if (sections.size() > 1) outs = operands(sections[1]);
    if (sections.size() > 2) ins = operands(sections[2]);
    return true;
}

// Replaces each asm statement by the emu_device.h call for its PTX instruction; unknown PTX is a compile error.
bool rewrite_asm(std::string& src, std::string& log, const std::string& file)
{
    std::string out;
    std::regex start("\\basm\\s*(volatile\\s*)?\\(");
    std::smatch m;
    std::string rest = src;
    while (std::regex_search(rest, m, start))
    {
        size_t open = m.position() + m.length();
        out += rest.substr(0, m.position());
        size_t i = open; int depth = 1; bool in_string = false;
        while (i < rest.size() && depth > 0)
        {
            char ch = rest[i];
            if (in_string) { if (ch == '\\') i++; else if (ch == '"') in_string = false; }
            else if (ch == '"') in_string = true;
            else if (ch == '(') depth++;
            else if (ch == ')') depth--;
            i++;
        }
        std::string body = rest.substr(open, i - 1 - open), text;
        std::vector<std::string> o, in;
        split_asm(body, text, o, in);
        std::string call;
        std::smatch wait;
        auto has = [&](const char* p) { return text.find(p) != std::string::npos; };
        // An empty asm with in/out operands (common.cuh's opaque()) only hides a value from the optimizer.
        if (text.find_first_not_of(" \t\n") == std::string::npos) call = "((void)0)";
        else if (has("cvt.f32.f16") && o.size() == 1 && in.size() == 1) call = "(" + o[0] + ") = emu_h2f(" + in[0] + ")";
        else if (has("cvt.rn.f16.f32") && o.size() == 1 && in.size() == 1) call = "(" + o[0] + ") = emu_f2h(" + in[0] + ")";
        else if (has("cvt.rn.bf16x2.f32") && o.size() == 1 && in.size() == 2) call = "(" + o[0] + ") = emu_cvt_bf16x2(" + in[0] + ", " + in[1] + ")";
        else if (has("cvt.rn.f16x2.f32") && o.size() == 1 && in.size() == 2) call = "(" + o[0] + ") = emu_cvt_f16x2(" + in[0] + ", " + in[1] + ")";
        else if (has("ex2.approx.ftz.f32") && o.size() == 1 && in.size() == 1) call = "(" + o[0] + ") = emu_ex2_ftz(" + in[0] + ")";
        else if (has("cp.async.cg.shared.global") && in.size() == 3) call = "emu_cp_async16(" + in[0] + ", " + in[1] + ", " + in[2] + ")";
        else if (has("cp.async.commit_group")) call = "emu_cp_async_commit()";
        // Programmatic dependent launch: stream operations run one after another here, so nothing to wait for or allow.
        else if (has("griddepcontrol.wait") || has("griddepcontrol.launch_dependents")) call = "((void)0)";
        else if (has("cp.async.wait_all")) call = "(emu_cp_async_commit(), emu_cp_async_wait(0))";
        else if (has("cp.async.wait_group") && std::regex_search(text, wait, std::regex("wait_group\\s+(\\d+)")))
            call = "emu_cp_async_wait(" + wait[1].str() + ")";
        else if (has("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") || has("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"))
        {
            if (o.size() != 4 || in.size() != 6) { log += file + ": mma.sync with unexpected operands\n"; return false; }
            call = std::string("emu_mma_m16n8k16(") + (has(".bf16.bf16") ? "EMU_MMA_BF16" : "EMU_MMA_F16");
            for (auto& x : o) call += ", &(" + x + ")";
            for (auto& x : in) call += ", (unsigned)(" + x + ")";
            call += ")";
        }
        else if ((has("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16") || has("ldmatrix.sync.aligned.m8n8.x4.shared.b16"))
            && o.size() == 4 && in.size() == 1)
            call = std::string("emu_ldmatrix_x4(") + (has(".trans") ? "EMU_LDMATRIX_X4_TRANS" : "EMU_LDMATRIX_X4") + ", &(" + o[0]
                + "), &(" + o[1] + "), &(" + o[2] + "), &(" + o[3] + "), " + in[0] + ")";
        // Warpgroup MMA: fences, commits and waits have nothing to order (each wgmma completes when issued).
        else if (has("wgmma.fence") || has("wgmma.commit_group") || has("wgmma.wait_group") || has("fence.proxy.async"))
            call = "((void)0)";
        else if (has("wgmma.mma_async.sync.aligned.m64n") && (has(".f32.bf16.bf16") || has(".f32.f16.f16")))
        {
            std::smatch shape, imm;
            bool a_regs = in.size() == 6;
            if (!std::regex_search(text, shape, std::regex("m64n(\\d+)k16")) || (in.size() != 3 && !a_regs) || (int)o.size() * 2 != std::stoi(shape[1].str())
                || !std::regex_search(text, imm, std::regex(a_regs ? "p,\\s*1,\\s*1,\\s*([01])\\s*;" : "p,\\s*1,\\s*1,\\s*([01]),\\s*([01])\\s*;")))
            { log += file + ": wgmma.mma_async with unexpected operands\n"; return false; }
            call = std::string("emu_wgmma(") + (has(".bf16.bf16") ? "EMU_WGMMA_BF16" : "EMU_WGMMA_F16") + ", " + shape[1].str() + ", "
                + (a_regs ? "0, " + imm[1].str() + ", 1, 0ull, (unsigned)(" + in[0] + "), (unsigned)(" + in[1] + "), (unsigned)(" + in[2] + "), (unsigned)("
                        + in[3] + "), " + in[4] + ", " + in[5]
                    : imm[1].str() + ", " + imm[2].str() + ", 0, " + in[0] + ", 0u, 0u, 0u, 0u, " + in[1] + ", " + in[2]) + ", {";
            for (size_t k = 0; k < o.size(); k++) call += (k ? ", &(" : "&(") + o[k] + ")";
            call += "})";
        }
        else
        {
            size_t line = std::count(src.begin(), src.begin() + (src.size() - rest.size()) + m.position(), '\n') + 1;
            log += file + "(" + std::to_string(line) + "): error: the CUDA emulator does not implement PTX \"" + text + "\"\n";
            return false;
        }
        out += call;
        rest = rest.substr(i);
    }
    out += rest;
    src = out;
    return true;
}

std::string rewrite_source(std::string s)
{
    // extern __shared__ T name[];  →  T* name = (T*)dynamic shared memory;
    std::regex dyn("extern\\s+__shared__\\s+(?:__align__\\s*\\(\\s*\\d+\\s*\\)\\s+)?([A-Za-z_][\\w:]*(?:\\s+[A-Za-z_][\\w:]*)*)\\s+(\\w+)\\s*\\[\\s*\\]\\s*;");
    s = std::regex_replace(s, dyn, "$1* $2 = reinterpret_cast<$1*>(emu_api->dynamic_shared);");
    // reinterpret_cast<const uint4*>(p)  →  emu_vector_cast<const uint4>(p), which checks the vector's alignment.
    std::regex vec("reinterpret_cast\\s*<\\s*((?:const\\s+)?(?:u?int[24]|float[24]))\\s*\\*\\s*>");
    return std::regex_replace(s, vec, "emu_vector_cast<$1>");
}

bool write_file(const std::string& path, const std::string& text)
{
    std::ofstream f(path, std::ios::binary);
    f << text;
    return (bool)f;
}

std::string read_file(const std::string& path)
{
    std::ifstream f(path, std::ios::binary);
    std::ostringstream s; s << f.rdbuf();
    return s.str();
}

int run_command(const std::string& cmd, std::string& output)
{
    FILE* p = popen((cmd + " 2>&1").c_str(), "r");
    if (!p) { output = "cannot run: " + cmd; return -1; }
    char buf[4096]; size_t n;
    while ((n = fread(buf, 1, sizeof buf, p)) > 0) output.append(buf, n);
    return pclose(p);
}

std::string compiler() { const char* cxx = getenv("DISPNATIVE_EMU_CXX"); return cxx && *cxx ? cxx : "g++"; }

// g++ diagnostics in NVRTC's form: "file.cu(line): error: ...", without the temporary directory.
std::string nvrtc_style(const std::string& log, const std::string& dir)
{
    std::string s = std::regex_replace(log, std::regex(dir + "/"), "");
    return std::regex_replace(s, std::regex("([\\w.]+):(\\d+):\\d+: (error|warning|note)"), "$1($2): $3");
}

// The size of an ELF64 image whose section headers come last (as g++ and ld write a shared object).
size_t elf_size(const unsigned char* image)
{
    uint64_t shoff; uint16_t shentsize, shnum;
    memcpy(&shoff, image + 0x28, 8); memcpy(&shentsize, image + 0x3a, 2); memcpy(&shnum, image + 0x3c, 2);
    return shoff + (size_t)shentsize * shnum;
}

int compile_program(Program& p)
{
    char dir_template[] = "/tmp/dispnative-emu-XXXXXX";
    char* dir = mkdtemp(dir_template);
    if (!dir) { p.log = "cannot create a temporary directory"; return 6; }
    std::string d = dir;
    bool ok = write_file(d + "/emu_device.h", EMU_DEVICE_H) && write_file(d + "/emu_api.h", EMU_API_H);
    for (auto& [name, text] : p.headers)
    {
        std::string t = rewrite_source(text);
        if (!rewrite_asm(t, p.log, name)) return 6;
        ok &= write_file(d + "/" + name, t);
    }
    std::string src = rewrite_source(p.source);
    if (!rewrite_asm(src, p.log, p.name)) return 6;
    std::string file = p.name.empty() ? "kernel.cu" : p.name;
    ok &= write_file(d + "/" + file, src);
    if (!ok) { p.log = "cannot write to " + d; return 6; }
    std::string out;
    std::string cxx = compiler();
    int rc = run_command(cxx + " -std=c++17 -E -x c++ -include " + d + "/emu_device.h -I " + d + " " + d + "/" + file + " -o " + d + "/pre.ii", out);
    if (rc != 0) { p.log = nvrtc_style(out, d); return 6; }
    std::string pre = read_file(d + "/pre.ii");
    // Entry points: extern "C" void name(params) { — __global__ has expanded to nothing.
    std::regex entry("extern\\s+\"C\"\\s+void\\s+(\\w+)\\s*\\(([^)]*)\\)\\s*\\{");
    std::ostringstream wrappers;
    wrappers << "\n";
    int entries = 0;
    for (auto it = std::sregex_iterator(pre.begin(), pre.end(), entry); it != std::sregex_iterator(); ++it)
    {
        std::string name = (*it)[1].str(), params = (*it)[2].str();
        if (name.rfind("emu_", 0) == 0) continue;
        std::vector<std::string> types;
        std::stringstream ps(params);
        std::string param;
        while (std::getline(ps, param, ','))
        {
            param = std::regex_replace(param, std::regex("__restrict__"), "");
            std::smatch pm;
            if (!std::regex_match(param, pm, std::regex("\\s*(.*?[\\w*&\\s])\\s*\\b(\\w+)\\s*"))) { p.log = "cannot parse parameter '" + param + "' of " + name; return 6; }
            types.push_back(pm[1].str());
        }
        if (params.find_first_not_of(" \t\n") == std::string::npos) types.clear();
        wrappers << "extern \"C\" void emu_entry_" << name << "(void** a) { " << name << "(";
        for (size_t i = 0; i < types.size(); i++) wrappers << (i ? ", " : "") << "*(" << types[i] << "*)a[" << i << "]";
        wrappers << "); }\nextern \"C\" const int emu_params_" << name << "[] = {" << types.size();
        for (auto& t : types) wrappers << ", (int)sizeof(" << t << ")";
        wrappers << "};\n";
        entries++;
    }
    if (entries == 0) { p.log = p.name + ": no extern \"C\" __global__ entry points"; return 6; }
    write_file(d + "/pre.ii", pre + wrappers.str());
    const char* opt = getenv("DISPNATIVE_EMU_OPT");
    // g++ ignores the section attribute of a static local in a function template (a __shared__ array declared in a
    // template device function) and gives it a section of its own, .bss._ZZ<name>; the linker script gathers those into
    // emu_shared too, so that every static __shared__ array is refilled and, under a cooperative launch, swapped per block.
    // -fno-gnu-unique: such a static is otherwise a process-wide unique symbol, which the dynamic linker binds to the
    // first loaded module's copy, outside a later module's emu_shared.
    if (!write_file(d + "/emu_shared.ld", "SECTIONS { emu_shared : { *(emu_shared) *(.bss._ZZ*) } } INSERT AFTER .data;\n"))
    { p.log = "cannot write to " + d; return 6; }
    rc = run_command(cxx + " -std=c++17 " + (opt && *opt ? opt : "-O2") + " -g0 -fPIC -shared -fno-strict-aliasing -fno-gnu-unique -Wno-unknown-pragmas -Wl,-T," + d +
        "/emu_shared.ld -o " + d + "/module.so " + d + "/pre.ii", out);
    if (rc != 0) { p.log = nvrtc_style(out, d); return 6; }
    std::string so = read_file(d + "/module.so");
    p.image.assign(so.begin(), so.end());
    p.log = nvrtc_style(out, d);
    std::string ignored;
    run_command("rm -rf " + d, ignored);
    return 0;
}

const char* driver_error_name(int rc)
{
    switch (rc)
    {
    case 0: return "CUDA_SUCCESS";
    case 1: return "CUDA_ERROR_INVALID_VALUE";
    case 2: return "CUDA_ERROR_OUT_OF_MEMORY";
    case 3: return "CUDA_ERROR_NOT_INITIALIZED";
    case 9: return "CUDA_ERROR_INVALID_CONFIGURATION";
    case 100: return "CUDA_ERROR_NO_DEVICE";
    case 101: return "CUDA_ERROR_INVALID_DEVICE";
    case 200: return "CUDA_ERROR_INVALID_IMAGE";
    case 400: return "CUDA_ERROR_INVALID_HANDLE";
    case 500: return "CUDA_ERROR_NOT_FOUND";
    case 600: return "CUDA_ERROR_NOT_READY";
    case 719: return "CUDA_ERROR_LAUNCH_FAILED";
    case 720: return "CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE";
    case 900: return "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED";
    default: return "CUDA_ERROR_UNKNOWN";
    }
}

} // namespace

// ===============================================================================================================
// CUDA driver API.
EXPORT int cuInit(unsigned) { g_initialized = true; return 0; }
EXPORT int cuDriverGetVersion(int* v) { *v = 13000; return 0; }
EXPORT int cuDeviceGetCount(int* n) { *n = 1; return 0; }
EXPORT int cuDeviceGet(int* d, int ordinal) { if (ordinal != 0) return 101; *d = 0; return 0; }
EXPORT int cuDeviceGetName(char* name, int len, int) { snprintf(name, len, "DispNative CUDA emulator (CPU)"); return 0; }
EXPORT int cuDeviceTotalMem_v2(size_t* bytes, int) { *bytes = memory_limit(); return 0; }
EXPORT int cuDeviceGetAttribute(int* v, int attribute, int)
{
    switch (attribute)
    {
    case 13: *v = 1980000; return 0;   // clock rate (kHz), H100 SXM boost
    case 16: *v = Multiprocessors; return 0;
    case 36: *v = 2619000; return 0;   // memory clock (kHz)
    case 37: *v = 5120; return 0;      // bus width (bits)
    case 38: *v = 1 << 20; return 0;   // L2 bytes: no cache is modelled; small, so eviction reads stay cheap
    case 75: *v = 9; return 0;         // compute capability
    case 76: *v = 0; return 0;
    case 97: *v = 232448; return 0;    // shared memory per block, opt-in (bytes)
    default: *v = 0; return 1;
    }
}
EXPORT int cuDevicePrimaryCtxRetain(void** ctx, int) { static int context; *ctx = &context; return g_initialized ? 0 : 3; }
EXPORT int cuDevicePrimaryCtxRelease_v2(int) { return 0; }
EXPORT int cuCtxSetCurrent(void*) { return 0; }
EXPORT int cuMemAlloc_v2(uint64_t* p, size_t bytes)
{
    Guard g(g_lock);
    uintptr_t a = device_alloc(bytes);
    if (!a) return 2;
    *p = a;
    return 0;
}
EXPORT int cuMemFree_v2(uint64_t p)
{
    Guard g(g_lock);
    int rc = synchronize();   // as the driver's cuMemFree does
    auto it = g_allocations.find((uintptr_t)p);
    if (it == g_allocations.end()) { warn("cuMemFree of 0x%llx, which cuMemAlloc did not return", (unsigned long long)p); return 1; }
    munmap(it->second.map, it->second.map_bytes);
    g_allocated -= (it->second.bytes + 255) & ~(size_t)255;
    g_allocations.erase(it);
    return rc;
}
std::map<uintptr_t, size_t> g_pinned;   // cuMemAllocHost's buffers: start → bytes
bool is_pinned(uintptr_t p, size_t bytes)
{
    auto it = g_pinned.upper_bound(p);
    if (it == g_pinned.begin()) return false;
    --it;
    return p + bytes <= it->first + it->second;
}
EXPORT int cuMemAllocHost_v2(void** p, size_t bytes)
{
    Guard g(g_lock);
    *p = malloc(std::max<size_t>(bytes, 1));
    if (!*p) return 2;
    g_pinned[(uintptr_t)*p] = std::max<size_t>(bytes, 1);
    return 0;
}
// Pinned memory that kernels may write too (CU_MEMHOSTALLOC_DEVICEMAP): host memory already, its device address its own.
// Filled with 0xff bytes as device memory is.
EXPORT int cuMemHostAlloc(void** p, size_t bytes, unsigned)
{
    int rc = cuMemAllocHost_v2(p, bytes);
    if (rc == 0) memset(*p, 0xff, bytes);
    return rc;
}
EXPORT int cuMemHostGetDevicePointer_v2(uint64_t* device, void* host, unsigned flags)
{
    Guard g(g_lock);
    auto it = g_pinned.upper_bound((uintptr_t)host);
    if (flags != 0 || it == g_pinned.begin() || (uintptr_t)host >= std::prev(it)->first + std::prev(it)->second)
    {
        warn("cuMemHostGetDevicePointer of %p: not in a pinned buffer, or flags %u (must be 0)", host, flags);
        return 1;
    }
    *device = (uint64_t)(uintptr_t)host;
    return 0;
}
EXPORT int cuMemFreeHost(void* p)
{
    Guard g(g_lock);
    int rc = synchronize();
    g_pinned.erase((uintptr_t)p);
    free(p);
    return rc;
}

static int copy(uintptr_t dst, uintptr_t src, size_t bytes, void* stream, bool dst_device, bool src_device, const char* what)
{
    Guard g(g_lock);
    bool dst_outside = dst_device && !find_allocation(dst, bytes), src_outside = src_device && !find_allocation(src, bytes);
    if (dst_outside || src_outside)
    {
        warn("%s of %zu bytes: %s range %s is outside any device buffer", what, bytes, dst_outside ? "destination" : "source",
            describe_address(dst_outside ? dst : src).c_str());
        return 1;
    }
    Operation op{Operation::COPY};
    op.dst = dst; op.src = src; op.bytes = bytes;
    // A copy from or to pageable memory returns only when the host side is done with (HtoD: staged) or written (DtoH).
    bool pageable = (!dst_device && !is_pinned(dst, bytes)) || (!src_device && !is_pinned(src, bytes));
    Stream* s = (Stream*)stream;
    if (!pageable || (s && s->capturing)) return submit(stream, std::move(op));
    if (int rc = synchronize()) return rc;
    return run_operation(op);
}
EXPORT int cuMemcpyHtoDAsync_v2(uint64_t dst, const void* src, size_t bytes, void* s) { return copy(dst, (uintptr_t)src, bytes, s, true, false, "cuMemcpyHtoDAsync"); }
EXPORT int cuMemcpyDtoHAsync_v2(void* dst, uint64_t src, size_t bytes, void* s) { return copy((uintptr_t)dst, src, bytes, s, false, true, "cuMemcpyDtoHAsync"); }
EXPORT int cuMemcpyDtoDAsync_v2(uint64_t dst, uint64_t src, size_t bytes, void* s) { return copy(dst, src, bytes, s, true, true, "cuMemcpyDtoDAsync"); }

EXPORT int cuStreamCreate(void** s, unsigned) { *s = new Stream(); return 0; }
EXPORT int cuStreamDestroy_v2(void* s) { Guard g(g_lock); int rc = synchronize(); delete (Stream*)s; return rc; }
EXPORT int cuStreamSynchronize(void* s) { Guard g(g_lock); return s && ((Stream*)s)->capturing ? 900 : synchronize(); }
EXPORT int cuEventCreate(void** e, unsigned) { *e = new Event(); return 0; }
EXPORT int cuEventDestroy_v2(void* e) { delete (Event*)e; return 0; }
EXPORT int cuEventRecord(void* e, void* stream)
{
    Guard g(g_lock);
    Event* ev = (Event*)e;
    ev->recorded = ev->pending = true;
    Operation op{Operation::EVENT};
    op.event = ev;
    return submit(stream, std::move(op));
}
EXPORT int cuEventSynchronize(void*) { Guard g(g_lock); return synchronize(); }
EXPORT int cuEventElapsedTime(float* ms, void* start, void* end)
{
    Guard g(g_lock);
    Event* a = (Event*)start; Event* b = (Event*)end;
    if (!a->recorded || !b->recorded) return 400;   // CUDA_ERROR_INVALID_HANDLE: an event never recorded
    if (a->pending || b->pending) return 600;        // CUDA_ERROR_NOT_READY: recorded, not yet reached
    *ms = std::chrono::duration<float, std::milli>(((Event*)end)->at - ((Event*)start)->at).count();
    return 0;
}
EXPORT int cuEventElapsedTime_v2(float* ms, void* start, void* end) { return cuEventElapsedTime(ms, start, end); }

EXPORT int cuModuleLoadData(void** module, const void* image)
{
    Guard g(g_lock);
    const unsigned char* elf = (const unsigned char*)image;
    uint16_t machine; memcpy(&machine, elf + 0x12, 2);
    if (memcmp(elf, "\x7f" "ELF", 4) != 0 || elf[4] != 2 || machine != 62)   // ELF64, x86-64: not a CUBIN from a real NVRTC
    {
        warn("cuModuleLoadData: not an image from the emulator's NVRTC (a CUBIN from a real one?)");
        return 200;
    }
    size_t size = elf_size(elf);
    char path[] = "/tmp/dispnative-emu-module-XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0) return 200;
    bool ok = write(fd, image, size) == (ssize_t)size;
    close(fd);
    void* h = ok ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : nullptr;
    unlink(path);
    if (!h) { warn("cuModuleLoadData: %s", dlerror()); return 200; }
    auto bind = (void (*)(EmuApi*))dlsym(h, "emu_bind");
    if (!bind) { dlclose(h); return 200; }
    g_api.syncthreads = api_syncthreads;
    g_api.collective = api_collective;
    g_api.fail = api_fail;
    g_api.yield = api_yield;
    bind(&g_api);
    auto section = (void (*)(char**, char**))dlsym(h, "emu_shared_section");
    char* begin = nullptr; char* end = nullptr;
    if (section) section(&begin, &end);
    *module = new Module{h, begin, end};
    return 0;
}
EXPORT int cuModuleUnload(void* module) { Guard g(g_lock); synchronize(); dlclose(((Module*)module)->handle); delete (Module*)module; return 0; }
EXPORT int cuModuleGetFunction(void** f, void* module, const char* name)
{
    Guard g(g_lock);
    void* h = ((Module*)module)->handle;
    auto entry = (void (*)(void**))dlsym(h, ("emu_entry_" + std::string(name)).c_str());
    auto params = (const int*)dlsym(h, ("emu_params_" + std::string(name)).c_str());
    if (!entry || !params) return 500;
    *f = new Function{entry, params, name, (const Module*)module};
    return 0;
}
// CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES (8) only, up to sm_90's opt-in limit (227 KiB).
EXPORT int cuFuncSetAttribute(void* f, int attribute, int value)
{
    Guard g(g_lock);
    if (attribute != 8) { warn("cuFuncSetAttribute: attribute %d is not emulated", attribute); return 1; }
    if (value < 0 || value > 232448) return 1;   // CUDA_ERROR_INVALID_VALUE
    ((Function*)f)->max_dynamic_shared = (unsigned)value;
    return 0;
}
// Blocks run one at a time here: as many as sm_90's 2048 threads and 227 KiB of shared memory would hold.
EXPORT int cuOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void* f, int block_size, size_t dynamic_shared)
{
    if (!blocks || !f || block_size <= 0 || block_size > 1024) return 1;
    int n = 2048 / block_size;
    if (dynamic_shared > 0) n = std::min<long>(n, 232448 / (long)dynamic_shared);
    *blocks = std::min(n, 32);
    return 0;
}
namespace {
int launch(void* f, EmuDim3 grid, EmuDim3 block, unsigned shared, void* stream, void** params, bool cooperative)
{
    Guard g(g_lock);
    const Function* fn = (const Function*)f;
    if (int rc = check_launch(*fn, grid, block, shared)) return rc;
    if (cooperative)
    {
        // As many blocks as the device holds at once (cuOccupancyMaxActiveBlocksPerMultiprocessor on every SM).
        int per_sm = 0;
        cuOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, f, (int)(block.x * block.y * block.z), shared);
        if ((long long)grid.x * grid.y * grid.z > (long long)Multiprocessors * per_sm)
        {
            warn("cooperative launch of %s: %u blocks, more than the %d the device holds at once", fn->name.c_str(), grid.x * grid.y * grid.z, Multiprocessors * per_sm);
            return 720;   // CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE
        }
    }
    Operation op{Operation::LAUNCH};
    op.fn = fn; op.grid = grid; op.block = block; op.shared = shared; op.cooperative = cooperative;
    for (int i = 0; i < fn->params[0]; i++)
    {
        const char* p = (const char*)params[i];
        op.args.emplace_back(p, p + fn->params[1 + i]);
    }
    return submit(stream, std::move(op));
}
} // namespace
EXPORT int cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned shared,
    void* stream, void** params, void** extra)
{
    if (extra) { warn("cuLaunchKernel: 'extra' is not emulated"); return 1; }
    return launch(f, {gx, gy, gz}, {bx, by, bz}, shared, stream, params, false);
}
// All blocks at once, so that a grid-wide barrier (threads spin-waiting through __nanosleep) can complete.
EXPORT int cuLaunchCooperativeKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned shared,
    void* stream, void** params)
{
    return launch(f, {gx, gy, gz}, {bx, by, bz}, shared, stream, params, true);
}
// cuLaunchKernelEx with CUlaunchConfig/CUlaunchAttribute as cuda.h lays them out; the only attribute taken is
// programmatic stream serialization (id 6), which changes nothing here: operations on a stream run one after another,
// and the asm rewriting above maps griddepcontrol.wait/launch_dependents to nothing.
struct EmuLaunchAttribute { int id; int pad; union { int value; char raw[64]; }; };
struct EmuLaunchConfig { unsigned gx, gy, gz, bx, by, bz, shared; void* stream; EmuLaunchAttribute* attrs; unsigned num_attrs; };
static_assert(sizeof(EmuLaunchAttribute) == 72 && sizeof(EmuLaunchConfig) == 56, "cuda.h's launch structures");
EXPORT int cuLaunchKernelEx(const EmuLaunchConfig* c, void* f, void** params, void** extra)
{
    if (!c || (c->num_attrs && !c->attrs)) return 1;
    for (unsigned i = 0; i < c->num_attrs; i++)
        if (c->attrs[i].id != 6 || (c->attrs[i].value != 0 && c->attrs[i].value != 1))
        {
            warn("cuLaunchKernelEx: attribute %d (value %d) is not emulated", c->attrs[i].id, c->attrs[i].value);
            return 1;
        }
    return cuLaunchKernel(f, c->gx, c->gy, c->gz, c->bx, c->by, c->bz, c->shared, c->stream, params, extra);
}
EXPORT int cuProfilerStart() { return 0; }   // no profiler here
EXPORT int cuProfilerStop() { return 0; }
EXPORT int cuStreamIsCapturing(void* s, int* status) { Guard g(g_lock); *status = s && ((Stream*)s)->capturing ? 1 : 0; return 0; }
EXPORT int cuStreamBeginCapture_v2(void* s, int) { Stream* st = (Stream*)s; if (!st || st->capturing) return 900; st->capturing = true; st->captured.clear(); return 0; }
EXPORT int cuStreamEndCapture(void* s, void** graph)
{
    Stream* st = (Stream*)s;
    if (!st || !st->capturing) return 1;
    st->capturing = false;
    *graph = new Graph{std::move(st->captured)};
    st->captured.clear();
    return 0;
}
EXPORT int cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long) { *exec = new Graph(*(Graph*)graph); return 0; }
EXPORT int cuGraphLaunch(void* exec, void* stream)
{
    Guard g(g_lock);
    if (stream && ((Stream*)stream)->capturing) return 900;
    for (auto& op : ((Graph*)exec)->ops)
        if (int rc = submit(stream, op)) return rc;
    return 0;
}
EXPORT int cuGraphExecDestroy(void* exec) { delete (Graph*)exec; return 0; }
EXPORT int cuGraphDestroy(void* graph) { delete (Graph*)graph; return 0; }
EXPORT int cuGetErrorName(int rc, const char** s) { *s = driver_error_name(rc); return 0; }
EXPORT int cuGetErrorString(int rc, const char** s)
{
    *s = rc == 719 ? "the emulated kernel failed (see the [cuda-emulator] line on stderr)" : driver_error_name(rc);
    return 0;
}

// ===============================================================================================================
// NVRTC.
// Never a real NVRTC's version; the minor hashes the device headers, so the engine's kernel cache (keyed on the NVRTC
// version) recompiles when they change.
EXPORT int nvrtcVersion(int* major, int* minor)
{
    static const int headers = [] {
        unsigned h = 2166136261u;
        for (const char* text : {EMU_DEVICE_H, EMU_API_H})
            for (const char* c = text; *c; c++) h = (h ^ (unsigned char)*c) * 16777619u;
        return (int)(h % 100000u);
    }();
    *major = 99; *minor = headers;
    return 0;
}
EXPORT int nvrtcCreateProgram(void** prog, const char* src, const char* name, int headers, const char* const* texts, const char* const* names)
{
    auto* p = new Program{src, name ? name : "kernel.cu", {}, {}, {}};
    for (int i = 0; i < headers; i++) p->headers.emplace_back(names[i], texts[i]);
    *prog = p;
    return 0;
}
EXPORT int nvrtcCompileProgram(void* prog, int, const char* const*) { Guard g(g_lock); return compile_program(*(Program*)prog); }
EXPORT int nvrtcDestroyProgram(void** prog) { delete (Program*)*prog; *prog = nullptr; return 0; }
EXPORT int nvrtcGetProgramLogSize(void* prog, size_t* n) { *n = ((Program*)prog)->log.size() + 1; return 0; }
EXPORT int nvrtcGetProgramLog(void* prog, char* log) { auto& l = ((Program*)prog)->log; memcpy(log, l.c_str(), l.size() + 1); return 0; }
EXPORT int nvrtcGetCUBINSize(void* prog, size_t* n) { *n = ((Program*)prog)->image.size(); return 0; }
EXPORT int nvrtcGetCUBIN(void* prog, char* out) { auto& im = ((Program*)prog)->image; memcpy(out, im.data(), im.size()); return 0; }
EXPORT const char* nvrtcGetErrorString(int rc) { return rc == 0 ? "NVRTC_SUCCESS" : rc == 6 ? "NVRTC_ERROR_COMPILATION" : "NVRTC_ERROR"; }

// ===============================================================================================================
// cuBLASLt.
EXPORT int cublasLtCreate(void** h) { static int handle; *h = &handle; return 0; }
EXPORT int cublasLtDestroy(void*) { return 0; }
EXPORT int cublasLtMatmulDescCreate(void** d, int compute, int scale) { *d = new LtDesc{compute, scale}; return 0; }
EXPORT int cublasLtMatmulDescDestroy(void* d) { delete (LtDesc*)d; return 0; }
EXPORT int cublasLtMatmulDescSetAttribute(void* d, int attribute, const void* value, size_t size)
{
    auto* desc = (LtDesc*)d;
    if ((attribute == 3 || attribute == 4) && size == 4)
    {
        int v; memcpy(&v, value, 4);
        if (v != 0 && v != 1) { warn("matmul: transpose operation %d not emulated", v); return 15; }
        (attribute == 3 ? desc->transa : desc->transb) = v;
        return 0;
    }
    warn("cublasLtMatmulDescSetAttribute(%d, %zu bytes) not emulated", attribute, size);
    return 15;
}
EXPORT int cublasLtMatrixLayoutCreate(void** l, int type, uint64_t rows, uint64_t cols, int64_t ld) { *l = new LtLayout{type, rows, cols, ld}; return 0; }
EXPORT int cublasLtMatrixLayoutDestroy(void* l) { delete (LtLayout*)l; return 0; }
EXPORT int cublasLtMatrixLayoutSetAttribute(void* l, int attribute, const void* value, size_t size)
{
    auto* layout = (LtLayout*)l;
    if (attribute == 5 && size == 4) { memcpy(&layout->batch, value, 4); return layout->batch >= 1 ? 0 : 7; }
    if (attribute == 6 && size == 8) { memcpy(&layout->stride, value, 8); return 0; }
    if (attribute == 1 && size == 4) { memcpy(&layout->order, value, 4); return 0; }
    warn("cublasLtMatrixLayoutSetAttribute(%d, %zu bytes) not emulated", attribute, size);
    return 15;
}
EXPORT int cublasLtMatmulPreferenceCreate(void** p) { *p = new LtPref(); return 0; }
EXPORT int cublasLtMatmulPreferenceDestroy(void* p) { delete (LtPref*)p; return 0; }
EXPORT int cublasLtMatmulPreferenceSetAttribute(void* p, int attribute, const void* value, size_t size)
{
    auto* pref = (LtPref*)p;
    if (attribute == 1 && size == 8) { memcpy(&pref->workspace, value, 8); return 0; }
    if (attribute >= 5 && attribute <= 8 && size == 4) { memcpy(&pref->align[attribute - 5], value, 4); return 0; }
    warn("cublasLtMatmulPreferenceSetAttribute(%d, %zu bytes) not emulated", attribute, size);
    return 15;
}
// Each returned "algorithm" carries the smallest alignment the preference allowed (the matmul checks its pointers)
// and an extra delay: the emulator offers three algorithms that compute the same result, the second the fastest
// (no delay) and the first the slowest, so the engine's algorithm timing has something to find.
EXPORT int cublasLtMatmulAlgoGetHeuristic(void*, void* desc, void* a, void* b, void* c, void* d, void* pref, int requested, void* results, int* found)
{
    uint64_t m, n, k;
    *found = 0;
    if (requested < 1) return 7;
    if (int rc = matmul_shape(*(LtDesc*)desc, *(LtLayout*)a, *(LtLayout*)b, *(LtLayout*)c, *(LtLayout*)d, m, n, k)) return rc;
    auto* p = (LtPref*)pref;
    uint32_t align = *std::min_element(p->align, p->align + 4);
    if (align == 0 || (align & (align - 1)) != 0) return 7;
    static const uint32_t delays_us[] = {2000, 0, 1000};
    int offered = std::min(requested, 3);
    for (int i = 0; i < offered; i++)
    {
        char* r = (char*)results + 96 * i;   // cublasLtMatmulHeuristicResult_t: algo (64 bytes), workspace, state, waves, reserved
        memset(r, 0, 96);
        memcpy(r, &align, 4);
        memcpy(r + 4, &delays_us[i], 4);
    }
    *found = offered;
    return 0;
}
EXPORT int cublasLtMatmul(void*, void* desc, const float* alpha, const void* A, void* a, const void* B, void* b, const float* beta,
    const void* C, void* c, void* D, void* d, const void* algo, void*, size_t, void* stream)
{
    Guard g(g_lock);
    Matmul mm{*(LtDesc*)desc, *(LtLayout*)a, *(LtLayout*)b, *(LtLayout*)c, *(LtLayout*)d, *alpha, *beta,
        (uintptr_t)A, (uintptr_t)B, (uintptr_t)C, (uintptr_t)D, 256};
    mm.delay_us = 0;
    if (algo) { memcpy(&mm.align, algo, 4); memcpy(&mm.delay_us, (const char*)algo + 4, 4); }
    if (mm.align == 0) mm.align = 256;
    uint64_t m, n, k;
    if (int rc = matmul_shape(mm.desc, mm.a, mm.b, mm.c, mm.d, m, n, k)) return rc;
    Operation op{Operation::MATMUL};
    op.mm = mm;
    return submit(stream, std::move(op));
}
EXPORT const char* cublasLtGetStatusName(int rc)
{
    switch (rc)
    {
    case 0: return "CUBLAS_STATUS_SUCCESS";
    case 3: return "CUBLAS_STATUS_ALLOC_FAILED";
    case 7: return "CUBLAS_STATUS_INVALID_VALUE";
    case 15: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "CUBLAS_STATUS_INTERNAL_ERROR";
    }
}
EXPORT size_t cublasLtGetVersion() { return 990000; }
EXPORT const char* cublasLtGetStatusString(int rc) { return rc == 0 ? "success" : "see the [cuda-emulator] line on stderr"; }
