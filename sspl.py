"""SSPL: "Self-Supervised Predictive Learning: A Negative-Free Method for Sound Source Localization in Visual
Scenes", Zengjie Song, Yuxi Wang, Junsong Fan, Tieniu Tan, Zhaoxiang Zhang, CVPR 2022.
Paper: https://arxiv.org/abs/2203.13412    Official code: https://github.com/zjsong/SSPL

Idea: no negatives. Two augmented views of a frame are pooled with the *same* audio-driven attention map, and a
SimSiam predictor learns to predict one view's audio-visual representation from the other's (a stop-gradient
prevents collapse). The attention map, a cosine between the audio and every location, is the localization map. The
predictive coding module (PCM) refines the visual features by predicting the audio feature from them (feedback) and
correcting them with the prediction errors (feedforward).

Equations (paper numbering; S = supplement):
  (1)-(2) f_v = Enc_v(I) (frozen VGG16 conv5_3, 512x14x14),  f_a = Enc_a(a) (frozen VGGish, 128-d)
  (3) S^n(i,j) = cos(f~_a, f_v^n(:,i,j)),  f~_a = g(f_a), g = FC(512)-ReLU-FC(512)
  (4) f_av^n(k) = sum_ij S~^n(i,j) f_v^n(k,i,j)       (5) S~^n = (S^n - min S^n) / (max S^n - min S^n)
  (6) L_NCS(z1, z2) = -cos(Pred(z1), z2),  z^n = MLP(f_av^n)    (8) L = 1/2 L_NCS(z1, SG(z2)) + 1/2 L_NCS(z2, SG(z1))
  PCM (Algorithm S1; layers r1 3x3, r2 7x7, r3 14x14, r0 = f_a, phi = GELU; f~_v = 1x1conv(r_L(T)) replaces f_v):
  (9) p_l(t) = W_{l+1,l}^T r_{l+1}(t)       (10) r_l(t) <- phi((1 - b_l) r_l(t-1) + b_l p_l(t))
  (11) e_{l-1}(t) = r_{l-1}(t) - p_{l-1}(t) (12) r_l(t) <- phi(r_l(t) + a_l W_{l-1,l}^T e_{l-1}(t))

Run:
  python sspl.py --train                       # the synthetic benchmark, cpu preset, with PCM (--no-pcm without)
  python sspl.py --train --seeds 0,1,2         # one run per seed (tabled by eval_cioU.py --table)
  python sspl.py --train --data ROOT --train-split ROOT/splits/flickr_10k.txt --vggish-weights vggish-10086976.pth
  python sspl.py --train --data ROOT --no-pcm --lr-table vggsound ...          # VGG-Sound w/o PCM (Table S1)
  torchrun --nproc_per_node=2 sspl.py --train --data ROOT ...                   # 2 x 128 = 256 (the paper)
  python sspl.py --eval --ckpt runs/<run>/best.pt --pcm-cycles 8                # Fig. 6: another test-time T
  python sspl.py --predict --ckpt runs/<run>/best.pt --image frame.jpg --audio clip.wav --out heat.png
  python sspl.py --predict --ckpt runs/<run>/best.pt --video clip.mp4 --out clip_heat.mp4
  The epoch line's f_av_std: SimSiam's collapse monitor, the mean per-dimension std of the L2-normalised f_av
  (about 1/sqrt(c) when spread out, 0 when collapsed).

Deviations from the paper (P) and the official code (O), one line each (details and measurements: README):
  1. (O) checkpoint selection on a validation split (official: the best epoch by *test* cIoU).
  2. (O) under DDP the gradients are averaged (the official wrapper bypassed DDP's forward); BatchNorm per GPU.
  3. (O) --pcm-cycles at --eval / --predict sets the test-time cycles (Fig. 6); more than trained reuse the last BN.
  4. (O, kept) a_l, b_l per channel under ReLU; f~_a = mean of g over the VGGish patches; waveform min-max normalised.
  5. (P) augmentation: crop + horizontal flip (Table S2's choice, the official transform).
  6. cpu preset (synthetic data): trained small CNNs, 64 channels, 2 PCM cycles, 112 px, 8 epochs; learns on some draws.
  7. (O) test frames are squashed to 224x224 (--test-transform center_crop: official; equal on square frames).
  8. (O) --decode fast: batched decode and augmentation on the device, <= 2 grey levels from --decode pil (exact).
  9. (O) audio shorter than a quarter of the window is an error (official: tiled silently); shorter ones are tiled.
  10. --negatives (beyond the paper): raw S >= 0.5 (--neg-threshold); SLAVC AP / max-F1 and pIA.
  11. (O) CUDA: mixed precision by default (--no-amp: float32, as official); Eq. 3-8 and the front end in float32.
"""
import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C

METHOD = "sspl"

# ----------------------------------------------------------------------------------------------------------
# Config / CLI
# ----------------------------------------------------------------------------------------------------------
PRESETS = {
    # official (Flickr): AdamW wd 1e-4, batch 256; w/ PCM lr1 5e-5 (MLP heads), lr2 2e-5 (rest), 20 epochs;
    # w/o PCM lr1 2e-3, lr2 5e-4, 100 epochs (VGG-Sound w/o PCM: lr1 1e-2, lr2 5e-3)
    "paper": dict(epochs=20, batch_size=256, lr=2e-5, lr_head=5e-5, image_size=224, encoder="vgg",
                  dim_proj=2048, dim_pred=512, pcm_cycles=4, freeze_visual=True),
    "cpu": dict(epochs=8, batch_size=64, lr=5e-4, lr_head=2e-3, image_size=112, encoder="small",
                dim_proj=256, dim_pred=64, pcm_cycles=2, freeze_visual=False),
}
TABLE_S1 = {  # (lr1 = projector/predictor MLPs, lr2 = the rest) per training set, w/ and w/o PCM
    "flickr": {True: (5e-5, 2e-5), False: (2e-3, 5e-4)},
    "vggsound": {True: (5e-5, 2e-5), False: (1e-2, 5e-3)},
}
SR, CLIP_SECONDS = 16000, 3.0
WINDOW = "center_tiled"                # official: a clip under 3 s is tiled, the window centred in the tiling
NEG_THRESHOLD, NEG_SCALE = 0.5, "S cosine in [-1, 1]"           # --negatives: the raw S of view 1


def build_parser():
    p = argparse.ArgumentParser(description="SSPL (CVPR 2022): see the module docstring. The epoch line's f_av_std is "
                                "SimSiam's collapse monitor: the mean per-dimension std of the L2-normalised f_av, "
                                "about 1/sqrt(c) when spread out, 0 when collapsed")
    C.add_standard_args(p)
    p.add_argument("--pcm", action=argparse.BooleanOptionalAction, default=True, help="use the PCM (w/ PCM)")
    p.add_argument("--pcm-cycles", type=int, help="PCM cycles after the initial pass (official 4 = the paper's T 5); "
                   "at --eval/--predict: the test-time cycles (default: as trained)")
    p.add_argument("--lr-head", type=float, help="lr1 of Table S1: projector and predictor MLPs")
    p.add_argument("--lr-table", choices=list(TABLE_S1), default="flickr",
                   help="paper preset: the Table S1 learning rates of this training set (--lr/--lr-head override)")
    p.add_argument("--freeze-visual", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the visual encoder frozen (paper: always; cpu preset: see deviation 6)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (none on a_l, b_l)")
    p.add_argument("--vggish-weights", help="torchvggish state dict (vggish-10086976.pth) for the paper preset")
    p.add_argument("--test-transform", choices=["squash", "center_crop"], default="squash",
                   help="test resize: squash (full-frame boxes stay aligned) or center_crop (official test)")
    p.add_argument("--image-size", type=int, help="input image side (official 224)")
    return p


def synthetic_data(log):          # no --data: the built-in synthetic benchmark, made once by data_prep.py
    import data_prep
    return data_prep.ensure_synthetic(log=log)


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------
def vgg16_conv5_3() -> nn.Sequential:
    """VGG16 `features[:29]`: conv1_1 ... conv5_3 before its ReLU (224 px -> 512 x 14 x 14)."""
    import torchvision
    return torchvision.models.vgg16(weights=None).features[:29]


class VGGish(nn.Module):
    """The AudioSet VGGish: (N, 1, 96, 64) log-mel patch -> (N, 128) (after ReLU; no PCA post-processing). The names of
    the public torchvggish port (features.{0,3,6,8,11,13}, embeddings.{0,2,4}), so its vggish-10086976.pth loads."""

    def __init__(self):
        super().__init__()
        layers, c_in = [], 1
        for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M"):
            layers += [nn.MaxPool2d(2, 2)] if v == "M" else [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=True)]
            c_in = c_in if v == "M" else v
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(nn.Linear(512 * 4 * 6, 4096), nn.ReLU(True), nn.Linear(4096, 4096),
                                        nn.ReLU(True), nn.Linear(4096, 128), nn.ReLU(True))

    def forward(self, x):
        x = self.features(x)                                         # (N, 512, 6, 4)
        return self.embeddings(x.permute(0, 2, 3, 1).reshape(x.shape[0], -1))   # TF's channel-last flattening


def vggish_mel_matrix(n_fft: int = 512, sr: int = 16000, n_mels: int = 64, fmin: float = 125.0,
                      fmax: float = 7500.0) -> np.ndarray:
    """VGGish's mel filterbank (257, 64): HTK mel, triangles on the spectrogram-bin grid, the DC row zeroed."""
    htk = lambda f: 1127.0 * np.log1p(np.asarray(f, np.float64) / 700.0)  # noqa: E731
    bins, edges = htk(np.linspace(0.0, sr / 2.0, n_fft // 2 + 1)), np.linspace(htk(fmin), htk(fmax), n_mels + 2)
    lo, ce, hi = edges[:-2], edges[1:-1], edges[2:]
    m = np.maximum(0.0, np.minimum((bins[:, None] - lo) / (ce - lo), (hi - bins[:, None]) / (hi - ce)))
    m[0, :] = 0.0
    return m


def vggish_examples(wav: torch.Tensor, sr: int = 16000) -> torch.Tensor:
    """VGGish's input: (B, N) 16 kHz -> (B, P, 1, 96, 64) log-mel patches: 25 ms periodic-Hann windows, 10 ms hop, no
    padding, |rfft 512| (magnitude), 64 HTK mel bins 125-7500 Hz, log(mel + 0.01), non-overlapping 96-frame patches
    (the rest dropped; 3 s -> 3 patches). In float64 (as the official numpy), returned in the input's float dtype."""
    x = wav.double()
    frames = x.unfold(-1, 400, 160)                                  # (B, T, 400)
    w = 0.5 - 0.5 * torch.cos(2 * math.pi * torch.arange(400, device=x.device, dtype=torch.float64) / 400)
    mel = torch.fft.rfft(frames * w, n=512, dim=-1).abs() @ torch.from_numpy(vggish_mel_matrix()).to(x.device)
    logmel = torch.log(mel + 0.01)                                   # (B, T, 64)
    n_patch = logmel.shape[1] // 96
    out = logmel[:, :n_patch * 96].reshape(x.shape[0], n_patch, 1, 96, 64)
    return out.to(wav.dtype if wav.is_floating_point() else torch.float32)


def normalize_audio(x):
    """Official per-clip waveform normalisation: 2 (x - min) / (max - min + 1e-3) - 1, (B, N)."""
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    return 2 * (x - lo) / (hi - lo + 1e-3) - 1


class PCM(nn.Module):
    """Predictive coding module (Eq. 9-12, Algorithm S1) as the official PCNet: three c-channel layers r1 (3x3),
    r2 (7x7), r3 (14x14), an audio layer r0 (d_a), per-cycle BatchNorm, a 1x1 output convolution."""

    def __init__(self, c: int = 512, d_a: int = 128, cycles: int = 4):
        super().__init__()
        self.cycles = cycles
        conv_pool = lambda: nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.MaxPool2d(2, 2))  # noqa: E731
        # feedback weights W_{l,l-1}: r1 -> audio prediction (1x1, bias), r2 -> p1 (7 -> 3), r3 -> p2 (14 -> 7)
        self.feedback = nn.ModuleList([nn.Conv2d(c, d_a, 1, bias=True), conv_pool(), conv_pool()])
        # feedforward weights W_{l-1,l}: e0 -> r1 (1x1), e1 -> r2 (3 -> 7), e2 -> r3 (x2 bilinear, 7 -> 14)
        self.feedforward = nn.ModuleList([
            nn.ConvTranspose2d(d_a, c, 1, bias=False),
            nn.ConvTranspose2d(c, c, 3, stride=2, padding=0, bias=False),
            nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                          nn.ConvTranspose2d(c, c, 3, stride=1, padding=1, bias=False))])
        self.out_conv = nn.ConvTranspose2d(c, c, 1, bias=True)          # r_L(T) -> f~_v ("1x1 convolution")
        self.a = nn.ParameterList([nn.Parameter(torch.ones(1, c, 1, 1)) for _ in range(3)])       # a_1..a_3
        self.b = nn.ParameterList([nn.Parameter(torch.full((1, c, 1, 1), 0.5)) for _ in range(3)])  # b_1..b_3
        bn = lambda n: nn.ModuleList([nn.BatchNorm2d(c) for _ in range(n)])  # noqa: E731
        self.bn_init_pred, self.bn_init_err = bn(2), bn(3)
        self.bn_pred, self.bn_err = bn(2 * cycles), bn(3 * cycles)

    def forward(self, f_v, f_a, cycles: int | None = None):
        phi, relu = F.gelu, F.relu
        a1, a2, a3 = (relu(x) for x in self.a)
        b1, b2, b3 = (relu(x) for x in self.b)
        Wf, Wu = self.feedback, self.feedforward

        def audio_error(r1):                                          # e_0 = r_0 - p_0, with r_0 = f_a
            a_hat = phi(Wf[0](r1)).mean((2, 3))                      # p_0 = GAP(phi(W_{1,0}^T r_1))
            return (f_a - a_hat)[:, :, None, None].expand(-1, -1, *r1.shape[-2:])
        # initial pass (t = 0): pure feedback from p_3 = f_v, then the feedforward corrections
        p2 = phi(self.bn_init_pred[1](Wf[2](f_v)))
        p1 = phi(self.bn_init_pred[0](Wf[1](p2)))
        r1 = phi(self.bn_init_err[0](p1 + a1 * Wu[0](audio_error(p1))))
        r2 = phi(self.bn_init_err[1](p2 + a2 * Wu[1](r1 - p1)))
        r3 = phi(self.bn_init_err[2](f_v + a3 * Wu[2](r2 - p2)))
        for t in range(self.cycles if cycles is None else cycles):
            k = min(t, self.cycles - 1)                              # deviation 3: reuse the last cycle's BN
            r3 = phi((1 - b3) * r3 + b3 * f_v)                       # Eq. 10 at the top layer (p_L = f_v, no BN)
            p2 = Wf[2](r3)                                           # Eq. 9
            r2 = phi(self.bn_pred[2 * k + 1]((1 - b2) * r2 + b2 * p2))   # Eq. 10
            p1 = Wf[1](r2)
            r1 = phi(self.bn_pred[2 * k]((1 - b1) * r1 + b1 * p1))
            r1 = phi(self.bn_err[3 * k](r1 + a1 * Wu[0](audio_error(r1))))      # Eq. 11-12
            r2 = phi(self.bn_err[3 * k + 1](r2 + a2 * Wu[1](r1 - p1)))
            r3 = phi(self.bn_err[3 * k + 2](r3 + a3 * Wu[2](r2 - p2)))
        return self.out_conv(r3)                                      # f~_v


class SimSiamHead(nn.Module):
    """Projector MLP (3 layers, BN, last BN without affine) and predictor Pred (bottleneck), as official."""

    def __init__(self, c: int = 512, d: int = 2048, h: int = 512):
        super().__init__()
        self.projector = nn.Sequential(
            nn.Linear(c, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(inplace=True),
            nn.Linear(d, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(inplace=True),
            nn.Linear(d, d, bias=False), nn.BatchNorm1d(d, affine=False))
        self.predictor = nn.Sequential(nn.Linear(d, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(inplace=True),
                                       nn.Linear(h, d))


class SSPL(nn.Module):
    def __init__(self, encoder="vgg", pcm=True, cycles=4, dim_proj=2048, dim_pred=512, freeze_visual=True):
        super().__init__()
        if encoder == "vgg":
            self.enc_v, self.enc_a, c, d_a = vgg16_conv5_3(), VGGish(), 512, 128
            self.enc_v.requires_grad_(False)                          # frozen (official fine_tune=0)
            self.enc_a.requires_grad_(False)
        else:                                                         # cpu preset: trained small CNNs
            w = (16, 32, 64, 64)
            self.enc_v = C.SmallCNN(3, w, strides=(2, 1, 2, 1), final_relu=False)   # 112 px -> 64 x 14 x 14
            self.enc_a = C.SmallCNN(1, w, strides=(2, 2, 2, 2))       # 96 x 64 patch -> 64 x 3 x 2
            c = d_a = 64
            self.enc_v.requires_grad_(not freeze_visual)
        self.frozen = encoder == "vgg"
        self.freeze_visual = freeze_visual or encoder == "vgg"
        self.g = nn.Sequential(nn.Linear(d_a, c), nn.ReLU(inplace=True), nn.Linear(c, c))   # g(.)
        self.pcm = PCM(c, d_a, cycles) if pcm else None
        self.head = SimSiamHead(c, dim_proj, dim_pred)

    def audio(self, wav):
        """(B, N) 16 kHz waveform -> per-clip normalisation -> (B, P, 1, 96, 64) log-mel patches ->
        f~_a = mean_k g(f_a,k) (B, c) and f_a = L2norm(mean_k f_a,k)."""
        with torch.autocast(wav.device.type, enabled=False):       # the log-mel front end in float32 under AMP
            patches = vggish_examples(normalize_audio(wav.to(torch.promote_types(wav.dtype, torch.float32))), SR)
        B, P = patches.shape[:2]
        emb = self.enc_a(patches.flatten(0, 1))
        emb = emb.amax((2, 3)) if emb.dim() == 4 else emb             # small CNN: global max pool
        emb = emb.view(B, P, -1)
        return self.g(emb).mean(1), F.normalize(emb.mean(1), dim=1)

    def visual(self, image, f_a, cycles=None):
        f_v = self.enc_v(image)
        return self.pcm(f_v, f_a, cycles) if self.pcm is not None else f_v

    def forward(self, im1, im2, wav):
        """The training forward: both views with the same audio through every shared module, then Eq. 8."""
        fa_t, f_a = self.audio(wav)
        f_av1 = attention(self.visual(im1, f_a), fa_t)[0]
        f_av2 = attention(self.visual(im2, f_a), fa_t)[0]
        return sspl_loss(self.head, f_av1, f_av2), f_av1

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.enc_a.eval()
        if self.freeze_visual:
            self.enc_v.eval()
        return self


def build_model(args) -> SSPL:
    model = SSPL(args.encoder, args.pcm, args.pcm_cycles, args.dim_proj, args.dim_pred, args.freeze_visual)
    if args.encoder == "vgg" and not args.no_pretrained:
        C.load_weights(model.enc_v, args.weights or "imagenet", "vgg16", prefix="features.")
        if not args.vggish_weights:
            raise C.UserError("the paper preset needs VGGish weights: pass --vggish-weights vggish-10086976.pth "
                              "(the public torchvggish release), or --no-pretrained")
        C.load_weights(model.enc_a, args.vggish_weights)
    return model


# ----------------------------------------------------------------------------------------------------------
# Loss (Eq. 3-8)
# ----------------------------------------------------------------------------------------------------------
def attention(V, fa_tilde):
    """Eq. 3-5: S (B, h, w) cosine map, S~ its per-sample min-max, f_av = sum_ij S~ V (un-normalised V). In float32 or
    wider, also under autocast (half inputs are promoted; float64 stays float64; the + 1e-10 must not round away)."""
    dt = torch.promote_types(torch.promote_types(V.dtype, fa_tilde.dtype), torch.float32)
    with torch.autocast(V.device.type, enabled=False):
        V, fa_tilde = V.to(dt), fa_tilde.to(dt)
        S = torch.einsum("bchw,bc->bhw", F.normalize(V, dim=1), F.normalize(fa_tilde, dim=1))
        flat = S.flatten(1)      # (the minimum taken twice, as in the official code: the same gradient bits)
        S_t = ((flat - flat.amin(1, keepdim=True)) / (flat.amax(1, keepdim=True) - flat.amin(1, keepdim=True) + 1e-10))
        S_t = S_t.view_as(S)
        return torch.einsum("bchw,bhw->bc", V, S_t), S, S_t


def ncs(p, z):
    """Eq. 6 with the stop-gradient of Eq. 8: -cos(p, SG(z)), averaged over the batch, in float32."""
    with torch.autocast(p.device.type, enabled=False):
        return -F.cosine_similarity(p.float(), z.detach().float(), dim=1).mean()


def sspl_loss(head: SimSiamHead, f_av1, f_av2):
    """Eq. 8: L = 1/2 L_NCS(z1, SG(z2)) + 1/2 L_NCS(z2, SG(z1))."""
    z1, z2 = head.projector(f_av1), head.projector(f_av2)
    p1, p2 = head.predictor(z1), head.predictor(z2)
    return 0.5 * ncs(p1, z2) + 0.5 * ncs(p2, z1)


def collapse_std(f):
    """SimSiam's collapse monitor on a representation: mean per-dimension std of the L2-normalised vectors
    (about 1/sqrt(d) when spread out, 0 when collapsed). Measured on f_av: z ends in a non-affine BatchNorm,
    which keeps its per-dimension std at about 1/sqrt(d) whatever happens."""
    return F.normalize(f.detach().float(), dim=1).std(0).mean().item()


# ----------------------------------------------------------------------------------------------------------
# Localization map
# ----------------------------------------------------------------------------------------------------------
def localization_map(model: SSPL, image, wav, cycles=None):
    """The raw cosine map S of Eq. 3 (view 1, before min-max), (B, h, w), as the official test."""
    fa_t, f_a = model.audio(wav)
    return attention(model.visual(image, f_a, cycles), fa_t)[1]


# ----------------------------------------------------------------------------------------------------------
# Train
# ----------------------------------------------------------------------------------------------------------
def make_dataset(args, split_file, train: bool):
    if train:                                            # two independently augmented views of each frame
        return C.av_dataset(args, split_file, "crop_flip", CLIP_SECONDS, WINDOW, SR, views=2)
    return C.av_dataset(args, split_file, args.test_transform, CLIP_SECONDS, WINDOW, SR)


def batch_to_device(batch, device, args, train: bool):
    """A loader batch -> (view 1, view 2, waveforms (B, N)) to train, (image, waveforms) to test, on the device (the
    VGGish front end runs inside SSPL.audio), or None when every sample was skipped."""
    img = C.batch_images(batch, device, args, "crop_flip" if train else args.test_transform, args.image_size,
                         views=2 if train else 1)          # first: it may drop unreadable samples
    return None if img is None else (*(img if train else (img,)), batch["wav"].to(device, non_blocking=True))


def train_step(net, opt, amp, inputs, args):
    """One optimisation step: both views with the same audio through every shared module (mixed precision on
    CUDA), Eq. 8, backward, AdamW step. Returns (loss, f_av of view 1) (f_av feeds the collapse monitor)."""
    im1, im2, wav = inputs
    with amp.autocast():
        loss, f_av1 = net(C.channels_last(im1), C.channels_last(im2), wav)   # through DDP: gradients are averaged
    amp.step(loss.float(), opt)
    return loss, f_av1


def param_groups(model: SSPL, args):
    """Table S1: lr1 for the projector/predictor MLPs, lr2 for the rest; no weight decay on a_l, b_l."""
    head = [p for p in model.head.parameters()]
    ab = [p for n, p in model.named_parameters() if n.startswith(("pcm.a.", "pcm.b."))]
    taken = {id(p) for p in head + ab}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    groups = [{"params": head, "lr": args.lr_head}, {"params": rest, "lr": args.lr}]
    if ab:
        groups.append({"params": ab, "lr": args.lr, "weight_decay": 0.0})
    return groups


def train(args):
    run = C.Run(args, METHOD)                          # preflight, DDP / device, seed, run folder or --resume, log
    run.log(f"SSPL {'w/' if args.pcm else 'w/o'} PCM | data {args.data} | preset {args.preset} | device {run.device} "
            f"x{run.world} | run {run.dir}")
    model = build_model(args).to(run.device)
    opt = torch.optim.AdamW(param_groups(model, args), lr=args.lr, weight_decay=args.weight_decay)
    net, amp = run.prepare(model, opt, model.enc_v)    # resumed state, CUDA habits, DDP
    train_ds, val_ds = make_dataset(args, args.train_split, True), make_dataset(args, args.val_split, False)
    ann = C.load_annotations(args.annotations)
    run.log(f"train {len(train_ds)} clips, val {len(val_ds)}; batch {run.per_proc} x {run.world}; audio "
            f"{CLIP_SECONDS:g} s at {SR} Hz -> 3 VGGish patches of 96x64")
    for epoch in run.epochs():
        net.train()
        losses, stds = [], []
        for batch in run.batches(train_ds, epoch):     # reseeded per epoch: exact resume
            inputs = batch_to_device(batch, run.device, args, True)
            if inputs is not None:
                loss, f_av1 = train_step(net, opt, amp, inputs, args)
                losses.append(loss.item())
                stds.append(collapse_std(f_av1))
        run.end_epoch(epoch, {"loss": losses, "f_av_std": stds},
                      lambda: evaluate(model, val_ds, ann, args, run.device, baselines=False))
    if run.finish():
        run_eval(args, run.device, run.log, run.seconds())


def benchmark(args):
    """--benchmark (common.run_benchmark): a few training steps, timed; writes benchmark.json, never a checkpoint."""
    run = C.Run(args, METHOD)
    model = build_model(args).to(run.device)
    opt = torch.optim.AdamW(param_groups(model, args), lr=args.lr, weight_decay=args.weight_decay)
    net, amp = run.prepare(model, opt, model.enc_v)
    return C.run_benchmark(run, lambda: make_dataset(args, args.train_split, True), batch_to_device, train_step,
                           net, opt, amp)


# ----------------------------------------------------------------------------------------------------------
# Evaluate
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def compute_maps(model, ds, device, args):
    model.eval()
    maps = {}
    for batch in torch.utils.data.DataLoader(ds, min(args.batch_size, 64), num_workers=args.workers,
                                             collate_fn=C.collate_av):
        inputs = batch_to_device(batch, device, args, False)
        if inputs is not None:
            maps.update(zip(batch["ids"], localization_map(model, *inputs, args.eval_cycles).cpu().numpy()))
    return maps


def evaluate(model, ds, ann, args, device, baselines=True):
    maps = compute_maps(model, ds, device, args)
    return dict(C.evaluate_maps(maps, ann, ids=ds.ids, protocol=args.protocol, align_corners=args.align_corners,
                                baselines=baselines), maps=maps)


def load_model(path, args, device):
    path = Path(path) / "best.pt" if Path(path).is_dir() else path
    ck = C.load_checkpoint(path, method=METHOD)             # readable, not another method's
    if "args" not in ck:
        raise C.UserError(f"{path}: not a checkpoint written by sspl.py (the official code released no weights)")
    keys = ("encoder", "pcm", "dim_proj", "dim_pred", "image_size", "preset", "freeze_visual")
    a = C.checkpoint_args(ck, path, METHOD, keys + ("pcm_cycles",))
    args.ckpt_seed = a.get("seed")                   # the training seed, for results.json
    for k in keys:
        setattr(args, k, a[k])
    model = SSPL(args.encoder, args.pcm, a["pcm_cycles"], args.dim_proj, args.dim_pred, args.freeze_visual)
    C.load_state(model, ck.get("model"), path, METHOD)
    return model.to(device).eval()


def run_eval(args, device, log, seconds_train=0.0):
    t0 = time.time()
    model = load_model(args.ckpt, args, device)
    ds, ann = make_dataset(args, args.test_split, False), C.load_annotations(args.annotations)
    res = evaluate(model, ds, ann, args, device)
    swapped = evaluate(model, C.SwapAudio(ds), ann, args, device, baselines=False) if len(ds) > 1 else None
    if args.negatives:
        thr = NEG_THRESHOLD if args.neg_threshold is None else args.neg_threshold
        res["negatives"], res["negatives_maps"] = C.run_negatives(
            lambda d: compute_maps(model, d, device, args), ds, ann, thr, NEG_SCALE, args.align_corners)
    cycles = args.eval_cycles if args.eval_cycles is not None else (model.pcm.cycles if model.pcm else None)
    inter = C.interactive_split(args, lambda a: evaluate(model, make_dataset(a, a.test_split, False), ann, a, device,
                                                         baselines=False))
    return C.save_results(args, METHOD, res, swapped, ann, log, time.time() - t0 + seconds_train, "S (view 1)",
                          {"pcm": bool(args.pcm), "pcm_cycles_test": cycles, "interactive": inter})


@torch.no_grad()
def predict(args, log=print):
    device = C.resolve_device(args.device)
    model = load_model(args.ckpt, args, device)
    maps = lambda img, wav: localization_map(model, img, wav, args.eval_cycles)     # noqa: E731 (B, h, w)
    if args.video:                                     # the test's window, centred on each frame
        return C.predict_video(args, maps, (args.test_transform, args.image_size, "bicubic"), (SR, CLIP_SECONDS,
                               WINDOW), device, log)
    img = C.image_transform(args.test_transform, args.image_size)(C.load_image(args.image))[None].to(device)
    wav, _, _ = C.read_wav_window(args.audio, CLIP_SECONDS, WINDOW, sample_rate=SR)     # the test's window
    heat = maps(img, torch.from_numpy(wav)[None].to(device))
    C.save_overlay_png(args.out or "heat.png", C.denormalize(img[0]), heat[0].cpu().numpy())
    log(f"heat map written to {args.out or 'heat.png'}")


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = C.parse_args(build_parser(), argv)
    args.eval_cycles = None if args.train else args.pcm_cycles     # --pcm-cycles at --eval / --predict: the test's T
    lr1, lr2 = TABLE_S1[args.lr_table][args.pcm]                    # the paper preset: Table S1, official epochs
    presets = dict(PRESETS, paper=dict(PRESETS["paper"], lr_head=lr1, lr=lr2, epochs=20 if args.pcm else 100))
    C.setup(args, presets, synthetic_data, protocol="abs0.5", align_corners=False)   # the official test
    stride = 16 if args.encoder == "vgg" else 8
    if args.pcm and (args.train or args.benchmark) and args.image_size // stride != 14 and not args.resume:
        raise C.UserError(f"--image-size {args.image_size}: the PCM works on a 14x14 feature map, so the "
                          f"{args.encoder} encoder needs --image-size {14 * stride} (or --no-pcm)")
    if args.predict:
        return predict(args)
    if args.benchmark:
        return benchmark(args)
    if args.train:
        return C.train_seeds(args, train) if args.seeds else train(args)
    return run_eval(args, C.resolve_device(args.device), C.RunLog())


if __name__ == "__main__":
    C.run_cli(main)
