// Sum over the middle axis of a tensor viewed as [outer, n, inner]:
// out[o * inner + j] = sum_k x[(o * n + k) * inner + j], accumulated in double
// like the CPU reference.

// One thread per output: many outputs, short sums.
extern "C" __global__ void sum_axis(const float* x, float* out, int outer, int n, int inner) {
    FOR_EACH(i, outer * inner) {
        const float* p = x + (long long)(i / inner) * n * inner + i % inner;
        double s = 0.0;
        for (int k = 0; k < n; ++k) s += p[(long long)k * inner];
        out[i] = (float)s;
    }
}

// One block of BLOCK threads per output: few outputs, long sums.
extern "C" __global__ void sum_axis_block(const float* x, float* out, int outer, int n, int inner) {
    int i = blockIdx.x;
    const float* p = x + (long long)(i / inner) * n * inner + i % inner;
    double s = 0.0;
    for (int k = threadIdx.x; k < n; k += blockDim.x) s += p[(long long)k * inner];
    s = block_sum(s);
    if (threadIdx.x == 0) out[i] = (float)s;
}
