"""SSPL: "Self-Supervised Predictive Learning: A Negative-Free Method for Sound Source Localization in Visual
Scenes", Zengjie Song, Yuxi Wang, Junsong Fan, Tieniu Tan, Zhaoxiang Zhang, CVPR 2022.
Paper: https://arxiv.org/abs/2203.13412    Official code: https://github.com/zjsong/SSPL

Idea. No negatives at all. Two augmented views of a frame are pooled with the *same* audio-driven attention map
and a SimSiam predictor learns to predict one view's audio-visual representation from the other's (with a
stop-gradient against collapse). The attention map itself, a cosine between the audio and every location, is the
localization map. The predictive coding module (PCM) refines the visual features by iteratively predicting the
audio feature from them (feedback) and correcting them with the prediction errors (feedforward).

Equations implemented (paper numbering; S = supplement):
  (1)-(2) f_v = Enc_v(I) (frozen VGG16 conv5_3, 512x14x14),  f_a = Enc_a(a) (frozen VGGish, 128-d)
  (3) S^n(i,j) = <f~_a, f_v^n(:,i,j)> / (||f~_a|| ||f_v^n(:,i,j)||),   f~_a = g(f_a), g = FC(512)-ReLU-FC(512)
  (4) f_av^n(k) = sum_ij S~^n(i,j) f_v^n(k,i,j)          (5) S~^n = (S^n - min S^n) / (max S^n - min S^n)
  (6) L_NCS(z1, z2) = -<Pred(z1), z2> / (||Pred(z1)|| ||z2||),  z^n = MLP(f_av^n)
  (8) L_SSPL = 1/2 L_NCS(z1, SG(z2)) + 1/2 L_NCS(z2, SG(z1))           (Eq. 7 with the stop-gradient)
  PCM, Algorithm S1, layers r1 (3x3), r2 (7x7), r3 (14x14), r0 = f_a:
  (9)  p_l(t) = W_{l+1,l}^T r_{l+1}(t)               (10) r_l(t) <- phi((1 - b_l) r_l(t-1) + b_l p_l(t))
  (11) e_{l-1}(t) = r_{l-1}(t) - p_{l-1}(t)          (12) r_l(t) <- phi(r_l(t) + a_l W_{l-1,l}^T e_{l-1}(t))
  with p_L = f_v, p_0 = phi(W_{1,0}^T r_1) pooled, phi = GELU; the output f~_v = 1x1conv(r_L(T)) replaces f_v in (3)-(4).

Run:
  python sspl.py --train                       # synthetic benchmark, cpu preset, with PCM (--no-pcm without)
  python sspl.py --train --seeds 0,1,2        # one run per seed, then a mean ± std table of the runs
  python sspl.py --train --data ROOT --train-split ROOT/splits/flickr_10k.txt --vggish-weights vggish-10086976.pth
  python sspl.py --train --data ROOT --no-pcm --lr-table vggsound ...          # VGG-Sound w/o PCM (Table S1)
  torchrun --nproc_per_node=2 sspl.py --train --data ROOT ...                   # 2 x 128 = 256 (paper)
  python sspl.py --eval --ckpt runs/<run>/best.pt --data ROOT --pcm-cycles 8    # Fig. 6: other test-time T
  python sspl.py --predict --ckpt runs/<run>/best.pt --image frame.jpg --audio clip.wav --out heat.png
  python sspl.py --benchmark --data ROOT --preset paper --no-pretrained --workers 8        # samples/s, memory

Deviations (from the paper P, from the official code O), and why:
  1. (O) Checkpoint selection on a validation split (the official code saves the best epoch by *test-set*
     cIoU, so its reported numbers are best-epoch-on-test).
  2. (O) Under DDP the gradients are really averaged across GPUs (the official NetWrapper bypasses DDP's
     forward, so each GPU stepped on its own 128-sample gradient); BatchNorm is per GPU (official: SyncBN).
  3. (O) The number of PCM cycles at test time may differ from training (--pcm-cycles; the paper's Fig. 6):
     cycles beyond the trained ones reuse the last cycle's BatchNorm, fewer cycles use the first ones. The
     official per-cycle BN keys made this impossible without code changes. T counts as the official code does:
     an initial pass plus --pcm-cycles (4 -> the paper's T = 5).
  4. (O, kept) As the official code: a_l, b_l are per-channel (1x512x1x1) under ReLU, init 1.0 / 0.5, no weight
     decay; the top layer's feedback update has no BN; the init pass has BN+GELU on predictions; f~_a is the
     mean of g over the three VGGish patches; the waveform is min-max normalised per clip before the log-mel;
     the map is the raw cosine S of view 1 (before min-max), evaluated with `abs0.5`; a clip shorter than 3 s
     is tiled int(48000 / len) + 1 times and the 3 s window centred in the tiling (start len // 2 - 24000).
  5. (P) Augmentation: crop + horizontal flip (Table S2's choice, the official train transform).
  6. cpu preset (synthetic benchmark only): the small CNNs are *trained* (there are no pretrained weights for
     them), 64 channels instead of 512 (PCM included), 2 PCM cycles after the initial pass instead of 4,
     projector 256 / predictor 64 instead of 2048 / 512, 112 px images, 8 epochs, and the w/o-PCM Flickr learning
     rates for both variants. As conv5_3 before its ReLU, the small visual CNN ends on its last convolution's
     pre-activation. This matters (measured on the synthetic benchmark, abs0.5, test N = 300, seed 0): with a
     final ReLU the negative-free objective let the attention drift to the background (inverted maps, cIoU@0.5
     33.3 w/ PCM and 37.0 w/o PCM against 43.7 for the centred prior); with a frozen randomly initialised visual CNN
     (--freeze-visual) the maps find objects but hardly depend on the sound (58.3, audio-swapped 55.7).
     This preset does not learn on every draw: on two synthetic sets x three seeds, only 2 of 6 beat both the centred
     prior and the audio-swapped control by 10 points of cIoU@0.5 and 5 of mean cIoU (README); --batch-size 32,
     --lr 2e-4 --lr-head 1e-3, --no-pcm, --freeze-visual and other test-time PCM cycles were no better on the
     failing seeds. The maps do prefer the sounding object (min-max normalised: 0.66-0.74 on it, 0.47-0.50 on
     silent ones), but silent objects or the background stay near abs0.5's half-range threshold: nothing in the
     negative-free objective pushes attention down on a region that looks alike in both views.
  7. (O) The default test transform is `squash`, Resize((224, 224)) bicubic, so full-frame boxes stay aligned;
     the official test resizes the short side to 224 (bicubic) and centre-crops (--test-transform center_crop).
     The two are identical on square frames (the official VGG-SS H5 frames are 256x256), not on non-square
     frames such as the Flickr-SoundNet test JPEGs.
  8. (O) The data path (--decode fast, the default): frames are decoded, resized, cropped, flipped (two views) per
     batch with torch ops on the training device (nvJPEG on CUDA), training crops from the pre-resized frame cache
     on real data. Against the official per-sample PIL pipeline (--decode pil, kept bit for bit): identical pixels
     from the cache; otherwise at most 2 grey levels (max |diff| 0.035 after ImageNet normalisation), mean 1e-4
     (CPU, torch's uint8 bicubic; photo-like 640x360 and 1280x720 JPEGs and the synthetic frames; 2026-11-28, 2-core
     CPU). On CUDA the resize runs in float32 (max 0.07, mean 0.003, measured on CPU); nvJPEG's decode is not
     measured (no GPU here). The crop/flip draws are torchvision's own calls in its order, made in the main process:
     with --workers 0 the same seed gives --decode pil's augmentation (with workers, pil draws in each worker's
     stream). Audio: the window is read straight from the WAV (identical samples); a clip shorter than a quarter of
     the window is an error (the official code tiles it silently), tiled clips are counted in the log.
  9. --negatives (beyond the paper): each test clip is also scored with silence, white noise and another clip's
     audio; the raw S of view 1 (cosine, fixed scale [-1, 1]) is thresholded at 0.5 after the resize to 224
     (--neg-threshold), confidence = mean of its top quarter (SLAVC's AP / max-F1, pIA; see common.py).
     The official abs0.5 test (min-max, >= 0.5, float32, cv2-style bilinear) is reproduced exactly by --eval.
  10. (O) On CUDA, training runs in mixed precision by default (bfloat16 where supported, else float16 with a
      gradient scaler; the official code trains in float32, which --no-amp restores); losses, maps and audio
      front ends stay in float32, image trunks use channels_last. Not yet run on a GPU (none in this environment).
"""
import argparse
import time
from pathlib import Path

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


def build_parser():
    p = argparse.ArgumentParser(description="SSPL (CVPR 2022) - see the module docstring")
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


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------
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
            self.enc_v, self.enc_a, c, d_a = C.vgg16_conv5_3(), C.VGGish(), 512, 128
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
            patches = C.vggish_examples(normalize_audio(wav.to(torch.promote_types(wav.dtype, torch.float32))), SR)
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
    """Eq. 3-5: S (B, h, w) cosine map, S~ its per-sample min-max, f_av = sum_ij S~ V (un-normalised V).
    Computed in float32 or wider (half inputs are promoted; float64 stays float64)."""
    dt = torch.promote_types(torch.promote_types(V.dtype, fa_tilde.dtype), torch.float32)
    V, fa_tilde = V.to(dt), fa_tilde.to(dt)
    S = torch.einsum("bchw,bc->bhw", F.normalize(V, dim=1), F.normalize(fa_tilde, dim=1))
    flat = S.flatten(1)
    S_t = (flat - flat.amin(1, keepdim=True)) / (flat.amax(1, keepdim=True) - flat.amin(1, keepdim=True) + 1e-10)
    f_av = torch.einsum("bchw,bhw->bc", V, S_t.view_as(S))
    return f_av, S, S_t.view_as(S)


def ncs(p, z):
    """Eq. 6 with the stop-gradient of Eq. 8: -cos(p, SG(z)), averaged over the batch."""
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


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
    """A loader batch -> what a step consumes: (view 1, view 2, waveforms (B, N)) for training, (image, waveforms)
    for testing, on the device (the VGGish front end runs inside SSPL.audio). --decode fast decodes and augments
    the frames here."""
    if train:                                            # batch_images first: it may drop unreadable samples
        im1, im2 = C.batch_images(batch, device, args, "crop_flip", args.image_size, views=2)
        return im1, im2, batch["wav"].to(device, non_blocking=True)
    img = C.batch_images(batch, device, args, args.test_transform, args.image_size)
    return img, batch["wav"].to(device, non_blocking=True)


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
    run = C.Run(args, METHOD)                         # DDP / device, seed, run folder (or --resume), log
    device, world, main_proc, ck, run_dir, log = run.device, run.world, run.main, run.ck, run.dir, run.log
    log(f"SSPL {'w/' if args.pcm else 'w/o'} PCM | data {args.data} | preset {args.preset} | device {device} x{world} "
        f"| run {run_dir}")
    model = build_model(args).to(device)
    C.gpu_habits(args, device, model.enc_v, [model])     # CUDA: cudnn.benchmark, channels_last; --compile
    opt = torch.optim.AdamW(param_groups(model, args), lr=args.lr, weight_decay=args.weight_decay)
    start, best, history = 0, -1.0, []
    if ck:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start, best, history = ck["epoch"], ck["best"], ck["history"]
        log(f"resumed from {args.resume} at epoch {start}")
    net = run.wrap(model)
    amp = C.Amp(device, args.amp)
    train_ds, val_ds = make_dataset(args, args.train_split, True), make_dataset(args, args.val_split, False)
    ann = C.load_annotations(args.annotations)
    log(f"train {len(train_ds)} clips, val {len(val_ds)}; batch {run.per_proc} x {world}; audio {CLIP_SECONDS:.0f} s at "
        f"{SR} Hz -> VGGish patches {tuple(C.vggish_examples(torch.zeros(1, int(SR * CLIP_SECONDS))).shape[1:])}")
    t0 = time.time()
    for epoch in range(start, args.epochs):
        loader = run.loader(train_ds, args, epoch)       # reseeded per epoch: exact resume
        net.train()
        tot, n, f_std = 0.0, 0, 0.0
        for step, batch in enumerate(C.progress(loader, f"epoch {epoch + 1}/{args.epochs}", enabled=main_proc)):
            if args.max_steps and step >= args.max_steps:
                break
            inputs = batch_to_device(batch, device, args, True)
            if len(inputs[0]) == 0:                          # every sample skipped (--skip-bad)
                continue
            loss, f_av1 = train_step(net, opt, amp, inputs, args)
            tot, n = tot + loss.item(), n + 1
            f_std += collapse_std(f_av1)
        tot, n, f_std = run.sums(tot, n, f_std)          # over every DDP rank: the logged loss is their mean
        if main_proc:
            res = evaluate(model, val_ds, ann, args, device, baselines=False)
            score = res["test"]["ciou@0.5"]
            history.append({"epoch": epoch + 1, "loss": tot / max(n, 1), "f_av_std": f_std / max(n, 1),
                            "val": res["test"]})
            log(f"epoch {epoch + 1}/{args.epochs} loss {tot / max(n, 1):.4f} f_av-std {f_std / max(n, 1):.4f} "
                f"(1/sqrt(c) = {model.g[-1].out_features ** -0.5:.4f}) | val {C.fmt_metrics(res['test'])} "
                f"({res['protocol']}, N={res['n']}) | {time.time() - t0:.0f}s")
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                     "best": max(best, score), "history": history, "args": vars(args)}
            C.save_checkpoint(run_dir / "last.pt", state)
            if score >= best:
                best = score
                C.save_checkpoint(run_dir / "best.pt", state)
        if world > 1:
            torch.distributed.barrier()
    if main_proc:
        log(f"training done in {time.time() - t0:.0f}s; best val cIoU@0.5 {100 * best:.2f}; testing best.pt")
        args.ckpt, args.out = str(run_dir / "best.pt"), str(run_dir)
        run_eval(args, device, log, seconds_train=time.time() - t0)


def benchmark(args):
    """--benchmark: samples/s of the loader, of train_step and end to end, peak memory (common.run_benchmark);
    trains a few steps on the side, writes benchmark.json, never a checkpoint."""
    C.single_process("--benchmark")
    run = C.Run(args, METHOD)                         # device, seed, run folder, log
    model = build_model(args).to(run.device)
    C.gpu_habits(args, run.device, model.enc_v, [model])
    opt = torch.optim.AdamW(param_groups(model, args), lr=args.lr, weight_decay=args.weight_decay)
    make_loader = lambda: run.loader(make_dataset(args, args.train_split, True), args, 0)   # noqa: E731
    return C.run_benchmark(args, METHOD, run.device, run.dir, run.log, make_loader, batch_to_device, train_step,
                           model, opt, C.Amp(run.device, args.amp))


# ----------------------------------------------------------------------------------------------------------
# Evaluate
# ----------------------------------------------------------------------------------------------------------
# --negatives: the raw S of view 1 (cosine, fixed scale [-1, 1]) thresholded at 0.5 after the resize to 224
# (--neg-threshold changes it).
NEG_THRESHOLD, NEG_SCALE = 0.5, "S cosine in [-1, 1]"


@torch.no_grad()
def compute_maps(model, ds, device, args, batch_size=32, workers=0, cycles=None):
    model.eval()
    maps = {}
    for batch in torch.utils.data.DataLoader(ds, batch_size, shuffle=False, num_workers=workers,
                                             collate_fn=C.collate_av):
        img, wav = batch_to_device(batch, device, args, False)
        if not batch["ids"]:
            continue
        S = localization_map(model, img, wav, cycles)
        for vid, m in zip(batch["ids"], S.cpu().numpy()):
            maps[vid] = m
    return maps


def evaluate(model, ds, ann, args, device, baselines=True):
    maps = compute_maps(model, ds, device, args, min(args.batch_size or 32, 64), args.workers, args.eval_cycles)
    res = C.evaluate_maps(maps, ann, ids=ds.ids, protocol=args.protocol, align_corners=args.align_corners,
                          baselines=baselines)
    res["maps"] = maps
    return res


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


def run_eval(args, device, log, seconds_train=None):
    t0 = time.time()
    model = load_model(args.ckpt, args, device)
    ds = make_dataset(args, args.test_split, False)
    ann = C.load_annotations(args.annotations)
    res = evaluate(model, ds, ann, args, device)
    swapped = evaluate(model, C.SwapAudio(ds), ann, args, device, baselines=False) if len(ds) > 1 else None
    if args.negatives:
        thr = NEG_THRESHOLD if args.neg_threshold is None else args.neg_threshold
        res["negatives"], res["negatives_maps"] = C.run_negatives(
            lambda d: compute_maps(model, d, device, args, min(args.batch_size or 32, 64), args.workers,
                                     args.eval_cycles), ds, ann, thr, NEG_SCALE, args.align_corners, log)
    cycles = args.eval_cycles if args.eval_cycles is not None else (model.pcm.cycles if model.pcm else None)
    return C.save_results(args, METHOD, res, swapped, ann, log, time.time() - t0 + (seconds_train or 0), "S (view 1)",
                          {"pcm": bool(args.pcm), "pcm_cycles_test": cycles})


@torch.no_grad()
def predict(args, device, log):
    if not (args.ckpt and args.image and args.audio):
        raise C.UserError("--predict needs --ckpt, --image and --audio")
    model = load_model(args.ckpt, args, device)
    frame = C.load_image(args.image)
    x, sr = C.read_wav(args.audio)
    if sr != SR:
        raise C.UserError(f"{args.audio}: {sr} Hz; SSPL expects {SR} Hz (convert with data_prep.py)")
    img = C.image_transform(args.test_transform, args.image_size)(frame)[None].to(device)
    wav = torch.from_numpy(C.clip_window(x, sr, CLIP_SECONDS, WINDOW))[None].to(device)
    heat = localization_map(model, img, wav, args.eval_cycles)[0].cpu().numpy()
    out = args.out or "heat.png"
    C.save_overlay_png(out, C.denormalize(img[0].cpu()), heat)
    log(f"heat map written to {out}")


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = C.parse_args(build_parser(), argv)        # + args.given_options (resume rules)
    if not (args.train or args.eval or args.predict or args.benchmark):
        raise C.UserError("choose one of --train, --eval, --predict, --benchmark (see --help)")
    C.check_command(args)                             # numbers >= 1, outputs writable: before any work
    # --pcm-cycles at --eval/--predict is the *test-time* T (Fig. 6); at --train it sets the architecture
    args.eval_cycles = None if args.train else args.pcm_cycles
    log = C.RunLog()
    if args.predict:
        args.preset = args.preset or "paper"
        C.apply_preset(args, PRESETS)
        return predict(args, C.resolve_device(args.device), log)
    C.resolve_data(args, log)
    if args.preset == "paper":                     # Table S1 learning rates; 100 epochs w/o PCM, 20 w/ (official)
        lr1, lr2 = TABLE_S1[args.lr_table][args.pcm]
        C.apply_preset(args, {"paper": dict(lr_head=lr1, lr=lr2, epochs=20 if args.pcm else 100)})
    C.apply_preset(args, PRESETS)
    args.protocol = args.protocol or "abs0.5"      # the official SSPL test: fixed 0.5 on the min-max map
    args.align_corners = bool(args.align_corners)  # official: cv2.resize INTER_LINEAR (half-pixel)
    if args.benchmark:
        return benchmark(args)
    if args.train:
        return C.train_seeds(args, train, log) if args.seeds else train(args)
    if not args.ckpt:
        raise C.UserError("--eval needs --ckpt")
    return run_eval(args, C.resolve_device(args.device), log)


if __name__ == "__main__":
    C.run_cli(main)
