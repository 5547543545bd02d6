// Group and batch norm (src/ops/norm.rs). x is viewed as [N, C, S] planes;
// a statistic pools the planes of one (sample, group) when `groups` > 0 and
// those of one channel across the batch when `groups` == 0.
//
// The reductions run one block of BLOCK threads per segment: segment
// `seg` holds the `len` elements `seg * first + (j / run) * step + j % run`,
// runs of `run` contiguous elements `step` apart. Each thread sums a strided
// share in double, then `block_sum` (common.cuh) adds the partial sums in a
// fixed tree, so the result does not depend on timing.

__device__ __forceinline__ long long seg_offset(int seg, int j, long long first, int run, long long step) {
    return seg * first + (j / run) * step + j % run;
}

// The statistic of plane p = n * C + c.
__device__ __forceinline__ int stat_of(int p, int c, int groups) {
    return groups > 0 ? (p / c) * groups + (p % c) / (c / groups) : p % c;
}

// Mean and biased variance of statistic blockIdx.x from double sums of x and
// x^2, as the CPU computes them.
extern "C" __global__ void norm_stats(const float* x, float* mean, float* var, int len, long long first, int run,
                                      long long step) {
    double s = 0.0, ss = 0.0;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        double v = x[seg_offset(blockIdx.x, j, first, run, step)];
        s += v;
        ss += v * v;
    }
    s = block_sum(s);
    ss = block_sum(ss);
    if (threadIdx.x == 0) {
        double mu = s / len;
        mean[blockIdx.x] = (float)mu;
        var[blockIdx.x] = (float)fmax(ss / len - mu * mu, 0.0);
    }
}

// rstd = 1 / sqrt(var + eps), one thread per statistic.
extern "C" __global__ void norm_rstd(const float* var, float* rstd, int n, float eps) {
    FOR_EACH(i, n) rstd[i] = 1.f / sqrtf(var[i] + eps);
}

// y = (x - mean) * (gamma * rstd) + beta, one thread per element.
extern "C" __global__ void norm_forward(const float* x, const float* gamma, const float* beta, const float* mean,
                                        const float* rstd, float* y, int total, int c, int s, int groups) {
    FOR_EACH(i, total) {
        int p = i / s, ch = p % c, k = stat_of(p, c, groups);
        y[i] = (x[i] - mean[k]) * (gamma[ch] * rstd[k]) + beta[ch];
    }
}

// Over segment blockIdx.x: a = sum(w * gy) and b = sum(w * gy * xhat), with
// xhat = (x - mean) * rstd of each element's own statistic and w its
// channel's gamma when `weighted`, else 1.
extern "C" __global__ void norm_backward_sums(const float* x, const float* gy, const float* gamma,
                                              const float* mean, const float* rstd, float* a, float* b, int len,
                                              long long first, int run, long long step, int c, int s, int groups,
                                              int weighted) {
    double sg = 0.0, sgx = 0.0;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        long long o = seg_offset(blockIdx.x, j, first, run, step);
        int p = (int)(o / s), k = stat_of(p, c, groups);
        double g = weighted ? (double)gy[o] * gamma[p % c] : (double)gy[o];
        sg += g;
        sgx += g * ((double)x[o] - mean[k]) * rstd[k];
    }
    sg = block_sum(sg);
    sgx = block_sum(sgx);
    if (threadIdx.x == 0) {
        a[blockIdx.x] = (float)sg;
        b[blockIdx.x] = (float)sgx;
    }
}

// dx = gy * gamma * rstd + (x - mean) * P + Q with P = -rstd^2 * b / len and
// Q = -rstd * a / len, from the gamma-weighted sums a, b of each statistic of
// `len` elements (zero when the statistics are constants); one thread per
// element.
extern "C" __global__ void norm_backward_dx(const float* x, const float* gy, const float* gamma, const float* mean,
                                            const float* rstd, const float* a, const float* b, float* dx, int total,
                                            int c, int s, int groups, int len) {
    FOR_EACH(i, total) {
        int p = i / s, ch = p % c, k = stat_of(p, c, groups);
        float r = rstd[k];
        float pk = -r * r * b[k] / len, qk = -r * a[k] / len;
        dx[i] = gy[i] * (gamma[ch] * r) + (x[i] - mean[k]) * pk + qk;
    }
}
