//! The convolution's production path (large column buffers, parallel GEMM
//! groups; unit tests shrink the buffers) against the same op one image at a time.

use saccade::gradcheck::rand_tensor;
use saccade::ops::conv::{conv2d_backward, conv2d_forward};
use saccade::ops::shape::slice_forward;
use saccade::Device;

#[test]
fn batched_conv_equals_per_image_conv() {
    let dev = Device::cpu();
    for (n, c, o, side, stride) in [(96, 16, 32, 32, 2), (40, 3, 16, 33, 1), (256, 32, 64, 8, 1)] {
        let x = rand_tensor(&[n, c, side, side], 1, &dev);
        let w = rand_tensor(&[o, c, 3, 3], 2, &dev);
        let y = conv2d_forward(&x, &w, None, stride, 1).unwrap();
        let gy = rand_tensor(y.shape(), 3, &dev);
        let (dx, dw, _) = conv2d_backward(&x, &w, &gy, stride, 1, false).unwrap();
        let (yv, dxv, dwv) = (y.to_vec().unwrap(), dx.to_vec().unwrap(), dw.to_vec().unwrap());
        let mut dw_sum = vec![0.0f64; dwv.len()];
        for i in 0..n {
            let xi = slice_forward(&x, 0, i, 1).unwrap();
            let gi = slice_forward(&gy, 0, i, 1).unwrap();
            let yi = conv2d_forward(&xi, &w, None, stride, 1)
                .unwrap()
                .to_vec()
                .unwrap();
            let (dxi, dwi, _) = conv2d_backward(&xi, &w, &gi, stride, 1, false).unwrap();
            let (dxi, dwi) = (dxi.to_vec().unwrap(), dwi.to_vec().unwrap());
            let (ly, lx) = (yi.len(), dxi.len());
            for (a, b) in yv[i * ly..(i + 1) * ly].iter().zip(&yi) {
                assert!((a - b).abs() < 1e-3, "forward {n}x{c}x{side}: {a} vs {b}");
            }
            for (a, b) in dxv[i * lx..(i + 1) * lx].iter().zip(&dxi) {
                assert!((a - b).abs() < 1e-3, "dx {n}x{c}x{side}: {a} vs {b}");
            }
            dw_sum.iter_mut().zip(&dwi).for_each(|(s, v)| *s += *v as f64);
        }
        for (a, b) in dwv.iter().zip(&dw_sum) {
            assert!(
                (*a as f64 - b).abs() < 1e-2 * b.abs().max(1.0),
                "dw {n}x{c}x{side}: {a} vs {b}"
            );
        }
    }
}
