// Copies that move data between layouts: concat/slice/pad along one axis of
// a tensor viewed as [outer, n, inner], row broadcast, and permute.

// dst [outer, total, inner] at offset `off` of the middle axis <- src [outer, n, inner].
extern "C" __global__ void copy_into(const float* src, float* dst, int outer, int n, int inner, int total,
                                     int off) {
    FOR_EACH(i, outer * n * inner) {
        int o = i / (n * inner), r = i % (n * inner);
        dst[((long long)o * total + off) * inner + r] = src[i];
    }
}

// dst [outer, len, inner] <- src [outer, n, inner] from `start` of the middle axis.
extern "C" __global__ void copy_from(const float* src, float* dst, int outer, int n, int inner, int start,
                                     int len) {
    FOR_EACH(i, outer * len * inner) {
        int o = i / (len * inner), r = i % (len * inner);
        dst[i] = src[((long long)o * n + start) * inner + r];
    }
}

// dst [rows, cols] <- src [cols] repeated on every row.
extern "C" __global__ void broadcast_rows(const float* src, float* dst, int rows, int cols) {
    FOR_EACH(i, rows * cols) dst[i] = src[i % cols];
}

// y[i] = x[offset of i]; `d.sa` holds the input's strides in output axis order.
extern "C" __global__ void permute(const float* x, float* y, int n, Dims d) {
    FOR_EACH(i, n) {
        int ia, ib;
        dims_offsets(d, i, &ia, &ib);
        y[i] = x[ia];
    }
}
