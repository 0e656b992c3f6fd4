"""LVS: "Localizing Visual Sounds the Hard Way", Honglie Chen, Weidi Xie, Triantafyllos Afouras, Arsha Nagrani,
Andrea Vedaldi, Andrew Zisserman, CVPR 2021.
Paper: https://arxiv.org/abs/2104.02691
Official code (test only): https://github.com/hche11/Localizing-Visual-Sounds-the-Hard-Way

Idea: contrastive learning where the positive is the part of the frame that responds to the clip's sound and the
*hard negative* is the rest of the same frame. The sounding region is not labelled: it is bootstrapped from the
model's own audio-visual similarity with a differentiable threshold, and a tri-map leaves the uncertain band between
two thresholds out of both terms.

Equations (the paper numbers (1)-(2) only; the rest by section):
  (1) V_i = f(I_i) in R^{c x h x w}    (2) A_i = g(a_i) in R^c      (L2-normalised, no projection head)
  3.2  [S_{i->j}]_uv = <A_i, [V_j]_:uv> / (||A_i|| ||[V_j]_:uv||)                   the cosine map
  3.3  P_i = <m_i, S_ii>/|m_i|,  N_i = <1 - m_i, S_ii>/|1 - m_i| + (1/hw) sum_{j != i} <1, S_{i->j}>,
       L = -(1/k) sum_i log(exp(P_i) / (exp(P_i) + exp(N_i)))                         (oracle mask m_i)
  3.4  m_ip = sigmoid((S_ii - eps_p)/tau), m_in = sigmoid((S_ii - eps_n)/tau) (tri-map: eps_p 0.65 > eps_n 0.4,
       tau 0.03); P_i with m_ip, the hard negative with 1 - m_in, L as above
  official logits (--loss official, the default; --loss paper: 3.4 literally): [P_i, E_i1..E_iB, H_i] / 0.07,
       target column 0, H_i = <1 - m_in, S_ii>/|1 - m_in|, E_ik = <m_p(S_ik), S_ik>/|m_p(S_ik)|, E_ii x (-99)

Run:
  python lvs_hardway.py --train                      # the synthetic benchmark, cpu preset
  python lvs_hardway.py --train --seeds 0,1,2        # one run per seed (tabled by eval_cioU.py --table)
  python lvs_hardway.py --train --data ROOT --train-split ROOT/splits/vggsound_144k.txt       # paper preset
  torchrun --nproc_per_node=4 lvs_hardway.py --train --data ROOT                             # batch 256 on 4 GPUs
  python lvs_hardway.py --eval --ckpt lvs_vggss.pth.tar --data ROOT      # the authors' released checkpoint
  python lvs_hardway.py --predict --ckpt runs/<run>/best.pt --image frame.jpg --audio clip.wav --out heat.png
  python lvs_hardway.py --predict --ckpt runs/<run>/best.pt --video clip.mp4 --out clip_heat.mp4
  Table 4 ablations: --no-trimap (models a/b), --no-hard-neg, --epsilon-p 0.6 --epsilon-n 0.45 (models c-f).

Deviations from the paper (P) and the official code (O), one line each (details and measurements: README):
  1. (O) the training loop is a reconstruction (none released): target 0, the x(-99) diagonal, Pos-weighted E, /0.07.
  2. (O) ImageNet weights are loaded after the official re-initialisation (official resnet18(pretrained) ignores it).
  3. (P) audio at 16 kHz: 3 s -> 257x200 and the paper's 17x13 map; the test uses the first 10 s (official), tiled.
  4. (O) test images are squashed to 224x224, no crop (the paper; --test-transform center_crop: official).
  5. (O) the official test rule exactly (median_strict, float32, cv2-style bilinear); --protocol median: EZ-VSL's.
  6. (O) runs on CPU too (the official forward builds its mask with .cuda()).
  7. (O) checkpoint selection on a validation split (the paper does not say how it selected).
  8. cpu preset (synthetic data): small CNNs (visual stride 8: 112 px -> 14x14), batch 64, lr 2e-3, 12 epochs.
  9. (O) --decode fast: batched decode and augmentation on the device, <= 2 grey levels from --decode pil (exact).
  10. (O) audio shorter than a quarter of the window is an error (official: tiled silently); shorter ones are tiled.
  11. --negatives (beyond the paper): raw S_ii >= eps_p = 0.65 (--neg-threshold); SLAVC AP / max-F1 and pIA.
  12. (O) CUDA: mixed precision by default (--no-amp: float32, as official); loss and maps in float32.
"""
import argparse
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C

METHOD = "lvs_hardway"

# ----------------------------------------------------------------------------------------------------------
# Config / CLI
# ----------------------------------------------------------------------------------------------------------
PRESETS = {
    # paper: Adam lr 1e-4, batch 256, ResNet-18 both streams, layer4 stride 1 (14x14); epochs are not stated
    "paper": dict(epochs=20, batch_size=256, lr=1e-4, image_size=224, encoder="resnet18"),
    "cpu": dict(epochs=12, batch_size=64, lr=2e-3, image_size=112, encoder="small"),
}
SR, TRAIN_SECONDS, TEST_SECONDS = 16000, 3.0, 10.0
NEG_THRESHOLD, NEG_SCALE = 0.65, "S_ii cosine in [-1, 1]"     # --negatives: eps_p, the positive-mask threshold


def build_parser():
    p = argparse.ArgumentParser(description="LVS (CVPR 2021): see the module docstring")
    C.add_standard_args(p)
    p.add_argument("--loss", choices=["official", "paper"], default="official", help="loss form (see the docstring)")
    p.add_argument("--epsilon-p", type=float, default=0.65, help="positive threshold eps_p (official 0.65)")
    p.add_argument("--epsilon-n", type=float, default=0.4, help="negative threshold eps_n (official 0.4)")
    p.add_argument("--tau", type=float, default=0.03, help="sigmoid temperature tau of the soft masks (0.03)")
    p.add_argument("--temperature", type=float, default=0.07, help="official logit temperature (0.07)")
    p.add_argument("--no-trimap", action="store_true", help="negatives = 1 - m_p (Table 4 models a/b)")
    p.add_argument("--no-hard-neg", action="store_true", help="drop the same-image hard negative")
    p.add_argument("--diag-mask", choices=["mult", "inf"], default="mult",
                   help="official: multiply the diagonal easy negative by -99; inf: remove it")
    p.add_argument("--test-transform", choices=["squash", "center_crop"], default="squash",
                   help="test image resize: squash (paper, no crop) or center_crop (official test.py)")
    p.add_argument("--image-size", type=int, help="input image side (official 224)")
    return p


def synthetic_data(log):          # no --data: the built-in synthetic benchmark, made once by data_prep.py
    import data_prep
    return data_prep.ensure_synthetic(log=log)


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------
class AVENet(nn.Module):
    """f: ResNet-18 with layer4 stride 1 (224 px -> 512 x 14 x 14); g: 1-channel ResNet-18 (same strides) with a
    global max pool (official `avgpool` is an AdaptiveMaxPool2d). No projection head; both L2-normalised."""

    def __init__(self, encoder: str = "resnet18"):
        super().__init__()
        if encoder == "resnet18":
            self.imgnet, self.audnet = C.ResNet18Trunk(3, stride=16), C.ResNet18Trunk(1, stride=16)
        else:
            self.imgnet = C.SmallCNN(3, strides=(2, 1, 2, 1))   # 112 px -> 128 x 14 x 14
            self.audnet = C.SmallCNN(1, strides=(2, 2, 2, 2))
        for m in self.modules():                                 # the official re-initialisation of both encoders
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, image, spec):
        V = F.normalize(self.imgnet(image), dim=1)               # Eq. (1), (B, c, h, w)
        A = F.normalize(self.audnet(spec).amax(dim=(2, 3)), dim=1)   # Eq. (2), (B, c)
        return V, A


def build_model(args) -> AVENet:
    model = AVENet(args.encoder)
    if args.encoder == "resnet18" and not args.no_pretrained:
        C.load_weights(model.imgnet, args.weights or "imagenet", "resnet18")   # after the re-init (deviation 2)
    return model


def convert_official_state_dict(sd: dict) -> dict:
    """The authors' AVENet keys -> ours: drop 'module.', the unused stems (conv1_flow, the image net's conv1_a,
    the audio net's 3-channel conv1) and fc; the audio stem conv1_a becomes conv1."""
    out = {}
    for k, v in C.strip_prefix(sd).items():
        net, _, rest = k.partition(".")
        if rest.startswith(("conv1_flow", "fc.")) or (net == "imgnet" and rest.startswith("conv1_a")) \
                or (net == "audnet" and rest.startswith("conv1.")):
            continue
        out[f"{net}.{rest.replace('conv1_a', 'conv1')}"] = v
    return out


# ----------------------------------------------------------------------------------------------------------
# Loss (§3.3, §3.4 and the official logits)
# ----------------------------------------------------------------------------------------------------------
def similarity(V, A):
    """S[n, k] = cosine map of image n with audio k, (B, B, h, w); S[i, i] = S_{i->i}, S[j, i] = S_{i->j}; in float32
    (also under autocast)."""
    with torch.autocast(V.device.type, enabled=False):
        return torch.einsum("nchw,kc->nkhw", V.float(), A.float())


def soft_masks(S, eps_p: float, eps_n: float, tau: float):
    """m_p = sigmoid((S - eps_p)/tau), m_n = sigmoid((S - eps_n)/tau) (§3.4), elementwise on any S."""
    return torch.sigmoid((S - eps_p) / tau), torch.sigmoid((S - eps_n) / tau)


def masked_mean(m, S):
    """<m, S> / |m| over the h x w locations."""
    return (m * S).sum((-2, -1)) / m.sum((-2, -1))


def lvs_official_logits(S, m_p, m_n, trimap=True, hard_neg=True, diag_mask="mult", temperature=0.07):
    """Logits (B, B+2) of the official AVENet (column 0 = the positive); S, m_p, m_n are (B, B, h, w)."""
    B = S.shape[0]
    i = torch.arange(B, device=S.device)
    S_ii, mp_ii = S[i, i], m_p[i, i]
    neg = 1 - (m_n[i, i] if trimap else mp_ii)                      # tri-map: the band eps_n..eps_p is ignored
    P = masked_mean(mp_ii, S_ii)                                     # positive P_i
    H = masked_mean(neg, S_ii)                                       # hard negative (background of image i)
    E = masked_mean(m_p, S)                                          # Pos-weighted easy negatives, (B, B)
    eye = torch.eye(B, dtype=torch.bool, device=S.device)
    E = E * (1 - 100 * eye.float()) if diag_mask == "mult" else E.masked_fill(eye, float("-inf"))
    cols = [P[:, None], E] + ([H[:, None]] if hard_neg else [])
    return torch.cat(cols, 1) / temperature


def lvs_paper_loss(S, m_p, m_n, trimap=True, hard_neg=True):
    """§3.4 literally: L = mean_i softplus(N_i - P_i) = -mean_i log(e^P_i / (e^P_i + e^N_i)),
    N_i = hard + (1/hw) sum_{j != i} <1, S_{i->j}>. Only the diagonal masks are used; pass binary masks
    (m_p = m_n = m) to get the §3.3 oracle loss."""
    B = S.shape[0]
    i = torch.arange(B, device=S.device)
    S_ii = S[i, i]
    P = masked_mean(m_p[i, i], S_ii)
    mean_maps = S.mean((-2, -1))                                     # (1/hw) <1, S[n, k]>, (B, B)
    easy = mean_maps.sum(0) - mean_maps[i, i]                        # sum over images j != i for audio i
    N = easy + (masked_mean(1 - (m_n[i, i] if trimap else m_p[i, i]), S_ii) if hard_neg else 0)
    return F.softplus(N - P).mean()


def lvs_loss(V, A, args):
    S = similarity(V, A)
    m_p, m_n = soft_masks(S, args.epsilon_p, args.epsilon_n, args.tau)
    if args.loss == "paper":
        return lvs_paper_loss(S, m_p, m_n, not args.no_trimap, not args.no_hard_neg)
    logits = lvs_official_logits(S, m_p, m_n, not args.no_trimap, not args.no_hard_neg, args.diag_mask,
                                 args.temperature)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


# ----------------------------------------------------------------------------------------------------------
# Localization map
# ----------------------------------------------------------------------------------------------------------
def localization_map(V, A):
    """The official test heat map: the raw cosine S_{i->i} (not the mask), (B, h, w), in float32."""
    with torch.autocast(V.device.type, enabled=False):
        return torch.einsum("nchw,nc->nhw", V.float(), A.float())


# ----------------------------------------------------------------------------------------------------------
# Train
# ----------------------------------------------------------------------------------------------------------
def make_dataset(args, split_file, train: bool):
    if train:
        return C.av_dataset(args, split_file, "crop_flip", TRAIN_SECONDS, "center", SR)
    return C.av_dataset(args, split_file, args.test_transform, TEST_SECONDS, "start", SR)


def batch_to_device(batch, device, args, train: bool):
    """A loader batch -> (images (B, 3, S, S), log spectrograms (B, 1, 257, T)) on the device, or None when every
    sample was skipped. --decode fast decodes and augments the frames here (crop_flip, or --test-transform)."""
    img = C.batch_images(batch, device, args, "crop_flip" if train else args.test_transform, args.image_size)
    return None if img is None else (img, C.log_spectrogram(batch["wav"].to(device, non_blocking=True), SR))


def train_step(net, opt, amp, inputs, args):
    """One optimisation step: forward (mixed precision on CUDA), the loss in float32 outside autocast, backward,
    Adam step. Returns the loss."""
    img, spec = inputs
    with amp.autocast():
        V, A = net(C.channels_last(img), spec)
    loss = lvs_loss(V, A, args)                           # in float32, outside autocast
    amp.step(loss, opt)
    return loss


def train(args):
    run = C.Run(args, METHOD)                          # preflight, DDP / device, seed, run folder or --resume, log
    run.log(f"LVS | loss {args.loss} | data {args.data} | preset {args.preset} | device {run.device} x{run.world} | "
            f"run {run.dir}")
    model = build_model(args).to(run.device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    net, amp = run.prepare(model, opt, model.imgnet)   # resumed state, CUDA habits, DDP
    train_ds, val_ds = make_dataset(args, args.train_split, True), make_dataset(args, args.val_split, False)
    ann = C.load_annotations(args.annotations)
    run.log(f"train {len(train_ds)} clips, val {len(val_ds)}; batch {run.per_proc} x {run.world}; audio {SR} Hz: train "
            f"{TRAIN_SECONDS:g} s centred -> 257x200, test the first {TEST_SECONDS:g} s -> 257x671")
    for epoch in run.epochs():
        net.train()
        losses = []
        for batch in run.batches(train_ds, epoch):     # reseeded per epoch: exact resume
            inputs = batch_to_device(batch, run.device, args, True)
            if inputs is not None:
                losses.append(train_step(net, opt, amp, inputs, args).item())
        run.end_epoch(epoch, {"loss": losses}, lambda: evaluate(model, val_ds, ann, args, run.device, baselines=False))
    if run.finish():
        run_eval(args, run.device, run.log, run.seconds())


def benchmark(args):
    """--benchmark (common.run_benchmark): a few training steps, timed; writes benchmark.json, never a checkpoint."""
    run = C.Run(args, METHOD)
    model = build_model(args).to(run.device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    net, amp = run.prepare(model, opt, model.imgnet)
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
            maps.update(zip(batch["ids"], localization_map(*model(*inputs)).cpu().numpy()))
    return maps


def evaluate(model, ds, ann, args, device, baselines=True):
    maps = compute_maps(model, ds, device, args)
    return dict(C.evaluate_maps(maps, ann, ids=ds.ids, protocol=args.protocol, align_corners=args.align_corners,
                                baselines=baselines), maps=maps)


def load_model(path, args, device):
    """Our checkpoints carry their args; the authors' release stores 'model_state_dict' with their key names."""
    path = Path(path) / "best.pt" if Path(path).is_dir() else path
    ck = C.load_checkpoint(path, method=METHOD)             # readable, not another method's
    if "args" in ck:
        a = C.checkpoint_args(ck, path, METHOD, ("encoder", "image_size", "loss"))
        args.ckpt_seed = a.get("seed")                   # the training seed, for results.json
        args.encoder, args.image_size = a["encoder"], a["image_size"]
        sd = ck.get("model")
    else:
        args.encoder, args.image_size = "resnet18", 224
        try:
            sd = convert_official_state_dict(ck.get("model_state_dict", ck))
        except (KeyError, ValueError, AttributeError, TypeError) as e:
            raise C.UserError(f"{path}: not an LVS checkpoint (official key layout not found: {e})") from None
    model = AVENet(args.encoder)
    C.load_state(model, sd, path, METHOD)
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
    inter = C.interactive_split(args, lambda a: evaluate(model, make_dataset(a, a.test_split, False), ann, a, device,
                                                         baselines=False))
    return C.save_results(args, METHOD, res, swapped, ann, log, time.time() - t0 + seconds_train, "S_ii",
                          {"loss": getattr(args, "loss", "official"), "interactive": inter})


@torch.no_grad()
def predict(args, log=print):
    device = C.resolve_device(args.device)
    model = load_model(args.ckpt, args, device)
    maps = lambda img, wav: localization_map(*model(img, C.log_spectrogram(wav, SR)))     # noqa: E731 (B, h, w)
    if args.video:                                     # the test's window, centred on each frame
        return C.predict_video(args, maps, (args.test_transform, args.image_size, "bicubic"),
                               (SR, TEST_SECONDS, "start"), device, log)
    img = C.image_transform(args.test_transform, args.image_size)(C.load_image(args.image))[None].to(device)
    wav, _, _ = C.read_wav_window(args.audio, TEST_SECONDS, "start", sample_rate=SR)     # the test's window
    heat = maps(img, torch.from_numpy(wav)[None].to(device))
    C.save_overlay_png(args.out or "heat.png", C.denormalize(img[0]), heat[0].cpu().numpy())
    log(f"heat map written to {args.out or 'heat.png'}")


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = C.parse_args(build_parser(), argv)
    C.setup(args, PRESETS, synthetic_data, protocol="median_strict", align_corners=False)   # the official test.py
    if args.predict:
        return predict(args)
    if args.benchmark:
        return benchmark(args)
    if args.train:
        return C.train_seeds(args, train) if args.seeds else train(args)
    return run_eval(args, C.resolve_device(args.device), C.RunLog())


if __name__ == "__main__":
    C.run_cli(main)
