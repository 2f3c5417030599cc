// Checks that the CUDA emulator reports what a GPU would: each case compiles a small kernel through the emulator's
// NVRTC, runs it through its driver API, and expects the failure or the wrong result that a GPU would give (or, for the
// control cases, the right result). Without these, the engine's self-test on the emulator could pass for the wrong
// reason. Built by build.sh; run as `emu_selftest path/to/libcudaemu.so`; ends with "N passed, N failed".
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dlfcn.h>
#include <string>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

namespace {

void* lib;
template <typename F> F get(const char* name)
{
    void* p = dlsym(lib, name);
    if (!p) { fprintf(stderr, "emu_selftest: %s is not exported\n", name); std::exit(2); }
    return (F)p;
}

int (*cuInit)(unsigned);
int (*cuMemAlloc)(uint64_t*, size_t);
int (*cuMemFree)(uint64_t);
int (*cuMemAllocHost)(void**, size_t);
int (*cuMemFreeHost)(void*);
int (*cuMemcpyHtoDAsync)(uint64_t, const void*, size_t, void*);
int (*cuMemcpyDtoHAsync)(void*, uint64_t, size_t, void*);
int (*cuStreamCreate)(void**, unsigned);
int (*cuStreamSynchronize)(void*);
int (*cuModuleLoadData)(void**, const void*);
int (*cuModuleGetFunction)(void**, void*, const char*);
int (*cuLaunchKernel)(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*, void**, void**);
int (*cuLaunchCooperativeKernel)(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*, void**);
int (*nvrtcCreateProgram)(void**, const char*, const char*, int, const char* const*, const char* const*);
int (*nvrtcCompileProgram)(void*, int, const char* const*);
int (*nvrtcGetCUBINSize)(void*, size_t*);
int (*nvrtcGetCUBIN)(void*, char*);
int (*nvrtcGetProgramLogSize)(void*, size_t*);
int (*nvrtcGetProgramLog)(void*, char*);

void* stream;
int passed = 0, failed = 0;

void report(bool ok, const char* name, const std::string& detail)
{
    printf("%s  %s: %s\n", ok ? "PASS" : "FAIL", name, detail.c_str());
    (ok ? passed : failed)++;
}

void* function(const char* source, const char* entry)
{
    void* prog = nullptr;
    nvrtcCreateProgram(&prog, source, "case.cu", 0, nullptr, nullptr);
    if (nvrtcCompileProgram(prog, 0, nullptr) != 0)
    {
        size_t n = 0; nvrtcGetProgramLogSize(prog, &n);
        std::string log(n, '\0'); nvrtcGetProgramLog(prog, log.data());
        fprintf(stderr, "emu_selftest: the case does not compile:\n%s\n", log.c_str());
        std::exit(2);
    }
    size_t size = 0; nvrtcGetCUBINSize(prog, &size);
    std::vector<char> image(size); nvrtcGetCUBIN(prog, image.data());
    void* module = nullptr; void* f = nullptr;
    if (cuModuleLoadData(&module, image.data()) || cuModuleGetFunction(&f, module, entry)) { fprintf(stderr, "emu_selftest: cannot load %s\n", entry); std::exit(2); }
    return f;
}

// Launches f on (grid, block) with dynamic shared memory, then synchronizes: the first non-zero code of the two.
int run(void* f, unsigned grid, unsigned block, unsigned shared, std::vector<void*> args)
{
    int rc = cuLaunchKernel(f, grid, 1, 1, block, 1, 1, shared, stream, args.data(), nullptr);
    int sync = cuStreamSynchronize(stream);
    return rc ? rc : sync;
}

std::vector<float> download(uint64_t d, size_t n)
{
    std::vector<float> h(n);
    cuMemcpyDtoHAsync(h.data(), d, n * 4, stream);   // pageable: returns when the copy is done
    return h;
}

uint64_t upload(const std::vector<float>& h)
{
    uint64_t d = 0;
    cuMemAlloc(&d, h.size() * 4);
    cuMemcpyHtoDAsync(d, h.data(), h.size() * 4, stream);
    return d;
}

const char* kVector = R"(
extern "C" __global__ void load4(const float* x, float* y, int offset)
{
    y[threadIdx.x] = reinterpret_cast<const float4*>(x + offset)[threadIdx.x].x;
}
)";

const char* kCpAsync = R"(
__device__ __forceinline__ unsigned smem_address(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
extern "C" __global__ void stage(const float* x, float* y, int offset)
{
    extern __shared__ __align__(16) float tile[];
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(smem_address(tile + 4 * threadIdx.x)), "l"(x + offset + 4 * threadIdx.x), "r"(16));
    asm volatile("cp.async.commit_group;");
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    __syncthreads();
    y[threadIdx.x] = tile[4 * ((threadIdx.x + 1) % blockDim.x)];
}
)";

// D[64 x 8] = A[64 x 16] · B[16 x 8] on wgmma.m64n8k16 with A from registers, every element 1, and B K-major in
// shared memory with the 128-byte swizzle: B[k][n] = 16 n + k + 1 (exact in bf16) at row n, 16-byte chunk
// (k / 8) ^ (n % 8). Every row of D is then 256 n + 136. Only the warps below `issuing` issue it (4: the whole
// warpgroup, as the instruction requires).
const char* kWgmma = R"(
extern "C" __global__ void wgmma_ones(float* y, int issuing)
{
    extern __shared__ __align__(16) unsigned short b[];
    int t = threadIdx.x, warp = t / 32, lane = t % 32;
    if (t < 128) { int n = t / 16, k = t % 16; b[n * 64 + (((k / 8) ^ n) * 8) + k % 8] = (unsigned short)(__float_as_uint(16.f * n + k + 1) >> 16); }
    __syncthreads();
    unsigned one = 0x3f803f80u;   // two bf16 ones
    unsigned long long desc = (unsigned long long)((unsigned)__cvta_generic_to_shared(b) & 0x3ffffu) >> 4 | 1ull << 16 | 64ull << 32 | 1ull << 62;
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    if (warp < issuing)
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%0, %1, %2, %3}, {%4, %5, %6, %7}, %8, p, 1, 1, 0;\n}\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(one), "r"(one), "r"(one), "r"(one), "l"(desc), "r"(0));
    // Thread (warp w, lane 4g + c): rows 16w + g and + 8, columns 2c and 2c + 1.
    for (int i = 0; i < 4; i++) y[t * 4 + i] = d[i];
}
)";

const char* kBarrier = R"(
extern "C" __global__ void neighbour(float* y, int sync)
{
    extern __shared__ float s[];
    s[threadIdx.x] = (float)threadIdx.x;
    if (sync) __syncthreads();
    y[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}
extern "C" __global__ void divergent(float* y)
{
    float v = (float)threadIdx.x;
    if (threadIdx.x < 16) __syncthreads();
    else v = __shfl_xor_sync(0xffffffffu, v, 1);
    y[threadIdx.x] = v;
}
// Every condition true: 31 in every lane.
extern "C" __global__ void votes(float* y)
{
    unsigned t = threadIdx.x, all = 0xffffffffu;
    y[t] = (__ballot_sync(all, t % 3 == 0) == 0x49249249u ? 1.f : 0.f) + (__any_sync(all, t == 7) ? 2.f : 0.f)
         + (__any_sync(all, 0) ? 0.f : 4.f) + (__all_sync(all, t < 32) ? 8.f : 0.f) + (__all_sync(all, t != 5) ? 0.f : 16.f);
}
extern "C" __global__ void overrun(float* y, int n)
{
    for (int i = threadIdx.x; i < n + 4096; i += blockDim.x) y[i] = 1.f;
}
extern "C" __global__ void fill(float* y, float v) { y[threadIdx.x] = v; }
// Block 0 writes shared memory, block 1 only reads it.
extern "C" __global__ void stale_static(float* y)
{
    __shared__ float s[32];
    if (blockIdx.x == 0) s[threadIdx.x] = 5.f;
    __syncthreads();
    y[blockIdx.x * 32 + threadIdx.x] = s[threadIdx.x];
}
// The same with the array declared in a function template (where g++ ignores a static's section attribute).
template <typename T> __device__ T* template_array() { __shared__ T s[32]; return s; }
extern "C" __global__ void stale_template(float* y)
{
    float* s = template_array<float>();
    if (blockIdx.x == 0) s[threadIdx.x] = 5.f;
    __syncthreads();
    y[blockIdx.x * 32 + threadIdx.x] = s[threadIdx.x];
}
extern "C" __global__ void stale_dynamic(float* y)
{
    extern __shared__ float s[];
    if (blockIdx.x == 0) s[threadIdx.x] = 5.f;
    __syncthreads();
    y[blockIdx.x * 32 + threadIdx.x] = s[threadIdx.x];
}
)";

// The attention kernel's softmax instructions: pair conversions (first operand in the upper half, round to nearest
// even) and ex2.approx.ftz (results below the smallest normal flushed).
const char* kConversions = R"(
extern "C" __global__ void convert(const float* x, unsigned* y)
{
    unsigned r;
    float e;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(x[0]), "f"(x[1]));
    y[0] = r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(x[0]), "f"(x[1]));
    y[1] = r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(x[2]));
    y[2] = __float_as_uint(e);
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(x[3]));
    y[3] = __float_as_uint(e);
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(x[4]), "f"(x[5]));
    y[4] = r;
}
)";

// Block b writes b to its static and dynamic shared arrays and to y[b], waits for the whole grid (a barrier on *count,
// spinning through __nanosleep), then reads its neighbour's y and its own shared arrays: each thread should find
// (b + 1) mod gridDim.x, plus 100 if its static array was not its block's own and 1000 if its dynamic one was not.
const char* kGrid = R"(
template <typename T> __device__ T* block_array() { __shared__ T st[32]; return st; }
extern "C" __global__ void neighbours(float* y, unsigned* count)
{
    __shared__ float st[32];
    float* tt = block_array<float>();   // a function template's static array: per block too
    extern __shared__ float dy[];
    st[threadIdx.x] = (float)blockIdx.x;
    tt[threadIdx.x] = (float)blockIdx.x;
    dy[threadIdx.x] = (float)blockIdx.x;
    if (threadIdx.x == 0) y[blockIdx.x] = (float)blockIdx.x;
    __syncthreads();
    if (threadIdx.x == 0)
    {
        __threadfence();
        atomicAdd(count, 1u);
        while (*(volatile unsigned*)count < gridDim.x) __nanosleep(0);
    }
    __syncthreads();
    y[gridDim.x + blockIdx.x * 32 + threadIdx.x] = y[(blockIdx.x + 1) % gridDim.x] + (st[threadIdx.x] != (float)blockIdx.x ? 100.f : 0.f)
        + (dy[threadIdx.x] != (float)blockIdx.x ? 1000.f : 0.f) + (tt[threadIdx.x] != (float)blockIdx.x ? 10000.f : 0.f);
}
// The same exchange with only a block barrier where the grid barrier belongs.
extern "C" __global__ void neighbours_unsynced(float* y)
{
    if (threadIdx.x == 0) y[blockIdx.x] = (float)blockIdx.x;
    __syncthreads();
    y[gridDim.x + blockIdx.x * 32 + threadIdx.x] = y[(blockIdx.x + 1) % gridDim.x];
}
)";

} // namespace

int main(int argc, char** argv)
{
    lib = dlopen(argc > 1 ? argv[1] : "libcudaemu.so", RTLD_NOW | RTLD_LOCAL);
    if (!lib) { fprintf(stderr, "emu_selftest: %s\n", dlerror()); return 2; }
    setvbuf(stdout, nullptr, _IOLBF, 0);
    cuInit = get<decltype(cuInit)>("cuInit");
    cuMemAlloc = get<decltype(cuMemAlloc)>("cuMemAlloc_v2");
    cuMemFree = get<decltype(cuMemFree)>("cuMemFree_v2");
    cuMemAllocHost = get<decltype(cuMemAllocHost)>("cuMemAllocHost_v2");
    cuMemFreeHost = get<decltype(cuMemFreeHost)>("cuMemFreeHost");
    cuMemcpyHtoDAsync = get<decltype(cuMemcpyHtoDAsync)>("cuMemcpyHtoDAsync_v2");
    cuMemcpyDtoHAsync = get<decltype(cuMemcpyDtoHAsync)>("cuMemcpyDtoHAsync_v2");
    cuStreamCreate = get<decltype(cuStreamCreate)>("cuStreamCreate");
    cuStreamSynchronize = get<decltype(cuStreamSynchronize)>("cuStreamSynchronize");
    cuModuleLoadData = get<decltype(cuModuleLoadData)>("cuModuleLoadData");
    cuModuleGetFunction = get<decltype(cuModuleGetFunction)>("cuModuleGetFunction");
    cuLaunchKernel = get<decltype(cuLaunchKernel)>("cuLaunchKernel");
    cuLaunchCooperativeKernel = get<decltype(cuLaunchCooperativeKernel)>("cuLaunchCooperativeKernel");
    nvrtcCreateProgram = get<decltype(nvrtcCreateProgram)>("nvrtcCreateProgram");
    nvrtcCompileProgram = get<decltype(nvrtcCompileProgram)>("nvrtcCompileProgram");
    nvrtcGetCUBINSize = get<decltype(nvrtcGetCUBINSize)>("nvrtcGetCUBINSize");
    nvrtcGetCUBIN = get<decltype(nvrtcGetCUBIN)>("nvrtcGetCUBIN");
    nvrtcGetProgramLogSize = get<decltype(nvrtcGetProgramLogSize)>("nvrtcGetProgramLogSize");
    nvrtcGetProgramLog = get<decltype(nvrtcGetProgramLog)>("nvrtcGetProgramLog");
    if (cuInit(0) || cuStreamCreate(&stream, 0)) { fprintf(stderr, "emu_selftest: no emulated device\n"); return 2; }

    std::vector<float> ramp(4096);
    for (size_t i = 0; i < ramp.size(); i++) ramp[i] = (float)i;
    uint64_t x = upload(ramp), y = 0;
    cuMemAlloc(&y, 4096 * 4);

    {
        void* f = function(kVector, "load4");
        int offset = 0;
        int rc = run(f, 1, 32, 0, {&x, &y, &offset});
        report(rc == 0 && download(y, 32)[5] == 20.f, "aligned float4 load", "rc " + std::to_string(rc));
        offset = 1;
        rc = run(f, 1, 32, 0, {&x, &y, &offset});
        report(rc != 0, "float4 load one element off 16-byte alignment fails", "rc " + std::to_string(rc));
    }
    {
        void* f = function(kCpAsync, "stage");
        int offset = 0;
        int rc = run(f, 1, 32, 32 * 16, {&x, &y, &offset});
        report(rc == 0 && download(y, 32)[0] == 4.f, "cp.async of aligned rows, waited for", "rc " + std::to_string(rc));
        offset = 2;
        rc = run(f, 1, 32, 32 * 16, {&x, &y, &offset});
        report(rc != 0, "cp.async from an address off 16-byte alignment fails", "rc " + std::to_string(rc));
    }
    {
        void* f = function(kBarrier, "neighbour");
        int sync = 1;
        int rc = run(f, 1, 64, 64 * 4, {&y, &sync});
        auto with = download(y, 64);
        report(rc == 0 && with[0] == 1.f && with[63] == 0.f, "shared-memory exchange behind __syncthreads", "rc " + std::to_string(rc));
        sync = 0;
        rc = run(f, 1, 64, 64 * 4, {&y, &sync});
        auto without = download(y, 64);
        int unwritten = 0;
        for (float v : without) unwritten += std::isnan(v);
        report(rc == 0 && unwritten > 0, "the same exchange without the barrier reads what no thread wrote yet",
            std::to_string(unwritten) + " of 64 threads read the 0xff fill");
        void* g = function(kBarrier, "divergent");
        rc = run(g, 1, 32, 0, {&y});
        report(rc != 0, "half a warp at __syncthreads, half at a full-warp shuffle: fails instead of hanging", "rc " + std::to_string(rc));
    }
    {
        int rc = run(function(kBarrier, "votes"), 1, 32, 0, {&y});
        auto out = download(y, 32);
        int right = 0;
        for (float v : out) right += v == 31.f;
        report(rc == 0 && right == 32, "warp votes: ballot, any, all", std::to_string(right) + " of 32 lanes got every vote right");
    }
    {
        // 1 + 2^-8 is a bf16 tie (to 1.0, the even neighbour) and exact in f16; 2^-130 is below f32's normals.
        uint64_t in = upload({1.00390625f, 3.f, -130.f, 3.f, 1.01171875f, NAN});
        int rc = run(function(kConversions, "convert"), 1, 1, 0, {&in, &y});
        auto out = download(y, 5);
        unsigned u[5];
        memcpy(u, out.data(), sizeof u);
        bool ok = rc == 0 && u[0] == 0x3f804040u && u[1] == 0x3c044200u && u[2] == 0u && u[3] == 0x41000000u && u[4] == 0x3f827fffu;
        char detail[160];
        snprintf(detail, sizeof detail, "bf16x2 %08x, f16x2 %08x, ex2(-130) %08x, ex2(3) %08x, bf16x2 of 1+3*2^-8 and NaN %08x", u[0], u[1], u[2], u[3], u[4]);
        report(ok, "pair conversions round to nearest even, first operand high; ex2.approx.ftz flushes", detail);
        cuMemFree(in);
    }
    for (const char* entry : {"stale_static", "stale_template", "stale_dynamic"})
    {
        int rc = run(function(kBarrier, entry), 2, 32, 128, {&y});
        auto out = download(y, 64);
        report(rc == 0 && out[0] == 5.f && std::isnan(out[32]), (std::string(entry) + ": a block reads no other block's shared memory").c_str(),
            "block 0 read " + std::to_string(out[0]) + ", block 1 read " + std::to_string(out[32]));
    }
    {
        // Device → pinned host: the copy lands at the synchronization, not when it is submitted.
        void* f = function(kBarrier, "fill");
        float* pinned = nullptr;
        cuMemAllocHost((void**)&pinned, 32 * 4);
        for (int i = 0; i < 32; i++) pinned[i] = -1.f;
        float seven = 7.f;
        cuLaunchKernel(f, 1, 1, 1, 32, 1, 1, 0, stream, std::vector<void*>{&y, &seven}.data(), nullptr);
        cuMemcpyDtoHAsync(pinned, y, 32 * 4, stream);
        float before = pinned[0];
        cuStreamSynchronize(stream);
        float after = pinned[0];
        report(before == -1.f && after == 7.f, "a download into pinned memory lands at the synchronization",
            "before " + std::to_string(before) + ", after " + std::to_string(after));
        // Pinned host → device: the source is read when the copy runs, so rewriting it before synchronizing shows.
        for (int i = 0; i < 32; i++) pinned[i] = 1.f;
        cuMemcpyHtoDAsync(y, pinned, 32 * 4, stream);
        for (int i = 0; i < 32; i++) pinned[i] = 2.f;
        cuStreamSynchronize(stream);
        report(download(y, 32)[0] == 2.f, "an upload from pinned memory reads its source when it runs", "device holds " + std::to_string(download(y, 32)[0]));
        cuMemFreeHost(pinned);
    }
    {
        // A kernel's invalid access ends the process (a GPU's context is lost after it): run it in a child.
        void* h = function(kBarrier, "overrun");
        int n = 4096, status = 0;
        fflush(stdout);
        pid_t child = fork();
        if (child == 0) { run(h, 1, 128, 0, {&y, &n}); _exit(0); }
        waitpid(child, &status, 0);
        report(WIFEXITED(status) && WEXITSTATUS(status) == 99, "a write past the end of a device buffer is reported and ends the process",
            "child exit status " + std::to_string(WIFEXITED(status) ? WEXITSTATUS(status) : -1));
    }
    {
        // A grid-wide barrier: it completes in a cooperative launch (all blocks at once, each with its own shared
        // memory), fails a normal launch instead of hanging (its first block would wait for the others forever), and
        // a cooperative grid larger than the device holds is refused.
        void* f = function(kGrid, "neighbours");
        const unsigned blocks = 4;
        uint64_t count = upload({0.f});   // a u32 zero
        std::vector<void*> args{&y, &count};
        int rc = cuLaunchCooperativeKernel(f, blocks, 1, 1, 32, 1, 1, 32 * 4, stream, args.data());
        int sync = cuStreamSynchronize(stream);
        auto out = download(y, blocks + blocks * 32);
        int right = 0;
        for (unsigned b = 0; b < blocks; b++)
            for (int t = 0; t < 32; t++) right += out[blocks + b * 32 + t] == (float)((b + 1) % blocks);
        report(rc == 0 && sync == 0 && right == (int)(blocks * 32), "grid barrier in a cooperative launch of 4 blocks, shared memory per block",
            std::to_string(right) + " of " + std::to_string(blocks * 32) + " threads read their neighbour's value and their own shared memory");
        cuMemcpyHtoDAsync(count, std::vector<float>{0.f}.data(), 4, stream);
        rc = run(f, blocks, 32, 32 * 4, args);
        report(rc != 0, "the same barrier in a normal launch fails instead of hanging", "rc " + std::to_string(rc));
        // Without the grid barrier: each block runs up to its next grid-wide wait before the next block starts, so the
        // neighbour's value is not there yet (running the blocks' threads in turns, one step each, would hide this).
        void* g = function(kGrid, "neighbours_unsynced");
        cuMemcpyHtoDAsync(y, std::vector<float>(blocks, -1.f).data(), blocks * 4, stream);
        std::vector<void*> unsynced_args{&y};
        rc = cuLaunchCooperativeKernel(g, blocks, 1, 1, 32, 1, 1, 0, stream, unsynced_args.data());
        sync = cuStreamSynchronize(stream);
        auto early = download(y, blocks + blocks * 32);
        int unwritten = 0;
        for (unsigned i = blocks; i < blocks + blocks * 32; i++) unwritten += early[i] == -1.f;
        report(rc == 0 && sync == 0 && unwritten > 0, "the same exchange with __syncthreads instead of the grid barrier reads unwritten values",
            std::to_string(unwritten) + " of " + std::to_string(blocks * 32) + " threads read their neighbour before it wrote");
        rc = cuLaunchCooperativeKernel(f, 132 * 32 + 1, 1, 1, 32, 1, 1, 32 * 4, stream, args.data());
        report(rc == 720, "a cooperative grid larger than the device holds at once is refused", "rc " + std::to_string(rc));
        cuMemFree(count);
    }
    {
        void* f = function(kWgmma, "wgmma_ones");
        int issuing = 4;
        int rc = run(f, 1, 128, 1024, {&y, &issuing});
        auto out = download(y, 512);
        int right = 0;
        for (int t = 0; t < 128; t++)
            for (int i = 0; i < 4; i++) right += out[t * 4 + i] == 256.f * (2 * (t % 4) + (i & 1)) + 136.f;
        report(rc == 0 && right == 512, "wgmma m64n8k16, A from registers, B through a 128-byte-swizzled descriptor",
            std::to_string(right) + " of 512 accumulators right");
        issuing = 3;
        rc = run(f, 1, 128, 1024, {&y, &issuing});
        report(rc != 0, "the same wgmma issued by 3 of the warpgroup's 4 warps fails", "rc " + std::to_string(rc));
    }
    cuMemFree(x); cuMemFree(y);
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
