"""Reference values for src/ops/sampler.rs (test `matches_pytorch_values`).

Run with torch 2.15 on the CPU:  python tests/pytorch_sampler.py
It prints Rust array literals that are pasted into the test. The image, the
output-gradient weights and theta are given by formulas/literals the Rust
test reproduces exactly.
"""
import struct

import torch
import torch.nn.functional as F

N, C, H, W, HO, WO = 2, 2, 5, 7, 3, 4
img = torch.tensor(
    [[[((c * H * W + y * W + x) * 37 % 101) / 100 for x in range(W)] for y in range(H)] for c in range(C)],
    dtype=torch.float32,
)
img = torch.stack([img, img.flip(-1)]).requires_grad_()  # sample 1 sees the mirrored image
theta = torch.tensor(
    [
        [[0.6, 0.1, 0.5], [-0.05, 0.7, -0.55]],  # rotated/sheared, crosses the right and top borders
        [[0.35, 0.0, -0.2], [0.0, 0.35, 0.1]],  # inside the image
    ],
    dtype=torch.float32,
    requires_grad=True,
)
k = torch.arange(N * C * HO * WO, dtype=torch.float32)
wts = ((k * 13) % 17) / 8 - 1  # d loss / d out

grid = F.affine_grid(theta, [N, C, HO, WO], align_corners=False)
out = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
(out.flatten() * wts).sum().backward()


def f32(v):
    """Shortest decimal that reads back as the same f32."""
    for digits in range(1, 10):
        s = f"{v:.{digits}g}"
        if struct.unpack("f", struct.pack("f", float(s)))[0] == v:
            return s if any(ch in s for ch in ".e") else s + ".0"


def lit(name, t):
    vals = ", ".join(f32(v) for v in t.detach().flatten().tolist())
    print(f"const {name}: [f32; {t.numel()}] = [{vals}];")


lit("TORCH_OUT", out)
lit("TORCH_GRAD_THETA", theta.grad)
lit("TORCH_GRAD_IMG", img.grad)
