// The spatial transformer (see src/ops/sampler.rs): affine_grid and bilinear
// grid_sample with PyTorch's conventions (align_corners=False, zero padding),
// and the localized crop, which samples the same way from per-sample windows
// of the images that the host read and uploaded.
//
// Products that feed a sum go through mul_add (__fmul_rn, __fadd_rn), which
// is never fused into an FMA, so everything rounds exactly like the CPU
// reference: the coordinates, where floor() picks the taps and a one-ulp
// difference next to an integer would read other pixels and flip the grid
// gradient, and the samples and grid gradients, which the theta gradient sums
// over thousands of points.

// a * b + c with two roundings, like the CPU (never an FMA).
__device__ __forceinline__ float mul_add(float a, float b, float c) {
    return __fadd_rn(__fmul_rn(a, b), c);
}

// Normalized coordinate of pixel centre i of an axis of `size` pixels.
__device__ __forceinline__ float base_coord(int i, int size) {
    return (float)(2 * i + 1) / (float)size - 1.f;
}

// Normalized coordinate (-1 and 1 are the outer pixel edges) to pixel units.
__device__ __forceinline__ float unnormalize(float v, int size) {
    return mul_add(v + 1.f, (float)size, -1.f) * 0.5f;
}

// The pixels a sampler holds for one sample (mirrors `Region`): rows
// y0..y0+h, columns x0..x0+w of an image of img_h x img_w pixels, stored as
// channel planes of h*w values from `off`. Taps outside it are zero padding.
struct Win {
    int y0, x0, h, w, img_h, img_w;
    long long off;
};

// Sample n of whole images [N, C, H, W].
__device__ __forceinline__ Win whole_image(int n, int c, int h, int w) {
    Win r = {0, 0, h, w, h, w, (long long)n * c * h * w};
    return r;
}

// Sample n of the localized crop's table: 7 ints per sample,
// y0, x0, h, w, img_h, img_w, offset of its planes in the windows buffer.
__device__ __forceinline__ Win table_window(const int* table, int n) {
    const int* t = table + 7 * n;
    Win r = {t[0], t[1], t[2], t[3], t[4], t[5], t[6]};
    return r;
}

// The 2x2 bilinear taps of one grid point (mirrors `Taps`): offsets into a
// window's channel plane, top-left, top-right, bottom-left, bottom-right (-1
// where the tap falls outside the window), and the column and row weights.
struct Taps {
    long long at[4];
    float wx[2], wy[2];

    __device__ float value(const float* plane, int k) const { return at[k] < 0 ? 0.f : plane[at[k]]; }
    __device__ float weight(int k) const { return wx[k & 1] * wy[k >> 1]; }
};

// Window-relative index of floor coordinate f of a window starting at `origin`.
// Far-off coordinates are clamped first, so that they land outside the window
// without overflowing; NaN counts as 0 like Rust's saturating casts.
__device__ __forceinline__ int window_index(float f, int origin) {
    return (int)(isnan(f) ? 0.f : fminf(fmaxf(f, -2.f), 2e9f)) - origin;
}

__device__ Taps make_taps(const Win& win, const float* point) {
    float ix = unnormalize(point[0], win.img_w), iy = unnormalize(point[1], win.img_h);
    float fx = floorf(ix), fy = floorf(iy);
    int cx = window_index(fx, win.x0), cy = window_index(fy, win.y0);
    Taps t;
    for (int k = 0; k < 4; ++k) {
        int x = cx + (k & 1), y = cy + (k >> 1);
        bool inside = 0 <= x && x < win.w && 0 <= y && y < win.h;
        t.at[k] = inside ? (long long)y * win.w + x : -1;
    }
    t.wx[0] = fx + 1.f - ix;
    t.wx[1] = ix - fx;
    t.wy[0] = fy + 1.f - iy;
    t.wy[1] = iy - fy;
    return t;
}

// Channel plane ch of a window in `data`.
__device__ __forceinline__ const float* plane_of(const float* data, const Win& win, int ch) {
    return data + win.off + (long long)ch * win.h * win.w;
}

// Output i of [N, C, npts] samples: channel ch of sample n's window at grid
// point p of `grid` [N, npts, 2] (mirrors `sample_forward`).
__device__ float sample_at(const float* data, const Win& win, const float* grid, int i, int c, int npts) {
    int n = i / npts / c, ch = i / npts % c, p = i % npts;
    Taps t = make_taps(win, grid + 2 * ((long long)n * npts + p));
    const float* plane = plane_of(data, win, ch);
    float s = t.weight(0) * t.value(plane, 0);
    for (int k = 1; k < 4; ++k) s = mul_add(t.weight(k), t.value(plane, k), s);
    return s;
}

// Gradient of grid point q of [N, npts] points: the sum over the c channels
// of `gout` [N, C, npts] (mirrors the grid part of `sample_backward`).
__device__ void grid_grad_at(const float* data, const Win& win, const float* grid, const float* gout, float* ggrid,
                             int q, int c, int npts) {
    int n = q / npts, p = q % npts;
    Taps t = make_taps(win, grid + 2LL * q);
    float gix = 0.f, giy = 0.f;
    for (int ch = 0; ch < c; ++ch) {
        float go = gout[((long long)n * c + ch) * npts + p];
        const float* plane = plane_of(data, win, ch);
        float v0 = t.value(plane, 0), v1 = t.value(plane, 1), v2 = t.value(plane, 2), v3 = t.value(plane, 3);
        gix = mul_add(go, mul_add(v3 - v2, t.wy[1], (v1 - v0) * t.wy[0]), gix);
        giy = mul_add(go, mul_add(v3 - v1, t.wx[1], (v2 - v0) * t.wx[0]), giy);
    }
    // Times d(pixel units)/d(normalized coordinate).
    ggrid[2LL * q] = gix * ((float)win.img_w * 0.5f);
    ggrid[2LL * q + 1] = giy * ((float)win.img_h * 0.5f);
}

// grid[n, i, j] = theta[n] . (x_j, y_i, 1); one thread per grid point.
extern "C" __global__ void affine_grid(const float* theta, float* grid, int n, int oh, int ow) {
    FOR_EACH(q, n * oh * ow) {
        const float* t = theta + 6 * (q / (oh * ow));
        float x = base_coord(q % ow, ow), y = base_coord(q / ow % oh, oh);
        grid[2LL * q] = mul_add(t[1], y, t[0] * x) + t[2];
        grid[2LL * q + 1] = mul_add(t[4], y, t[3] * x) + t[5];
    }
}

// dtheta[n, k] = sum over the points of grad_grid times d grid / d theta_k,
// in double like the CPU; one block of BLOCK threads per (n, k): strided
// partial sums, then a tree in shared memory (deterministic).
extern "C" __global__ void affine_grid_backward(const float* gg, float* dtheta, int oh, int ow) {
    int n = blockIdx.x / 6, k = blockIdx.x % 6, npts = oh * ow;
    // Rows 0 and 1 of theta take the x and y components of the gradient.
    const float* g = gg + 2LL * n * npts + k / 3;
    double s = 0.0;
    for (int q = threadIdx.x; q < npts; q += blockDim.x) {
        double v = g[2LL * q];
        if (k % 3 == 0) v *= (double)base_coord(q % ow, ow);
        if (k % 3 == 1) v *= (double)base_coord(q / ow, oh);
        s += v;
    }
    s = block_sum(s);
    if (threadIdx.x == 0) dtheta[blockIdx.x] = (float)s;
}

// out [N, C, npts] = bilinear samples of img [N, C, H, W] at grid [N, npts, 2];
// one thread per output element.
extern "C" __global__ void grid_sample(const float* img, const float* grid, float* out, int n, int c, int h, int w,
                                       int npts) {
    FOR_EACH(i, n * c * npts) out[i] = sample_at(img, whole_image(i / npts / c, c, h, w), grid, i, c, npts);
}

// The grid's gradient of grid_sample; one thread per grid point, summing
// over channels (a deterministic gather).
extern "C" __global__ void grid_sample_backward_grid(const float* img, const float* grid, const float* gout,
                                                     float* ggrid, int n, int c, int h, int w, int npts) {
    FOR_EACH(q, n * npts) grid_grad_at(img, whole_image(q / npts, c, h, w), grid, gout, ggrid, q, c, npts);
}

// The image's gradient of grid_sample: each output element adds its four
// weighted taps into gimg [N, C, H, W], which the launcher zero-fills. A
// scatter with atomicAdd (where outputs share pixels the order of the
// additions, hence the last bits, varies from run to run); one thread per
// output element.
extern "C" __global__ void grid_sample_backward_img(const float* grid, const float* gout, float* gimg, int n, int c,
                                                    int h, int w, int npts) {
    FOR_EACH(i, n * c * npts) {
        int s = i / npts / c, ch = i / npts % c;
        Win win = whole_image(s, c, h, w);
        Taps t = make_taps(win, grid + 2 * ((long long)s * npts + i % npts));
        float* plane = gimg + win.off + (long long)ch * h * w;
        for (int k = 0; k < 4; ++k)
            if (t.at[k] >= 0) atomicAdd(plane + t.at[k], t.weight(k) * gout[i]);
    }
}

// out [N, C, npts] = bilinear samples of each sample's window (`table`, see
// table_window) at grid [N, npts, 2]; one thread per output element.
extern "C" __global__ void localized_crop(const float* windows, const int* table, const float* grid, float* out,
                                          int n, int c, int npts) {
    FOR_EACH(i, n * c * npts) out[i] = sample_at(windows, table_window(table, i / npts / c), grid, i, c, npts);
}

// The grid's gradient of localized_crop; one thread per grid point, summing
// over channels (a deterministic gather).
extern "C" __global__ void localized_crop_backward(const float* windows, const int* table, const float* grid,
                                                   const float* gout, float* ggrid, int n, int c, int npts) {
    FOR_EACH(q, n * npts) grid_grad_at(windows, table_window(table, q / npts), grid, gout, ggrid, q, c, npts);
}
