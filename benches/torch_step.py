"""A PyTorch replica of saccade's training step, to time it beside saccade
and to check that both are the same model.

Install (scratch virtual environment outside the repository; only PyPI is
needed, and the PyPI Linux wheel is the CUDA build, which runs on the CPU but
will not import without its nvidia-* / cuda-toolkit dependencies)::

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch numpy safetensors
    # measured 2026-11: torch 2.15.0+cu132 (539 MB wheel) plus about 2.4 GB of
    # nvidia-*/triton wheels, 5.4 GB installed, about 4 minutes

    # `pip install torch --no-deps` is NOT enough for this wheel: `import
    # torch` then fails with "libcudart.so.13: cannot open shared object file".

Commands (from the repository root, saccade built with `cargo build --release`)::

    # the fair protocol (BENCHMARKS.md, "Against PyTorch"): on an idle
    # machine, 3 alternated rounds of PyTorch eager (default OpenMP, and
    # OMP_WAIT_POLICY=PASSIVE), torch.compile (default, max-autotune) and
    # `saccade bench --step`, each the median step on one batch with the
    # glimpses' gradient on; then saccade's epoch with its loader
    /tmp/torchenv/bin/python benches/torch_step.py --compare-saccade target/release/saccade
    /tmp/torchenv/bin/python benches/torch_step.py --compare-saccade target/release/saccade --preset paper --batch-size 32
    # one PyTorch figure alone (median of the timed steps of forward + backward + Adam)
    /tmp/torchenv/bin/python benches/torch_step.py --preset small --batch-size 32 --steps 30 --threads 2
    /tmp/torchenv/bin/python benches/torch_step.py --preset small --compile default --json
    # the large-image baseline: ResNet18 over 12x12 tiles of 224^2 of a 2528^2 image
    /tmp/torchenv/bin/python benches/torch_step.py --model tiled-resnet18 --size 2528 --batch-size 2 --steps 2

    # same model? initial weights and first-step gradients from saccade
    /tmp/torchenv/bin/python benches/torch_step.py --verify --saccade target/release/saccade

What is replicated (src/models/{saccader,vrnn,classifier}.rs, src/ops/*.rs):
the VRNN over the 32x32 proxy (conv encoder + GroupNorm + ELU, attention of a
query from h over the encoder's 8x8 map for the glimpse centre, posterior /
prior / decoder MLPs, GRU cell), z -> theta = [[s,0,tx],[0,s,ty]] with
s = s_min + (s_max - s_min) sigmoid(z_s) and (tx, ty) = tanh(z_xy), crops by
affine_grid + grid_sample (bilinear, zeros, align_corners=False), the crop
classifier (3x3 conv without bias + GroupNorm(C/8) + ELU blocks, global
average pool), features averaged over the T glimpses, a two-layer head, and
the per-sample loss CE + beta * mean_t(BCE-sum NLL_t + KL_t) averaged over
the batch, Adam (0.9, 0.999, 1e-8) at lr 1e-3 without clipping (the paper
preset: lr 1e-4, clip values to 0.25, as `saccade train --preset paper`).
Parameter names equal saccade's checkpoint names, so a checkpoint loads with
`load_state_dict(strict=True)`.

The glimpse policy is saccade's default, the hard mask (`--no-mask`: the
paper's policy, which passes `--no-mask` to saccade too): each image keeps one flag per cell
of the 8x8 attention map; after step t the cells whose centres lie inside
step t's glimpse box (|cx - tx| <= s and |cy - ty| <= s, theta from z_t: the
sample in training, the mean in evaluation; no gradient through the mask)
are flagged, and later steps add -1e9 to the flagged cells' scores before the
softmax; an image whose cells are all flagged is not masked.

Without `--data`, the timing batch is random: images uniform in [0, 1] of
side --size (100), their area-downsampled proxies (saccade's INTER_AREA
rule), random labels. Speed does not depend on the pixel values. With
`--data DIR` (a folder written by `saccade data generate --format png`) the
first batch of DIR/train is used instead.
"""

import argparse
import json
import math
import os
import platform
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

LATENT = 3
INIT_LOGVAR = -4.0

PRESETS = {
    # SaccadeConfig::small / ::paper in src/models/saccader.rs; the training
    # defaults (lr, clip, batch) are those of `saccade train --preset ...`.
    "small": dict(proxy_size=32, glimpses=4, crop=24, scale_min=0.2, scale_max=0.5, beta=0.01,
                  multiplicative=False, fixed_variance=None, enc_width=16, embed=128, hidden=128,
                  classifier_width=16, lr=1e-3, clip_value=0.0, batch_size=32),
    "paper": dict(proxy_size=32, glimpses=4, crop=64, scale_min=0.1, scale_max=0.3, beta=0.01,
                  multiplicative=False, fixed_variance=None, enc_width=32, embed=256, hidden=256,
                  classifier_width=32, lr=1e-4, clip_value=0.25, batch_size=100),
}


# ---------------------------------------------------------------- the model


def gn_groups(channels):
    return max(channels // 8, 1)


class Block(nn.Module):
    """3x3 conv (no bias) -> GroupNorm -> ELU; names `conv`, `gn` as in saccade."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.gn = nn.GroupNorm(gn_groups(cout), cout, eps=1e-5)

    def forward(self, x):
        return F.elu(self.gn(self.conv(x)))


class ConvStack(nn.Module):
    """Blocks named "0", "1", ... (saccade's `{name}.{i}.conv` / `.gn`)."""

    def __init__(self, cin, plan):
        super().__init__()
        self.n = len(plan)
        for i, (cout, stride) in enumerate(plan):
            self.add_module(str(i), Block(cin, cout, stride))
            cin = cout
        self.out_channels = cin
        self.strides = [s for _, s in plan]

    def blocks(self):
        return [getattr(self, str(i)) for i in range(self.n)]

    def forward(self, x):
        for b in self.blocks():
            x = b(x)
        return x

    def out_side(self, n):
        for s in self.strides:
            n = (n - 1) // s + 1
        return n


class Encoder(ConvStack):
    """The proxy encoder `vrnn.enc.{0,1,2}` plus its dense layer `vrnn.enc.fc`."""

    def __init__(self, cin, width, proxy_size, embed):
        super().__init__(cin, [(width, 2), (2 * width, 2), (2 * width, 1)])
        self.side = self.out_side(proxy_size)
        self.fc = nn.Linear(self.out_channels * self.side * self.side, embed)


class Mlp(nn.Module):
    """Two dense layers with an ELU between, named "0" and "1"."""

    def __init__(self, fin, hidden, fout):
        super().__init__()
        self.add_module("0", nn.Linear(fin, hidden))
        self.add_module("1", nn.Linear(hidden, fout))

    def forward(self, x):
        return getattr(self, "1")(F.elu(getattr(self, "0")(x)))


def cell_centres(m, proxy_size):
    """[2, m*m]: x then y of the proxy pixel each encoder cell is centred on
    (vrnn.rs `cell_centres`): cell j sits on proxy pixel r*j, r = J/m."""
    r = proxy_size // m
    c = [(2 * r * k + 1) / proxy_size - 1.0 for k in range(m)]
    xs = [c[p % m] for p in range(m * m)]
    ys = [c[p // m] for p in range(m * m)]
    return torch.tensor([xs, ys], dtype=torch.float32)


class Vrnn(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        c, e, h = cfg["channels"], cfg["embed"], cfg["hidden"]
        self.enc = Encoder(c, cfg["enc_width"], cfg["proxy_size"], e)
        self.phi_z = nn.Linear(LATENT, e)
        self.posterior = Mlp(e + h, e, 1 + LATENT)
        self.query = nn.Linear(h, self.enc.out_channels)
        self.prior = Mlp(h, e, 2 * LATENT)
        self.decoder = Mlp(e + h, e, c * cfg["proxy_size"] ** 2)
        self.gru = nn.GRUCell(2 * e, h)
        # saccade's non-default initial values: the posterior starts at
        # N(0, e^-4) for every image, the query at zero (uniform attention).
        with torch.no_grad():
            post = getattr(self.posterior, "1")
            post.weight.zero_()
            post.bias.copy_(torch.tensor([0.0] + [INIT_LOGVAR] * LATENT))
            self.query.weight.zero_()
        self.register_buffer("cells", cell_centres(self.enc.side, cfg["proxy_size"]), persistent=False)

    def encode(self, proxy):
        b = proxy.shape[0]
        fmap = self.enc(proxy)
        f, m = fmap.shape[1], fmap.shape[2]
        phi_x = F.elu(self.enc.fc(fmap.reshape(b, f * m * m)))
        return phi_x, fmap.reshape(b, f, m * m)

    def attend(self, keys, h, masked):
        """Expected cell centre under softmax(<query(h), keys>), through atanh."""
        b, f = keys.shape[0], keys.shape[1]
        q = self.query(h).reshape(b, f, 1)
        scores = (keys * q).sum(1, keepdim=True)  # [B, 1, P]
        if masked is not None:
            scores = scores + masked[:, None, :].to(scores.dtype) * -1e9
        weights = torch.softmax(scores, dim=-1)
        xy = (weights * self.cells).sum(2)  # [B, 2]
        return 0.5 * (torch.log(1.0 + xy) - torch.log(1.0 - xy))

    def run(self, proxy, steps, noise, theta_of=None, mask=False):
        """Unroll T steps. `noise`: list of [B, 3] standard normals, or None
        for posterior means. With `mask`, `theta_of(z)` gives each step's
        glimpse for the hard mask."""
        b = proxy.shape[0]
        target = proxy.reshape(b, -1)
        phi_x, keys = self.encode(proxy)
        h = proxy.new_zeros(b, self.cfg["hidden"])
        flags = torch.zeros(b, keys.shape[2], dtype=torch.bool) if mask else None
        zs, nll_kl, kls = [], [], []
        for t in range(steps):
            q = self.posterior(torch.cat([phi_x, h], 1))
            mu_s = q[:, 0:1]
            masked = None
            if mask and t > 0:
                masked = flags & ~flags.all(dim=1, keepdim=True)
            mu_xy = self.attend(keys, h, masked)
            mu_q = torch.cat([mu_s, mu_xy], 1)
            if self.cfg["fixed_variance"] is not None:
                logvar_q = proxy.new_full((b, LATENT), math.log(self.cfg["fixed_variance"]))
            else:
                logvar_q = q[:, 1:1 + LATENT]
            p = self.prior(h)
            mu_p, logvar_p = p[:, :LATENT], p[:, LATENT:2 * LATENT]
            z = mu_q + torch.exp(0.5 * logvar_q) * noise[t] if noise is not None else mu_q
            phi_z = F.elu(self.phi_z(z))
            logits = self.decoder(torch.cat([phi_z, h], 1))
            nll = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1)
            kl = 0.5 * (logvar_p - logvar_q + (torch.exp(logvar_q) + (mu_q - mu_p) ** 2)
                        / torch.exp(logvar_p) - 1.0).sum(1)
            nll_kl.append(nll + kl)
            kls.append(kl)
            h = self.gru(torch.cat([phi_x, phi_z], 1), h)
            zs.append(z)
            if mask and t + 1 < steps:
                with torch.no_grad():
                    th = theta_of(z.detach())
                    s, tx, ty = th[:, 0, 0:1], th[:, 0, 2:3], th[:, 1, 2:3]
                    inside = ((self.cells[0][None, :] - tx).abs() <= s) & \
                             ((self.cells[1][None, :] - ty).abs() <= s)
                    flags = flags | inside
        elbo_terms = torch.stack(nll_kl, 0).mean(0)
        kl = torch.stack(kls, 0).mean(0)
        return zs, elbo_terms, kl


class Saccader(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.vrnn = Vrnn(cfg)
        w = cfg["classifier_width"]
        self.classifier = ConvStack(cfg["channels"], [(w, 1), (2 * w, 2), (4 * w, 2), (4 * w, 2)])
        f = self.classifier.out_channels
        self.head = nn.ModuleList([nn.Linear(f, f), nn.Linear(f, cfg["num_classes"])])

    def theta(self, z):
        lo, hi = self.cfg["scale_min"], self.cfg["scale_max"]
        s = lo + (hi - lo) * torch.sigmoid(z[:, 0:1])
        txy = torch.tanh(z[:, 1:3])
        zero = torch.zeros_like(s)
        row0 = torch.cat([s, zero, txy[:, 0:1]], 1)
        row1 = torch.cat([zero, s, txy[:, 1:2]], 1)
        return torch.stack([row0, row1], 1)

    def forward(self, images, proxies, labels, noise, mask=False):
        """Returns logits, per-sample ce, elbo terms, kl, the batch loss, thetas."""
        b, c = images.shape[0], images.shape[1]
        t_steps, l = self.cfg["glimpses"], self.cfg["crop"]
        zs, elbo_terms, kl = self.vrnn.run(proxies, t_steps, noise, self.theta, mask)
        thetas, crops = [], []
        for z in zs:
            th = self.theta(z)
            grid = F.affine_grid(th, [b, c, l, l], align_corners=False)
            crops.append(F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                                       align_corners=False))
            thetas.append(th)
        feats = self.classifier(torch.cat(crops, 0)).mean((2, 3))
        pooled = feats.reshape(t_steps, b, -1).mean(0)
        logits = self.head[1](F.elu(self.head[0](pooled)))
        ce = F.cross_entropy(logits, labels, reduction="none")
        scaled = self.cfg["beta"] * elbo_terms
        per_sample = ce * scaled if self.cfg["multiplicative"] else ce + scaled
        return logits, ce, elbo_terms, kl, per_sample.mean(), thetas


def model_config(preset, channels=1, num_classes=55, **over):
    cfg = dict(PRESETS[preset])
    for k in ("lr", "clip_value", "batch_size"):
        cfg.pop(k)
    cfg.update(channels=channels, num_classes=num_classes)
    cfg.update(over)
    return cfg


def num_params(model):
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------- the tiled ResNet18 baseline


class ConvBn(nn.Module):
    def __init__(self, cin, cout, k, stride):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1)

    def forward(self, x):
        return self.bn(self.conv(x))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.a = ConvBn(cin, cout, 3, stride)
        self.b = ConvBn(cout, cout, 3, 1)
        self.down = ConvBn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        y = self.b(F.relu(self.a(x)))
        return F.relu(y + (self.down(x) if self.down is not None else x))


class ResNetTrunk(nn.Module):
    """src/models/resnet.rs: 7x7/2 stem + BN + ReLU + 3x3/2 max pool, 4 stages
    of 2 basic blocks, global average pool."""

    def __init__(self, channels, width):
        super().__init__()
        self.stem = ConvBn(channels, width, 7, 2)
        blocks, cin = [], width
        for stage in range(4):
            cout = width << stage
            for i in range(2):
                blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.features = cin

    def forward(self, x):
        y = F.max_pool2d(F.relu(self.stem(x)), 3, 2, 1)
        return self.blocks(y).mean((2, 3))


def tile_starts(side, tile):
    if side <= tile:
        return [0]
    return [min(i * tile, side - tile) for i in range(-(-side // tile))]


class TiledResNet18(nn.Module):
    """src/models/tiled.rs: one trunk over every tile (last row/column moved
    back inside the image), tile features summed per image, dense head with
    ReLU. Tiles go through the trunk `chunk` at a time (batch-norm statistics
    per chunk), in (image, row, column) order."""

    def __init__(self, channels, num_classes, width=64, tile=224, chunk=16, checkpointing=False):
        super().__init__()
        self.tile, self.chunk, self.checkpointing = tile, chunk, checkpointing
        self.trunk = ResNetTrunk(channels, width)
        f = self.trunk.features
        self.head = nn.ModuleList([nn.Linear(f, f), nn.Linear(f, num_classes)])

    def forward(self, images):
        b, _, h, w = images.shape
        t = self.tile
        ys, xs = tile_starts(h, t), tile_starts(w, t)
        tiles = [images[i, :, y:y + t, x:x + t] for i in range(b) for y in ys for x in xs]
        per = len(ys) * len(xs)
        summed = images.new_zeros(b, self.trunk.features)
        for start in range(0, len(tiles), self.chunk):
            part = torch.stack(tiles[start:start + self.chunk])
            if self.checkpointing and torch.is_grad_enabled():
                # saccade's --checkpointing: keep one chunk's activations at a
                # time, recompute them in backward (here the recomputation
                # also moves the batch-norm running statistics a second time).
                feats = torch.utils.checkpoint.checkpoint(self.trunk, part, use_reentrant=False)
            else:
                feats = self.trunk(part)
            owner = torch.tensor([(start + j) // per for j in range(part.shape[0])])
            summed = summed.index_add(0, owner, feats)
        return self.head[1](F.relu(self.head[0](summed)))


# --------------------------------------------------------------------- data


def read_png(path):
    """8-bit grey or RGB, non-interlaced PNG -> float32 [C, H, W] in [0, 1]
    (what saccade's image decoder gives: value / 255)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG")
    pos, idat, hdr = 8, [], None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    w, h, depth, ctype, _, _, interlace = hdr
    chans = {0: 1, 2: 3, 4: 2, 6: 4}[ctype]
    if depth != 8 or interlace != 0:
        raise ValueError(f"{path}: only 8-bit non-interlaced PNGs are read")
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
    stride = w * chans
    raw = raw.reshape(h, stride + 1)
    out = np.zeros((h, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int32)
    bpp = chans
    for y in range(h):
        ft, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if ft == 0:
            cur = line
        elif ft == 2:
            cur = (line + prev) & 255
        else:
            cur = np.zeros(stride, dtype=np.int32)
            for i in range(stride):
                a = cur[i - bpp] if i >= bpp else 0
                bb = prev[i]
                c = prev[i - bpp] if i >= bpp else 0
                if ft == 1:
                    pred = a
                elif ft == 3:
                    pred = (a + bb) >> 1
                else:
                    pa, pb, pc = abs(bb - c), abs(a - c), abs(a + bb - 2 * c)
                    pred = a if pa <= pb and pa <= pc else (bb if pb <= pc else c)
                cur[i] = (line[i] + pred) & 255
        out[y] = cur
        prev = cur
    img = out.reshape(h, w, chans)
    if chans in (2, 4):  # drop alpha
        img = img[..., :chans - 1]
    return (img.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0))


def area_weights(n, m):
    """src/data/proxy.rs `area_weights` as a dense [m, n] float32 matrix."""
    step = n / m
    wt = np.zeros((m, n), dtype=np.float32)
    for o in range(m):
        lo, hi = o * step, (o + 1) * step
        for i in range(math.floor(lo), min(math.ceil(hi), n)):
            overlap = max(min(hi, i + 1.0) - max(lo, float(i)), 0.0)
            if overlap > 0:
                wt[o, i] = np.float32(overlap / step)
    return wt


def area_resize(img, size):
    """[C, H, W] -> [C, size, size] area mean (OpenCV INTER_AREA), as saccade's proxies."""
    _, h, w = img.shape
    wy, wx = area_weights(h, size), area_weights(w, size)
    rows = img @ wx.T  # [C, H, size]
    return np.einsum("oh,chw->cow", wy, rows).astype(np.float32)


def pair_class_names():
    return [f"{a}+{b}" for a in range(10) for b in range(a, 10)]


def class_names_for(folder_names):
    """saccade's class order for its generated tasks (the PNG folders are named by class)."""
    for names in (pair_class_names(), [str(s) for s in range(19)], [str(d) for d in range(10)]):
        if set(folder_names) <= set(names):
            return names
    return sorted(folder_names)


def load_png_split(folder, limit=None):
    """(paths, images [N,C,H,W], labels) of OUT/<split>/<class>/<index>.png in index order."""
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    names = class_names_for(classes)
    items = []
    for cname in classes:
        for f in os.listdir(os.path.join(folder, cname)):
            if f.endswith(".png"):
                items.append((int(f.split(".")[0]), os.path.join(folder, cname, f), names.index(cname)))
    items.sort()
    if limit is not None:
        items = items[:limit]
    imgs = np.stack([read_png(p) for _, p, _ in items])
    return [p for _, p, _ in items], imgs, np.array([l for _, _, l in items], dtype=np.int64), names


def random_batch(b, channels, size, proxy_size, num_classes, seed=0):
    g = np.random.default_rng(seed)
    imgs = g.random((b, channels, size, size), dtype=np.float32)
    proxies = np.stack([area_resize(x, proxy_size) for x in imgs])
    labels = g.integers(0, num_classes, size=b)
    return torch.from_numpy(imgs), torch.from_numpy(proxies), torch.from_numpy(labels)


# ------------------------------------------------------------------- timing


def train_step_fn(model, opt, batch, clip_value, mask):
    images, proxies, labels = batch
    b = images.shape[0]
    params = [p for p in model.parameters()]

    def step():
        noise = [torch.randn(b, LATENT) for _ in range(model.cfg["glimpses"])]
        logits, ce, elbo, kl, loss, _ = model(images, proxies, labels, noise, mask=mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip_value > 0:
            torch.nn.utils.clip_grad_value_(params, clip_value)
        # saccade computes the global norm every step (a NaN guard).
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        opt.step()
        lv = loss.item()
        if not (math.isfinite(lv) and math.isfinite(norm.item())):
            raise RuntimeError(f"loss {lv}, gradient norm {norm.item()}")
        return lv

    return step


def time_steps(step, warmup, steps):
    """(timed step seconds, their losses, seconds of the first warm-up step:
    with torch.compile, the compilation)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    first = time.perf_counter() - t0
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    return times, losses, first


def summarize(times, b):
    med, mean = statistics.median(times), statistics.fmean(times)
    return dict(median_step_s=med, mean_step_s=mean, min_step_s=min(times), max_step_s=max(times),
                samples_per_s=b / med, samples_per_s_at_mean=b / mean, samples_per_s_at_min=b / min(times),
                steps=len(times), loadavg_1min_after=os.getloadavg()[0], cpu=cpu_description(),
                peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def cpu_description():
    """The CPU model and the vector extensions that decide GEMM speed."""
    model, flags = platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == platform.machine():
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    vec = ("AVX-512" if "avx512f" in flags else "AVX2+FMA, no AVX-512" if {"avx2", "fma"} <= flags
           else "no AVX2")
    return f"{model} ({vec})"


def run_saccade_step(binary, preset, batch_size, threads, steps, mask):
    """saccade's step on one batch, as this script times PyTorch's: `saccade
    bench --step` (median of `steps` steps after a warm-up, the glimpses'
    gradient on, as in the replica)."""
    cmd = [binary, "bench", "--step", "--preset", preset, "--batch-size", str(batch_size),
           "--steps", str(steps), "--threads", str(threads), "--json"]
    if not mask:
        raise SystemExit("--no-mask: `saccade bench --step` times the presets as they are (mask on)")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return dict(command=" ".join(cmd), error=r.stderr[-2000:])
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return dict(command=" ".join(cmd), **res)


def run_saccade_train(binary, preset, batch_size, threads, train_size, out, mask):
    """saccade's epoch with its loader: one epoch of `saccade train`, the
    glimpses' gradient on from the first image (`--policy-warmup 0`) as in
    the replica."""
    cmd = [binary, "train", "--preset", preset, *([] if mask else ["--no-mask"]), "--policy-warmup", "0",
           "--batch-size", str(batch_size),
           "--train-size", str(train_size), "--valid-size", "64", "--test-size", "64",
           "--epochs", "1", "--out", out, "--device", "cpu", "--threads", str(threads), "--json"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        return dict(command=" ".join(cmd), error=r.stderr[-2000:])
    res = json.loads(r.stdout.strip().splitlines()[-1])
    ep = res["epochs"][0]
    return dict(command=" ".join(cmd), samples_per_s=ep["samples_per_second"], epoch_seconds=ep["seconds"],
                images=train_size, process_wall_s=wall,
                note="epoch time of Trainer::fit: includes the data loader (rendering, proxies), "
                     "excludes validation and test")


def bench(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.model == "tiled-resnet18":
        size = args.size or 2528
        b = args.batch_size or 2
        model = TiledResNet18(1, 55, width=args.resnet_width, tile=224, chunk=args.tile_chunk,
                              checkpointing=args.checkpointing)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        images = torch.rand(b, 1, size, size)
        labels = torch.randint(0, 55, (b,))

        def step():
            loss = F.cross_entropy(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()

        warm = args.warmup if args.warmup is not None else 1
        times, losses, _ = time_steps(step, warm, args.steps)
        res = dict(model="tiled-resnet18", size=size, batch_size=b, tiles_per_image=len(tile_starts(size, 224)) ** 2,
                   tile_chunk=args.tile_chunk, checkpointing=args.checkpointing, params=num_params(model), threads=args.threads,
                   torch=torch.__version__, warmup=warm, data="random", **summarize(times, b))
        return res
    preset = PRESETS[args.preset]
    b = args.batch_size or preset["batch_size"]
    size = args.size or 100
    cfg = model_config(args.preset)
    model = Saccader(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=preset["lr"], betas=(0.9, 0.999), eps=1e-8)
    if args.data:
        _, imgs, labels, names = load_png_split(os.path.join(args.data, "train"), limit=b)
        proxies = np.stack([area_resize(x, cfg["proxy_size"]) for x in imgs])
        batch = (torch.from_numpy(imgs), torch.from_numpy(proxies), torch.from_numpy(labels))
        data = f"first {len(labels)} images of {args.data}/train"
        b = len(labels)
    else:
        batch = random_batch(b, cfg["channels"], size, cfg["proxy_size"], cfg["num_classes"], args.seed)
        data = f"random {b}x1x{size}x{size} images, area proxies, random labels"
    if args.compile != "none":
        model = torch.compile(model, mode=None if args.compile == "default" else args.compile)
    step = train_step_fn(model, opt, batch, preset["clip_value"], args.mask)
    warm = args.warmup if args.warmup is not None else 3
    times, losses, warm_s = time_steps(step, warm, args.steps)
    res = dict(model="saccade", preset=args.preset, mask=args.mask, batch_size=b, image_size=size,
               compile=args.compile, warmup_s=warm_s,
               params=num_params(model), threads=args.threads, torch=torch.__version__,
               warmup=warm, data=data, lr=preset["lr"], clip_value=preset["clip_value"],
               first_loss=losses[0], last_loss=losses[-1], **summarize(times, b))
    return res


# -------------------------------------------------------------- verification


def load_checkpoint(path):
    """(params by name, adam m by name, adam step, metadata) of a saccade checkpoint."""
    from safetensors import safe_open

    with safe_open(path, framework="np") as f:
        meta = f.metadata() or {}
        params, moments, second = {}, {}, {}
        for k in f.keys():
            kind, name = k.split("/", 1)
            t = f.get_tensor(k)
            {"param": params, "adam_m": moments, "adam_v": second}[kind][name] = t
    return params, moments, second, int(meta.get("adam_step", 0)), json.loads(meta.get("meta", "{}"))


def compare(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    d = np.abs(a - b)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return dict(max_abs_diff=float(d.max()) if d.size else 0.0,
                rel_l2=float(np.linalg.norm(a - b) / max(nb, 1e-30)),
                cosine=float(a @ b / max(na * nb, 1e-30)), norm_torch=float(na), norm_saccade=float(nb))


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r.stdout


def verify(args):
    """Build saccade's step-0 state and compare.

    1. `saccade data generate --format png` writes the train split (the same
       images `saccade train --seed S` renders: scenes are seeded per
       (seed, split, index)).
    2. `saccade train --train-size N --batch-size N --epochs 1 --lr 1e-30
       --fixed-variance V`: one Adam step of at most 1e-30 per weight (train
       refuses lr 0), so the checkpoint holds the initial weights to f32
       precision (a zero stays within 1e-30 of zero) and Adam's first moment m = (1 - 0.9) g
       holds the first step's gradient; a tiny fixed posterior variance makes
       the sampled z equal the posterior mean (noise * 1e-15), so that step is
       deterministic and saccade's posterior noise is not needed. metrics.jsonl
       holds that step's loss, CE and KL.
    3. `saccade predict --json --top K` on the test images: evaluation-mode
       class probabilities (posterior means; the learned-variance path does
       not enter them).

    Both sides use the hard mask, or with `--no-mask` both the paper's
    policy (saccade gets `--no-mask`).
    """
    torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    binary = args.saccade
    work = args.workdir or tempfile.mkdtemp(prefix="torch_verify_")
    n, seed, fv = args.verify_size, args.seed_saccade, args.fixed_variance
    data_dir, run_dir = os.path.join(work, "data"), os.path.join(work, "run")
    # The replica has no policy warmup (it only gates which gradients reach
    # the glimpses early in a run): saccade's step is compared ungated.
    extra = ["--preset", args.preset, "--policy-warmup", "0", *([] if args.mask else ["--no-mask"])]
    if not os.path.exists(os.path.join(data_dir, "train")):
        run([binary, "data", "generate", "--dataset", "cluttered-mnist", "--out", data_dir, "--train", str(n),
             "--valid", str(n), "--test", str(n), "--format", "png", "--seed", str(seed)])
    ck = os.path.join(run_dir, "checkpoint.safetensors")
    if not os.path.exists(ck):
        run([binary, "train", *extra, "--train-size", str(n), "--valid-size", str(n), "--test-size", str(n),
             "--batch-size", str(n), "--epochs", "1", "--lr", "1e-30", "--clip-value", "0",
             "--fixed-variance", repr(fv),
             "--seed", str(seed), "--out", run_dir, "--device", "cpu", "--threads", str(args.threads), "--json"])
    params, m1, v1, adam_step, meta = load_checkpoint(ck)
    tcfg = meta["train"]
    mc = tcfg["model"]
    assert adam_step == 1 and tcfg["lr"] < 1e-29, (adam_step, tcfg["lr"])
    cfg = {k: mc[k] for k in ("channels", "num_classes", "proxy_size", "glimpses", "crop", "scale_min",
                              "scale_max", "beta", "multiplicative", "fixed_variance", "enc_width", "embed",
                              "hidden", "classifier_width")}
    model = Saccader(cfg)
    sd = {k: torch.from_numpy(np.array(v)) for k, v in params.items()}
    missing = set(model.state_dict()) ^ set(sd)
    assert not missing, f"names differ: {sorted(missing)}"
    model.load_state_dict(sd, strict=True)
    out = dict(workdir=work, mask=args.mask, params_torch=num_params(model),
               params_saccade=int(sum(np.prod(v.shape) for v in params.values())),
               config=cfg)

    # -- the training step (fixed tiny variance, lr 1e-30)
    _, imgs, labels, _ = load_png_split(os.path.join(data_dir, "train"))
    proxies = np.stack([area_resize(x, cfg["proxy_size"]) for x in imgs])
    x, p, y = torch.from_numpy(imgs), torch.from_numpy(proxies), torch.from_numpy(labels)
    noise = [torch.zeros(len(y), LATENT) for _ in range(cfg["glimpses"])]
    model.zero_grad()
    logits, ce, elbo, kl, loss, _ = model(x, p, y, noise, mask=args.mask)
    loss.backward()
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        metrics = json.loads(f.readline())
    correct = int((logits.argmax(1) == y).sum())
    out["train_step"] = dict(
        batch=len(y), loss_torch=loss.item(), loss_saccade=metrics["train_loss"],
        ce_torch=ce.mean().item(), ce_saccade=metrics["train_ce"],
        kl_torch=kl.mean().item(), kl_saccade=metrics["train_kl"],
        correct_torch=correct, correct_saccade=round(metrics["train_accuracy"] * len(y)),
    )
    one_minus_b1 = np.float32(1.0) - np.float32(0.9)
    grads, worst = {}, None
    all_t, all_s = [], []
    for name, prm in model.named_parameters():
        g_s = np.asarray(m1[name], np.float32) / one_minus_b1
        g_t = prm.grad.numpy() if prm.grad is not None else np.zeros_like(g_s)
        c = compare(g_t, g_s)
        grads[name] = c
        all_t.append(g_t.ravel())
        all_s.append(g_s.ravel())
        if c["norm_saccade"] > 0 and (worst is None or c["rel_l2"] > grads[worst]["rel_l2"]):
            worst = name
    out["gradients"] = dict(all=compare(np.concatenate(all_t), np.concatenate(all_s)),
                            worst_tensor=worst, worst=grads[worst], per_tensor=grads)

    # -- evaluation mode: saccade predict on the test images
    paths, timgs, tlabels, names = load_png_split(os.path.join(data_dir, "test"))
    pr = json.loads(run([binary, "predict", "--checkpoint", ck, "--json", "--top", str(cfg["num_classes"]),
                         "--device", "cpu", "--threads", str(args.threads), *paths]).strip().splitlines()[-1])
    probs_s = np.zeros((len(paths), cfg["num_classes"]), np.float32)
    for i, row in enumerate(pr["predictions"]):
        for cname, pv in row["top"]:
            probs_s[i, names.index(cname)] = pv
    tproxies = np.stack([area_resize(im, cfg["proxy_size"]) for im in timgs])
    with torch.no_grad():
        lg, _, _, _, _, _ = model(torch.from_numpy(timgs), torch.from_numpy(tproxies),
                                  torch.from_numpy(tlabels), None, mask=args.mask)
        probs_t = torch.softmax(lg, 1).numpy()
    out["eval_probs"] = dict(images=len(paths), **compare(probs_t, probs_s),
                             argmax_agree=int((probs_t.argmax(1) == probs_s.argmax(1)).sum()))
    # float32 rounding gives ~1e-7 relative (1e-5 on the smallest gradient
    # tensors); a different model or policy gives 1e-4 and more.
    st = out["train_step"]
    out["match"] = bool(abs(st["loss_torch"] - st["loss_saccade"]) <= 1e-5 * abs(st["loss_saccade"])
                        and out["gradients"]["worst"]["rel_l2"] <= 1e-3
                        and out["eval_probs"]["max_abs_diff"] <= 1e-5)
    return out


# --------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--model", choices=["saccade", "tiled-resnet18"], default="saccade")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 32 (small), 100 (paper), 2 (tiled)")
    ap.add_argument("--size", type=int, default=None, help="image side (default 100; 2528 for tiled)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; 1 tiled)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-mask", dest="mask", action="store_false",
                    help="the paper's glimpse policy instead of saccade's default hard mask")
    ap.add_argument("--data", help="a `saccade data generate --format png` folder for the timing batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resnet-width", type=int, default=64)
    ap.add_argument("--tile-chunk", type=int, default=16)
    ap.add_argument("--checkpointing", action="store_true",
                    help="tiled: recompute each chunk of tiles in backward (saccade's --checkpointing)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--compile", choices=["none", "default", "max-autotune-no-cudagraphs"], default="none",
                    help="torch.compile the model (inductor) in this mode; the first warm-up step's time "
                         "(compilation included) is reported as warmup_s")
    ap.add_argument("--compare-saccade", metavar="BIN",
                    help="the fair protocol: per round each of --opponents (fresh processes), then `BIN bench "
                         "--step`, same preset/batch/threads/steps; then one `BIN train` epoch of "
                         "--saccade-images images with its loader")
    ap.add_argument("--opponents", default="eager,eager-passive,compile,compile-max",
                    help=f"with --compare-saccade, comma-separated from {', '.join(OPPONENTS)}")
    ap.add_argument("--saccade-images", type=int, default=3200, help="0: no epoch")
    ap.add_argument("--rounds", type=int, default=3, help="with --compare-saccade: alternated rounds")
    ap.add_argument("--verify", action="store_true", help="compare with saccade (needs --saccade)")
    ap.add_argument("--saccade", default="target/release/saccade", help="saccade binary for --verify")
    ap.add_argument("--workdir", help="--verify: folder for the generated data and checkpoint (default: a temp dir)")
    ap.add_argument("--verify-size", type=int, default=32, help="--verify: images per split (one batch)")
    ap.add_argument("--seed-saccade", type=int, default=1)
    ap.add_argument("--fixed-variance", type=float, default=1e-30,
                    help="--verify: posterior variance of the deterministic step (sqrt = 1e-15)")
    args = ap.parse_args()

    if args.verify:
        res = verify(args)
        if args.json:
            print(json.dumps(res))
            sys.exit(0 if res["match"] else 1)
        s, g, e = res["train_step"], res["gradients"], res["eval_probs"]
        print(f"parameters: torch {res['params_torch']}, saccade {res['params_saccade']}")
        print(f"train step on {s['batch']} images (lr 1e-30, fixed variance {args.fixed_variance}):")
        for k in ("loss", "ce", "kl", "correct"):
            print(f"  {k}: torch {s[k + '_torch']!r}  saccade {s[k + '_saccade']!r}")
        a = g["all"]
        print(f"  gradients, all {len(g['per_tensor'])} tensors: rel L2 {a['rel_l2']:.3g}, "
              f"max abs diff {a['max_abs_diff']:.3g}, cosine {a['cosine']:.9f}")
        w = g["worst"]
        print(f"  worst tensor {g['worst_tensor']}: rel L2 {w['rel_l2']:.3g}, max abs diff {w['max_abs_diff']:.3g}")
        print(f"eval-mode probabilities on {e['images']} test images (saccade predict): max abs diff "
              f"{e['max_abs_diff']:.3g}, rel L2 {e['rel_l2']:.3g}, argmax agree {e['argmax_agree']}/{e['images']}")
        print(f"(work folder {res['workdir']})")
        print("MATCH" if res["match"] else "MISMATCH")
        sys.exit(0 if res["match"] else 1)

    if args.compare_saccade:
        res = compare_rounds(args)
        if args.json:
            print(json.dumps(res))
        return
    res = bench(args)
    res["env"] = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")
                  if k in os.environ}
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")


# How each opponent runs: torch.compile mode and extra environment.
OPPONENTS = {
    "eager": ("none", {}),
    "eager-passive": ("none", {"OMP_WAIT_POLICY": "PASSIVE"}),
    "compile": ("default", {}),
    "compile-max": ("max-autotune-no-cudagraphs", {}),
}


def torch_worker(args, opponent):
    """One PyTorch timing in a fresh process (OpenMP reads its environment
    once, at import)."""
    mode, extra = OPPONENTS[opponent]
    cmd = [sys.executable, os.path.abspath(__file__), "--preset", args.preset, "--steps", str(args.steps),
           "--threads", str(args.threads), "--seed", str(args.seed), "--compile", mode, "--json"]
    for flag, v in (("--batch-size", args.batch_size), ("--size", args.size), ("--warmup", args.warmup),
                    ("--data", args.data)):
        if v is not None:
            cmd += [flag, str(v)]
    if not args.mask:
        cmd.append("--no-mask")
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **extra})
    if r.returncode != 0:
        raise RuntimeError(f"{opponent}: {' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def compare_rounds(args):
    """The fair protocol (BENCHMARKS.md): per round, each PyTorch opponent and
    then saccade time the same model's step on one batch, same preset, batch
    and threads, the glimpses' gradient on both sides; rounds alternate so
    that drift in the machine hits every side alike. Then saccade's epoch
    with its loader, separately."""
    opponents = args.opponents.split(",")
    for o in opponents:
        if o not in OPPONENTS:
            raise SystemExit(f"--opponents: unknown `{o}`; choose from {', '.join(OPPONENTS)}")
    rounds = []
    for r in range(max(args.rounds, 1)):
        rnd = {"loadavg_1min_before": os.getloadavg()[0]}
        for o in opponents:
            rnd[o] = torch_worker(args, o)
        rnd["saccade"] = run_saccade_step(args.compare_saccade, args.preset, rnd[opponents[0]]["batch_size"],
                                          args.threads, args.steps, args.mask)
        rounds.append(rnd)
        if not args.json:
            line = ", ".join(f"{o} {rnd[o]['samples_per_s']:.1f}" for o in opponents)
            sac = rnd["saccade"].get("samples_per_s")
            print(f"round {r + 1} (load {rnd['loadavg_1min_before']:.1f}): samples/s {line}, saccade "
                  + (f"{sac:.1f}" if sac else f"failed: {rnd['saccade'].get('error')}"), flush=True)
    b = rounds[0][opponents[0]]["batch_size"]
    med = {o: statistics.median(x[o]["samples_per_s"] for x in rounds) for o in opponents + ["saccade"]
           if all("samples_per_s" in x[o] for x in rounds)}
    res = dict(preset=args.preset, batch_size=b, threads=args.threads, cpu=cpu_description(),
               torch=torch.__version__, rounds=rounds, median_samples_per_s=med,
               saccade_over={o: med["saccade"] / med[o] for o in opponents if "saccade" in med and o in med})
    compiled = [o for o in opponents if OPPONENTS[o][0] != "none"]
    if compiled:
        res["compile_s"] = {o: [x[o]["warmup_s"] for x in rounds] for o in compiled}
    if args.saccade_images > 0:
        with tempfile.TemporaryDirectory(prefix="saccade_cmp_") as d:
            res["saccade_epoch"] = run_saccade_train(args.compare_saccade, args.preset, b, args.threads,
                                                     args.saccade_images, d, args.mask)
    if not args.json:
        print(f"{res['cpu']}, {args.threads} threads, torch {res['torch']}, preset {args.preset}, batch {b}, "
              f"{len(rounds)} rounds: median samples/s " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()))
        print("saccade / opponent: " + ", ".join(f"{k} {v:.2f}x" for k, v in res["saccade_over"].items()))
        for o, c in res.get("compile_s", {}).items():
            print(f"{o}: warm-up steps incl. compilation " + ", ".join(f"{x:.0f} s" for x in c))
        ep = res.get("saccade_epoch")
        if ep:
            print(f"saccade epoch with its loader: " + (f"{ep['samples_per_s']:.1f} samples/s "
                  f"({ep['images']} images, {ep['epoch_seconds']:.0f} s)" if "samples_per_s" in ep
                  else f"failed: {ep['error']}"))
    return res

if __name__ == "__main__":
    main()
