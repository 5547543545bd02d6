// Pooling of [planes, h, w] images (see src/ops/pool.rs): average and max
// pooling over square windows, and the mean of each plane. Forward kernels
// take one thread per output; backward kernels gather, one thread per input
// pixel summing the output gradients of the windows that hold it in the
// order the CPU loop adds them, so they are deterministic.

// A pooling's geometry (mirrors `Window` in src/ops/pool.rs): input and
// output plane sizes, and window size, stride and padding.
struct Window {
    int h, w, ho, wo, k, s, p;
};

// Outputs lo..=hi along one axis whose window [o*s - p, o*s - p + k) holds
// input index y (empty when lo > hi).
__device__ __forceinline__ void windows_over(int y, int k, int s, int p, int n_out, int* lo, int* hi) {
    int a = y + p - k;
    *lo = a < 0 ? 0 : a / s + 1;
    *hi = min((y + p) / s, n_out - 1);
}

// Index in its plane `src` of the maximum of window (oy, ox), clipped to the
// plane, the first one on ties: the CPU's `max_pool_argmax` step for step.
__device__ int max_pool_argmax(const float* src, const Window& g, int oy, int ox) {
    int y0 = max(oy * g.s - g.p, 0), y1 = min(oy * g.s + g.k - g.p, g.h);
    int x0 = max(ox * g.s - g.p, 0), x1 = min(ox * g.s + g.k - g.p, g.w);
    int best = y0 * g.w + x0;
    for (int y = y0; y < y1; ++y)
        for (int x = x0; x < x1; ++x)
            if (src[y * g.w + x] > src[best]) best = y * g.w + x;
    return best;
}

// y[q, oy, ox] = scale * window sum (no padding), summed row by row like the CPU.
extern "C" __global__ void avg_pool2d(const float* x, float* y, int n, Window g, float scale) {
    FOR_EACH(i, n) {
        int q = i / (g.ho * g.wo), o = i % (g.ho * g.wo);
        const float* src = x + (long long)q * g.h * g.w + (o / g.wo) * g.s * g.w + (o % g.wo) * g.s;
        float s = 0.f;
        for (int r = 0; r < g.k; ++r) {
            float row = 0.f;
            for (int c = 0; c < g.k; ++c) row += src[r * g.w + c];
            s += row;
        }
        y[i] = s * scale;
    }
}

// dx[q, y, x] = sum over the windows holding (y, x) of scale * gy.
extern "C" __global__ void avg_pool2d_backward(const float* gy, float* dx, int n, Window g, float scale) {
    FOR_EACH(i, n) {
        int q = i / (g.h * g.w), j = i % (g.h * g.w);
        const float* src = gy + (long long)q * g.ho * g.wo;
        int oy0, oy1, ox0, ox1;
        windows_over(j / g.w, g.k, g.s, 0, g.ho, &oy0, &oy1);
        windows_over(j % g.w, g.k, g.s, 0, g.wo, &ox0, &ox1);
        float acc = 0.f;
        for (int oy = oy0; oy <= oy1; ++oy)
            for (int ox = ox0; ox <= ox1; ++ox) acc += __fmul_rn(src[oy * g.wo + ox], scale);
        dx[i] = acc;
    }
}

// y[q, oy, ox] = maximum of the window over the padded plane (padding never wins).
extern "C" __global__ void max_pool2d(const float* x, float* y, int n, Window g) {
    FOR_EACH(i, n) {
        int q = i / (g.ho * g.wo), o = i % (g.ho * g.wo);
        const float* src = x + (long long)q * g.h * g.w;
        y[i] = src[max_pool_argmax(src, g, o / g.wo, o % g.wo)];
    }
}

// dx[q, y, x] = sum of gy over the windows whose maximum (found again from
// x, ties as the forward) is (y, x).
extern "C" __global__ void max_pool2d_backward(const float* x, const float* gy, float* dx, int n, Window g) {
    FOR_EACH(i, n) {
        int q = i / (g.h * g.w), j = i % (g.h * g.w);
        const float* src = x + (long long)q * g.h * g.w;
        const float* gq = gy + (long long)q * g.ho * g.wo;
        int oy0, oy1, ox0, ox1;
        windows_over(j / g.w, g.k, g.s, g.p, g.ho, &oy0, &oy1);
        windows_over(j % g.w, g.k, g.s, g.p, g.wo, &ox0, &ox1);
        float acc = 0.f;
        for (int oy = oy0; oy <= oy1; ++oy)
            for (int ox = ox0; ox <= ox1; ++ox)
                if (max_pool_argmax(src, g, oy, ox) == j) acc += gq[oy * g.wo + ox];
        dx[i] = acc;
    }
}

// y[q] = mean of plane q; one thread per plane, summed in order in f32 like the CPU.
extern "C" __global__ void global_avg_pool(const float* x, float* y, int planes, int hw) {
    FOR_EACH(q, planes) {
        const float* src = x + (long long)q * hw;
        float s = 0.f;
        for (int j = 0; j < hw; ++j) s += src[j];
        y[q] = s / (float)hw;
    }
}

// dx[q, j] = gy[q] / hw; one thread per input element.
extern "C" __global__ void global_avg_pool_backward(const float* gy, float* dx, int n, int hw) {
    FOR_EACH(i, n) dx[i] = gy[i / hw] / (float)hw;
}
