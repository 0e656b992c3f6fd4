"""LVS: "Localizing Visual Sounds the Hard Way", Honglie Chen, Weidi Xie, Triantafyllos Afouras, Arsha Nagrani,
Andrea Vedaldi, Andrew Zisserman, CVPR 2021.
Paper: https://arxiv.org/abs/2104.02691    Official code (test only): https://github.com/hche11/Localizing-Visual-Sounds-the-Hard-Way

Idea. Contrastive learning where the positive is the part of the frame that responds to the clip's sound and
the *hard negative* is the rest of the same frame. The sounding region is not labelled: it is bootstrapped from
the model's own audio-visual similarity map with a differentiable threshold, and a tri-map leaves the uncertain
band between two thresholds out of both terms.

Equations implemented (the paper numbers only (1)-(2); the rest are cited by section):
  (1) V_i = f(I_i) in R^{c x h x w}       (2) A_i = g(a_i) in R^c        (both L2-normalised, no projection head)
  §3.2  [S_{i->j}]_{uv} = <A_i, [V_j]_{:uv}> / (||A_i|| ||[V_j]_{:uv}||)              the cosine map
  §3.3  oracle: P_i = <m_i, S_{i->i}>/|m_i|,
               N_i = <1 - m_i, S_{i->i}>/|1 - m_i|  +  (1/hw) sum_{j != i} <1, S_{i->j}>
               L = -(1/k) sum_i log( exp(P_i) / (exp(P_i) + exp(N_i)) )
  §3.4  m_ip = sigmoid((S_{i->i} - eps_p)/tau),  m_in = sigmoid((S_{i->i} - eps_n)/tau)   (tri-map: eps_p > eps_n)
        P_i = <m_ip, S_{i->i}>/|m_ip|,  N_i = <1 - m_in, S_{i->i}>/|1 - m_in| + easy negatives,  L as above
  with eps_p = 0.65, eps_n = 0.4, tau = 0.03.

The official repository released no training code. The loss used by default (`--loss official`) is the one its
AVENet.forward implies (reconstruction in ../shared notes, §1.5 "Logits and loss as implemented"):
  logits_i = [ P_i , E_i1 ... E_iB , H_i ] / 0.07,   target = column 0 (cross-entropy over the row)
  P_i = positive as above; H_i = <1 - m_in, S_ii>/|1 - m_in| (the hard negative);
  E_ik = <m_p(S_ik), S_ik>/|m_p(S_ik)| for every audio k of the batch against image i (a Pos-weighted mean, not
  the paper's plain mean), with the diagonal k = i multiplied by -99 (official mask 1 - 100*eye; --diag-mask inf
  removes it additively instead).
`--loss paper` implements §3.4 literally (no 0.07 temperature, one logit pair per sample, easy negatives = plain
means of S_{i->j} over the other images j, summed).

Run:
  python lvs_hardway.py --train                                                   # synthetic benchmark, cpu preset
  python lvs_hardway.py --train --seeds 0,1,2        # one run per seed, then a mean ± std table of the runs
  python lvs_hardway.py --train --data ROOT --train-split ROOT/splits/vggsound_144k.txt      # paper preset
  torchrun --nproc_per_node=4 lvs_hardway.py --train --data ROOT                            # batch 256 over 4 GPUs
  python lvs_hardway.py --eval --ckpt lvs_vggss.pth.tar --data ROOT     # the authors' released checkpoint
  python lvs_hardway.py --predict --ckpt runs/<run>/best.pt --image frame.jpg --audio clip.wav --out heat.png
  python lvs_hardway.py --benchmark --data ROOT --preset paper --no-pretrained --workers 8     # samples/s, memory
  Table 4 ablations: --no-trimap (model a/b), --no-hard-neg, --epsilon-p 0.6 --epsilon-n 0.45 (models c-f).

Deviations (from the paper P, from the official code O), and why:
  1. (O) The training loop is a reconstruction: the official repository has none (issue #7 there). Inferred
     choices: target index 0, the multiplicative -99 diagonal mask, Pos-weighted easy negatives, /0.07.
  2. (O) ImageNet weights are loaded into the visual trunk *after* the official re-initialisation of both
     encoders (the official resnet18(pretrained=True) ignores the flag; the paper says ImageNet-pretrained).
  3. (P) Audio: 16 kHz (data_prep.py), so the 3 s training input is 257x200 (the paper's "257x300" is
     inconsistent with its 17x13 audio map; 257x200 gives 17x13). Testing uses the first 10 s, tiled when shorter
     (official), 257x671.
  4. (O) Test images are resized to 224x224 without cropping (the paper; boxes are full-frame); the official
     test crops the centre (--test-transform center_crop reproduces it).
  5. (O) Evaluation: the official test.py rule exactly (`median_strict`: p = 1 - normalize_img(-map), pixels
     strictly above the per-image median plus those equal to 1, in float32; bilinear align_corners=False for
     cv2.resize); `--protocol median` is EZ-VSL's >= variant.
  6. (O) Runs on CPU (the official forward builds its mask with .cuda()); AVENet needs no undeclared argument.
  7. (O) Checkpoint selection on a validation split (the paper does not say how it selected).
  8. cpu preset (synthetic benchmark only): small CNNs (visual stride 8: 112 px -> 14x14, as the stride-16
     ResNet at 224), batch 64, lr 5e-4.
  9. (O) The data path (--decode fast, the default): frames are decoded, resized, cropped, flipped per batch with
     torch ops on the training device (nvJPEG on CUDA), training crops from the pre-resized frame cache on real
     data. Against the official per-sample PIL pipeline (--decode pil, kept bit for bit): identical pixels from the
     cache; otherwise at most 2 grey levels (max |diff| 0.035 after ImageNet normalisation), mean 1e-4 (CPU, torch's
     uint8 bicubic; photo-like 640x360 and 1280x720 JPEGs and the synthetic frames; 2026-11-28, 2-core CPU). On CUDA
     the resize runs in float32 (max 0.07, mean 0.003, measured on CPU); nvJPEG's decode is not measured (no GPU
     here). The crop/flip draws are torchvision's own calls in its order, made in the main process: with --workers 0
     the same seed gives --decode pil's augmentation (with workers, pil draws in each worker's stream). Audio: the
     window is read straight from the WAV (identical samples); a clip shorter than a quarter of the window is an
     error (the official code tiles it silently), tiled clips are counted in the log; the log spectrogram is
     computed in float32 (max |diff| to float64 6e-7 on 10 s clips).
  10. --negatives (beyond the paper): each test clip is also scored with silence, white noise and another clip's
      audio; the raw S_ii (cosine, fixed scale [-1, 1]) is thresholded at eps_p = 0.65 after the resize to 224
      (--neg-threshold), confidence = mean of its top quarter (SLAVC's AP / max-F1, pIA; see common.py).
  11. (O) On CUDA, training runs in mixed precision by default (bfloat16 where supported, else float16 with a
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

METHOD = "lvs_hardway"

# ----------------------------------------------------------------------------------------------------------
# Config / CLI
# ----------------------------------------------------------------------------------------------------------
PRESETS = {
    # paper: Adam lr 1e-4, batch 256, ResNet-18 both streams, layer4 stride 1 (14x14); epochs are not stated
    "paper": dict(epochs=20, batch_size=256, lr=1e-4, image_size=224, encoder="resnet18"),
    "cpu": dict(epochs=12, batch_size=64, lr=5e-4, image_size=112, encoder="small"),
}
SR, TRAIN_SECONDS, TEST_SECONDS = 16000, 3.0, 10.0


def build_parser():
    p = argparse.ArgumentParser(description="LVS (CVPR 2021) - see the module docstring")
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
    """S[n, k] = cosine map of image n with audio k, (B, B, h, w); S[i, i] = S_{i->i}, S[j, i] = S_{i->j}."""
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
    """The official test heat map: the raw cosine S_{i->i} (not the mask), (B, h, w)."""
    return torch.einsum("nchw,nc->nhw", V.float(), A.float())


# ----------------------------------------------------------------------------------------------------------
# Train
# ----------------------------------------------------------------------------------------------------------
def make_dataset(args, split_file, train: bool):
    if train:
        return C.av_dataset(args, split_file, "crop_flip", TRAIN_SECONDS, "center", SR)
    return C.av_dataset(args, split_file, args.test_transform, TEST_SECONDS, "start", SR)


def batch_to_device(batch, device, args, train: bool):
    """A loader batch -> what a step consumes: (images (B, 3, S, S), log spectrograms (B, 1, 257, T)) on the
    device. --decode fast decodes and augments the frames here (crop_flip for training, --test-transform else)."""
    img = C.batch_images(batch, device, args, "crop_flip" if train else args.test_transform, args.image_size)
    return img, C.log_spectrogram(batch["wav"].to(device, non_blocking=True), SR)


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
    run = C.Run(args, METHOD)                         # DDP / device, seed, run folder (or --resume), log
    device, world, main_proc, ck, run_dir, log = run.device, run.world, run.main, run.ck, run.dir, run.log
    log(f"LVS | loss {args.loss} | data {args.data} | preset {args.preset} | device {device} x{world} | run {run_dir}")
    model = build_model(args).to(device)
    C.gpu_habits(args, device, model.imgnet, [model])    # CUDA: cudnn.benchmark, channels_last; --compile
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
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
    log(f"train {len(train_ds)} clips, val {len(val_ds)}; batch {run.per_proc} x {world}; audio {SR} Hz: train "
        f"{TRAIN_SECONDS:.0f} s centred -> {tuple(C.log_spectrogram(torch.zeros(1, int(SR * TRAIN_SECONDS)), SR).shape[2:])}, "
        f"test first {TEST_SECONDS:.0f} s -> {tuple(C.log_spectrogram(torch.zeros(1, int(SR * TEST_SECONDS)), SR).shape[2:])}")
    t0 = time.time()
    for epoch in range(start, args.epochs):
        loader = run.loader(train_ds, args, epoch)       # reseeded per epoch: exact resume
        net.train()
        tot, n = 0.0, 0
        for step, batch in enumerate(C.progress(loader, f"epoch {epoch + 1}/{args.epochs}", enabled=main_proc)):
            if args.max_steps and step >= args.max_steps:
                break
            inputs = batch_to_device(batch, device, args, True)
            if len(inputs[0]) == 0:                          # every sample skipped (--skip-bad)
                continue
            loss = train_step(net, opt, amp, inputs, args)
            tot, n = tot + loss.item(), n + 1
        tot, n = run.sums(tot, n)                        # over every DDP rank: the logged loss is their mean
        if main_proc:
            res = evaluate(model, val_ds, ann, args, device, baselines=False)
            score = res["test"]["ciou@0.5"]
            history.append({"epoch": epoch + 1, "loss": tot / max(n, 1), "val": res["test"]})
            log(f"epoch {epoch + 1}/{args.epochs} loss {tot / max(n, 1):.4f} | val {C.fmt_metrics(res['test'])} "
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
    C.gpu_habits(args, run.device, model.imgnet, [model])
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    make_loader = lambda: run.loader(make_dataset(args, args.train_split, True), args, 0)   # noqa: E731
    return C.run_benchmark(args, METHOD, run.device, run.dir, run.log, make_loader, batch_to_device, train_step,
                           model, opt, C.Amp(run.device, args.amp))


# ----------------------------------------------------------------------------------------------------------
# Evaluate
# ----------------------------------------------------------------------------------------------------------
# --negatives: the raw S_ii (cosine, fixed scale [-1, 1]) thresholded at eps_p = 0.65 (the loss's positive-mask
# threshold) after the resize to 224 (--neg-threshold changes it).
NEG_THRESHOLD, NEG_SCALE = 0.65, "S_ii cosine in [-1, 1]"


@torch.no_grad()
def compute_maps(model, ds, device, args, batch_size=32, workers=0):
    model.eval()
    maps = {}
    for batch in torch.utils.data.DataLoader(ds, batch_size, shuffle=False, num_workers=workers,
                                             collate_fn=C.collate_av):
        img, spec = batch_to_device(batch, device, args, False)
        if not batch["ids"]:
            continue
        V, A = model(img, spec)
        for vid, m in zip(batch["ids"], localization_map(V, A).cpu().numpy()):
            maps[vid] = m
    return maps


def evaluate(model, ds, ann, args, device, baselines=True):
    maps = compute_maps(model, ds, device, args, min(args.batch_size or 32, 64), args.workers)
    res = C.evaluate_maps(maps, ann, ids=ds.ids, protocol=args.protocol, align_corners=args.align_corners,
                          baselines=baselines)
    res["maps"] = maps
    return res


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
            lambda d: compute_maps(model, d, device, args, min(args.batch_size or 32, 64), args.workers), ds, ann, thr,
            NEG_SCALE, args.align_corners, log)
    return C.save_results(args, METHOD, res, swapped, ann, log, time.time() - t0 + (seconds_train or 0), "S_ii",
                          {"loss": getattr(args, "loss", "official")})


@torch.no_grad()
def predict(args, device, log):
    if not (args.ckpt and args.image and args.audio):
        raise C.UserError("--predict needs --ckpt, --image and --audio")
    model = load_model(args.ckpt, args, device)
    frame = C.load_image(args.image)
    x, sr = C.read_wav(args.audio)
    if sr != SR:
        raise C.UserError(f"{args.audio}: {sr} Hz; LVS expects {SR} Hz (convert with data_prep.py)")
    img = C.image_transform(args.test_transform, args.image_size)(frame)[None].to(device)
    wav = torch.from_numpy(C.clip_window(x, sr, TEST_SECONDS, "start"))[None].to(device)
    heat = localization_map(*model(img, C.log_spectrogram(wav, SR)))[0].cpu().numpy()
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
    log = C.RunLog()
    if args.predict:
        args.preset = args.preset or "paper"
        C.apply_preset(args, PRESETS)
        return predict(args, C.resolve_device(args.device), log)
    C.resolve_data(args, log)
    C.apply_preset(args, PRESETS)
    args.protocol = args.protocol or "median_strict"     # the official LVS test script, exactly
    args.align_corners = bool(args.align_corners)       # official: cv2.resize INTER_LINEAR (half-pixel)
    if args.benchmark:
        return benchmark(args)
    if args.train:
        return C.train_seeds(args, train, log) if args.seeds else train(args)
    if not args.ckpt:
        raise C.UserError("--eval needs --ckpt")
    return run_eval(args, C.resolve_device(args.device), log)


if __name__ == "__main__":
    C.run_cli(main)
