"""PyTorch CPU timings of the shapes in benches/ops.rs, for comparison on
the same machine: `python benches/torch_ops.py` (needs torch; 2 threads, as
the Rust benches use on the reference machine).

Prints one line per case: name, median milliseconds, GFLOP/s (elements/s for
the elementwise case), counting 2 flops per multiply-add like ops.rs.
"""

import time

import torch
import torch.nn.functional as F

torch.set_num_threads(2)
torch.manual_seed(0)


def bench(fn, min_time=2.0, min_iters=10):
    """Median wall time of fn() in seconds, after a warm-up."""
    for _ in range(3):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def report(group, name, seconds, work, unit="GFLOP/s"):
    print(f"{group}/{name}: {seconds * 1e3:.3f} ms, {work / seconds / 1e9:.2f} {unit}")


def main():
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    with torch.no_grad():
        a, b = torch.randn(512, 512), torch.randn(512, 512)
        report("matmul_flops", "matmul_512x512x512", bench(lambda: a @ b), 2 * 512**3)
        x, w, bias = torch.randn(256, 1024), torch.randn(1024, 1024), torch.randn(1024)
        t = bench(lambda: F.linear(x, w, bias))
        report("matmul_flops", "linear_256x1024_to_1024", t, 2 * 256 * 1024 * 1024)

    conv_cases = [
        ("resnet3x3_n8_64to64_56x56", (8, 64, 56, 56), 64, 3, 1, 1),
        ("stem7x7s2_n2_3to64_224x224", (2, 3, 224, 224), 64, 7, 2, 3),
    ]
    for group, backward in [("conv2d_fwd_flops", False), ("conv2d_fwd_bwd_flops", True)]:
        for name, shape, out, k, s, p in conv_cases:
            x = torch.randn(*shape, requires_grad=backward)
            w = torch.randn(out, shape[1], k, k, requires_grad=backward)
            bias = torch.randn(out, requires_grad=backward)
            ho = (shape[2] + 2 * p - k) // s + 1
            wo = (shape[3] + 2 * p - k) // s + 1
            flops = 2 * shape[0] * out * ho * wo * shape[1] * k * k

            def step():
                y = F.conv2d(x, w, bias, stride=s, padding=p)
                if backward:
                    # Same gradient as ops.rs feeds back: the output itself.
                    torch.autograd.grad(y, (x, w, bias), y.detach())

            with torch.set_grad_enabled(backward):
                t = bench(step)
            report(group, name, t, (3 if backward else 1) * flops)

    with torch.no_grad():
        x = torch.randn(8, 64, 56, 56)
        report("elementwise_elems", "relu_8x64x56x56", bench(lambda: torch.relu(x)), x.numel(), "Gelem/s")


if __name__ == "__main__":
    main()
