#!/usr/bin/env python3
"""What the proxy alone can do on megapixel MNIST: a plain CNN trained on the
180x180 low-resolution view of each 1500x1500 image, for a wall-clock budget,
then scored on the 1000 test images on the four IPS tasks.

Data
----
`--data DIR` is the folder the IPS megapixel-MNIST generator writes
(benbergner/ips, data/megapixel_mnist/make_mnist.py, itself adapted from
idiap/attention-sampling scripts/make_mnist.py):

    python make_mnist.py --width 1500 --height 1500 DIR

(defaults: 5000 train, 1000 test images, 50 noise patterns, seed 0; it needs
numpy and keras' MNIST, or any loader returning keras' `mnist.load_data()`
structure). Here the peers' copy does it without keras, its one changed
line importing keras_mnist_shim.py, which reads /work/shared/data/mnist/*.gz
(see /work/scratch/peers/REPORT.md; about 20 s on 2 cores):

    cd /work/scratch/peers && python make_mnist_ips.py --width 1500 \
        --height 1500 dsets/megapixel_mnist_1500

DIR then holds parameters.json, train.npy and test.npy: pickled
object arrays of dicts {'input': (flat indices, values) of the nonzero
pixels of the float image in [0, 1], 'majority', 'max', 'top': int,
'multi': 10-vector multi-hot}.

Low-resolution view
-------------------
Scale 180/1500 = 0.12, attention sampling's low-resolution scale, made by
exact area averaging (each output pixel is the mean of the 8.33 x 8.33
input pixels it covers, partial pixels weighted by their overlap; the same
as OpenCV's INTER_AREA). (Attention sampling itself uses skimage's
rescale(order=1, anti_aliasing=True), a Gaussian blur and bilinear
interpolation; the information kept is about the same.) Computed once from
the sparse pixels and cached as DIR/lowres180_area.npz (float16).

Model and training
------------------
Four blocks of 3x3 conv + BatchNorm + ReLU + 2x2 max-pool (widths
w, 2w, 4w, 8w; 180 -> 90 -> 45 -> 22 -> 11), a fifth 3x3 conv + BN + ReLU,
global average and max pooling concatenated, then four linear heads:
softmax over 10 classes for majority, max and top, 10 sigmoids for multi.
Loss: the sum of the three cross-entropies and the multi task's BCE summed
over its 10 classes (mean over the batch). AdamW, lr cosine-decayed over
the wall-clock budget (the schedule follows elapsed time, not steps).
`--coords` adds two coordinate channels (x, y in [-1, 1]) to the input
(off by default: a plain CNN).

Metrics (IPS's): accuracy by argmax for majority, max and top; multi counts
as right only if all 10 outputs are right at a 0.5 threshold. Mean = the
mean of the four.

Usage
-----
  python benches/lowres_cnn.py --data /work/scratch/peers/dsets/megapixel_mnist_1500 \
      --minutes 15 --threads 2 --seed 0 [--json]

Needs numpy and torch (the CPU build is enough).
"""

import argparse
import json
import math
import os
import platform
import time

import numpy as np

TASKS = ["majority", "max", "top", "multi"]
SIDE = 1500
LOW = 180
CACHE = "lowres180_area.npz"
CACHE_VERSION = 1


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def area_weights(n_in, n_out):
    """For each input index, up to two (output index, weight) pairs: the
    share of the input pixel [r, r+1) that falls in output pixel i's span
    [i*s, (i+1)*s), s = n_in/n_out, divided by s (so weights sum to 1 over
    each output pixel's inputs)."""
    s = n_in / n_out
    r = np.arange(n_in, dtype=np.float64)
    i0 = np.floor(r / s).astype(np.int64)
    edge = (i0 + 1) * s  # end of output pixel i0's span
    w0 = np.minimum(r + 1, edge) - r
    i1 = np.minimum(i0 + 1, n_out - 1)
    w1 = 1.0 - w0
    return i0, w0 / s, i1, w1 / s


def lowres_views(records, side, low):
    i0, w0, i1, w1 = area_weights(side, low)
    out = np.zeros((len(records), low, low), dtype=np.float16)
    for k, rec in enumerate(records):
        idx, val = rec["input"]
        idx = np.asarray(idx[0] if isinstance(idx, tuple) else idx)
        val = np.asarray(val, dtype=np.float64)
        rows, cols = idx // side, idx % side  # 1 channel: flat index = row * W + col
        acc = np.zeros(low * low, dtype=np.float64)
        for ri, rw in ((i0, w0), (i1, w1)):
            for ci, cw in ((i0, w0), (i1, w1)):
                wt = rw[rows] * cw[cols] * val
                acc += np.bincount(ri[rows] * low + ci[cols], weights=wt, minlength=low * low)
        out[k] = acc.reshape(low, low).astype(np.float16)
    return out


def labels(records):
    y = {t: np.array([int(r[t]) for r in records], dtype=np.int64) for t in ("majority", "max", "top")}
    y["multi"] = np.stack([np.asarray(r["multi"], dtype=np.float32) for r in records])
    return y


def load_views(data_dir):
    """The 180^2 views and labels of both splits, from the cache or made
    (and cached) from train.npy/test.npy."""
    with open(os.path.join(data_dir, "parameters.json")) as f:
        params = json.load(f)
    assert params["width"] == SIDE and params["height"] == SIDE, f"expected {SIDE}x{SIDE} images, got {params}"
    sizes = [os.path.getsize(os.path.join(data_dir, f"{s}.npy")) for s in ("train", "test")]
    path = os.path.join(data_dir, CACHE)
    if os.path.exists(path):
        z = np.load(path)
        if int(z["version"]) == CACHE_VERSION and list(z["source_sizes"]) == sizes:
            out = {}
            for s in ("train", "test"):
                out[s] = (z[f"{s}_x"], {t: z[f"{s}_{t}"] for t in TASKS})
            print(f"views: cached {path}")
            return out, params
        print(f"views: {path} is stale, remaking")
    t0 = time.time()
    out, arrays = {}, {"version": CACHE_VERSION, "source_sizes": np.array(sizes)}
    for s in ("train", "test"):
        records = np.load(os.path.join(data_dir, f"{s}.npy"), allow_pickle=True)
        x = lowres_views(records, SIDE, LOW)
        y = labels(records)
        del records
        out[s] = (x, y)
        arrays[f"{s}_x"] = x
        for t in TASKS:
            arrays[f"{s}_{t}"] = y[t]
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    print(f"views: made {path} in {time.time() - t0:.1f} s")
    return out, params


def build_model(torch, width, coords):
    nn = torch.nn

    def block(cin, cout, pool):
        layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        if pool:
            layers.append(nn.MaxPool2d(2))
        return layers

    w = width
    cin = 3 if coords else 1
    trunk = nn.Sequential(*block(cin, w, True), *block(w, 2 * w, True), *block(2 * w, 4 * w, True),
                          *block(4 * w, 8 * w, True), *block(8 * w, 8 * w, False))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = trunk
            self.heads = nn.ModuleDict({t: nn.Linear(16 * w, 10) for t in TASKS})
            if coords:
                lin = torch.linspace(-1, 1, LOW)
                grid = torch.stack(torch.meshgrid(lin, lin, indexing="ij"))  # (y, x)
                self.register_buffer("grid", grid.unsqueeze(0))

        def forward(self, x):
            if coords:
                x = torch.cat([x, self.grid.expand(x.shape[0], -1, -1, -1)], 1)
            f = self.trunk(x)
            f = torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1)
            return {t: h(f) for t, h in self.heads.items()}

    return Net()


def batch_tensors(torch, x, y, idx):
    xb = torch.from_numpy(x[idx].astype(np.float32)).unsqueeze(1)
    yb = {t: torch.from_numpy(y[t][idx]) for t in TASKS}
    return xb, yb


def loss_fn(torch, out, yb):
    F = torch.nn.functional
    loss = sum(F.cross_entropy(out[t], yb[t]) for t in ("majority", "max", "top"))
    return loss + F.binary_cross_entropy_with_logits(out["multi"], yb["multi"], reduction="sum") / yb["multi"].shape[0]


def evaluate(torch, model, x, y, batch):
    model.eval()
    right = {t: 0 for t in TASKS}
    with torch.no_grad():
        for s in range(0, len(x), batch):
            idx = np.arange(s, min(s + batch, len(x)))
            xb, yb = batch_tensors(torch, x, y, idx)
            out = model(xb)
            for t in ("majority", "max", "top"):
                right[t] += int((out[t].argmax(1) == yb[t]).sum())
            right["multi"] += int(((out["multi"] >= 0).float() == yb["multi"]).all(1).sum())
    acc = {t: right[t] / len(x) for t in TASKS}
    acc["mean"] = sum(acc[t] for t in TASKS) / len(TASKS)
    return acc


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--data", default="/work/scratch/peers/dsets/megapixel_mnist_1500",
                    help="folder with parameters.json, train.npy, test.npy (IPS megapixel-MNIST generator output)")
    ap.add_argument("--minutes", type=float, default=15.0, help="training wall-clock budget (default 15)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--width", type=int, default=16, help="first block's channels (then x2, x4, x8, x8)")
    ap.add_argument("--coords", action="store_true", help="add x, y coordinate channels to the input")
    ap.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs seen, torch threads {a.threads}); "
          f"torch {torch.__version__}, numpy {np.__version__}")

    data, params = load_views(a.data)
    xtr, ytr = data["train"]
    xte, yte = data["test"]
    print(f"train {len(xtr)} images, test {len(xte)} images, view {LOW}x{LOW} (area, scale {LOW / SIDE:.2f})")

    model = build_model(torch, a.width, a.coords)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: width {a.width}, coords {a.coords}, {n_params:,} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)

    budget = a.minutes * 60.0
    t0 = time.time()
    seen, steps, epoch, run_loss = 0, 0, 0, None
    last_print = t0
    done = False
    while not done:
        order = rng.permutation(len(xtr))
        for s in range(0, len(order) - a.batch + 1, a.batch):
            elapsed = time.time() - t0
            if elapsed >= budget:
                done = True
                break
            lr = a.lr * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
            for g in opt.param_groups:
                g["lr"] = lr
            model.train()
            xb, yb = batch_tensors(torch, xtr, ytr, order[s:s + a.batch])
            loss = loss_fn(torch, model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(xb)
            steps += 1
            v = loss.item()
            run_loss = v if run_loss is None else 0.98 * run_loss + 0.02 * v
            if time.time() - last_print > 30:
                last_print = time.time()
                print(f"  {elapsed:7.1f} s  epoch {epoch}  images {seen}  loss {run_loss:.3f}  lr {lr:.2e}", flush=True)
        else:
            epoch += 1
    train_s = time.time() - t0
    t1 = time.time()
    acc = evaluate(torch, model, xte, yte, 100)
    eval_s = time.time() - t1
    print(f"trained {train_s:.1f} s: {seen} images ({seen / len(xtr):.2f} epochs, {seen / train_s:.1f} img/s), "
          f"{steps} steps; test eval {eval_s:.1f} s")
    print(f"test accuracy ({len(xte)} images, seed {a.seed}, {a.minutes:g} min on {a.threads} threads):")
    for t in TASKS + ["mean"]:
        print(f"  {t:<9} {100 * acc[t]:6.2f}%")
    if a.json:
        print(json.dumps({"command": "lowres_cnn", "cpu": cpu_model(), "threads": a.threads, "minutes": a.minutes,
                          "seed": a.seed, "width": a.width, "coords": a.coords, "train_seconds": train_s,
                          "images_seen": seen, "epochs": seen / len(xtr), "accuracy": acc}))


if __name__ == "__main__":
    main()
