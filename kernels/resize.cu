// Bilinear resize of [planes, h, w] images, PyTorch's align_corners=False
// rule (see src/ops/resize.rs). Forward: one thread per output pixel.
// Backward: a deterministic gather, one thread per input pixel summing the
// output gradients that read it.

// For output index d along an axis of `in` inputs: the two source indices
// and their weights. `scale` = in / out from the host; the source position is
// rounded after each step (no fused multiply-add) so the taps match the CPU's
// `taps` bit for bit.
struct Tap {
    int i0, i1;
    float w0, w1;
};

__device__ __forceinline__ Tap tap(int d, int in, float scale) {
    float src = fmaxf(__fadd_rn(__fmul_rn((float)d + 0.5f, scale), -0.5f), 0.f);
    Tap t;
    t.i0 = min((int)src, in - 1);
    t.i1 = min(t.i0 + 1, in - 1);
    t.w1 = fminf(fmaxf(src - (float)t.i0, 0.f), 1.f);
    t.w0 = 1.f - t.w1;
    return t;
}

// Whether output index d reads input index i along an axis, and with which
// weight (both taps' weights when both land on i).
__device__ __forceinline__ bool tap_weight(int d, int i, int in, float scale, float* wt) {
    Tap t = tap(d, in, scale);
    *wt = (t.i0 == i ? t.w0 : 0.f) + (t.i1 == i ? t.w1 : 0.f);
    return t.i0 == i || t.i1 == i;
}

// Output indices lo..=hi along an axis that may read input index i: those
// whose source position lies in [i - 1, i + 1), widened by one on each side
// against rounding, and from 0 for i <= 1 (positions clamped at 0 read
// inputs 0 and 1). tap_weight decides exactly.
__device__ __forceinline__ void readers(int i, int in, int out, int* lo, int* hi) {
    float inv = (float)out / (float)in;
    *lo = i <= 1 ? 0 : max((int)floorf(((float)i - 0.5f) * inv - 0.5f) - 1, 0);
    *hi = min((int)ceilf(((float)i + 1.5f) * inv - 0.5f) + 1, out - 1);
}

// y[q, oy, ox] from the four source pixels, combined in the CPU's order.
extern "C" __global__ void resize_bilinear(const float* x, float* y, int n, int h, int w, int oh, int ow,
                                           float sy, float sx) {
    FOR_EACH(i, n) {
        int q = i / (oh * ow), o = i % (oh * ow);
        Tap a = tap(o / ow, h, sy), b = tap(o % ow, w, sx);
        const float* r0 = x + (long long)q * h * w + a.i0 * w;
        const float* r1 = x + (long long)q * h * w + a.i1 * w;
        y[i] = a.w0 * (b.w0 * r0[b.i0] + b.w1 * r0[b.i1]) + a.w1 * (b.w0 * r1[b.i0] + b.w1 * r1[b.i1]);
    }
}

// dx[q, iy, ix] = sum over the outputs reading (iy, ix) of weight_y * weight_x * gy.
extern "C" __global__ void resize_bilinear_backward(const float* gy, float* dx, int n, int h, int w, int oh,
                                                    int ow, float sy, float sx) {
    FOR_EACH(i, n) {
        int q = i / (h * w), iy = i % (h * w) / w, ix = i % w;
        const float* src = gy + (long long)q * oh * ow;
        int oy0, oy1, ox0, ox1;
        readers(iy, h, oh, &oy0, &oy1);
        readers(ix, w, ow, &ox0, &ox1);
        float acc = 0.f;
        for (int oy = oy0; oy <= oy1; ++oy) {
            float wy, wx;
            if (!tap_weight(oy, iy, h, sy, &wy)) continue;
            float row = 0.f;
            for (int ox = ox0; ox <= ox1; ++ox)
                if (tap_weight(ox, ix, w, sx, &wx)) row += wx * src[oy * ow + ox];
            acc += wy * row;
        }
        dx[i] = acc;
    }
}
