// Elementwise ops: fill, the unary maps with their derivatives, and the four
// broadcasting binary ops. Op codes follow `Unary::kernel_code` / `Binary` in
// src/ops/elementwise.rs.

#define SELU_ALPHA 1.6732632f
#define SELU_SCALE 1.050701f

__device__ __forceinline__ float unary_apply(int op, float a, float b, float x) {
    switch (op) {
    case 0: return x > 0.f ? x : 0.f;
    case 1: return x > 0.f ? x : a * expm1f(x);
    case 2: return SELU_SCALE * (x > 0.f ? x : SELU_ALPHA * expm1f(x));
    case 3: return sigmoid_f(x);
    case 4: return tanhf(x);
    case 5: return fmaxf(x, 0.f) + log1pf(expf(-fabsf(x)));
    case 6: return expf(x);
    case 7: return logf(x);
    default: return a * x + b;
    }
}

// d apply / dx from the input x and the output y.
__device__ __forceinline__ float unary_deriv(int op, float a, float x, float y) {
    switch (op) {
    case 0: return x > 0.f ? 1.f : 0.f;
    case 1: return x > 0.f ? 1.f : y + a;
    case 2: return x > 0.f ? SELU_SCALE : y + SELU_SCALE * SELU_ALPHA;
    case 3: return y * (1.f - y);
    case 4: return 1.f - y * y;
    case 5: return sigmoid_f(x);
    case 6: return y;
    case 7: return 1.f / x;
    default: return a;
    }
}

extern "C" __global__ void fill(float* out, int n, float v) {
    FOR_EACH(i, n) out[i] = v;
}

extern "C" __global__ void unary_forward(const float* x, float* y, int n, int op, float a, float b) {
    FOR_EACH(i, n) y[i] = unary_apply(op, a, b, x[i]);
}

extern "C" __global__ void unary_backward(const float* x, const float* y, const float* gy, float* gx, int n,
                                          int op, float a) {
    FOR_EACH(i, n) gx[i] = gy[i] * unary_deriv(op, a, x[i], y[i]);
}

extern "C" __global__ void binary_forward(const float* a, const float* b, float* out, int n, int op, Dims d) {
    FOR_EACH(i, n) {
        int ia, ib;
        dims_offsets(d, i, &ia, &ib);
        float x = a[ia], y = b[ib];
        out[i] = op == 0 ? x + y : op == 1 ? x - y : op == 2 ? x * y : x / y;
    }
}
