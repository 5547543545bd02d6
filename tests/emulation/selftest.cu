// Kernels that test the emulation itself (tests/kernel_emulation.rs,
// `emulator_*`): what it must run right, and mistakes it must catch.

// Writes one element past the end of `out`.
extern "C" __global__ void write_past_end(float* out, int n) {
    FOR_EACH(i, n + 1) out[i] = 1.f;
}

// Threads below 10 wait at a barrier the others never reach.
extern "C" __global__ void divergent_barrier(float* out) {
    if (threadIdx.x < 10) __syncthreads();
    out[threadIdx.x] = 1.f;
}

// The classic: an early return before a barrier.
extern "C" __global__ void return_before_barrier(float* out, int n) {
    int i = threadIdx.x;
    if (i >= n) return;
    __syncthreads();
    out[i] = 1.f;
}

// A tree sum of 256 values that forgets the barrier inside its loop.
extern "C" __global__ void sum_missing_barrier(const float* x, float* out) {
    __shared__ float part[256];
    part[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    for (int w = 128; w > 0; w >>= 1)
        if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
    if (threadIdx.x == 0) out[0] = part[0];
}

// Per warp: the sum by shuffle-down, the maximum by xor butterfly, the ballot
// of x > 0, and each lane's left neighbour by shuffle-up; 2-D blocks so the
// lane comes from the linear thread index.
extern "C" __global__ void warp_ops(const float* x, float* sum, float* mx, float* ballot, float* left) {
    int t = (threadIdx.y * blockDim.x + threadIdx.x) + blockIdx.x * blockDim.x * blockDim.y;
    float v = x[t], s = v, m = v;
    for (int d = 16; d > 0; d >>= 1) s += __shfl_down_sync(0xffffffffu, s, d);
    for (int d = 16; d > 0; d >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, d));
    unsigned b = __ballot_sync(0xffffffffu, v > 0.f);
    left[t] = __shfl_up_sync(0xffffffffu, v, 1);
    float first = __shfl_sync(0xffffffffu, s, 0);  // lane 0 holds the sum
    if (t % 32 == 0) {
        sum[t / 32] = first;
        mx[t / 32] = m;
        ballot[t / 32] = (float)__popc(b);
    }
}

// Reverses each block's part of `x` through dynamic shared memory.
extern "C" __global__ void reverse_blocks(const float* x, float* y, int n) {
    extern __shared__ __align__(16) float buf[];  // blockDim.x floats
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    buf[threadIdx.x] = i < n ? x[i] : 0.f;
    __syncthreads();
    int j = blockIdx.x * blockDim.x + (blockDim.x - 1 - threadIdx.x);
    if (j < n) y[j] = buf[threadIdx.x];
}
