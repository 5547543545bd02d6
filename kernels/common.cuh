// Prepended to every kernel file by src/device/cuda.rs. Plain CUDA C: NVRTC
// supplies the math built-ins, so no toolkit header is included.

// One thread per item, looping when the grid is smaller than the work.
#define FOR_EACH(i, n) for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += blockDim.x * gridDim.x)

#define MAX_RANK 8

// Threads per block of every launch: `BLOCK` in src/device/cuda.rs, which a
// test there keeps equal to this. Shared arrays are sized by it.
#define BLOCK 256

// The sum of `v` over the threads of a block of at most BLOCK threads (a
// power of two), added in a fixed tree order so that results do not depend
// on timing; every thread gets it. Safe to call more than once in a kernel:
// it waits for every thread to have read the previous total before reusing
// its shared array.
template <class T>
__device__ T block_sum(T v) {
    __shared__ T part[BLOCK];
    __syncthreads();
    part[threadIdx.x] = v;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w >>= 1) {
        if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
        __syncthreads();
    }
    return part[0];
}

// Index maps of up to MAX_RANK axes, passed by value (mirrors `Dims` in
// src/device/cuda.rs): `shape` is the output's, `sa`/`sb` the element
// strides of up to two inputs read in the output's index space.
struct Dims {
    int rank;
    int shape[MAX_RANK];
    int sa[MAX_RANK];
    int sb[MAX_RANK];
};

// Offsets into the two inputs of output element `i`.
__device__ __forceinline__ void dims_offsets(const Dims& d, int i, int* ia, int* ib) {
    int a = 0, b = 0;
    for (int ax = d.rank - 1; ax >= 0; --ax) {
        int k = i % d.shape[ax];
        i /= d.shape[ax];
        a += k * d.sa[ax];
        b += k * d.sb[ax];
    }
    *ia = a;
    *ib = b;
}

// The logistic function without overflow (as `sigmoid` in src/ops/elementwise.rs).
__device__ __forceinline__ float sigmoid_f(float x) {
    if (x >= 0.f) return 1.f / (1.f + expf(-x));
    float e = expf(x);
    return e / (1.f + e);
}
