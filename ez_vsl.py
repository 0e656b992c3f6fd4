"""EZ-VSL: "Localizing Visual Sounds the Easy Way", Shentong Mo and Pedro Morgado, ECCV 2022.
Paper: https://arxiv.org/abs/2203.09324    Official code: https://github.com/stoneMo/EZ-VSL

Idea. Treat each image as a *bag* of location features. The audio of a clip only has to match *one* location of
its own frame (the most similar), while matching no location of any other frame in the batch. This multiple-
instance contrastive loss needs no hand-made sounding/non-sounding regions. At test time the audio-visual map is
blended with an audio-free "object prior" from a frozen ImageNet network (object-guided localization, OGL).

Equations implemented (paper numbering):
  (1)  v^_i^{xy} = U_v v_i^{xy} + b_v,  a^_i = U_a a_i + b_a           1x1 conv / linear projections, L2-normalised
  (3)  L_{a->v} = -log exp(max_{xy} sim(a^_i, v^_i^{xy}) / tau) / sum_k exp(max_{xy} sim(a^_i, v^_k^{xy}) / tau)
  (4)  L_{v->a} = -log exp(max_{xy} sim(v^_i^{xy}, a^_i) / tau) / sum_k exp(max_{xy} sim(v^_i^{xy}, a^_k) / tau)
  (5)  L = L_{a->v} + L_{v->a}                                           (summed, as the official code)
  (6)  S^AVL_{xy} = sim(v^_{xy}, a^)
  (7)  S^CLS_{xy} = max_o P(o | v'_{xy})          (8)  S^L1_{xy} = ||v'_{xy}||_1     (v' from the frozen f_obj)
  (9)  S^EZVSL = alpha * minmax(S^AVL) + (1 - alpha) * minmax(S^OBJ),  alpha = 0.4

Run:
  python ez_vsl.py --train                                   # synthetic benchmark, cpu preset (a few minutes)
  python ez_vsl.py --train --seeds 0,1,2        # one run per seed, then a mean ± std table of the runs
  python ez_vsl.py --train --data ROOT --train-split ROOT/splits/vggsound_144k.txt   # paper preset (20 epochs)
  python ez_vsl.py --train --data ROOT --train-split ROOT/splits/flickr_10k.txt --epochs 100
  torchrun --nproc_per_node=2 ez_vsl.py --train --data ROOT           # 2 GPUs x 64, local negatives (the paper)
  python ez_vsl.py --eval --ckpt runs/<run>/best.pt --data ROOT --test-split ROOT/splits/test.txt --viz 20
  python ez_vsl.py --eval --ckpt ezvsl_vggss144k/best.pth --data ROOT    # the authors' released checkpoint
  python ez_vsl.py --predict --ckpt runs/<run>/best.pt --image frame.jpg --audio clip.wav --out heat.png
  python ez_vsl.py --benchmark --data ROOT --preset paper --no-pretrained --batch-size 128 --workers 8   # samples/s

Deviations (from the paper P, from the official code O), and why:
  1. (P, O) The spectrogram rate: the paper says 11025 Hz and 257x300; the official code uses the file's rate.
     We use 16 kHz (data_prep.py writes it): 3 s -> 257x200 (the LVS encoder's 17x13; see common.py).
  2. (O) Checkpoint selection on a held-out validation split with the AVL map (the official train.py selects
     best.pth on the *test* set). The test split is used once, at the end.
  3. (O) Under DDP the negatives are local by default as in the code and paper (2 GPUs x 64 -> 63 negatives);
     --gather-negatives gathers them across GPUs instead. Without DDP, the whole batch is one negative pool:
     a 1-GPU batch of 128 has 127 negatives, not the paper's 63 (use --batch-size 64 to match the pool size).
  4. (O) Seeds are honoured (the official --seed is parsed but unused); maps are resized with
     bilinear align_corners=True at test by default (official test.py; --no-align-corners gives False) and, with
     OGL, S^AVL and S^OBJ are each up-sampled to 224 before Eq. 9, as official; validation uses the same
     evaluator as the test (official validate() uses bicubic).
     align_corners=True puts the 7x7 cell centres at i/6 of the image instead of (i + 0.5)/7, where the
     trunk's cells are: up to half a cell off towards the borders. On the synthetic benchmark that cost six
     checkpoints 1.6-3.9 points of mean cIoU under abs0.5 (README); the README's comparison across methods uses
     abs0.5's own resize (--no-align-corners), EZ-VSL's official numbers the default.
  5. (O) The test never silently replaces unreadable samples (official datasets.py substitutes a random item)
     and a missing checkpoint is an error (official test.py continues with random weights).
  6. (O) The localization map is the cosine S^AVL (the official Savl is cos/tau: the same after min-max up to
     float32 rounding, which can move a tie at the median).
  7. cpu preset (synthetic benchmark only): small CNNs instead of ResNet-18, 112 px images, dim 128, batch 16 (15
     negatives), lr 2e-3, 20 epochs. Training starts at chance (loss 2 ln B, the AVL map inverted), leaves it after
     a number of *steps*, then the map sharpens. Tuned on ten draws (three seeds x two synthetic sets with one
     thread, four with two) under abs0.5 (issue 16's bar, README): batch 64 / lr 5e-4 / 12 epochs (18 steps an
     epoch), no seed of three beat the centred prior by 5 points of mean cIoU; batch 32, two of three; batch 16, the
     six one-thread draws but not the two-thread default seed 0, even at 20 epochs; lr 1e-3 and 20 epochs, nine of
     ten (one stayed diffuse over silent objects); lr 2e-3, all ten. Failing draws are rarer, which is not to say
     impossible on another machine. About 4 minutes on 2 cores. OGL needs ImageNet weights; when they are
     unavailable (offline) the OBJ and blended rows are skipped with a message and the AVL map is the reported one.
  8. (O) PCM scale: 16-bit samples are divided by 32768 (common.read_wav, as LVS's soundfile); the official
     audio_io decodes to int16 and divides by 32767 (then clips to [-1, 1]). In the /12 log spectrogram the
     official input is larger by log((S (32768/32767)^2 + 1e-7) / (S + 1e-7)) / 12 <= 2 ln(32768/32767) / 12
     = 5.09e-6, reached in bins well above the 1e-7 floor (a 3 s synthetic clip: max 5.085e-6, median 1.8e-6;
     numpy/torch float64, 2-core CPU, 2026-11-28). Kept: read_wav is shared with LVS, whose scale it matches.
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
  10. --negatives (beyond the paper): each test clip is also scored with silence, white noise and another
      clip's audio; the raw S^AVL (cosine, fixed scale [-1, 1]) is thresholded at 0.5 after the resize to 224
      (--neg-threshold), confidence = mean of its top quarter (SLAVC's AP / max-F1, pIA; see common.py).
  11. (O) On CUDA, training runs in mixed precision by default (bfloat16 where supported, else float16 with a
      gradient scaler; the official code trains in float32, which --no-amp restores); losses, maps and audio
      front ends stay in float32, image trunks use channels_last. Not yet run on a GPU (none in this environment).
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C

METHOD = "ez_vsl"

# ----------------------------------------------------------------------------------------------------------
# Config / CLI
# ----------------------------------------------------------------------------------------------------------
PRESETS = {
    # official: Adam 1e-4, batch 128, 20 epochs (100 on 10k sets), 224 px, ResNet-18 trunks, dim 512
    "paper": dict(epochs=20, batch_size=128, lr=1e-4, image_size=224, dim=512, encoder="resnet18"),
    "cpu": dict(epochs=20, batch_size=16, lr=2e-3, image_size=112, dim=128, encoder="small"),
}
SR, CLIP_SECONDS = 16000, 3.0


def build_parser():
    p = argparse.ArgumentParser(description="EZ-VSL (ECCV 2022) - see the module docstring")
    C.add_standard_args(p)
    p.add_argument("--tau", type=float, default=0.03, help="temperature tau of Eq. 3-4 (official 0.03)")
    p.add_argument("--alpha", type=float, default=0.4, help="alpha of Eq. 9 (official 0.4)")
    p.add_argument("--obj-prior", choices=["l1", "cls"], default="l1", help="object prior: Eq. 8 (L1) or Eq. 7 (CLS)")
    p.add_argument("--no-ogl", action="store_true", help="skip object-guided localization (AVL map only)")
    p.add_argument("--gather-negatives", action="store_true", help="DDP: use negatives from every GPU")
    p.add_argument("--dim", type=int, help="shared embedding size (official 512)")
    p.add_argument("--image-size", type=int, help="input image side (official 224)")
    return p


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------
def _init_official(m: nn.Module):
    """The official initialisation of audnet and the projections: kaiming-normal convs (fan_out), trunc-normal
    linears (std 0.01), BN weight ~ N(1, 0.02) and bias 0."""
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(mod, nn.Linear):
            nn.init.trunc_normal_(mod.weight, std=0.01)
        elif isinstance(mod, nn.BatchNorm2d):
            nn.init.normal_(mod.weight, 1.0, 0.02)
            nn.init.zeros_(mod.bias)


class EZVSL(nn.Module):
    """Visual trunk -> (B, 512, h, w) -> 1x1 conv U_v; audio trunk -> global max pool -> linear U_a (Eq. 1).
    Attribute names are the official ones (imgnet, audnet, img_proj, aud_proj) so released checkpoints load."""

    def __init__(self, encoder: str = "resnet18", dim: int = 512):
        super().__init__()
        if encoder == "resnet18":
            self.imgnet = C.ResNet18Trunk(3, stride=32)        # 224 px -> 512 x 7 x 7
            self.audnet = C.ResNet18Trunk(1, stride=32)        # 1 x 257 x 200 -> 512 x 9 x 7
            c = 512
        else:
            self.imgnet = C.SmallCNN(3, strides=(2, 1, 2, 2))  # 112 px -> 128 x 7 x 7
            self.audnet = C.SmallCNN(1, strides=(2, 2, 2, 2))  # 1 x 257 x 200 -> 128 x 8 x 7
            c = self.imgnet.out_channels
        self.img_proj = nn.Conv2d(c, dim, kernel_size=1)
        self.aud_proj = nn.Linear(c, dim)
        for m in (self.audnet, self.img_proj, self.aud_proj):
            _init_official(m)

    def forward(self, image, spec):
        v = F.normalize(self.img_proj(self.imgnet(image)), dim=1)          # v^ (B, dim, h, w)
        a = self.audnet(spec).amax(dim=(2, 3))                              # global max pool (official)
        a = F.normalize(self.aud_proj(a), dim=1)                            # a^ (B, dim)
        return v, a


class ObjectPrior(nn.Module):
    """f_obj: a separate ImageNet ResNet-18, never trained; S^L1 (Eq. 8; official: mean |v'| over channels) or
    S^CLS (Eq. 7: max class posterior of the ImageNet classifier applied at every location)."""

    def __init__(self, kind: str = "l1", weights="imagenet"):
        super().__init__()
        self.kind = kind
        self.trunk = C.ResNet18Trunk(3, stride=32)
        self.fc = nn.Linear(512, 1000)
        if weights == "imagenet":
            sd = C._torchvision_state_dict("resnet18")
        else:
            sd = C.strip_prefix(torch.load(weights, map_location="cpu", weights_only=False))
        self.trunk.load_state_dict({k: v for k, v in sd.items() if not k.startswith("fc.")})
        self.fc.load_state_dict({"weight": sd["fc.weight"], "bias": sd["fc.bias"]})
        self.eval().requires_grad_(False)

    def forward(self, image):
        f = self.trunk(image)                                               # v' (B, 512, h, w)
        if self.kind == "l1":
            return f.abs().mean(1)                                          # Eq. 8 (/512, as official)
        logits = torch.einsum("bchw,oc->bohw", f, self.fc.weight) + self.fc.bias[None, :, None, None]
        return logits.softmax(1).amax(1)                                    # Eq. 7


def build_model(args) -> EZVSL:
    model = EZVSL(args.encoder, args.dim)
    if args.encoder == "resnet18" and not args.no_pretrained:
        C.load_weights(model.imgnet, args.weights or "imagenet", "resnet18")   # ImageNet visual trunk (official)
    return model


# ----------------------------------------------------------------------------------------------------------
# Loss (Eq. 3-5)
# ----------------------------------------------------------------------------------------------------------
def mil_logits(v, a, tau):
    """max_{xy} sim(v_n^{xy}, a_m) / tau for every image n and audio m -> (Bv, Ba)."""
    S = torch.einsum("nchw,mc->nmhw", v, a) / tau                          # (Bv, Ba, h, w)
    return S.flatten(2).amax(-1)


def ezvsl_loss(v, a, tau: float = 0.03, gather: bool = False):
    """L = L_{a->v} + L_{v->a} (Eq. 5) with in-batch negative bags. With gather=True (DDP) the negatives come
    from every process; the positives are the local samples."""
    v, a = v.float(), a.float()
    offset = 0
    v_all, a_all = v, a
    if gather and torch.distributed.is_initialized():
        v_all, a_all = C.gather_cat(v), C.gather_cat(a)
        offset = torch.distributed.get_rank() * v.shape[0]
    target = torch.arange(v.shape[0], device=v.device) + offset
    loss_v2a = F.cross_entropy(mil_logits(v, a_all, tau), target)            # Eq. 4: image i vs every audio k
    loss_a2v = F.cross_entropy(mil_logits(v_all, a, tau).t(), target)        # Eq. 3: audio i vs every image k
    return loss_a2v + loss_v2a


# ----------------------------------------------------------------------------------------------------------
# Localization map (Eq. 6-9)
# ----------------------------------------------------------------------------------------------------------
def avl_map(v, a):
    """S^AVL (Eq. 6): cosine of every location with the clip's own audio -> (B, h, w)."""
    return torch.einsum("nchw,nc->nhw", v.float(), a.float())


def minmax_batch(m):
    """The official utils.normalize_img per map: (m - min) / (max - min), a constant map returned unchanged."""
    return C.minmax(m)


def ogl_blend(s_avl, s_obj, alpha: float = 0.4):
    """Eq. 9 on maps of the same size: alpha * minmax(AVL) + (1 - alpha) * minmax(OBJ), min-max again. The official
    test applies it to float32 maps already up-sampled to 224x224 (bilinear, align_corners=True), as evaluate()."""
    return minmax_batch(alpha * minmax_batch(s_avl) + (1 - alpha) * minmax_batch(s_obj))


# ----------------------------------------------------------------------------------------------------------
# Train
# ----------------------------------------------------------------------------------------------------------
def make_dataset(args, split_file, train: bool):
    return C.av_dataset(args, split_file, "crop_flip" if train else "squash", CLIP_SECONDS, "center", SR)


def batch_to_device(batch, device, args, train: bool):
    """A loader batch -> what a step consumes: (images (B, 3, S, S), log spectrograms (B, 1, 257, 200)) on the
    device. --decode fast decodes and augments the frames here (crop_flip for training, squash for testing)."""
    img = C.batch_images(batch, device, args, "crop_flip" if train else "squash", args.image_size)
    return img, C.log_spectrogram(batch["wav"].to(device, non_blocking=True), SR)


def train_step(net, opt, amp, inputs, args):
    """One optimisation step: forward (mixed precision on CUDA), L = L_a->v + L_v->a (Eq. 5) in float32,
    backward, Adam step. Returns the loss."""
    img, spec = inputs
    with amp.autocast():
        v, a = net(C.channels_last(img), spec)
    loss = ezvsl_loss(v, a, args.tau, args.gather_negatives)
    amp.step(loss, opt)
    return loss


def train(args):
    run = C.Run(args, METHOD)                         # DDP / device, seed, run folder (or --resume), log
    device, world, main_proc, ck, run_dir, log = run.device, run.world, run.main, run.ck, run.dir, run.log
    log(f"EZ-VSL | data {args.data} | preset {args.preset} | device {device} x{world} | run {run_dir}")
    model = build_model(args).to(device)
    C.gpu_habits(args, device, model.imgnet, [model])    # CUDA: cudnn.benchmark, channels_last; --compile
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    start, best, history = 0, -1.0, []
    if ck:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start, best, history = ck["epoch"], ck["best"], ck["history"]
        log(f"resumed from {args.resume} at epoch {start}")
    net = run.wrap(model)
    amp = C.Amp(device, args.amp)
    train_ds = make_dataset(args, args.train_split, True)
    val_ds = make_dataset(args, args.val_split, False)
    ann = C.load_annotations(args.annotations)
    log(f"train {len(train_ds)} clips, val {len(val_ds)}; batch {run.per_proc} x {world}; audio {CLIP_SECONDS:.0f} s "
        f"at {SR} Hz -> spectrogram {tuple(C.log_spectrogram(torch.zeros(1, int(SR * CLIP_SECONDS)), SR).shape[2:])}")
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
            res = evaluate(model, val_ds, ann, args, device, ogl=False, baselines=False)
            score = res["test"]["ciou@0.5"]
            history.append({"epoch": epoch + 1, "loss": tot / max(n, 1), "val": res["test"]})
            log(f"epoch {epoch + 1}/{args.epochs} loss {tot / max(n, 1):.4f} | val AVL {C.fmt_metrics(res['test'])} "
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
        args.ckpt = str(run_dir / "best.pt")
        args.out = str(run_dir)
        run_eval(args, device, log, seconds_train=time.time() - t0)


def benchmark(args):
    """--benchmark: samples/s of the loader, of train_step and end to end, peak memory (common.run_benchmark);
    trains a few steps on the side, writes benchmark.json, never a checkpoint."""
    C.single_process("--benchmark")
    run = C.Run(args, METHOD)                         # device, seed, run folder, log
    model = build_model(args).to(run.device)
    C.gpu_habits(args, run.device, model.imgnet, [model])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    make_loader = lambda: run.loader(make_dataset(args, args.train_split, True), args, 0)   # noqa: E731
    return C.run_benchmark(args, METHOD, run.device, run.dir, run.log, make_loader, batch_to_device, train_step,
                           model, opt, C.Amp(run.device, args.amp))


# ----------------------------------------------------------------------------------------------------------
# Evaluate
# ----------------------------------------------------------------------------------------------------------
# --negatives: the raw S^AVL (cosine, fixed scale [-1, 1]; OGL is audio-free, so it is left out) thresholded at
# NEG_THRESHOLD after the resize to 224 (--neg-threshold changes it).
NEG_THRESHOLD, NEG_SCALE = 0.5, "S^AVL cosine in [-1, 1]"


@torch.no_grad()
def compute_maps(model, ds, device, args, batch_size=32, obj_model=None, workers=0):
    """{id: S^AVL} and, given f_obj, {id: S^OBJ} (each at its own feature resolution, float32 numpy; the official
    test up-samples each to 224 before the blend)."""
    model.eval()
    avl, obj = {}, {}
    loader = torch.utils.data.DataLoader(ds, batch_size, shuffle=False, num_workers=workers, collate_fn=C.collate_av)
    for batch in loader:
        img, spec = batch_to_device(batch, device, args, False)
        ids = batch["ids"]
        if not ids:
            continue
        v, a = model(img, spec)
        s = avl_map(v, a).cpu().numpy()
        o = obj_model(img).float() if obj_model is not None else None
        for k, vid in enumerate(ids):
            avl[vid] = s[k]
            if o is not None:
                obj[vid] = o[k].cpu().numpy()
    return avl, obj


def blend_maps(avl: dict, obj: dict, alpha: float, align_corners: bool = True, ids=None) -> dict:
    """{id: Eq. 9 map at 224x224}: S^AVL and S^OBJ each up-sampled to 224 first, then blended (official order)."""
    out = {}
    for k in [k for k in (ids if ids is not None else list(avl)) if k in avl and k in obj]:
        a, o = (C.resize_maps(torch.from_numpy(np.asarray(m, np.float32))[None], C.GT_SIZE, align_corners)
                for m in (avl[k], obj[k]))
        out[k] = ogl_blend(a, o, alpha)[0].numpy()
    return out


def evaluate(model, ds, ann, args, device, ogl=True, baselines=True, obj_model=None, keep_maps=None):
    """The method's test map under the protocol; with OGL, rows for AVL, OBJ and AVL+OBJ (Eq. 9, blended after the
    up-sampling to 224 as the official test). res["maps"]: the scored maps of the ids in keep_maps (default all;
    the blended maps are 224x224)."""
    avl, obj = compute_maps(model, ds, device, args, args.batch_size or 32, obj_model if ogl else None, args.workers)
    kw = dict(ids=ds.ids, protocol=args.protocol, align_corners=args.align_corners)
    if not obj:
        res = C.evaluate_maps(avl, ann, baselines=baselines, **kw)
        res["maps"] = avl
        return res
    fuse = (obj, lambda a, o: ogl_blend(a, o, args.alpha))
    res = C.evaluate_maps(avl, ann, baselines=baselines, extra_baselines={"obj (audio-free)": obj}, fuse=fuse, **kw)
    res["rows"] = {"avl": C.evaluate_maps(avl, ann, baselines=False, **kw)["test"],
                   "obj": res["baselines"]["obj (audio-free)"], "avl+obj": res["test"]}
    res["maps"] = blend_maps(avl, obj, args.alpha, args.align_corners, keep_maps)
    return res


def load_model(path, args, device):
    """Our checkpoints carry their args; the official release is {'model': state_dict} (module.-prefixed)."""
    path = Path(path) / "best.pt" if Path(path).is_dir() else path
    ck = C.load_checkpoint(path, method=METHOD)             # readable, not another method's
    if "args" in ck:
        a = C.checkpoint_args(ck, path, METHOD, ("encoder", "dim", "image_size", "preset"))
        args.ckpt_seed = a.get("seed")                   # the training seed, for results.json
        for k in ("encoder", "dim", "image_size", "preset"):
            setattr(args, k, a[k])
    else:                                                   # the authors' release: paper architecture
        args.encoder, args.dim, args.image_size = "resnet18", 512, 224
    model = EZVSL(args.encoder, args.dim)
    sd = ck.get("model")
    C.load_state(model, C.strip_prefix(sd) if isinstance(sd, dict) else sd, path, METHOD)
    return model.to(device).eval()


def make_obj_model(args, log, device):
    if args.no_ogl or args.no_pretrained:
        log("OGL skipped (--no-ogl / --no-pretrained): AVL map only")
        return None
    try:
        return ObjectPrior(args.obj_prior, args.weights or "imagenet").to(device)
    except C.UserError as e:
        log(f"OGL skipped (AVL map only): {e}")
        return None


def run_eval(args, device, log, seconds_train=None):
    t0 = time.time()
    model = load_model(args.ckpt, args, device)
    ds = make_dataset(args, args.test_split, False)
    ann = C.load_annotations(args.annotations)
    obj_model = make_obj_model(args, log, device)
    keep = None if args.save_maps else ds.ids[: args.viz]          # 224x224 blended maps: only those written
    res = evaluate(model, ds, ann, args, device, obj_model=obj_model, keep_maps=keep)
    swapped = evaluate(model, C.SwapAudio(ds), ann, args, device, obj_model=obj_model, baselines=False,
                       keep_maps=[]) if len(ds) > 1 else None
    if args.negatives:
        thr = NEG_THRESHOLD if args.neg_threshold is None else args.neg_threshold
        res["negatives"], res["negatives_maps"] = C.run_negatives(
            lambda d: compute_maps(model, d, device, args, args.batch_size or 32, None, args.workers)[0], ds, ann, thr,
            NEG_SCALE, args.align_corners, log)
    for name, row in res.get("rows", {}).items():
        log(f"[test] EZ-VSL row {name:<8} {C.fmt_metrics(row)}   ({res['protocol']}, N={res['n']})")
    return C.save_results(args, METHOD, res, swapped, ann, log, time.time() - t0 + (seconds_train or 0),
                          "avl+obj" if "rows" in res else "avl", {"ezvsl_rows": res.get("rows")})


@torch.no_grad()
def predict(args, device, log):
    if not (args.ckpt and args.image and args.audio):
        raise C.UserError("--predict needs --ckpt, --image and --audio")
    model = load_model(args.ckpt, args, device)
    frame = C.load_image(args.image)
    x, sr = C.read_wav(args.audio)
    if sr != SR:
        raise C.UserError(f"{args.audio}: {sr} Hz; EZ-VSL expects {SR} Hz (convert with data_prep.py)")
    img = C.image_transform("squash", args.image_size)(frame)[None].to(device)
    wav = torch.from_numpy(C.clip_window(x, sr, CLIP_SECONDS, "center"))[None].to(device)
    v, a = model(img, C.log_spectrogram(wav, SR))
    heat = avl_map(v, a)
    obj_model = make_obj_model(args, log, device)
    if obj_model is not None:                       # as the official test: both up-sampled to 224, then Eq. 9
        ac = True if args.align_corners is None else args.align_corners
        heat = ogl_blend(C.resize_maps(heat.float(), C.GT_SIZE, ac),
                         C.resize_maps(obj_model(img).float(), C.GT_SIZE, ac), args.alpha)
    out = args.out or "heat.png"
    C.save_overlay_png(out, np.asarray(frame.resize((args.image_size, args.image_size))), heat[0].cpu().numpy())
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
    args.protocol = args.protocol or "median"      # official EZ-VSL test: per-image median
    args.align_corners = True if args.align_corners is None else args.align_corners   # official test.py
    if args.benchmark:
        return benchmark(args)
    if args.train:
        return C.train_seeds(args, train, log) if args.seeds else train(args)
    if not args.ckpt:
        raise C.UserError("--eval needs --ckpt")
    return run_eval(args, C.resolve_device(args.device), log)


if __name__ == "__main__":
    C.run_cli(main)
