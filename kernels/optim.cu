// Optimizer steps: fused Adam and the two gradient clippings.

// One Adam update (PyTorch's, L2 weight decay added to the gradient).
extern "C" __global__ void adam(const float* p, const float* g, const float* m, const float* v, float* p2,
                                float* m2, float* v2, int n, float lr, float beta1, float beta2, float eps,
                                float weight_decay, float bc1, float bc2) {
    FOR_EACH(i, n) {
        float gr = g[i] + weight_decay * p[i];
        float mi = beta1 * m[i] + (1.f - beta1) * gr;
        float vi = beta2 * v[i] + (1.f - beta2) * gr * gr;
        m2[i] = mi;
        v2[i] = vi;
        p2[i] = p[i] - lr * (mi / bc1) / (sqrtf(vi / bc2) + eps);
    }
}

extern "C" __global__ void clamp(const float* g, float* out, int n, float c) {
    FOR_EACH(i, n) out[i] = fminf(fmaxf(g[i], -c), c);
}

// acc[0] += sum of x[i]^2 (each block adds its partial sum once).
extern "C" __global__ void sum_squares(const float* x, int n, float* acc) {
    float s = 0.f;
    FOR_EACH(i, n) s += x[i] * x[i];
    s = block_sum(s);
    if (threadIdx.x == 0) atomicAdd(acc, s);
}
