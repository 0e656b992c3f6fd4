"""CSOL: "Class-aware Sounding Objects Localization via Audiovisual Correspondence", Di Hu, Yake Wei, Rui Qian,
Weiyao Lin, Ruihua Song, Ji-Rong Wen, IEEE TPAMI 2021 (extends "Discriminative Sounding Objects Localization via
Self-supervised Audiovisual Matching", NeurIPS 2020).
Paper: https://arxiv.org/abs/2112.11749    Official code: https://github.com/GeWu-Lab/CSOL_TPAMI2021

Idea: two stages. Stage one learns, on single-source clips, where a sound comes from (audio-visual matching with a
sigmoid map), pools the visual features inside the sounding area into object representations, clusters them into an
object dictionary (one key per pseudo category) and trains audio and visual classifiers on the cluster labels. Stage
two, on "cocktail-party" clips with several sounding and silent objects, lights up the objects of every category with
the dictionary keys, keeps those inside the sounding area, and aligns their category distribution with the one the
stage-one audio classifier predicts from the mixed sound.

Equations (paper numbering):
  (1) l = sigmoid(conv1x1(cos(g(a), f(v))))              (2) L_loc = BCE(y_match, GMP(l(g(a_i), f(v_j))))
  (3) o_i = sum_mn f(v_i)(m,n) l_i(m,n) / sum_mn l_i(m,n)    (4)-(5) L_clu = sum_i min_y ||o_i - D^T y_i||^2 (k-means)
  (6) L_cls = CE(y*, h_a(a)) + CE(y*, h_v(v))            (7) m_i^k = d_k . f(v_i^c)    (8) s_i^k = m_i^k o l_i
  (9) p_v = softmax([GAP(s^1) ... GAP(s^K)])           (10) p_a = softmax(h_a(g(a^c)))  (the frozen stage-one model)
  (11) L_c = KL(p_v || p_a)     (12) L_2 = L_c + lambda L_loc     (13) S(m,n) = softmax_k s^k(m,n)

Run:
  python csol_classaware.py --train                 # synthetic benchmark: stage one on the single-source splits,
                                                    # stage two on the cocktail splits (cpu preset)
  python csol_classaware.py --train --stage 1 ...   # or --stage 2 --ckpt <stage-one run>/stage1.pt
  python csol_classaware.py --train --seeds 0,1,2   # one run per seed (tabled by eval_cioU.py --table)
  python csol_classaware.py --train --data ROOT --clusters 11 --cocktail-train-split ROOT/splits/synthetic_train.txt
  python csol_classaware.py --eval --ckpt runs/<run>/stage2.pt [--data ROOT]
  python csol_classaware.py --predict --ckpt runs/<run>/stage2.pt --image frame.jpg --audio clip.wav --out heat.png
  python csol_classaware.py --predict --ckpt runs/<run>/stage2.pt --video clip.mp4 --out clip_heat.mp4

Deviations from the paper (P) and the official code (O), one line each (details and measurements: README):
  1. (O) clusters -> classes by an exact optimum (Hungarian) on the labelled validation clips (official: random trials).
  2. (O) defaults follow the official code: masked pooling (--obj-pool paper: Eq. 3), linear heads, x3 softmax at test.
  3. (P) the KL is the paper's KL(p_v || p_a), batch mean: about K times the official (--kl official: KLDivLoss).
  4. (O) the official scripts crash as shipped (a `cluster` keyword, K fixed to 11, ...): rebuilt, K a parameter.
  5. (O) NSA on the class maps of the silent classes (official: on clusters; equal when K = the number of classes).
  6. (O) checkpoints: stage1_best.pt (best validation localization) and stage1.pt (last, with the dictionary).
  7. cpu preset (synthetic data): small CNNs (112 px -> 14x14), K = 6 classes, 8 + 6 epochs, one classification pass.
  8. (O) the class-map affine starts at the identity (official: alpha ~ U(-1, 1), which can invert the maps).
  9. (O) one process only (official: DataParallel); under torchrun it stops with one line.
  10. (O) negatives by rolling the batch (official: a separately loaded frame of another video).
  11. (O) --decode fast: batched decode, bilinear resize and jitter on the device, <= 2 grey levels from --decode pil.
  12. --negatives (beyond the paper): raw l >= 0.5 (--neg-threshold); SLAVC AP / max-F1 and pIA.
  13. (O, kept) the official metrics in float32: rel0.1; CIoU@0.3 = share >= 0.05*6; no sounding box: NaN.
  14. (O) CUDA: mixed precision by default (--no-amp: float32, as official); losses and maps in float32.
"""
import argparse
import copy
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C

METHOD = "csol_classaware"

# ----------------------------------------------------------------------------------------------------------
# Config / CLI
# ----------------------------------------------------------------------------------------------------------
PRESETS = {
    # official (MUSIC): Adam 1e-4 wd 1e-4, batch 32 pairs, 15 stage-one epochs (3 classification passes each,
    # heads Adam 1e-3), K = 11, 5 stage-two epochs, lambda 0.5
    "paper": dict(epochs=15, epochs2=5, batch_size=32, lr=1e-4, image_size=224, encoder="resnet18",
                  clusters=11, class_iter=3),
    "cpu": dict(epochs=8, epochs2=6, batch_size=32, lr=5e-4, image_size=112, encoder="small",
                clusters=6, class_iter=1),
}
SR, CLIP_SECONDS = 16000, 1.0
NEG_THRESHOLD, NEG_SCALE = 0.5, "l sigmoid in [0, 1]"           # --negatives: the raw l of Eq. 1
RESIZE = "bilinear"                    # official: torchvision's default Resize interpolation (PIL bilinear)


def build_parser():
    p = argparse.ArgumentParser(description="CSOL (TPAMI 2021): see the module docstring")
    C.add_standard_args(p)
    p.add_argument("--stage", choices=["1", "2", "both"], default="both", help="which stage(s) --train runs")
    p.add_argument("--epochs2", type=int, help="stage-two epochs (official 5)")
    p.add_argument("--clusters", type=int, help="K, dictionary size (>= number of classes; official 11 on MUSIC)")
    p.add_argument("--class-iter", type=int, help="classification passes per stage-one epoch (official 3)")
    p.add_argument("--mask-threshold", type=float, default=0.05, help="l > this marks the object area (official)")
    p.add_argument("--obj-pool", choices=["official", "paper"], default="official", help="object feature pooling")
    p.add_argument("--no-obj-affine", action="store_true", help="drop the official scalar affine on class maps")
    p.add_argument("--kl", choices=["paper", "official"], default="paper", help="Eq. 11 direction / reduction")
    p.add_argument("--lam", type=float, default=0.5, help="lambda of Eq. 12 (official 0.5)")
    p.add_argument("--map-temp", type=float, default=3.0,
                   help="factor before the softmax of Eq. 13 at test (official 3)")
    p.add_argument("--cocktail-train-split", help="stage-two training ids (default ROOT/splits/cocktail_train.txt)")
    p.add_argument("--cocktail-val-split", help="stage-two validation ids (default ROOT/splits/cocktail_val.txt)")
    p.add_argument("--cocktail-test-split", help="class-aware test ids (default ROOT/splits/cocktail_test.txt)")
    p.add_argument("--image-size", type=int, help="input image side (official 224)")
    return p


def synthetic_data(log):          # no --data: the built-in synthetic benchmark, made once by data_prep.py
    import data_prep
    return data_prep.ensure_synthetic(log=log)


# ----------------------------------------------------------------------------------------------------------
# Model (the audio front end first)
# ----------------------------------------------------------------------------------------------------------
def slaney_mel_matrix(n_fft: int, sr: int, n_mels: int) -> np.ndarray:
    """librosa.filters.mel's defaults (Slaney mel scale and area normalisation, 0 to sr / 2): (n_fft//2+1, n_mels)."""
    f_sp, logstep = 200.0 / 3, np.log(6.4) / 27.0          # linear below 1 kHz (15 mel), logarithmic above
    hz2mel = lambda f: np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / logstep, f / f_sp)  # noqa
    mel2hz = lambda m: np.where(m >= 15.0, 1000.0 * np.exp(logstep * (m - 15.0)), f_sp * m)                    # noqa
    mel_f = mel2hz(np.linspace(hz2mel(0.0), hz2mel(sr / 2.0), n_mels + 2))
    ramps = mel_f[:, None] - np.linspace(0, sr / 2.0, n_fft // 2 + 1)[None, :]
    fdiff = np.diff(mel_f)
    w = np.maximum(0, np.minimum(-ramps[:-2] / fdiff[:-1, None], ramps[2:] / fdiff[1:, None]))
    return (w * (2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))[:, None]).T


def csol_log_mel(wav: torch.Tensor, sr: int = 16000) -> torch.Tensor:
    """(B, N) -> (B, 1, 1 + N // 80, 64) (1 s at 16 kHz -> 201x64): STFT n_fft 160, hop 80, periodic Hann, centred
    with zero padding; 64 Slaney mel bins on the *magnitude* (librosa melspectrogram(S=|STFT|)); power_to_db (amin
    1e-10) with the top_db=80 floor per clip. In float64 (in float32 the bins near the floor are rounding noise),
    returned in the input's float dtype."""
    x = wav.double()
    w = torch.hann_window(160, periodic=True, dtype=torch.float64, device=x.device)
    spec = torch.stft(x, n_fft=160, hop_length=80, win_length=160, window=w, center=True, pad_mode="constant",
                      return_complex=True).abs()                   # (B, 81, T)
    mel = torch.einsum("fm,bft->btm", torch.from_numpy(slaney_mel_matrix(160, sr, 64)).to(x.device), spec)
    db = 10.0 * torch.log10(mel.clamp_min(1e-10))
    db = torch.maximum(db, db.amax(dim=(1, 2), keepdim=True) - 80.0)
    return db.unsqueeze(1).to(wav.dtype if wav.is_floating_point() else torch.float32)


class LocationNet(nn.Module):
    """Trunks f (visual, 14x14) and g (audio), projections to 128-d, the map l of Eq. 1, the classification heads
    h_v, h_a (Eq. 6) and, in stage two, the dictionary D (Eq. 7) with the official scalar affine."""

    def __init__(self, encoder="resnet18", K=11):
        super().__init__()
        if encoder == "resnet18":
            self.imgnet, self.audnet, c = C.ResNet18Trunk(3, stride=16), C.ResNet18Trunk(1, stride=16), 512
        else:
            self.imgnet, self.audnet = C.SmallCNN(3, strides=(2, 1, 2, 1)), C.SmallCNN(1, strides=(2, 2, 2, 2))
            c = self.imgnet.out_channels
        self.conv_v = nn.Sequential(nn.Conv2d(c, 128, 1), nn.ReLU(inplace=True), nn.Conv2d(128, 128, 1))
        self.fc_a = nn.Sequential(nn.Linear(c, 128), nn.ReLU(inplace=True), nn.Linear(128, 128))
        self.conv_av = nn.Conv2d(1, 1, 1, bias=False)
        self.conv_av.weight.data.fill_(5.0)                               # official init: l = sigmoid(5 cos)
        self.h_v, self.h_a = nn.Linear(c, K), nn.Linear(c, K)
        self.obj_affine = nn.Conv3d(1, 1, 1)                              # official obj_conv: alpha * m + beta
        nn.init.ones_(self.obj_affine.weight)                             # deviation 7: start at the identity
        nn.init.zeros_(self.obj_affine.bias)
        self.register_buffer("D", torch.zeros(K, c))                      # the dictionary (set after stage one)
        self.channels = c
        for m in self.audnet.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def reset_heads(self, K):
        """Official: fresh single-layer heads (N(0, 0.01), bias 0) every stage-one epoch."""
        dev = self.D.device
        self.h_v, self.h_a = nn.Linear(self.channels, K).to(dev), nn.Linear(self.channels, K).to(dev)
        for h in (self.h_v, self.h_a):
            nn.init.normal_(h.weight, 0, 0.01)
            nn.init.zeros_(h.bias)

    def features(self, image, spec):
        v_fea = self.imgnet(image)                                        # f(v), (B, c, h, w)
        a_fea = self.audnet(spec).amax((2, 3))                            # g's trunk + global max pool, (B, c)
        return v_fea, a_fea

    def loc_map(self, v_fea, a_fea):
        """Eq. 1: l = sigmoid(w * cos(g(a), f(v))) with the 1x1 conv w (B, h, w); the map in float32 or wider."""
        v = F.normalize(self.conv_v(v_fea), dim=1)
        a = F.normalize(self.fc_a(a_fea), dim=1)
        dt = torch.promote_types(v.dtype, torch.float32)
        with torch.autocast(v.device.type, enabled=False):
            cos = torch.einsum("bchw,bc->bhw", v.to(dt), a.to(dt))[:, None]
            return torch.sigmoid(F.conv2d(cos, self.conv_av.weight.to(dt)))[:, 0]


def build_model(args) -> LocationNet:
    model = LocationNet(args.encoder, args.clusters)
    if args.encoder == "resnet18" and not args.no_pretrained:
        C.load_weights(model.imgnet, args.weights or "imagenet", "resnet18")
    return model


# ----------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------
def stage1_loc_loss(model, v_fea, a_fea):
    """Eq. 2 with one mismatched image per audio (the previous clip of the batch, v rolled by one; deviation 9):
    BCE on GMP(l) over 2B pairs."""
    B = v_fea.shape[0]
    l_pos = model.loc_map(v_fea, a_fea)
    l_neg = model.loc_map(v_fea.roll(1, 0), a_fea)
    gmp = torch.cat([l_pos.flatten(1).amax(1), l_neg.flatten(1).amax(1)])
    y = torch.cat([torch.ones(B), torch.zeros(B)]).to(gmp)
    return F.binary_cross_entropy(gmp.float().clamp(1e-6, 1 - 1e-6), y)


def object_features(v_fea, l, threshold=0.05, pool="official"):
    """Eq. 3. official: m = dilate(l > threshold) (4-neighbour cross, interior pixels), o = sum(f * m) / (H W);
    paper: o = sum(f * l) / sum(l). v_fea (B, c, h, w), l (B, h, w) -> (B, c)."""
    if pool == "paper":
        return (v_fea * l[:, None]).sum((2, 3)) / l.sum((1, 2))[:, None].clamp_min(1e-12)
    m = (l > threshold).float()
    grown = m.clone()
    inner = m[:, 1:-1, 1:-1] > 0                                          # official: only non-border pixels spread
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        grown[:, 1 + dy:m.shape[1] - 1 + dy, 1 + dx:m.shape[2] - 1 + dx][inner] = 1.0
    return (v_fea * grown[:, None]).sum((2, 3)) / (m.shape[1] * m.shape[2])


def build_dictionary(obj_feats: np.ndarray, K: int, seed: int = 0):
    """Eq. 4-5 by k-means on the L2-normalised object features; D = per-cluster mean of the raw features (official).
    Returns (D (K, c), labels). An empty cluster keeps a zero key."""
    from sklearn.cluster import KMeans
    x = obj_feats / np.maximum(np.linalg.norm(obj_feats, axis=1, keepdims=True), 1e-12)
    km = KMeans(n_clusters=K, n_init=10, random_state=seed).fit(x)
    D = np.stack([obj_feats[km.labels_ == k].mean(0) if (km.labels_ == k).any() else np.zeros(obj_feats.shape[1])
                  for k in range(K)])
    return D.astype(np.float32), km.labels_, km


def class_maps(model, v_fea, l, affine=True):
    """Eq. 7-8: m^k = d_k . f(v) (raw features, raw keys), optional official affine, s^k = m^k o l -> (B, K, h, w).
    Computed in float32 or wider (half inputs are promoted; float64 stays float64)."""
    dt = torch.promote_types(torch.promote_types(v_fea.dtype, l.dtype), torch.float32)
    with torch.autocast(v_fea.device.type, enabled=False):
        m = torch.einsum("bchw,kc->bkhw", v_fea.to(dt), model.D.to(dt))
        if affine:                                                        # the 1x1x1 Conv3d: alpha * m + beta
            m = F.conv3d(m[:, None], model.obj_affine.weight.to(dt), model.obj_affine.bias.to(dt))[:, 0]
        return m * l.to(dt)[:, None]


def kl_consistency(s, a_logits_fixed, direction="paper"):
    """Eq. 9-11: p_v = softmax(GAP(s)), p_a = softmax(h_a(g(a))) of the frozen stage-one model.
    paper: KL(p_v || p_a) summed over K, mean over the batch; official: KLDivLoss(log p_v, p_a), i.e.
    KL(p_a || p_v) averaged over all B*K elements."""
    log_pv = F.log_softmax(s.mean((2, 3)), dim=1)                         # Eq. 9
    log_pa = F.log_softmax(a_logits_fixed, dim=1)                         # Eq. 10 (temperature 1)
    if direction == "official":
        return (log_pa.exp() * (log_pa - log_pv)).mean()
    return (log_pv.exp() * (log_pv - log_pa)).sum(1).mean()


def stage2_loc_loss(model, v_fea, a_fea):
    """Official stage-two L_loc: positives GMP(l(a_i, v_i)) -> 1; negatives: the four 2x2-quadrant maxima of
    l(a_i, v_j) on another grid -> 0; 0.5 (BCE_pos + BCE_neg)."""
    l_pos = model.loc_map(v_fea, a_fea).flatten(1).amax(1)
    l_neg = F.adaptive_max_pool2d(model.loc_map(v_fea.roll(1, 0), a_fea)[:, None], 2).flatten()
    eps = 1e-6
    return 0.5 * (F.binary_cross_entropy(l_pos.float().clamp(eps, 1 - eps), torch.ones_like(l_pos).float())
                  + F.binary_cross_entropy(l_neg.float().clamp(eps, 1 - eps), torch.zeros_like(l_neg).float()))


# ----------------------------------------------------------------------------------------------------------
# Localization maps
# ----------------------------------------------------------------------------------------------------------
def final_maps(s, temp=3.0):
    """Eq. 13: per-pixel softmax over the K categories (x temp, official 3 at test)."""
    return torch.softmax(temp * s, dim=1)


def hungarian_assign(label2cluster: np.ndarray) -> np.ndarray:
    """Exact optimum of the official matching objective: every cluster j gets one class, every class >= 1 cluster,
    maximising sum_j L[class(j), j] with L[i, j] = P(cluster j | class i). Hungarian on a K x K matrix: C mandatory
    class columns plus K - C free columns worth max_i L[i, j]. Returns class index per cluster (K,)."""
    from scipy.optimize import linear_sum_assignment
    Cn, K = label2cluster.shape
    if K < Cn:
        raise C.UserError(f"K = {K} clusters cannot cover {Cn} classes; use --clusters >= {Cn}")
    M = np.concatenate([label2cluster.T, np.repeat(label2cluster.max(0)[:, None], K - Cn, 1)], 1)   # (K, K)
    rows, cols = linear_sum_assignment(-M)
    out = np.empty(K, int)
    for j, c in zip(rows, cols):
        out[j] = c if c < Cn else int(np.argmax(label2cluster[:, j]))
    return out


# ----------------------------------------------------------------------------------------------------------
# Train
# ----------------------------------------------------------------------------------------------------------
def make_dataset(args, split_file, train: bool):
    return C.av_dataset(args, split_file, "csol_train" if train else "squash", CLIP_SECONDS, "center", SR,
                        interpolation=RESIZE)


def batch_to_device(batch, device, args, train: bool):
    """A loader batch -> (images (B, 3, S, S), log-mels (B, 1, 201, 64)) on the device, or None when every sample was
    skipped. --decode fast decodes and augments the frames here (csol_train to train, squash to test)."""
    img = C.batch_images(batch, device, args, "csol_train" if train else "squash", args.image_size, RESIZE)
    return None if img is None else (img, csol_log_mel(batch["wav"].to(device, non_blocking=True), SR))


def train_step(model, opt, amp, inputs, args):
    """One stage-one localization step (Eq. 2; stage one is what the paper preset trains most: 15 epochs, against
    5 of stage two): trunks under mixed precision on CUDA, the map and the BCE in float32, backward, Adam step.
    Returns the loss. (Stage one's classification passes and stage two have their own steps in their loops.)"""
    img, spec = inputs
    with amp.autocast():
        v_fea, a_fea = model.features(C.channels_last(img), spec)
    loss = stage1_loc_loss(model, v_fea.float(), a_fea.float())         # Eq. 2
    amp.step(loss, opt)
    return loss


def loader_for(ds, args, epoch, shuffle=True):
    return torch.utils.data.DataLoader(ds, args.batch_size, shuffle=shuffle, num_workers=args.workers,
                                       drop_last=shuffle and len(ds) >= args.batch_size, collate_fn=C.collate_av,
                                       generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))


@torch.no_grad()
def extract_objects(model, ds, args, device, train: bool):
    """Object features (Eq. 3) of every clip of ds (positive pairs, eval mode; train: with the training
    augmentation, as ds's frames are seen in training) -> (features, their ids)."""
    model.eval()
    feats, ids = [], []
    for batch in loader_for(ds, args, 0, shuffle=False):
        inputs = batch_to_device(batch, device, args, train)
        if inputs is None:
            continue
        v_fea, a_fea = model.features(*inputs)
        feats.append(object_features(v_fea, model.loc_map(v_fea, a_fea), args.mask_threshold, args.obj_pool).cpu())
        ids += batch["ids"]
    return torch.cat(feats).numpy(), ids


def class_labels(ann, ids, names):
    return np.array([names.index(ann[i]["class"]) for i in ids])


def stage1_classes(args, ann) -> list[str]:
    """The annotated classes of stage one's train and val clips (first --limit ids of each split), sorted."""
    ids = C.read_split(args.train_split)[: args.limit] + C.read_split(args.val_split)[: args.limit]
    return sorted({ann[i]["class"] for i in ids if i in ann})


def train_stage1(args, device, log, run_dir, ck=None):
    model = build_model(args).to(device)
    C.gpu_habits(args, device, model.imgnet, [model.imgnet, model.audnet])   # CUDA: cudnn.benchmark, channels_last
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if not n.startswith(("h_v", "h_a"))],
                           lr=args.lr, weight_decay=1e-4)
    amp = C.Amp(device, args.amp)
    start, best, history, assign, nmi = 0, -1.0, [], None, None
    if ck:                                                                # --resume inside stage one
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start, best, history, nmi = ck["epoch"], ck["best"], ck["history"], ck["nmi"]
        assign = None if ck["assignment"] is None else np.array(ck["assignment"])
        log(f"resumed stage one at epoch {start}")
    train_ds, val_ds = make_dataset(args, args.train_split, True), make_dataset(args, args.val_split, False)
    ann = C.load_annotations(args.annotations)
    names = stage1_classes(args, ann)
    log(f"stage one: {len(train_ds)} single-source clips, val {len(val_ds)}; K = {args.clusters}; audio 1 s -> "
        f"log-mel {tuple(csol_log_mel(torch.zeros(1, SR)).shape[2:])}")
    t0 = time.time()
    for epoch in range(start, args.epochs):
        C.seed_everything(args.seed * 1000 + epoch)
        model.train()
        tot, n = 0.0, 0
        for step, batch in enumerate(C.progress(loader_for(train_ds, args, epoch), f"stage 1 loc {epoch + 1}")):
            if args.max_steps and step >= args.max_steps:
                break
            inputs = batch_to_device(batch, device, args, True)
            if inputs is None:                                            # every sample skipped (--skip-bad)
                continue
            loss = train_step(model, opt, amp, inputs, args)              # Eq. 2
            tot, n = tot + loss.item(), n + 1
        if epoch >= 1:                                                    # official: cluster + classify from epoch 1
            feats, feat_ids = extract_objects(model, train_ds, args, device, True)
            D, labels, km = build_dictionary(feats, args.clusters, args.seed)   # Eq. 4-5
            model.D.copy_(torch.from_numpy(D))
            val_feats, val_ids = extract_objects(model, val_ds, args, device, False)
            val_pseudo = km.predict(_l2(val_feats))
            assign, nmi = match_clusters(class_labels(ann, val_ids, names), val_pseudo, len(names), args.clusters)
            model.reset_heads(args.clusters)
            heads = torch.optim.Adam(list(model.h_v.parameters()) + list(model.h_a.parameters()), lr=1e-3,
                                     weight_decay=1e-4)
            lab = dict(zip(feat_ids, labels.tolist()))
            for it in range(args.class_iter):                             # Eq. 6 on the pseudo labels
                model.train()
                for step, batch in enumerate(loader_for(train_ds, args, epoch * 10 + it + 1)):
                    if args.max_steps and step >= args.max_steps:
                        break
                    inputs = batch_to_device(batch, device, args, True)
                    if inputs is None:
                        continue
                    img, spec = inputs
                    y = torch.tensor([lab[i] for i in batch["ids"]], device=device)
                    with amp.autocast():
                        v_fea, a_fea = model.features(C.channels_last(img), spec)
                    v_fea, a_fea = v_fea.float(), a_fea.float()
                    loss = F.cross_entropy(model.h_v(v_fea.mean((2, 3))), y) + F.cross_entropy(model.h_a(a_fea), y)
                    amp.step(loss, opt, heads)
        res = evaluate_single(model, val_ds, ann, args, device, baselines=False)
        score = res["test"]["ciou@0.5"]
        history.append({"epoch": epoch + 1, "loss": tot / max(n, 1), "val": res["test"], "nmi": nmi})
        log(f"stage 1 epoch {epoch + 1}/{args.epochs} L_loc {tot / max(n, 1):.4f} | val {C.fmt_metrics(res['test'])} "
            f"({res['protocol']}, N={res['n']})" + (f" | NMI {nmi:.3f}" if epoch >= 1 else "") +
            f" | {time.time() - t0:.0f}s")
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                 "best": max(best, score), "history": history, "args": vars(args), "classes": names, "stage": 1,
                 "assignment": None if assign is None else assign.tolist(), "nmi": nmi}
        if score >= best:
            best = score
            C.save_checkpoint(run_dir / "stage1_best.pt", state)
        C.save_checkpoint(run_dir / "stage1.pt", state)
    return model


def _l2(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def nmi_score(y_true, y_pred):
    from sklearn.metrics import normalized_mutual_info_score
    return float(normalized_mutual_info_score(y_true, y_pred))


def train_stage2(args, device, log, run_dir, model, stage1_info, ck=None):
    fixed = copy.deepcopy(model).eval().requires_grad_(False)            # the frozen stage-one audio model (Eq. 10)
    C.gpu_habits(args, device, model.imgnet, [model.imgnet, model.audnet])   # after the copy: fixed stays uncompiled
    C.gpu_habits(args, device, fixed.imgnet)
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if not n.startswith(("h_v", "h_a"))],
                           lr=args.lr, weight_decay=1e-4)
    amp = C.Amp(device, args.amp)
    start, history = 0, []
    if ck:                                                                # --resume inside stage two
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start, history = ck["epoch"], ck["history"]
        log(f"resumed stage two at epoch {start}")
    train_ds = make_dataset(args, args.cocktail_train_split, True)
    log(f"stage two: {len(train_ds)} cocktail clips; KL {args.kl}; lambda {args.lam}")
    t0 = time.time()
    for epoch in range(start, args.epochs2):
        C.seed_everything(args.seed * 1000 + 500 + epoch)
        model.train()
        tot = totc = 0.0
        n = 0
        for step, batch in enumerate(C.progress(loader_for(train_ds, args, 500 + epoch), f"stage 2 {epoch + 1}")):
            if args.max_steps and step >= args.max_steps:
                break
            inputs = batch_to_device(batch, device, args, True)
            if inputs is None:                                            # every sample skipped (--skip-bad)
                continue
            img, spec = inputs
            img = C.channels_last(img)
            with amp.autocast():                                          # trunks in mixed precision on CUDA
                v_fea, a_fea = model.features(img, spec)
            v_fea, a_fea = v_fea.float(), a_fea.float()
            s = class_maps(model, v_fea, model.loc_map(v_fea, a_fea), not args.no_obj_affine)   # Eq. 7-8
            with torch.no_grad():
                with amp.autocast():
                    a_fixed = fixed.features(img, spec)[1]
                a_logits = fixed.h_a(a_fixed.float())
            L_c = kl_consistency(s, a_logits, args.kl)                    # Eq. 9-11
            loss = L_c + args.lam * stage2_loc_loss(model, v_fea, a_fea)  # Eq. 12
            amp.step(loss, opt)
            tot, totc, n = tot + loss.item(), totc + L_c.item(), n + 1
        history.append({"epoch": epoch + 1, "loss": tot / max(n, 1), "L_c": totc / max(n, 1)})
        log(f"stage 2 epoch {epoch + 1}/{args.epochs2} L2 {tot / max(n, 1):.4f} L_c {totc / max(n, 1):.4f} | "
            f"{time.time() - t0:.0f}s")
        C.save_checkpoint(run_dir / "stage2.pt", {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                                  "epoch": epoch + 1, "history": history,
                                                  "args": vars(args), "stage": 2, **stage1_info})
    return model


def train(args):
    """Both stages (or --stage 1 / 2). --resume RUN continues the run in RUN: stage one from its last epoch, or
    stage two from its last epoch (the frozen audio model of Eq. 10 is the finished stage one, reloaded)."""
    if args.stage == "2" and not (args.ckpt or args.resume):
        raise C.UserError("--stage 2 needs --ckpt <stage-one run folder or stage1.pt>")
    resume_ck = stage1_ck = None
    if args.resume:                                   # the settings come from the run's latest checkpoint
        rd = C.run_folder(args.resume)
        resume_ck = rd / "stage2.pt" if (rd / "stage2.pt").is_file() else rd / "stage1.pt"
    elif args.stage == "2":
        stage1_ck = Path(args.ckpt) / "stage1.pt" if Path(args.ckpt).is_dir() else Path(args.ckpt)
        if stage1_ck.is_file() and C.load_checkpoint(stage1_ck, METHOD).get("assignment", 0) is None:
            raise C.UserError(f"{stage1_ck}: no object dictionary (stage one builds it from its second epoch); "
                              f"train stage one with --epochs 2 or more")
    else:
        if args.stage == "both" and args.epochs < 2:
            raise C.UserError(f"--epochs {args.epochs}: stage one builds its object dictionary from its second epoch, "
                              f"which stage two needs; use --epochs 2 or more (or --stage 1)")
        n_cls = len(stage1_classes(args, C.load_annotations(args.annotations)))   # Hungarian: a cluster per class
        if n_cls > args.clusters:
            raise C.UserError(f"K = {args.clusters} clusters cannot cover the {n_cls} classes of the train/val "
                              f"annotations ({args.annotations}); use --clusters >= {n_cls}")
    splits = (("train_split", "val_split") if args.stage != "2" else ()) + \
        (("cocktail_train_split",) if args.stage != "1" else ()) + ("test_split",) + \
        (("cocktail_test_split",) if Path(args.cocktail_test_split).is_file() else ())
    run = C.Run(args, METHOD, resume=resume_ck, splits=splits, ckpt=stage1_ck,
                annotated=("val_split", "test_split", "cocktail_test_split"), train_key=None, free=("stage",),
                raisable=("epochs2",))                                       # preflight, seed, folder
    device, log, run_dir = run.device, run.log, run.dir
    log(f"CSOL | stages {args.stage} | data {args.data} | preset {args.preset} | device {device} | run {run_dir}")
    t0 = time.time()
    ck1 = C.load_checkpoint(run_dir / "stage1.pt") if args.resume and (run_dir / "stage1.pt").is_file() else None
    if args.stage in ("1", "both") and (ck1 is None or ck1["epoch"] < args.epochs):
        train_stage1(args, device, log, run_dir, ck1)
        ck1 = C.load_checkpoint(run_dir / "stage1.pt")
    elif ck1 is None:                                 # stage two alone (also resumed): its stage-one checkpoint
        if not args.ckpt:
            raise C.UserError("--stage 2 needs --ckpt <stage-one run folder or stage1.pt>")
        ck1 = C.load_checkpoint(Path(args.ckpt) / "stage1.pt" if Path(args.ckpt).is_dir() else args.ckpt)
    if args.stage in ("2", "both"):
        for k in ("encoder", "clusters", "image_size"):                  # the architecture stage one was trained with
            setattr(args, k, ck1["args"][k])
        model = LocationNet(args.encoder, args.clusters).to(device)
        model.load_state_dict(ck1["model"])
        ck2 = C.load_checkpoint(run_dir / "stage2.pt") if args.resume and (run_dir / "stage2.pt").is_file() else None
        info = {k: ck1.get(k) for k in ("classes", "assignment", "nmi")}
        train_stage2(args, device, log, run_dir, model, info, ck2)
    run.lock.close()
    args.ckpt = str(run_dir / ("stage2.pt" if args.stage != "1" else "stage1.pt"))
    args.out = str(run_dir)
    run_eval(args, device, log, seconds_train=time.time() - t0)


def benchmark(args):
    """--benchmark (common.run_benchmark): stage one's localization step (Eq. 2; what the paper preset trains most),
    timed; writes benchmark.json, never a checkpoint."""
    run = C.Run(args, METHOD)
    model = build_model(args).to(run.device)
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if not n.startswith(("h_v", "h_a"))],
                           lr=args.lr, weight_decay=1e-4)
    net, amp = run.prepare(model, opt, model.imgnet, [model.imgnet, model.audnet])
    return C.run_benchmark(run, lambda: make_dataset(args, args.train_split, True), batch_to_device, train_step,
                           net, opt, amp)


# ----------------------------------------------------------------------------------------------------------
# Evaluate
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def compute_outputs(model, ds, args, device, with_classes=False):
    """{id: l} (single-source map) and, with_classes, {id: S (K, h, w)} (Eq. 13)."""
    model.eval()
    loc, cls = {}, {}
    for batch in loader_for(ds, args, 0, shuffle=False):
        inputs = batch_to_device(batch, device, args, False)
        if inputs is None:
            continue
        img, spec, ids = *inputs, batch["ids"]
        v_fea, a_fea = model.features(img, spec)
        l = model.loc_map(v_fea, a_fea)
        S = final_maps(class_maps(model, v_fea, l, not args.no_obj_affine), args.map_temp) if with_classes else None
        for k, vid in enumerate(ids):
            loc[vid] = l[k].cpu().numpy()
            if with_classes:
                cls[vid] = S[k].cpu().numpy()
    return loc, cls


def evaluate_single(model, ds, ann, args, device, baselines=True):
    loc, _ = compute_outputs(model, ds, args, device)
    res = C.evaluate_maps(loc, ann, ids=ds.ids, protocol=args.protocol, align_corners=args.align_corners,
                          baselines=baselines)
    res["maps"] = loc
    return res


def match_clusters(y, pseudo, n_classes, K):
    """Labels y and cluster ids of the (single-source) validation clips -> (cluster->class assignment, NMI).
    Run with the stage-one model right after its clustering (official: stage one's cluster file)."""
    L = np.zeros((n_classes, K))
    for c, k in zip(y, pseudo):
        L[c, k] += 1
    L = L / np.maximum(L.sum(1, keepdims=True), 1)                       # P(cluster | class)
    return hungarian_assign(L), nmi_score(y, pseudo)


def resize_map(m) -> np.ndarray:
    """One map to 224 x 224, bilinear with cv2's half-pixel rule (the official tools.py)."""
    return C.resize_maps(torch.as_tensor(np.asarray(m, np.float32))[None])[0].numpy()


def class_aware_scores(class_maps: dict, sounding: dict, silent, ciou_frac: float = 0.5, nsa_tau: float = 0.2):
    """One cocktail image, as the official eval.py: class_maps {class: 2-D map}, sounding {class: [boxes]}, silent: the
    classes without a sounding box; maps resized in float32 (cv2-style). -> (ciou_n, nsa_n): the mean over sounding
    classes of IoU(map > ciou_frac max(map), boxes) (threshold in float64, compared in float32), NaN without a
    sounding box (np.mean of nothing); the mean over silent classes of the share of pixels <= nsa_tau (or None)."""
    ious = []
    for c, boxes in sounding.items():
        m = resize_map(class_maps[c])
        P = torch.from_numpy(m > np.float32(ciou_frac * float(m.max())))
        ious.append(C.ciou(P, C.ground_truth(torch.from_numpy(C.boxes_to_map(boxes, "union")))).item())
    nsa = [float(np.mean(resize_map(class_maps[c]) <= np.float32(nsa_tau))) for c in silent]
    return (float(np.mean(ious)) if ious else float("nan")), (float(np.mean(nsa)) if nsa else None)


def summarize_class_aware(cious, nsas) -> dict:
    """CIoU@0.3 = share of images whose mean class IoU >= 0.05*6 (eval.py literally: 0.30000000000000004), AUC and
    CIoU@0.5 over the same scores (an image without a sounding box is NaN and fails every threshold, as official),
    the mean class IoU over the images with a sounding box, NSA = the mean silent-area score."""
    s, arr = C.summarize(cious, nan_mean="skip"), np.asarray(cious, np.float64)
    valid = [v for v in nsas if v is not None]
    return {"ciou@0.3": float(np.sum(arr >= 0.05 * 6) / len(arr)) if len(arr) else float("nan"), **s,
            "nsa": float(np.mean(valid)) if valid else float("nan")}


def box_activation(m, box) -> float:
    """Mean of a class map (resized to 224) inside one normalised box."""
    x1, y1, x2, y2 = C.rasterize_box(box)
    return float(resize_map(m)[y1:y2, x1:x2].mean()) if x2 > x1 and y2 > y1 else float("nan")


def class_aware_eval(cls_maps, ann, ids, assign, names, frac=0.5, tau=0.2):
    """CIoU@0.3 / AUC / NSA on cocktail images: class map = sum of its clusters' maps (official for CIoU; for NSA
    see deviation 4). Also the mean
    activation of each object's own class map inside its box, for sounding and for silent in-frame objects (ours:
    NSA counts every silent class, mostly absent ones, so it cannot show whether *visible* silent objects stay dark)."""
    cious, nsas, examples, act_snd, act_sil = [], [], [], [], []
    for vid in ids:
        S = cls_maps[vid]
        per_class = {c: S[assign == i].sum(0) for i, c in enumerate(names) if (assign == i).any()}
        for o in ann[vid]["objects"]:
            if o["class"] in per_class:
                (act_snd if o["sounding"] else act_sil).append(box_activation(per_class[o["class"]], o["bbox"]))
        snd = {}
        for o in ann[vid]["objects"]:
            if o["sounding"]:
                snd.setdefault(o["class"], []).append(o["bbox"])
        silent = [c for c in names if c not in snd]
        ciou_n, nsa_n = class_aware_scores(per_class, snd, silent, frac, tau)
        cious.append(ciou_n)
        nsas.append(nsa_n)
        examples.append(f"{vid}: sounding {sorted(snd)}, silent-in-frame "
                        f"{sorted(o['class'] for o in ann[vid]['objects'] if not o['sounding'])}")
    out = summarize_class_aware(cious, nsas)
    out["act_sounding_box"], out["act_silent_box"] = float(np.nanmean(act_snd)), float(np.nanmean(act_sil))
    return out, examples


def load_model(path, args, device):
    if Path(path).is_dir():                                  # a run folder: its stage2.pt, else its stage1.pt
        path = Path(path) / ("stage2.pt" if (Path(path) / "stage2.pt").is_file() else "stage1.pt")
    ck = C.load_checkpoint(path, method=METHOD)             # readable, not another method's
    a = C.checkpoint_args(ck, path, METHOD, ("encoder", "clusters", "image_size", "preset"))
    args.ckpt_seed = a.get("seed")                   # the training seed, for results.json
    for k in ("encoder", "clusters", "image_size", "preset"):
        setattr(args, k, a[k])
    args.classes = ck.get("classes")
    model = LocationNet(args.encoder, args.clusters)
    C.load_state(model, ck.get("model"), path, METHOD)
    return model.to(device), ck


def run_eval(args, device, log, seconds_train=0.0):
    t0 = time.time()
    model, ck = load_model(args.ckpt, args, device)
    ann = C.load_annotations(args.annotations)
    ds = make_dataset(args, args.test_split, False)
    res = evaluate_single(model, ds, ann, args, device)
    swapped = evaluate_single(model, C.SwapAudio(ds), ann, args, device, baselines=False) if len(ds) > 1 else None
    if args.negatives:
        thr = NEG_THRESHOLD if args.neg_threshold is None else args.neg_threshold
        res["negatives"], res["negatives_maps"] = C.run_negatives(
            lambda d: compute_outputs(model, d, args, device)[0], ds, ann, thr, NEG_SCALE, args.align_corners)
    extra = {"stage": ck.get("stage"), "interactive": C.interactive_split(args, lambda a: evaluate_single(
        model, make_dataset(a, a.test_split, False), ann, a, device, baselines=False))}
    names = args.classes
    if ck.get("stage") == 2 and names and ck.get("assignment") and Path(args.cocktail_test_split).is_file():
        assign, nmi = np.array(ck["assignment"]), ck["nmi"]
        cdata = make_dataset(args, args.cocktail_test_split, False)
        _, cls = compute_outputs(model, cdata, args, device, with_classes=True)
        ca, examples = class_aware_eval(cls, ann, cdata.ids, assign, names)
        rng = np.random.default_rng(args.seed)                            # baseline: classes assigned at random
        rand = [class_aware_eval(cls, ann, cdata.ids, rng.permutation(assign), names)[0] for _ in range(5)]
        rand_mean = {k: float(np.mean([r[k] for r in rand])) for k in rand[0]}
        _, cls_sw = compute_outputs(model, C.SwapAudio(cdata), args, device, with_classes=True)
        ca_sw, _ = class_aware_eval(cls_sw, ann, cdata.ids, assign, names)
        fmt = lambda m: (f"CIoU@0.3 {100 * m['ciou@0.3']:6.2f}  AUC {100 * m['auc']:6.2f}  "  # noqa: E731
                         f"CIoU@0.5 {100 * m['ciou@0.5']:6.2f}  NSA {100 * m['nsa']:6.2f}  "
                         f"in-box activation sounding {m['act_sounding_box']:.3f} / silent {m['act_silent_box']:.3f}")
        log(f"[class-aware] {len(cdata)} cocktail images; class IoU at 0.5 x max of each class map, NSA: share of "
            f"silent-class pixels <= 0.2; cluster -> class by Hungarian on the labelled val clips after stage one "
            f"(NMI {nmi:.3f}): {dict(zip(range(args.clusters), [names[i] for i in assign]))}")
        log(f"[class-aware] model           {fmt(ca)}")
        log(f"[class-aware] random classes  {fmt(rand_mean)}   (cluster->class permuted, mean of 5)")
        log(f"[class-aware] audio-swapped   {fmt(ca_sw)}")
        for e in examples[:3]:
            log(f"[class-aware] {e}")
        extra["class_aware"] = {"test": ca, "random_assignment": rand_mean, "audio_swapped": ca_sw, "nmi": nmi,
                                "n": len(cdata), "split": str(args.cocktail_test_split),
                                "assignment": [names[i] for i in assign]}
    return C.save_results(args, METHOD, res, swapped, ann, log, time.time() - t0 + seconds_train, "l (Eq. 1)",
                          extra)


@torch.no_grad()
def predict(args, log=print):
    device = C.resolve_device(args.device)
    model, _ = load_model(args.ckpt, args, device)
    model.eval()
    maps = lambda img, wav: model.loc_map(*model.features(img, csol_log_mel(wav, SR)))     # noqa: E731 (B, h, w)
    if args.video:                                     # the test's window, centred on each frame
        return C.predict_video(args, maps, ("squash", args.image_size, RESIZE), (SR, CLIP_SECONDS, "center"),
                               device, log)
    img = C.image_transform("squash", args.image_size, RESIZE)(C.load_image(args.image))[None].to(device)
    wav, _, _ = C.read_wav_window(args.audio, CLIP_SECONDS, "center", sample_rate=SR)     # the test's window
    heat = maps(img, torch.from_numpy(wav)[None].to(device))
    C.save_overlay_png(args.out or "heat.png", C.denormalize(img[0]), heat[0].cpu().numpy())
    log(f"heat map (l, Eq. 1) written to {args.out or 'heat.png'}")


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = C.parse_args(build_parser(), argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise C.UserError("csol_classaware.py runs in one process (k-means needs every object feature in one place); "
                          "launch it with python, not torchrun")
    C.setup(args, PRESETS, synthetic_data, protocol="rel0.1", align_corners=False)   # the official tools.py
    for k in ("train", "val", "test"):
        if getattr(args, f"cocktail_{k}_split") is None and args.data:
            setattr(args, f"cocktail_{k}_split", str(Path(args.data) / "splits" / f"cocktail_{k}.txt"))
    if args.predict:
        return predict(args)
    if args.benchmark:
        return benchmark(args)
    if args.train:
        return C.train_seeds(args, train) if args.seeds else train(args)
    return run_eval(args, C.resolve_device(args.device), C.RunLog())


if __name__ == "__main__":
    C.run_cli(main)
