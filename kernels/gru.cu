// The GRU cell's gates and state update, fused (src/ops/gru.rs; PyTorch
// GRUCell, gate order r, z, n). gi and gh are the [N, 3H] pre-activations
// x W_ih^T + b_ih and h W_hh^T + b_hh from the GEMMs; one thread per
// (row, unit) of the [N, H] state, each writing its own outputs only.

// h' = (1 - z) * n + z * h with r, z = sigmoid(gi + gh), n = tanh(gi_n + r * gh_n);
// saves the rows [r | z | n | gh_n] of the [N, 4H] `saved` for backward.
extern "C" __global__ void gru_forward(const float* gi, const float* gh, const float* h, float* out, float* saved,
                                       int rows, int hd) {
    FOR_EACH(i, rows * hd) {
        int row = i / hd, j = i % hd;
        const float* a = gi + (long long)row * 3 * hd;
        const float* b = gh + (long long)row * 3 * hd;
        float r = sigmoid_f(a[j] + b[j]);
        float z = sigmoid_f(a[hd + j] + b[hd + j]);
        float hn = b[2 * hd + j];
        float n = tanhf(a[2 * hd + j] + r * hn);
        out[i] = (1.f - z) * n + z * h[i];
        float* s = saved + (long long)row * 4 * hd;
        s[j] = r;
        s[hd + j] = z;
        s[2 * hd + j] = n;
        s[3 * hd + j] = hn;
    }
}

// From the output gradient g [N, H]: the gradients of both pre-activations,
// d_gi and d_gh [N, 3H] (they differ only in the n gate, scaled by r on the
// h side), and dh_direct = g * z, the gradient through the z * h term.
extern "C" __global__ void gru_backward(const float* saved, const float* g, const float* h, float* d_gi,
                                        float* d_gh, float* dh_direct, int rows, int hd) {
    FOR_EACH(i, rows * hd) {
        int row = i / hd, j = i % hd;
        const float* s = saved + (long long)row * 4 * hd;
        float r = s[j], z = s[hd + j], n = s[2 * hd + j], hn = s[3 * hd + j];
        float gy = g[i], hv = h[i];
        float dn = gy * (1.f - z) * (1.f - n * n);
        float dz = gy * (hv - n) * z * (1.f - z);
        float dr = dn * hn * r * (1.f - r);
        float* di = d_gi + (long long)row * 3 * hd;
        float* dg = d_gh + (long long)row * 3 * hd;
        di[j] = dr;
        di[hd + j] = dz;
        di[2 * hd + j] = dn;
        dg[j] = dr;
        dg[hd + j] = dz;
        dg[2 * hd + j] = dn * r;
        dh_direct[i] = gy * z;
    }
}
