// Per-sample losses and softmax (see src/ops/loss.rs). Each loss term is
// computed in f32 and summed per row in double, like the CPU's `row_sums`
// and `row_logsumexp`.

#define LN_2PI 1.8378771f

// out[blockIdx.x] = sum of term(i) over the d elements i of row blockIdx.x;
// one block of BLOCK threads per row, strided partial sums then a tree
// reduction in shared memory (a fixed order, so deterministic).
template <class Term>
__device__ void block_row_sum(float* out, int d, Term term) {
    long long base = (long long)blockIdx.x * d;
    double s = 0.0;
    for (int j = threadIdx.x; j < d; j += blockDim.x) s += (double)term(base + j);
    s = block_sum(s);
    if (threadIdx.x == 0) out[blockIdx.x] = (float)s;
}

// Per row: sum(max(x, 0) - x t + log(1 + e^-|x|)). A target outside [0, 1],
// which the CPU rejects with an error, makes its row NaN here.
extern "C" __global__ void bce_with_logits(const float* x, const float* t, float* out, int d) {
    block_row_sum(out, d, [=](long long i) {
        float xi = x[i], ti = t[i];
        if (!(ti >= 0.f && ti <= 1.f)) return nanf("");
        return fmaxf(xi, 0.f) - xi * ti + log1pf(expf(-fabsf(xi)));
    });
}

// dx[i] = g[i / d] * (sigmoid(x[i]) - t[i]); one thread per element.
extern "C" __global__ void bce_with_logits_backward(const float* x, const float* t, const float* g, float* dx,
                                                    int n, int d) {
    FOR_EACH(i, n) dx[i] = g[i / d] * (sigmoid_f(x[i]) - t[i]);
}

// Per row: sum 0.5 * (log 2pi + logvar + (x - mu)^2 / e^logvar).
extern "C" __global__ void gaussian_nll(const float* x, const float* mu, const float* lv, float* out, int d) {
    block_row_sum(out, d, [=](long long i) {
        float diff = x[i] - mu[i];
        return 0.5f * (LN_2PI + lv[i] + diff * diff * expf(-lv[i]));
    });
}

// dmu and dlogvar of each element; one thread per element.
extern "C" __global__ void gaussian_nll_backward(const float* x, const float* mu, const float* lv,
                                                 const float* g, float* dmu, float* dlv, int n, int d) {
    FOR_EACH(i, n) {
        float gn = g[i / d];
        float scaled = (mu[i] - x[i]) * expf(-lv[i]);
        dmu[i] = gn * scaled;
        dlv[i] = gn * 0.5f * (1.f - (mu[i] - x[i]) * scaled);
    }
}

// log sum_j e^{row[j]} over k values, shifted by the row max, the
// exponentials summed in double (the CPU's `row_logsumexp`).
__device__ float row_logsumexp(const float* row, int k) {
    float m = __int_as_float(0xff800000);  // -infinity
    for (int j = 0; j < k; ++j) m = fmaxf(m, row[j]);
    double s = 0.0;
    for (int j = 0; j < k; ++j) s += exp((double)(row[j] - m));
    return m + (float)log(s);
}

// Per row of logits [rows, k]: lse[r] and loss[r] = lse[r] - x[r, labels[r]]
// (labels as floats); one thread per row.
extern "C" __global__ void softmax_cross_entropy(const float* x, const float* labels, float* loss, float* lse,
                                                 int rows, int k) {
    FOR_EACH(r, rows) {
        const float* row = x + (long long)r * k;
        float l = row_logsumexp(row, k);
        lse[r] = l;
        loss[r] = l - row[(int)labels[r]];
    }
}

// dx[r, j] = g[r] * (e^{x[r, j] - lse[r]} - [j == labels[r]]); one thread per element.
extern "C" __global__ void softmax_cross_entropy_backward(const float* x, const float* labels, const float* lse,
                                                          const float* g, float* dx, int n, int k) {
    FOR_EACH(i, n) {
        int r = i / k;
        dx[i] = g[r] * (expf(x[i] - lse[r]) - (i % k == (int)labels[r] ? 1.f : 0.f));
    }
}

// y[r, j] = e^{x[r, j] - lse[r]} over rows of length k; one thread per row.
extern "C" __global__ void softmax(const float* x, float* y, int rows, int k) {
    FOR_EACH(r, rows) {
        const float* row = x + (long long)r * k;
        float l = row_logsumexp(row, k);
        for (int j = 0; j < k; ++j) y[(long long)r * k + j] = expf(row[j] - l);
    }
}

// dx[r, j] = y[r, j] * (g[r, j] - sum_i g[r, i] y[r, i]); one thread per row,
// the dot product in double like the CPU.
extern "C" __global__ void softmax_backward(const float* y, const float* g, float* dx, int rows, int k) {
    FOR_EACH(r, rows) {
        long long o = (long long)r * k;
        double dot = 0.0;
        for (int j = 0; j < k; ++j) dot += (double)(g[o + j] * y[o + j]);
        for (int j = 0; j < k; ++j) dx[o + j] = y[o + j] * (g[o + j] - (float)dot);
    }
}
