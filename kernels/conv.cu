// 2-D convolution pieces around the GEMM of kernels/matmul.cu (see
// src/ops/conv.rs): im2col and its adjoint col2im over one chunk of `nz`
// images, the bias add, the bias gradient, and the sum of per-image weight
// gradients. Column matrices are per image: cols[z] is [c*kh*kw, ho*wo].

// One convolution's geometry from its input side (mirrors `ConvDims` in
// src/ops/conv.rs): input [c, h, w], kernel kh x kw, output grid ho x wo.
struct ConvDims {
    int c, h, w, kh, kw, stride, pad, ho, wo;
};

// cols[z, (ci*kh + i)*kw + j, oy*wo + ox] = img[z, ci, oy*s + i - p, ox*s + j - p],
// 0 in the padding; one thread per column entry.
extern "C" __global__ void im2col(const float* img, float* cols, ConvDims g, int nz) {
    int hw = g.ho * g.wo, ck = g.c * g.kh * g.kw;
    FOR_EACH(t, nz * ck * hw) {
        int p = t % hw, r = t / hw;
        int z = r / ck, ci = r % ck / (g.kh * g.kw), i = r / g.kw % g.kh, j = r % g.kw;
        int iy = p / g.wo * g.stride + i - g.pad, ix = p % g.wo * g.stride + j - g.pad;
        float v = 0.f;
        if (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w)
            v = img[((long long)z * g.c + ci) * g.h * g.w + (long long)iy * g.w + ix];
        cols[t] = v;
    }
}

// The adjoint of im2col as a gather: img[z, ci, y, x] = sum of the column
// entries im2col reads from that pixel, in kernel-offset order (i, then j),
// like the CPU's col2im. One thread per pixel; deterministic.
extern "C" __global__ void col2im(const float* cols, float* img, ConvDims g, int nz) {
    int plane = g.h * g.w, hw = g.ho * g.wo;
    FOR_EACH(t, nz * g.c * plane) {
        int y = t % plane / g.w, x = t % g.w;
        // Rows (ci, 0, 0).. of cols[z] for q = z * c + ci.
        const float* rows = cols + (long long)(t / plane) * g.kh * g.kw * hw;
        float s = 0.f;
        // Only offsets i with (y + pad - i) a multiple of the stride hit a grid row.
        for (int i = (y + g.pad) % g.stride; i < g.kh; i += g.stride) {
            int dy = y + g.pad - i;
            if (dy < 0) break;
            int oy = dy / g.stride;
            if (oy >= g.ho) continue;
            for (int j = (x + g.pad) % g.stride; j < g.kw; j += g.stride) {
                int dx = x + g.pad - j;
                if (dx < 0) break;
                int ox = dx / g.stride;
                if (ox >= g.wo) continue;
                s += rows[(long long)(i * g.kw + j) * hw + oy * g.wo + ox];
            }
        }
        img[t] = s;
    }
}

// y[t] += b[channel of t] for y [n, c, plane]; one thread per element.
extern "C" __global__ void add_bias(float* y, const float* b, int c, int plane, int total) {
    FOR_EACH(t, total) y[t] += b[t / plane % c];
}

// db[ci] = sum over images and pixels of gy[z, ci, :] for gy [n, c, plane]:
// one block of BLOCK threads per channel, double partial sums added in a fixed
// tree (deterministic).
extern "C" __global__ void bias_grad(const float* gy, float* db, int n, int c, int plane) {
    int ci = blockIdx.x;
    double s = 0.0;
    for (int t = threadIdx.x; t < n * plane; t += blockDim.x)
        s += gy[((long long)(t / plane) * c + ci) * plane + t % plane];
    s = block_sum(s);
    if (threadIdx.x == 0) db[ci] = (float)s;
}

// dw[e] += sum over z of part[z, e] for `nz` per-image weight gradients of
// `len` entries; one thread per entry, images in order (deterministic).
extern "C" __global__ void sum_images(const float* part, float* dw, int nz, int len) {
    FOR_EACH(e, len) {
        float s = dw[e];
        for (int z = 0; z < nz; ++z) s += part[(long long)z * len + e];
        dw[e] = s;
    }
}
