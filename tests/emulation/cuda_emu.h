// What a kernel file sees when tests/kernel_emulation.rs compiles it as C++
// with g++ to run it on the CPU: the CUDA keywords, built-in variables and
// device functions our kernels use, mapped onto plain C++, and the glue that
// exports every kernel of the file to the test (see tests/emulation/mod.rs).
//
// Execution model (tests/emulation/cuda_emu.cpp): the blocks of a launch run
// one after another on the calling thread; the threads of a block run as
// fibers (ucontext) that switch only at a barrier (__syncthreads, __syncwarp,
// the warp shuffles and votes). So a `static` is shared exactly by the
// threads of one block and atomics need no locking. Between two barriers the
// threads run one after another in a shuffled order (the same on every run),
// so a result that depends on that order, as after a missing __syncthreads,
// comes out wrong.
//
// Not here (a kernel using them does not compile as C++ until they are
// added): textures, surfaces, cooperative groups, half precision, clock(),
// __syncthreads_count/_and/_or, shuffles over part of a warp (masks are ignored).

#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include <type_traits>
#include <typeinfo>
#include <utility>

// ---- Keywords --------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
// One instance per OS thread, and the blocks of a launch run in turn on one.
#define __shared__ static thread_local
#define __constant__ static

// ---- Built-in variables ----------------------------------------------------

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
};

// Set by the scheduler before it switches to a thread's fiber.
extern thread_local uint3 threadIdx, blockIdx;
extern thread_local dim3 blockDim, gridDim;
static const int warpSize = 32;

// ---- The runtime (cuda_emu.cpp) --------------------------------------------

namespace emu {

// A launch as the driver gets it (cudarc's LaunchConfig).
struct Launch {
    unsigned int grid[3];
    unsigned int block[3];
    unsigned int shared_bytes;
};

// Run `body(ctx)` once per thread of every block of `l`. Returns 0, or
// nonzero with what went wrong written to `err`.
int launch(const Launch& l, void (*body)(void*), void* ctx, char* err, size_t err_len);

void sync_block();
void sync_warp();
// Every lane of the warp offers `mine`; returns what lane `src` offered.
uint64_t warp_exchange(uint64_t mine, int src);
void* dynamic_shared();
// "float const*, int, Dims" from the typeid names of parameter types.
const char* describe(const char* const* type_names, int n);

}  // namespace emu

// ---- Device functions ------------------------------------------------------

#define __syncthreads() emu::sync_block()
inline void __syncwarp(unsigned = 0xffffffffu) { emu::sync_warp(); }

namespace emu {
inline int lane() { return (int)((threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x) % 32; }
template <class T>
inline T shfl_from(T v, int src) {
    static_assert(sizeof(T) <= 8, "warp shuffles move at most 8 bytes");
    uint64_t bits = 0;
    __builtin_memcpy(&bits, &v, sizeof(T));
    uint64_t got = warp_exchange(bits, src);
    T out;
    __builtin_memcpy(&out, &got, sizeof(T));
    return out;
}
// The type of an argument that takes part in no template deduction.
template <class T>
struct same {
    using type = T;
};
}  // namespace emu

// Every lane takes part: our kernels' masks name the whole warp.
template <class T>
inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
    int lane = emu::lane();
    return emu::shfl_from(v, lane / width * width + (src % width + width) % width);
}
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
    int lane = emu::lane(), src = lane ^ mask;
    return emu::shfl_from(v, src / width == lane / width ? src : lane);
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
    int lane = emu::lane();
    return emu::shfl_from(v, lane % width + (int)delta < width ? lane + (int)delta : lane);
}
template <class T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
    int lane = emu::lane();
    return emu::shfl_from(v, lane % width >= (int)delta ? lane - (int)delta : lane);
}
inline unsigned __ballot_sync(unsigned, int pred) {
    unsigned bits = 0;
    for (int l = 0; l < 32; ++l) bits |= (unsigned)emu::warp_exchange(pred != 0, l) << l;
    return bits;
}
inline int __any_sync(unsigned m, int pred) { return __ballot_sync(m, pred) != 0; }
inline int __all_sync(unsigned m, int pred) { return __ballot_sync(m, !pred) == 0; }

// One fiber runs at a time, so atomics are plain read-modify-writes.
template <class T>
inline T atomicAdd(T* p, typename emu::same<T>::type v) {
    T old = *p;
    *p = old + v;
    return old;
}
template <class T>
inline T atomicMax(T* p, typename emu::same<T>::type v) {
    T old = *p;
    *p = old > v ? old : v;
    return old;
}
template <class T>
inline T atomicMin(T* p, typename emu::same<T>::type v) {
    T old = *p;
    *p = old < v ? old : v;
    return old;
}
template <class T>
inline T atomicExch(T* p, typename emu::same<T>::type v) {
    T old = *p;
    *p = v;
    return old;
}
template <class T>
inline T atomicCAS(T* p, typename emu::same<T>::type expected, typename emu::same<T>::type v) {
    T old = *p;
    if (old == expected) *p = v;
    return old;
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
// Round-to-nearest arithmetic the GPU never fuses into an FMA; the host build
// targets plain x86-64 (no FMA instructions), so plain operators match.
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fsub_rn(float x, float y) { return x - y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fdiv_rn(float x, float y) { return x / y; }
inline double __dadd_rn(double x, double y) { return x + y; }
inline double __dmul_rn(double x, double y) { return x * y; }
inline float __saturatef(float x) { return fminf(fmaxf(x, 0.f), 1.f); }
template <class T>
inline T __ldg(const T* p) { return *p; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
inline int __ffs(int x) { return __builtin_ffs(x); }

inline int __float_as_int(float x) {
    int i;
    __builtin_memcpy(&i, &x, 4);
    return i;
}
inline unsigned __float_as_uint(float x) {
    unsigned i;
    __builtin_memcpy(&i, &x, 4);
    return i;
}
inline float __int_as_float(int i) {
    float x;
    __builtin_memcpy(&x, &i, 4);
    return x;
}
inline float __uint_as_float(unsigned i) {
    float x;
    __builtin_memcpy(&x, &i, 4);
    return x;
}

struct __align__(8) float2 { float x, y; };
struct float3 { float x, y, z; };
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(8) int2 { int x, y; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float3 make_float3(float x, float y, float z) { return {x, y, z}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }

// ---- Exporting the kernels -------------------------------------------------

namespace emu {

template <class F>
struct Params;
template <class... A>
struct Params<void (*)(A...)> {
    static const int count = sizeof...(A);
    template <size_t... I>
    static void call(void (*k)(A...), void** args, std::index_sequence<I...>) {
        // Like cuLaunchKernel: args[i] points at the value of parameter i.
        k(*static_cast<std::remove_cv_t<A>*>(args[I])...);
    }
    static const char* describe() {
        static const char* const names[] = {typeid(A).name()..., ""};
        static const char* s = emu::describe(names, count);
        return s;
    }
};

template <auto K>
struct Kernel {
    using P = Params<decltype(K)>;
    static void body(void* args) { P::call(K, static_cast<void**>(args), std::make_index_sequence<P::count>()); }
    static int run(const Launch* l, void** args, char* err, size_t err_len) {
        return emu::launch(*l, body, args, err, err_len);
    }
};

// One row of the table the test reads: name, C++ signature, runner.
struct Entry {
    const char* name;
    const char* (*signature)();
    int (*run)(const Launch*, void** args, char* err, size_t err_len);
};

}  // namespace emu

// The generated end of every file lists its kernels:
//   EMU_EXPORT_KERNELS(EMU_KERNEL(fill) EMU_KERNEL(unary_forward) ...)
#define EMU_KERNEL(k) {#k, emu::Params<decltype(&k)>::describe, emu::Kernel<&k>::run},
#define EMU_EXPORT_KERNELS(...)                                                          \
    extern "C" __attribute__((visibility("default"))) const emu::Entry* emu_kernels(int* n) { \
        static const emu::Entry table[] = {__VA_ARGS__};                                \
        *n = (int)(sizeof(table) / sizeof(table[0]));                                   \
        return table;                                                                   \
    }
