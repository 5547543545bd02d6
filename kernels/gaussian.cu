// Diagonal Gaussians: the reparameterized sample and the closed-form KL,
// each forward and backward in one kernel (see src/ops/gaussian.rs).

extern "C" __global__ void reparameterize(const float* mu, const float* lv, const float* eps, float* z, int n) {
    FOR_EACH(i, n) z[i] = mu[i] + expf(0.5f * lv[i]) * eps[i];
}

extern "C" __global__ void reparameterize_backward(const float* lv, const float* eps, const float* g,
                                                   float* dlv, int n) {
    FOR_EACH(i, n) dlv[i] = 0.5f * g[i] * expf(0.5f * lv[i]) * eps[i];
}

// out[r] = KL over the d values of row r; one thread per row, double sums
// like the CPU reference.
extern "C" __global__ void kl_diag(const float* mq, const float* lq, const float* mp, const float* lp,
                                   float* out, int rows, int d) {
    FOR_EACH(r, rows) {
        double s = 0.0;
        for (long long i = (long long)r * d; i < (long long)(r + 1) * d; ++i) {
            float diff = mq[i] - mp[i];
            float ratio = expf(lq[i] - lp[i]);
            s += (double)(0.5f * (lp[i] - lq[i] + ratio + diff * diff * expf(-lp[i]) - 1.f));
        }
        out[r] = (float)s;
    }
}

extern "C" __global__ void kl_diag_backward(const float* mq, const float* lq, const float* mp,
                                            const float* lp, const float* g, float* dmq, float* dlq,
                                            float* dmp, float* dlp, int n, int d) {
    FOR_EACH(i, n) {
        float gn = g[i / d];
        float inv_p = expf(-lp[i]);
        float diff = mq[i] - mp[i];
        float ratio = expf(lq[i] - lp[i]);
        float dm = gn * diff * inv_p;
        dmq[i] = dm;
        dlq[i] = 0.5f * gn * (ratio - 1.f);
        dmp[i] = -dm;
        dlp[i] = 0.5f * gn * (1.f - ratio - diff * diff * inv_p);
    }
}
