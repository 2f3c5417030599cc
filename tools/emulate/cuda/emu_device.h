// Force-included before every kernel source that the CUDA emulator compiles with g++: CUDA's built-ins in plain
// C++. Each CUDA thread is a fiber of the emulator's scheduler (cuda_emulator.cpp); __shared__ variables are static
// (the blocks of a launch run one after another; a cooperative launch's, which run at once, swap them), warp
// collectives (shuffles, mma.sync, ldmatrix) go through the scheduler, which resumes the lanes of a warp only when all
// of them have arrived.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <math.h>
#include <vector>

#include "emu_api.h"

EmuApi* emu_api = nullptr;
static char emu_shared_anchor;   // "shared addresses" (cvta) are offsets from here: every __shared__ array is static
extern "C" void emu_bind(EmuApi* api) { emu_api = api; }
extern "C" char __start_emu_shared[] __attribute__((weak)), __stop_emu_shared[] __attribute__((weak));
extern "C" void emu_shared_section(char** begin, char** end) { *begin = __start_emu_shared; *end = __stop_emu_shared; }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Static __shared__ arrays share one section, which the emulator fills with 0xff bytes before each block runs, as it
// does dynamic shared memory: a block reading shared memory it did not write sees NaN, not a previous block's data.
#define __shared__ static __attribute__((section("emu_shared")))
#define threadIdx (emu_api->current->thread_idx)
#define blockIdx (emu_api->current->block_idx)
#define blockDim (emu_api->block_dim)
#define gridDim (emu_api->grid_dim)
#define warpSize 32

struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct alignas(16) int4 { int x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }

inline float __int_as_float(int v) { float f; memcpy(&f, &v, 4); return f; }
inline float __uint_as_float(unsigned v) { float f; memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float f) { int v; memcpy(&v, &f, 4); return v; }
inline unsigned __float_as_uint(float f) { unsigned v; memcpy(&v, &f, 4); return v; }
inline void __nanosleep(unsigned) { emu_api->yield(); }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float cospif(float x) { return (float)cos(M_PI * (double)x); }
inline float sinpif(float x) { return (float)sin(M_PI * (double)x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

// The kernels' vector loads and stores (reinterpret_cast<const uint4*>(p) and the like, which the emulator's source
// rewriting turns into this call): a GPU faults on a vector access at an address that is not a multiple of its
// size, where x86 would quietly read it, so the cast checks the address.
static char emu_misaligned_message[160];   // not a function-local static: those are the kernels' __shared__ arrays
template <typename V, typename P> inline V* emu_vector_cast(P* p)
{
    if ((uintptr_t)p % sizeof(V) != 0)
    {
        char* message = emu_misaligned_message;
        snprintf(message, sizeof emu_misaligned_message, "misaligned address: a %zu-byte vector access at %p, which is not %zu-byte aligned",
            sizeof(V), (const void*)p, sizeof(V));
        emu_api->fail(message);
    }
    return reinterpret_cast<V*>(p);
}

inline void __syncthreads() { emu_api->syncthreads(); }
// Blocks run one after another and a fiber switches only at a collective, so a read-modify-write is atomic and every
// write is visible to whatever runs next.
inline unsigned atomicAdd(unsigned* p, unsigned v) { unsigned old = *p; *p = old + v; return old; }
inline void __threadfence() {}
inline void __threadfence_system() {}
template <typename T> inline T __ldcg(const T* p) { return *p; }

inline unsigned emu_lane() { return emu_api->current->linear & 31u; }

template <typename T> inline T emu_shuffle(unsigned mask, T v, unsigned source)
{
    static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
    unsigned long long in[2] = {0, source}, out[4];
    memcpy(&in[0], &v, sizeof(T));
    emu_api->collective(EMU_SHUFFLE, mask, in, 2, out);
    T r; memcpy(&r, &out[0], sizeof(T));
    return r;
}
// Source lanes as the CUDA programming guide defines them for a segment of `width` lanes.
template <typename T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32)
{
    unsigned lane = emu_lane();
    return emu_shuffle(mask, v, (lane & ~(unsigned)(width - 1)) + ((unsigned)src & (unsigned)(width - 1)));
}
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32)
{
    unsigned lane = emu_lane(), src = lane ^ (unsigned)lane_mask;
    if ((src & ~(unsigned)(width - 1)) != (lane & ~(unsigned)(width - 1))) src = lane;
    return emu_shuffle(mask, v, src);
}
template <typename T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32)
{
    unsigned lane = emu_lane();
    return emu_shuffle(mask, v, (lane & (unsigned)(width - 1)) + delta < (unsigned)width ? lane + delta : lane);
}
template <typename T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32)
{
    unsigned lane = emu_lane();
    return emu_shuffle(mask, v, (lane & (unsigned)(width - 1)) >= delta ? lane - delta : lane);
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu_api->collective(EMU_SYNCWARP, mask, nullptr, 0, nullptr); }
// Votes, built from one shuffle per lane of the mask (every lane makes the same sequence of collectives).
inline unsigned __ballot_sync(unsigned mask, int predicate)
{
    unsigned bits = 0;
    for (unsigned src = 0; src < 32; src++)
        if (mask >> src & 1u) bits |= emu_shuffle(mask, predicate ? 1u : 0u, src) << src;
    return bits;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == mask; }

// The PTX that the emulator's source rewriting maps inline asm statements to.
// Shared addresses: 0x80000000 + offset into the launch's dynamic shared memory, or 0x40000000 + the distance of a
// static __shared__ array from the anchor.
inline size_t __cvta_generic_to_shared(const void* p)
{
    const char* c = (const char*)p;
    if (c >= emu_api->dynamic_shared && c <= emu_api->dynamic_shared + emu_api->dynamic_shared_bytes)
        return 0x80000000u + (size_t)(c - emu_api->dynamic_shared);
    long long distance = c - &emu_shared_anchor;
    if (distance < -0x40000000ll || distance >= 0x40000000ll) emu_api->fail("__cvta_generic_to_shared of an address outside shared memory");
    return (size_t)(distance + 0x40000000ll);
}
inline char* emu_shared_pointer(unsigned address)
{
    return address >= 0x80000000u ? emu_api->dynamic_shared + (address - 0x80000000u) : &emu_shared_anchor + ((long long)address - 0x40000000ll);
}
// cp.async.cg 16 bytes with src-size 16 or 0 (zero fill), both addresses 16-byte aligned. A copy lands only when a
// wait_group that covers its group runs; until then its destination holds 0xff bytes (NaN in f32, bf16 and f16), so
// reading before the wait, a missing wait, or overwriting a buffer that other threads still read shows in the results.
struct EmuAsyncCopy { char* dst; const void* src; unsigned group; };
struct EmuAsyncState { unsigned long long serial = ~0ull; unsigned group = 0; std::vector<EmuAsyncCopy> copies; };
static EmuAsyncState emu_async_states[1024];
inline EmuAsyncState& emu_async_state()
{
    EmuAsyncState& s = emu_async_states[emu_api->current->linear];
    if (s.serial != emu_api->current->serial) { s.serial = emu_api->current->serial; s.group = 0; s.copies.clear(); }
    return s;
}
inline void emu_cp_async16(unsigned dst, const void* src, unsigned src_size)
{
    if (src_size != 16 && src_size != 0) emu_api->fail("cp.async: src-size other than 0 or 16");
    EmuAsyncState& s = emu_async_state();
    char* d = emu_shared_pointer(dst);
    if ((uintptr_t)d % 16 != 0 || (src_size && (uintptr_t)src % 16 != 0)) emu_api->fail("misaligned address: cp.async of 16 bytes from or to an address that is not 16-byte aligned");
    s.copies.push_back({d, src_size ? src : nullptr, s.group});
    memset(d, 0xff, 16);
}
inline void emu_cp_async_commit() { emu_async_state().group++; }
// Completes every committed group except the newest `pending` ones.
inline void emu_cp_async_wait(unsigned pending)
{
    EmuAsyncState& s = emu_async_state();
    size_t kept = 0;
    for (const EmuAsyncCopy& c : s.copies)
    {
        if (c.group + pending < s.group) { if (c.src) memcpy(c.dst, c.src, 16); else memset(c.dst, 0, 16); }
        else s.copies[kept++] = c;
    }
    s.copies.resize(kept);
}
// cvt.rn.bf16x2.f32 / cvt.rn.f16x2.f32 d, hi, lo: both rounded to nearest even, hi in the upper half. The bf16 NaN is
// the hardware's canonical 0x7fff.
inline unsigned emu_bf16_rn(float v)
{
    unsigned u;
    memcpy(&u, &v, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
inline unsigned emu_cvt_bf16x2(float hi, float lo) { return (emu_bf16_rn(hi) << 16) | emu_bf16_rn(lo); }
inline unsigned emu_cvt_f16x2(float hi, float lo) { return ((unsigned)emu_f2h(hi) << 16) | (unsigned)emu_f2h(lo); }
// ex2.approx.ftz.f32: 2^x with results below the smallest normal flushed to zero (the host's exp2f is at least as
// accurate as the hardware's approximation; the self-test compares with tolerances).
inline float emu_ex2_ftz(float x)
{
    float y = exp2f(x);
    return y < 1.17549435e-38f ? 0.f : y;
}
inline void emu_mma_m16n8k16(int kind, float* c0, float* c1, float* c2, float* c3, unsigned a0, unsigned a1, unsigned a2,
    unsigned a3, unsigned b0, unsigned b1)
{
    float* c[4] = {c0, c1, c2, c3};
    unsigned long long in[10] = {a0, a1, a2, a3, b0, b1}, out[4];
    for (int i = 0; i < 4; i++) { unsigned u; memcpy(&u, c[i], 4); in[6 + i] = u; }
    emu_api->collective(kind, 0xffffffffu, in, 10, out);
    for (int i = 0; i < 4; i++) { unsigned u = (unsigned)out[i]; memcpy(c[i], &u, 4); }
}
inline void emu_ldmatrix_x4(int kind, unsigned* r0, unsigned* r1, unsigned* r2, unsigned* r3, unsigned address)
{
    unsigned long long in[1] = {(unsigned long long)(uintptr_t)emu_shared_pointer(address)}, out[4];
    emu_api->collective(kind, 0xffffffffu, in, 1, out);
    *r0 = (unsigned)out[0]; *r1 = (unsigned)out[1]; *r2 = (unsigned)out[2]; *r3 = (unsigned)out[3];
}
// wgmma.mma_async.m64nNk16 with f32 accumulators (acc: this lane's N / 2 of them): a collective of each warp of the
// warpgroup on its own, since a warp's 16 rows of D depend only on its rows of A and on B. Shared-memory operands are
// read through their descriptors when the warp's lanes have all arrived; the instruction completes at once (its
// wait_group is a no-op here).
inline void emu_wgmma(int kind, int n, int tnsp_a, int tnsp_b, int a_regs, unsigned long long desc_a, unsigned a0, unsigned a1,
    unsigned a2, unsigned a3, unsigned long long desc_b, int scale_d, std::initializer_list<float*> acc)
{
    float d[128];
    if ((int)acc.size() != n / 2 || n > 256) emu_api->fail("wgmma: the accumulator count is not N / 2");
    int i = 0;
    for (float* p : acc) d[i++] = *p;
    unsigned long long meta = (unsigned long long)n | (unsigned long long)tnsp_a << 10 | (unsigned long long)tnsp_b << 11
        | (unsigned long long)a_regs << 12 | (unsigned long long)(scale_d != 0) << 13 | (unsigned long long)((emu_api->current->linear >> 5) & 3) << 16;
    unsigned long long in[8] = {meta, (unsigned long long)(uintptr_t)d, desc_a, a0, a1, a2, a3, desc_b};
    emu_api->collective(kind, 0xffffffffu, in, 8, nullptr);
    i = 0;
    for (float* p : acc) *p = d[i++];
}
