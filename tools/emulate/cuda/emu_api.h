// The interface between the CUDA emulator (cuda_emulator.cpp) and the kernel modules it compiles (emu_device.h).
#pragma once

struct EmuDim3 { unsigned x, y, z; };
struct EmuThread { EmuDim3 thread_idx, block_idx; unsigned linear; };

// Filled by the emulator when it loads the module (emu_bind).
struct EmuApi
{
    EmuThread* current;   // the running thread, set before each switch to its fiber
    EmuDim3 block_dim, grid_dim;
    char* dynamic_shared;
    void (*syncthreads)();
    // A warp collective: every lane of `mask` must call it with the same kind; `in` is this lane's operands,
    // `out` (4 words, or null) receives its results.
    void (*collective)(int kind, unsigned mask, const unsigned long long* in, int count, unsigned long long* out);
    void (*fail)(const char* message);
};

enum EmuCollective { EMU_SHUFFLE = 1, EMU_SYNCWARP = 2, EMU_MMA_BF16 = 3, EMU_MMA_F16 = 4, EMU_LDMATRIX_X4_TRANS = 5 };
