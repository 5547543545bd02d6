#!/usr/bin/env python3
"""FLOPs and activation memory per TRAINING image on megapixel MNIST
(1500x1500, 1 channel): IPS at its official configuration beside a saccade
model given by its training configuration.

Conventions
-----------
* FLOPs = 2 x multiply-adds of convolutions, dense layers and matrix
  products (fvcore/ptflops convention). Biases, norms, activations,
  softmaxes, pooling and residual adds are left out of this headline and
  shown separately as "elementwise" (per-element costs stated in
  ELEMENTWISE below); they change no conclusion.
* saccade's headline also counts its crop reads (bilinear sampling, about
  8 FLOPs per output value: 4 taps, 4 weights), because they are arithmetic
  IPS does not do (its 50x50 patches are an unfold, a copy: 0 FLOPs).
* Training: backward is taken as 2x forward, so a trained pass costs 3x its
  forward. That slightly overcounts (the first conv needs no input
  gradient), the same for both sides.

IPS (benbergner/ips @ 4c17c1d, config/mnist_config.yml, architecture/ips_net.py,
architecture/transformer.py, training/iterative.py)
----------------------------------------------------------------------------
* Patches: 50x50, stride 50: N = 30 x 30 = 900 per image, 1 channel, no
  normalization.
* Encoder (`get_conv_patch_enc`, enc_type resnet18, pretrained False,
  n_chan_in 1, n_res_blocks 2): torchvision resnet18 with conv1 replaced by
  Conv2d(1, 64, 7, stride 2, pad 3, bias False), then bn1, relu, maxpool
  (3x3, s2, p1), layer1 (2 BasicBlocks, 64 ch), layer2 (2 BasicBlocks,
  128 ch, the first strided with a 1x1 conv + BN downsample), avgpool.
  "n_res_blocks: 2" means two ResNet *stages* (layer1 and layer2, i.e.
  4 BasicBlocks, 8 3x3 convs + 1 downsample); layer3/layer4 only when 4.
  No fc: the 128-channel avgpool output is the token, D = 128.
  Shapes for one 50x50 patch: 1x50x50 -> conv1 64x25x25 -> maxpool
  64x13x13 -> layer1 64x13x13 -> layer2 128x7x7 -> avgpool 128.
* IPS scoring pass (`IPSNet.ips`, @torch.no_grad, encoder and transformer
  in eval mode): encode the first M = 100 patches, then ceil((900-100)/100)
  = 8 iterations each encoding I = 100 new patches, adding the sinusoidal
  position code and scoring the M + I = 200 tokens by the cross-attention
  (`get_scores`: q_w on the 4 query tokens, k_w on the 200 tokens,
  q.k^T over 8 heads of D_k = 16; no values, no MLP), keeping the top M.
  So 900 encoder passes, forward only.
* Trained pass (`IPSNet.forward` under autograd): the M = 100 selected
  patches are encoded AGAIN with gradients (the scoring pass kept no
  graph), + position code, then the Transformer: multi-head cross-attention
  (n_token = 4 learned queries, H = 8, D = 128, D_k = D_v = 16: q_w 128->128
  on 4 tokens, k_w and v_w 128->128 on 100 tokens, fc 128->128 on 4 tokens,
  residual + LayerNorm) and the MLP (128 -> 512 -> 128, ReLU, residual +
  LayerNorm) on the 4 tokens; then one head per task, Linear(128 -> 10) on
  that task's token (softmax for majority/max/top, sigmoid for multi).
* Per training image: scoring pass + 3 x (trained pass). Inference (the
  `evaluate` loop does the same two passes): scoring pass + trained pass.
* Batch: B = 16 images per optimizer step (B_seq 16). The stored-activation
  estimate is for the trained pass of those 16 x 100 patches.

saccade (src/models/{saccader,vrnn,classifier}.rs)
--------------------------------------------------
* ConvStack block = 3x3 conv (pad 1, no bias) -> GroupNorm (max(c/8,1)
  groups) -> ELU; output side (n-1)//stride + 1.
* VRNN (once per image): proxy C x J x J -> ConvStack
  [(w,2),(2w,2),(2w,1)] -> map 2w x m x m (m = J/4 rounded up, P = m^2
  cells) -> average pool by summary_pool k -> enc_fc (2w*(m/k)^2 -> E)
  + ELU = phi_x.
* VRNN (per glimpse step, T times): posterior MLP (E+H -> E -> 4),
  attention (query H -> 2w, or 1 -> 2w with fixed_query, scores [1,2w]@[2w,P], softmax, [1,P]@[P,2] for
  the centre), prior MLP (H -> E -> 6), phi_z (3 -> E), decoder MLP
  (E+H -> E -> C*J*J, Bernoulli logits of the whole proxy, every step), GRU
  cell (input 2E, hidden H: 3H(2E) + 3H*H multiply-adds).
* Crops: T crops of C x L x L by bilinear sampling.
* Crop classifier on the T crops: ConvStack [(f,1),(2f,2),(4f,2),(4f,2)]
  then global average pooling, F = 4f features.
* Optional `place` Linear(3 -> F) per glimpse (glimpse_position), pooling
  (mean / max / attention: weighted mean [1,T]@[T,F] beside the max,
  2F; relevance: attention plus a Linear(F -> 1) score per glimpse), head.0 Linear(F or 2F -> F) + ELU, one Linear(F -> K_task) per task.
* Training = 3 x forward (the whole model is under autograd).

Hand checks (example config: --example-config)
----------------------------------------------
* IPS conv1: 25*25 outputs * 64 ch * 7*7*1 taps = 1,960,000 MACs = 3.92 MFLOP.
  layer1 conv: 13*13*64*64*9 = 6,230,016 MACs; 4 of them = 24.92 M.
  layer2: 49*128*64*9 (strided) + 3 * 49*128*128*9 + 49*128*64 (1x1)
  = 3,612,672 + 21,676,032 + 401,408 = 25,690,112 MACs.
  Encoder per patch = 52,570,176 MACs = 105.14 MFLOP; x900 = 94.6 GFLOP.
* saccade, J = 128, w = 16: enc convs at 64^2, 32^2, 32^2:
  64*64*16*9 = 589,824; 32*32*32*16*9 = 4,718,592; 32*32*32*32*9 =
  9,437,184 MACs. enc_fc 32*32*32 -> 128 = 4,194,304 MACs (summary_pool
  4: 8*8*32 -> 128 = 262,144). The decoder's
  last layer 128 -> 16384 = 2,097,152 MACs per step, the largest per-step
  term (x10 steps). Classifier (f = 16, L = 32): 32^2*16*9 + 16^2*32*16*9
  + 8^2*64*32*9 + 4^2*64*64*9 = 147,456 + 1,179,648 + 1,179,648 + 589,824
  = 3,096,576 MACs per crop.
* Parameter counts are printed for both models; with --checkpoint the
  saccade count is checked against the tensors the file holds.

Usage
-----
  python benches/megapixel_flops.py --example-config > /tmp/mm.json
  python benches/megapixel_flops.py --config /tmp/mm.json [--json]
  python benches/megapixel_flops.py --checkpoint runs/x/model.safetensors

Needs only the Python standard library.
"""

import argparse
import json
import math
import struct
import sys

# ---------------------------------------------------------------------------
# Elementwise cost assumptions (FLOPs per output element), for the secondary
# "elementwise" column only.
ELEMENTWISE = {
    "bn": 2,  # eval-mode BN folded to a scale and shift (training adds stats: ~4)
    "relu": 1,
    "maxpool": 8,  # 3x3 window: 8 comparisons
    "add": 1,
    "avgpool": 1,
    "gn": 8,  # mean, variance, normalize, scale, shift
    "elu": 3,
    "bias": 1,
    "softmax": 5,
    "layernorm": 8,
    "gru_gates": 12,  # 2 sigmoids, a tanh, the blend, per hidden unit
}
BILINEAR_FLOPS = 8  # per sampled value: 4 taps, 4 weights

# IPS, config/mnist_config.yml @ 4c17c1da8cffddb46039224f0388b340ff8fa3b2
IPS_MNIST = {
    "image": 1500,
    "channels": 1,
    "patch": 50,
    "stride": 50,
    "N": 900,
    "M": 100,
    "I": 100,
    "D": 128,
    "H": 8,
    "D_k": 16,
    "D_v": 16,
    "D_inner": 512,
    "n_token": 4,
    "n_class": 10,
    "tasks": ["majority", "max", "top", "multi"],
    "B": 16,
}


class Row:
    """One layer: shapes, multiply-adds and elementwise FLOPs per call, and
    how many calls per image (`n`)."""

    def __init__(self, stage, name, shape_in, shape_out, macs, elem=0, n=1, params=0):
        self.stage, self.name = stage, name
        self.shape_in, self.shape_out = shape_in, shape_out
        self.macs, self.elem, self.n, self.params = macs, elem, n, params

    @property
    def flops(self):
        return 2 * self.macs * self.n

    @property
    def elem_total(self):
        return self.elem * self.n


def shp(*dims):
    return "x".join(str(d) for d in dims)


def conv_out(n, k, s, p):
    return (n + 2 * p - k) // s + 1


# ---------------------------------------------------------------------------
# IPS


def resnet_encoder_rows(cfg, stage, n):
    """ResNet-18 truncated after layer2, 1 input channel, one patch; stored
    activation elements per patch are returned beside the rows."""
    rows = []
    stored = 0  # fp32 elements autograd keeps for backward
    stored_bytes_extra = 0
    c, side = cfg["channels"], cfg["patch"]
    stored += c * side * side  # conv1 keeps its input for the weight gradient

    def conv(name, cin, cout, k, s, p, side_in):
        o = conv_out(side_in, k, s, p)
        macs = o * o * cout * cin * k * k
        rows.append(Row(stage, name, shp(cin, side_in, side_in), shp(cout, o, o), macs, 0, n, cout * cin * k * k))
        return o

    def bn(name, ch, sd):
        rows.append(Row(stage, name, shp(ch, sd, sd), shp(ch, sd, sd), 0, ELEMENTWISE["bn"] * ch * sd * sd, n, 2 * ch))

    def relu(name, ch, sd):
        rows.append(Row(stage, name, shp(ch, sd, sd), shp(ch, sd, sd), 0, ELEMENTWISE["relu"] * ch * sd * sd, n))

    o = conv("conv1 7x7/2", c, 64, 7, 2, 3, side)
    stored += 64 * o * o  # conv output (BN's input)
    bn("bn1", 64, o)
    stored += 64 * o * o  # BN output (ReLU is in place on it, keeps it)
    relu("relu", 64, o)
    mo = conv_out(o, 3, 2, 1)
    rows.append(Row(stage, "maxpool 3x3/2", shp(64, o, o), shp(64, mo, mo), 0, ELEMENTWISE["maxpool"] * 64 * mo * mo, n))
    stored += 64 * mo * mo
    stored_bytes_extra += 8 * 64 * mo * mo  # int64 argmax indices
    side = mo
    cin = 64
    for layer, cout, first_stride in (("layer1", 64, 1), ("layer2", 128, 2)):
        for blk in range(2):
            s = first_stride if blk == 0 else 1
            pre = f"{layer}.{blk}"
            o1 = conv(f"{pre}.conv1 3x3/{s}", cin, cout, 3, s, 1, side)
            bn(f"{pre}.bn1", cout, o1)
            relu(f"{pre}.relu", cout, o1)
            o2 = conv(f"{pre}.conv2 3x3/1", cout, cout, 3, 1, 1, o1)
            bn(f"{pre}.bn2", cout, o2)
            stored += 4 * cout * o2 * o2  # conv1, bn1(+relu), conv2, bn2 outputs
            if s != 1 or cin != cout:
                conv(f"{pre}.downsample 1x1/{s}", cin, cout, 1, s, 0, side)
                bn(f"{pre}.downsample.bn", cout, o2)
                stored += 2 * cout * o2 * o2
            rows.append(Row(stage, f"{pre} add+relu", shp(cout, o2, o2), shp(cout, o2, o2), 0,
                            (ELEMENTWISE["add"] + ELEMENTWISE["relu"]) * cout * o2 * o2, n))
            stored += cout * o2 * o2  # the sum (ReLU in place keeps it)
            side, cin = o2, cout
    rows.append(Row(stage, "avgpool", shp(cin, side, side), shp(cin), 0, ELEMENTWISE["avgpool"] * cin * side * side, n))
    stored += cin
    return rows, stored * 4 + stored_bytes_extra, cin


def ips_rows(cfg):
    N, M, I, D = cfg["N"], cfg["M"], cfg["I"], cfg["D"]
    H, dk, dv, dinner, nt = cfg["H"], cfg["D_k"], cfg["D_v"], cfg["D_inner"], cfg["n_token"]
    per_side = (cfg["image"] - cfg["patch"]) // cfg["stride"] + 1
    assert per_side * per_side == N, f"{per_side}^2 patches, N = {N}"
    n_iter = math.ceil((N - M) / I)
    score, train = [], []
    enc_s, _, _ = resnet_encoder_rows(cfg, "score: encoder", N)  # M initial + n_iter*I
    score += enc_s
    L = M + I
    score += [
        Row("score: attention", "+ pos. code", shp(L, D), shp(L, D), 0, L * D, n_iter),
        Row("score: attention", "q_w (4 queries)", shp(nt, D), shp(nt, H * dk), nt * D * H * dk, 0, n_iter),
        Row("score: attention", "k_w", shp(L, D), shp(L, H * dk), L * D * H * dk, 0, n_iter),
        Row("score: attention", "q.k^T / sqrt(dk)", shp(H, nt, dk) + " @ " + shp(H, dk, L), shp(H, nt, L),
            H * nt * L * dk, ELEMENTWISE["softmax"] * H * nt * L, n_iter),
        Row("score: attention", "mean heads, tasks; top-M", shp(H, nt, L), shp(L), 0, H * nt * L + L, n_iter),
    ]
    enc_t, act_bytes, d_out = resnet_encoder_rows(cfg, "train: encoder", M)
    assert d_out == D
    train += enc_t
    train += [
        Row("train: aggregator", "+ pos. code", shp(M, D), shp(M, D), 0, M * D),
        Row("train: aggregator", "q_w (4 queries)", shp(nt, D), shp(nt, H * dk), nt * D * H * dk, 0, 1, D * H * dk + nt * D),
        Row("train: aggregator", "k_w", shp(M, D), shp(M, H * dk), M * D * H * dk, 0, 1, D * H * dk),
        Row("train: aggregator", "v_w", shp(M, D), shp(M, H * dv), M * D * H * dv, 0, 1, D * H * dv),
        Row("train: aggregator", "q.k^T, softmax", shp(H, nt, dk) + " @ " + shp(H, dk, M), shp(H, nt, M),
            H * nt * M * dk, ELEMENTWISE["softmax"] * H * nt * M),
        Row("train: aggregator", "attn @ v", shp(H, nt, M) + " @ " + shp(H, M, dv), shp(H, nt, dv), H * nt * M * dv),
        Row("train: aggregator", "fc + q, LayerNorm", shp(nt, H * dv), shp(nt, D), nt * H * dv * D,
            (1 + ELEMENTWISE["layernorm"]) * nt * D, 1, H * dv * D + 2 * D),
        Row("train: aggregator", "MLP w_1 + ReLU", shp(nt, D), shp(nt, dinner), nt * D * dinner,
            2 * nt * dinner, 1, D * dinner + dinner),
        Row("train: aggregator", "MLP w_2 + res, LayerNorm", shp(nt, dinner), shp(nt, D), nt * dinner * D,
            (2 + ELEMENTWISE["layernorm"]) * nt * D, 1, dinner * D + D + 2 * D),
    ]
    for t in cfg["tasks"]:
        k = cfg["n_class"]
        train.append(Row("train: heads", f"head {t} Linear", shp(D), shp(k), D * k, k + ELEMENTWISE["softmax"] * k, 1, D * k + k))
    return score, train, act_bytes, n_iter


def ips_figures(cfg):
    score, train, act_bytes_patch, n_iter = ips_rows(cfg)
    s = sum(r.flops for r in score)
    t = sum(r.flops for r in train)
    se = sum(r.elem_total for r in score)
    te = sum(r.elem_total for r in train)
    enc_params = sum(r.params for r in train if r.stage == "train: encoder")
    params = sum(r.params for r in train)
    # Transformer activations at the trained pass are ~ M*D*3 (+ pos) floats
    # per image: negligible beside the encoder, left out.
    act_image = act_bytes_patch * cfg["M"]
    return {
        "rows_score": score,
        "rows_train": train,
        "n_iter": n_iter,
        "score_forward_flops": s,
        "selected_forward_flops": t,
        "forward_flops": s + t,
        "train_flops": s + 3 * t,
        "elementwise_forward": se + te,
        "elementwise_train": se + 3 * te,
        "encoder_flops_per_patch": sum(r.flops for r in train if r.stage == "train: encoder") // cfg["M"],
        "params": params,
        "encoder_params": enc_params,
        "act_bytes_per_patch": act_bytes_patch,
        "act_bytes_per_image": act_image,
        "act_bytes_batch": act_image * cfg["B"],
        "batch": cfg["B"],
    }


# ---------------------------------------------------------------------------
# saccade


def load_config(path):
    with open(path) as f:
        return json.load(f)


def read_checkpoint_meta(path):
    """The `meta` JSON saccade stores in the safetensors header's
    __metadata__ (src/checkpoint.rs: {"format": "saccade-checkpoint-1",
    "meta": "<json>", ...}, meta = {"train": TrainConfig, ...}), and the
    shapes of its `param/*` tensors."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    info = header.get("__metadata__") or {}
    if info.get("format") != "saccade-checkpoint-1":
        sys.exit(f"{path}: no saccade-checkpoint-1 metadata in the safetensors header")
    meta = json.loads(info["meta"])
    shapes = {k[len("param/"):]: v["shape"] for k, v in header.items() if k.startswith("param/")}
    return meta, shapes


def model_config(obj):
    """Accept the checkpoint's meta ({"train": ...}), the `train` object
    (TrainConfig, its `model` = SaccadeConfig) or a bare SaccadeConfig."""
    if "train" in obj and isinstance(obj["train"], dict):
        obj = obj["train"]
    if obj.get("baseline"):
        sys.exit(f"this configuration trains a baseline ({obj['baseline']}), not the saccade model")
    if "model" in obj and isinstance(obj["model"], dict):
        return obj["model"], obj
    if "glimpses" in obj:
        return obj, {}
    sys.exit("not a saccade training configuration (no `model` object, no `glimpses`)")


def tasks_of(m):
    heads = m.get("task_heads") or []
    if not heads:
        return [("class", m["num_classes"], False)]
    return [(t["name"], len(t["class_names"]), bool(t.get("multi_label", False))) for t in heads]


def convstack_rows(stage, cin, side, plan, n, stored):
    rows = []
    for i, (cout, s) in enumerate(plan):
        o = (side - 1) // s + 1
        rows.append(Row(stage, f"{i}.conv 3x3/{s}", shp(cin, side, side), shp(cout, o, o), o * o * cout * cin * 9,
                        (ELEMENTWISE["gn"] + ELEMENTWISE["elu"]) * cout * o * o, n, cout * cin * 9 + 2 * cout))
        stored[0] += 3 * cout * o * o  # conv, GroupNorm and ELU outputs
        cin, side = cout, o
    return rows, cin, side


def saccade_rows(m):
    C, J, T, L = m["channels"], m["proxy_size"], m["glimpses"], m["crop"]
    # The decoder reconstructs the proxy average-pooled by decoder_pool
    # (1 in checkpoints from before the field).
    R = J // m.get("decoder_pool", 1)
    w, E, Hd, f = m["enc_width"], m["embed"], m["hidden"], m["classifier_width"]
    pool = m.get("glimpse_pool", "mean")
    position = bool(m.get("glimpse_position", False))
    rows = []
    stored = [C * J * J]  # fp32 elements kept for backward, per image
    enc, fe, side = convstack_rows("vrnn: proxy encoder", C, J, [(w, 2), (2 * w, 2), (2 * w, 1)], 1, stored)
    rows += enc
    P = side * side
    # phi_x reads the map average-pooled by summary_pool (1 in checkpoints
    # from before the field).
    k = m.get("summary_pool", 1)
    S = (side // k) ** 2
    if k > 1:
        rows.append(Row("vrnn: proxy encoder", f"avg pool {k}x{k}", shp(fe, side, side), shp(fe, side // k, side // k),
                        0, fe * P, 1))
    rows.append(Row("vrnn: proxy encoder", "enc_fc + ELU", shp(fe * S), shp(E), fe * S * E,
                    (1 + ELEMENTWISE["elu"]) * E, 1, fe * S * E + E))
    if m.get("ink_prior"):
        rows.append(Row("vrnn: proxy encoder", "ink prior (cell sums, ln)", shp(C, J, J), shp(P), 0, C * J * J + 2 * P))
    st = "vrnn: per step"

    def lin(name, fin, fout, act_elem=0, n=T):
        return Row(st, name, shp(fin), shp(fout), fin * fout, fout + act_elem, n, fin * fout + fout)

    rows += [
        lin("posterior.0 + ELU", E + Hd, E, ELEMENTWISE["elu"] * E),
        lin("posterior.1", E, 4),
        lin("query", 1 if m.get("fixed_query") else Hd, fe),
        Row(st, "scores [1,F]@[F,P] + softmax", shp(1, fe) + " @ " + shp(fe, P), shp(1, P), fe * P,
            (ELEMENTWISE["softmax"] + 3) * P, T),  # + mask, weighted score sum
        Row(st, "centre [1,P]@[P,2] + atanh", shp(1, P) + " @ " + shp(P, 2), shp(2), 2 * P, 8, T),
        lin("prior.0 + ELU", Hd, E, ELEMENTWISE["elu"] * E),
        lin("prior.1", E, 6),
        Row(st, "reparameterize, KL", shp(3), shp(3), 0, 30, T),
        lin("phi_z + ELU", 3, E, ELEMENTWISE["elu"] * E),
        lin("decoder.0 + ELU", E + Hd, E, ELEMENTWISE["elu"] * E),
        lin("decoder.1 (proxy logits)", E, C * R * R, 4 * C * R * R),  # + BCE with logits
        Row(st, "GRU cell", shp(2 * E) + " , " + shp(Hd), shp(Hd), 3 * Hd * (2 * E + Hd),
            6 * Hd + ELEMENTWISE["gru_gates"] * Hd, T, 3 * Hd * (2 * E + Hd) + 6 * Hd),
    ]
    stored[0] += T * (2 * C * R * R + 6 * E + 6 * Hd + 2 * P)  # decoder logits+probs dominate
    rows.append(Row("crops", "bilinear crop read", shp(C, "H", "W"), shp(C, L, L), 0, BILINEAR_FLOPS * C * L * L, T))
    stored[0] += T * C * L * L
    cls, F, _ = convstack_rows("crop classifier", C, L, [(f, 1), (2 * f, 2), (4 * f, 2), (4 * f, 2)], T, stored)
    rows += cls
    last = cls[-1].shape_out.split("x")
    rows.append(Row("crop classifier", "global avg pool", cls[-1].shape_out, shp(F), 0, int(last[0]) * int(last[1]) * int(last[2]), T))
    ht = "heads"
    if position:
        rows.append(Row(ht, "place Linear(3->F) + tanh", shp(3), shp(F), 3 * F, F + F + 3, T, 3 * F + F))
    if pool == "relevance":
        # A score of each glimpse's features, added to its proxy score; the
        # proxy scores' soft cross-entropy against the weights is O(T).
        rows.append(Row(ht, "relevance Linear(F->1)", shp(F), shp(1), F, 1, T, F + 1))
    if pool in ("attention", "relevance"):
        rows.append(Row(ht, "pool: weighted mean [1,T]@[T,F]", shp(1, T) + " @ " + shp(T, F), shp(F), T * F,
                        ELEMENTWISE["softmax"] * T + 2 * T * F))
        pooled = 2 * F
    elif pool == "max":
        rows.append(Row(ht, "pool: max over T", shp(T, F), shp(F), 0, 2 * T * F))
        pooled = F
    else:
        rows.append(Row(ht, "pool: mean over T", shp(T, F), shp(F), 0, T * F))
        pooled = F
    rows.append(Row(ht, "head.0 + ELU", shp(pooled), shp(F), pooled * F, F + ELEMENTWISE["elu"] * F, 1, pooled * F + F))
    for name, k, multi in tasks_of(m):
        loss = "sigmoid BCE" if multi else "softmax CE"
        rows.append(Row(ht, f"head {name} ({loss})", shp(F), shp(k), F * k, k + ELEMENTWISE["softmax"] * k, 1, F * k + k))
    # VRNN parameters not on a row: posterior/prior second layers etc. are on
    # rows; GRU's are; nothing else holds parameters.
    return rows, stored[0] * 4


def saccade_figures(m, batch):
    rows, act_bytes_image = saccade_rows(m)
    macs_flops = sum(r.flops for r in rows)
    crop_reads = sum(r.elem_total for r in rows if r.stage == "crops")
    elem = sum(r.elem_total for r in rows if r.stage != "crops")
    fwd = macs_flops + crop_reads
    return {
        "rows": rows,
        "matmul_forward_flops": macs_flops,
        "crop_read_flops": crop_reads,
        "forward_flops": fwd,
        "train_flops": 3 * fwd,
        "elementwise_forward": elem,
        "elementwise_train": 3 * elem,
        "params": sum(r.params for r in rows),
        "act_bytes_per_image": act_bytes_image,
        "act_bytes_batch": act_bytes_image * batch,
        "batch": batch,
    }


EXAMPLE = {
    "model": {
        "channels": 1,
        "num_classes": 10,
        "proxy_size": 128,
        "glimpses": 10,
        "crop": 32,
        "scale_min": 0.035,
        "scale_max": 0.06,
        "beta": 0.01,
        "multiplicative": False,
        "fixed_variance": 1e-5,
        "mask_attended": True,
        "policy_warmup": 0,
        "policy_gradient": False,
        "glimpse_pool": "relevance",
        "focus": "peak",
        "glimpse_position": True,
        "ink_prior": True,
        "decoder_pool": 4,
        "summary_pool": 4,
        "fixed_query": True,
        "enc_width": 16,
        "embed": 128,
        "hidden": 128,
        "classifier_width": 16,
        "task_heads": [
            {"name": "majority", "class_names": [str(i) for i in range(10)], "multi_label": False},
            {"name": "max", "class_names": [str(i) for i in range(10)], "multi_label": False},
            {"name": "top", "class_names": [str(i) for i in range(10)], "multi_label": False},
            {"name": "multi", "class_names": [str(i) for i in range(10)], "multi_label": True},
        ],
    },
    "dataset": "megapixel-mnist",
    "epochs": 12,
    "batch_size": 32,
    "lr": 0.001,
    "lr_schedule": "wsd",
    "clip_value": 1.0,
    "clip_norm": 0.0,
    "seed": 0,
    "sizes": [5000, 0, 1000],
}


# ---------------------------------------------------------------------------
# Output


def human(x, unit=""):
    for div, suf in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3f} {suf}{unit}"
    return f"{x:.0f} {unit}"


def print_rows(title, rows):
    print(f"\n{title}")
    hdr = f"{'stage':<22} {'layer':<34} {'in':>22} {'out':>12} {'MACs/call':>13} {'calls':>6} {'FLOPs/image':>14} {'elementwise':>12}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r.stage:<22} {r.name:<34} {r.shape_in:>22} {r.shape_out:>12} {r.macs:>13,} {r.n:>6} {r.flops:>14,} {r.elem_total:>12,}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring for every assumption.")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--config", help="saccade training configuration JSON (the `train` object of a checkpoint's metadata)")
    src.add_argument("--checkpoint", help="saccade .safetensors checkpoint: the configuration is read from its header")
    src.add_argument("--example-config", action="store_true", help="print the example configuration JSON and exit")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    ap.add_argument("--ips-m", type=int, default=IPS_MNIST["M"], help="IPS memory size M (official: 100)")
    ap.add_argument("--ips-i", type=int, default=IPS_MNIST["I"], help="IPS iteration size I (official: 100)")
    ap.add_argument("--batch", type=int, default=IPS_MNIST["B"], help="batch for the activation estimates (IPS official: 16)")
    a = ap.parse_args()
    if a.example_config:
        print(json.dumps(EXAMPLE, indent=1))
        return
    ckpt_shapes = None
    if a.checkpoint:
        meta, ckpt_shapes = read_checkpoint_meta(a.checkpoint)
        source = a.checkpoint
        obj = meta
    elif a.config:
        obj = load_config(a.config)
        source = a.config
    else:
        obj = EXAMPLE
        source = "built-in example (--example-config)"
    m, train = model_config(obj)

    ips_cfg = dict(IPS_MNIST, M=a.ips_m, I=a.ips_i, B=a.batch)
    ips = ips_figures(ips_cfg)
    sac = saccade_figures(m, a.batch)
    ckpt_check = None
    if ckpt_shapes is not None:
        held = sum(math.prod(s) for s in ckpt_shapes.values())
        ckpt_check = {"checkpoint_params": held, "counted_params": sac["params"], "match": held == sac["params"]}

    ratio_fwd = ips["forward_flops"] / sac["forward_flops"]
    ratio_train = ips["train_flops"] / sac["train_flops"]
    if a.json:
        out = {
            "saccade_config_source": source,
            "conventions": "FLOPs = 2 x multiply-adds of convs/linears/matmuls; training = forward + 2x forward backward; "
                           "saccade adds bilinear crop reads (8 FLOPs per sampled value); elementwise ops reported apart",
            "ips": {k: v for k, v in ips.items() if not k.startswith("rows")} | {"config": ips_cfg},
            "saccade": {k: v for k, v in sac.items() if k != "rows"}
            | {"config": {k: m.get(k) for k in ("channels", "proxy_size", "glimpses", "crop", "enc_width", "embed", "hidden",
                                                  "classifier_width", "glimpse_pool", "glimpse_position")},
               "tasks": [{"name": n, "classes": k, "multi_label": ml} for n, k, ml in tasks_of(m)]},
            "ratio_ips_over_saccade": {"forward": ratio_fwd, "train": ratio_train},
        }
        if ckpt_check:
            out["checkpoint_check"] = ckpt_check
        print(json.dumps(out, indent=1))
        return

    print(f"IPS megapixel MNIST (benbergner/ips @ 4c17c1d, config/mnist_config.yml): N={ips_cfg['N']} patches of "
          f"{ips_cfg['patch']}x{ips_cfg['patch']}, M={ips_cfg['M']}, I={ips_cfg['I']}, D={ips_cfg['D']}, "
          f"H={ips_cfg['H']}, D_k=D_v={ips_cfg['D_k']}, D_inner={ips_cfg['D_inner']}, {ips_cfg['n_token']} tokens/tasks")
    print_rows(f"IPS no-grad scoring pass (forward only; {ips_cfg['M']} + {ips['n_iter']}x{ips_cfg['I']} patches encoded, "
               f"{ips['n_iter']} scoring steps over M+I tokens)", ips["rows_score"])
    print_rows(f"IPS trained pass on the M={ips_cfg['M']} selected patches (forward; training adds backward = 2x)",
               ips["rows_train"])
    print(f"\nsaccade configuration: {source}")
    print("  " + ", ".join(f"{k}={m.get(k)}" for k in ("channels", "proxy_size", "glimpses", "crop", "enc_width", "embed",
                                                      "hidden", "classifier_width", "glimpse_pool", "glimpse_position",
                                                      "focus", "ink_prior")))
    print("  tasks: " + ", ".join(f"{n} ({k}{', multi-label' if ml else ''})" for n, k, ml in tasks_of(m)))
    print_rows("saccade forward (training = 3x)", sac["rows"])

    print("\nParameters: IPS {:,} (encoder {:,}); saccade {:,}".format(ips["params"], ips["encoder_params"], sac["params"]))
    if ckpt_check:
        verdict = "match" if ckpt_check["match"] else "MISMATCH: the architecture reading above is off"
        print(f"  checkpoint holds {ckpt_check['checkpoint_params']:,} parameter values: {verdict}")

    print("\nPer image, FLOPs = 2 x multiply-adds (+ saccade's crop reads); elementwise apart")
    w = 16
    print(f"{'':<44} {'IPS':>{w}} {'saccade':>{w}} {'IPS/saccade':>12}")
    line = lambda name, x, y: print(f"{name:<44} {human(x, 'FLOP'):>{w}} {human(y, 'FLOP'):>{w}} {x / y:>12.1f}")
    line("forward (inference)", ips["forward_flops"], sac["forward_flops"])
    print(f"{'  of which IPS scoring pass (900 patches)':<44} {human(ips['score_forward_flops'], 'FLOP'):>{w}}")
    print(f"{'  of which IPS selected M patches + aggreg.':<44} {human(ips['selected_forward_flops'], 'FLOP'):>{w}}")
    print(f"{'  of which saccade crop reads':<44} {'':>{w}} {human(sac['crop_read_flops'], 'FLOP'):>{w}}")
    line("training (IPS: score + 3x selected; sacc. 3x)", ips["train_flops"], sac["train_flops"])
    line("elementwise, training (not in the above)", ips["elementwise_train"], sac["elementwise_train"])
    line("training incl. elementwise", ips["train_flops"] + ips["elementwise_train"],
         sac["train_flops"] + sac["elementwise_train"])
    b = a.batch
    print(f"\nStored activations for backward (fp32, estimate: conv/norm/sum outputs, maxpool indices), batch {b}:")
    print(f"  IPS: {human(ips['act_bytes_per_patch'], 'B')} per patch x M={ips_cfg['M']} = "
          f"{human(ips['act_bytes_per_image'], 'B')} per image; batch {b}: {ips['act_bytes_batch'] / 2**30:.2f} GiB "
          f"(encoder only; transformer and weights negligible; the no-grad pass keeps none)")
    print(f"  saccade: {human(sac['act_bytes_per_image'], 'B')} per image; batch {b}: "
          f"{sac['act_bytes_batch'] / 2**30:.3f} GiB (rough: conv+GN+ELU outputs, crops, per-step decoder logits)")


if __name__ == "__main__":
    main()
