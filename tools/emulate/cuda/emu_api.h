// The interface between the CUDA emulator (cuda_emulator.cpp) and the kernel modules it compiles (emu_device.h).
#pragma once
#include <cmath>
#include <cstring>

struct EmuDim3 { unsigned x, y, z; };
// serial: numbers each run of a block, so (serial, linear) names one thread's run; module-side per-thread state
// (cp.async groups) resets when it changes.
struct EmuThread { EmuDim3 thread_idx, block_idx; unsigned linear; unsigned long long serial; };

// Filled by the emulator when it loads the module (emu_bind).
struct EmuApi
{
    EmuThread* current;   // the running thread, set before each switch to its fiber
    EmuDim3 block_dim, grid_dim;
    char* dynamic_shared;
    unsigned dynamic_shared_bytes;
    void (*syncthreads)();
    // A warp collective: every lane of `mask` must call it with the same kind; `in` is this lane's operands,
    // `out` (4 words, or null) receives its results.
    void (*collective)(int kind, unsigned mask, const unsigned long long* in, int count, unsigned long long* out);
    void (*fail)(const char* message);
    // __nanosleep: lets the other threads run (a thread switches only where it waits; a spin-wait loop yields here).
    void (*yield)();
};

enum EmuCollective { EMU_SHUFFLE = 1, EMU_SYNCWARP = 2, EMU_MMA_BF16 = 3, EMU_MMA_F16 = 4, EMU_LDMATRIX_X4_TRANS = 5, EMU_LDMATRIX_X4 = 6,
    EMU_WGMMA_BF16 = 7, EMU_WGMMA_F16 = 8 };

// f16 ↔ f32 as the PTX cvt instructions do (round to nearest even), for the kernels' rewritten asm and for cuBLASLt.
inline float emu_h2f(unsigned short h)
{
    unsigned s = (unsigned)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) { float f = ldexpf((float)m, -24); return s ? -f : f; }
    unsigned u = e == 31 ? s | 0x7f800000u | (m << 13) : s | ((e + 112) << 23) | (m << 13);
    float f; memcpy(&f, &u, 4); return f;
}
inline unsigned short emu_f2h(float f) { _Float16 h = (_Float16)f; unsigned short b; memcpy(&b, &h, 2); return b; }
