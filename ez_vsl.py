"""EZ-VSL: "Localizing Visual Sounds the Easy Way", Shentong Mo and Pedro Morgado, ECCV 2022.
Paper: https://arxiv.org/abs/2203.09324    Official code: https://github.com/stoneMo/EZ-VSL

Idea: an image is a bag of location features. The audio of a clip only has to match *one* location of its own frame
(the most similar) and no location of the other frames of the batch: a multiple-instance contrastive loss, with no
hand-made sounding regions. At test time the audio-visual map is blended with the audio-free "object prior" of a frozen
ImageNet network (object-guided localization, OGL).

Equations (paper numbering):
  (1)  v^_i^{xy} = U_v v_i^{xy} + b_v,  a^_i = U_a a_i + b_a          1x1 conv / linear projections, L2-normalised
  (3)  L_{a->v} = -log exp(max_xy sim(a^_i, v^_i^xy)/tau) / sum_k exp(max_xy sim(a^_i, v^_k^xy)/tau)
  (4)  L_{v->a} = -log exp(max_xy sim(v^_i^xy, a^_i)/tau) / sum_k exp(max_xy sim(v^_i^xy, a^_k)/tau)
  (5)  L = L_{a->v} + L_{v->a}                (6)  S^AVL_xy = sim(v^_xy, a^)
  (7)  S^CLS_xy = max_o P(o | v'_xy)          (8)  S^L1_xy = ||v'_xy||_1            (v' of the frozen f_obj)
  (9)  S^EZVSL = alpha minmax(S^AVL) + (1 - alpha) minmax(S^OBJ),  alpha = 0.4

Run:
  python ez_vsl.py --train                      # the synthetic benchmark, cpu preset (a few minutes on 2 cores)
  python ez_vsl.py --train --seeds 0,1,2        # one run per seed (tabled by eval_cioU.py --table)
  python ez_vsl.py --train --data ROOT --train-split ROOT/splits/vggsound_144k.txt       # paper preset
  torchrun --nproc_per_node=2 ez_vsl.py --train --data ROOT        # 2 GPUs x 64, local negatives (the paper)
  python ez_vsl.py --eval --ckpt runs/<run>/best.pt [--data ROOT] [--negatives] [--save-maps m.npz] [--viz 20]
  python ez_vsl.py --eval --ckpt ezvsl_vggss144k/best.pth --data ROOT      # the authors' released checkpoint
  python ez_vsl.py --predict --ckpt runs/<run>/best.pt --image frame.jpg --audio clip.wav --out heat.png
  python ez_vsl.py --predict --ckpt runs/<run>/best.pt --video clip.mp4 --out clip_heat.mp4
  python ez_vsl.py --benchmark --data ROOT --preset paper --no-pretrained --batch-size 128 --workers 8

Deviations from the paper (P) and the official code (O), one line each (details and measurements: README):
  1. (P, O) audio at 16 kHz (data_prep.py): 3 s -> 257x200 (paper: 11025 Hz and 257x300; official: the file's rate).
  2. (O) checkpoint selection on a validation split (official: on the test set); the test split is used once.
  3. (O) DDP negatives are local as official (--gather-negatives: from every GPU); one process: the whole batch.
  4. (O) seeds are honoured; the test resize is bilinear align_corners=True as official (--no-align-corners: False).
  5. (O) an unreadable sample stops the run (official: replaced by a random one; --skip-bad: skipped and listed).
  6. (O) the map is the cosine S^AVL (official: cos / tau, the same after min-max up to float32 rounding).
  7. cpu preset (synthetic data): small CNNs, 112 px -> 14x14 map, dim 128, batch 16, lr 2e-3, tau 0.1, 12 epochs.
  8. (O) 16-bit PCM / 32768 (official: / 32767): the log spectrogram differs by at most 5.1e-6.
  9. (O) --decode fast: batched decode and augmentation on the device, <= 2 grey levels from --decode pil (exact).
  10. (O) audio shorter than a quarter of the window is an error (official: tiled silently); shorter ones are tiled.
  11. --negatives (beyond the paper): raw S^AVL >= 0.5 (--neg-threshold); SLAVC AP / max-F1 and pIA.
  12. (O) CUDA: mixed precision by default (--no-amp: float32, as official); loss and maps in float32.
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
    "paper": dict(epochs=20, batch_size=128, lr=1e-4, image_size=224, dim=512, encoder="resnet18", tau=0.03),
    # small8: a 14x14 map (stride 8; "small", 7x7, is what cpu checkpoints before 2026-12-07 hold)
    "cpu": dict(epochs=12, batch_size=16, lr=2e-3, image_size=112, dim=128, encoder="small8", tau=0.1),
}
SR, CLIP_SECONDS = 16000, 3.0
NEG_THRESHOLD, NEG_SCALE = 0.5, "S^AVL cosine in [-1, 1]"      # --negatives: OGL is audio-free, so it is left out


def build_parser():
    p = argparse.ArgumentParser(description="EZ-VSL (ECCV 2022): see the module docstring")
    C.add_standard_args(p)
    p.add_argument("--tau", type=float, help="temperature tau of Eq. 3-4 (official and paper preset 0.03; cpu 0.1)")
    p.add_argument("--alpha", type=float, default=0.4, help="alpha of Eq. 9 (official 0.4)")
    p.add_argument("--obj-prior", choices=["l1", "cls"], default="l1", help="object prior: Eq. 8 (L1) or Eq. 7 (CLS)")
    p.add_argument("--no-ogl", action="store_true", help="skip object-guided localization (the AVL map only)")
    p.add_argument("--gather-negatives", action="store_true", help="DDP: negatives from every GPU")
    p.add_argument("--dim", type=int, help="shared embedding size (official 512)")
    p.add_argument("--image-size", type=int, help="input image side (official 224)")
    return p


def synthetic_data(log):          # no --data: the built-in synthetic benchmark, made once by data_prep.py
    import data_prep
    return data_prep.ensure_synthetic(log=log)


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------
def _init_official(m: nn.Module):
    """The official initialisation of the audio net and the projections: kaiming-normal convs (fan_out), trunc-normal
    linears (std 0.01), BN weight ~ N(1, 0.02), bias 0."""
    for mod in m.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(mod, nn.Linear):
            nn.init.trunc_normal_(mod.weight, std=0.01)
        elif isinstance(mod, nn.BatchNorm2d):
            nn.init.normal_(mod.weight, 1.0, 0.02)
            nn.init.zeros_(mod.bias)


class EZVSL(nn.Module):
    """Visual trunk -> (B, 512, h, w) -> 1x1 conv U_v; audio trunk -> global max pool -> linear U_a (Eq. 1). The
    official attribute names (imgnet, audnet, img_proj, aud_proj), so released checkpoints load."""

    def __init__(self, encoder: str = "resnet18", dim: int = 512):
        super().__init__()
        if encoder == "resnet18":
            self.imgnet = C.ResNet18Trunk(3, stride=32)         # 224 px -> 512 x 7 x 7
            self.audnet = C.ResNet18Trunk(1, stride=32)         # 1 x 257 x 200 -> 512 x 9 x 7
        else:
            self.imgnet = C.SmallCNN(3, strides=(2, 1, 2, 1 if encoder == "small8" else 2))  # 112 px -> 14 x 14 (7 x 7)
            self.audnet = C.SmallCNN(1, strides=(2, 2, 2, 2))   # 1 x 257 x 200 -> 128 x 8 x 7
        c = 512 if encoder == "resnet18" else self.imgnet.out_channels
        self.img_proj = nn.Conv2d(c, dim, kernel_size=1)
        self.aud_proj = nn.Linear(c, dim)
        for m in (self.audnet, self.img_proj, self.aud_proj):
            _init_official(m)

    def forward(self, image, spec):
        v = F.normalize(self.img_proj(self.imgnet(image)), dim=1)           # v^ (B, dim, h, w)
        a = F.normalize(self.aud_proj(self.audnet(spec).amax(dim=(2, 3))), dim=1)   # global max pool, a^ (B, dim)
        return v, a


class ObjectPrior(nn.Module):
    """f_obj: a separate ImageNet ResNet-18, never trained: S^L1 (Eq. 8; official: mean |v'| over channels) or S^CLS
    (Eq. 7: the ImageNet classifier's max class posterior at every location)."""

    def __init__(self, kind: str = "l1", weights="imagenet"):
        super().__init__()
        self.kind, self.trunk, self.fc = kind, C.ResNet18Trunk(3, stride=32), nn.Linear(512, 1000)
        sd = (C.imagenet_state_dict("resnet18") if weights == "imagenet"
              else C.strip_prefix(C.safe_load(weights, "--weights")))
        C.load_state(self.trunk, {k: v for k, v in sd.items() if not k.startswith("fc.")}, weights, "ResNet-18 trunk")
        C.load_state(self.fc, {"weight": sd.get("fc.weight"), "bias": sd.get("fc.bias")}, weights,
                     "ImageNet classifier")
        self.eval().requires_grad_(False)

    def forward(self, image):
        f = self.trunk(image)                                               # v' (B, 512, h, w)
        if self.kind == "l1":
            return f.abs().mean(1)                                          # Eq. 8 (/ 512, as official)
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
    """max_xy sim(v_n^xy, a_m) / tau for every image n and audio m -> (Bv, Ba), in float32 (also under autocast)."""
    with torch.autocast(v.device.type, enabled=False):
        return (torch.einsum("nchw,mc->nmhw", v.float(), a.float()) / tau).flatten(2).amax(-1)


def gather_cat(x: torch.Tensor) -> torch.Tensor:
    """x of every DDP process, concatenated; the gradient flows through this process's part."""
    parts = [torch.zeros_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x.detach())
    parts[torch.distributed.get_rank()] = x
    return torch.cat(parts)


def ezvsl_loss(v, a, tau: float = 0.03, gather: bool = False):
    """L = L_{a->v} + L_{v->a} (Eq. 5) with the batch's other bags as negatives (gather: every GPU's)."""
    v, a = v.float(), a.float()
    v_all, a_all, offset = v, a, 0
    if gather and torch.distributed.is_initialized():
        v_all, a_all, offset = gather_cat(v), gather_cat(a), torch.distributed.get_rank() * v.shape[0]
    target = torch.arange(v.shape[0], device=v.device) + offset
    loss_v2a = F.cross_entropy(mil_logits(v, a_all, tau), target)            # Eq. 4: image i vs every audio k
    loss_a2v = F.cross_entropy(mil_logits(v_all, a, tau).t(), target)        # Eq. 3: audio i vs every image k
    return loss_a2v + loss_v2a


# ----------------------------------------------------------------------------------------------------------
# Localization map (Eq. 6-9)
# ----------------------------------------------------------------------------------------------------------
def avl_map(v, a):
    """S^AVL (Eq. 6): the cosine of every location with the clip's own audio -> (B, h, w), in float32."""
    with torch.autocast(v.device.type, enabled=False):
        return torch.einsum("nchw,nc->nhw", v.float(), a.float())


def ogl_blend(s_avl, s_obj, alpha: float = 0.4):
    """Eq. 9 on maps of one size: minmax(alpha minmax(AVL) + (1 - alpha) minmax(OBJ)); the official test applies it to
    maps already up-sampled to 224x224 (bilinear, align_corners=True)."""
    return C.minmax(alpha * C.minmax(s_avl) + (1 - alpha) * C.minmax(s_obj))


def blend_maps(avl: dict, obj: dict, alpha: float, align_corners: bool = True, ids=None) -> dict:
    """{id: the Eq. 9 map at 224x224}: S^AVL and S^OBJ each up-sampled to 224 first, then blended (official order)."""
    up = lambda m: C.resize_maps(torch.from_numpy(np.asarray(m, np.float32))[None], C.GT_SIZE, align_corners)  # noqa
    return {k: ogl_blend(up(avl[k]), up(obj[k]), alpha)[0].numpy() for k in (avl if ids is None else ids)
            if k in avl and k in obj}


# ----------------------------------------------------------------------------------------------------------
# Train
# ----------------------------------------------------------------------------------------------------------
def make_dataset(args, split_file, train: bool):
    return C.av_dataset(args, split_file, "crop_flip" if train else "squash", CLIP_SECONDS, "center", SR)


def batch_to_device(batch, device, args, train: bool):
    """A loader batch -> (images (B, 3, S, S), log spectrograms (B, 1, 257, 200)) on the device, or None when every
    sample was skipped. --decode fast decodes and augments the frames here (crop_flip to train, squash to test)."""
    img = C.batch_images(batch, device, args, "crop_flip" if train else "squash", args.image_size)
    return None if img is None else (img, C.log_spectrogram(batch["wav"].to(device, non_blocking=True), SR))


def train_step(net, opt, amp, inputs, args):
    """Forward (mixed precision on CUDA), L = L_a->v + L_v->a (Eq. 5) in float32, backward, Adam step."""
    img, spec = inputs
    with amp.autocast():
        v, a = net(C.channels_last(img), spec)
    loss = ezvsl_loss(v, a, args.tau, args.gather_negatives)
    amp.step(loss, opt)
    return loss


def train(args):
    run = C.Run(args, METHOD)                          # preflight, DDP / device, seed, run folder or --resume, log
    run.log(f"EZ-VSL | data {args.data} | preset {args.preset} | device {run.device} x{run.world} | run {run.dir}")
    model = build_model(args).to(run.device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    net, amp = run.prepare(model, opt, model.imgnet)   # resumed state, CUDA habits, DDP
    train_ds, val_ds = make_dataset(args, args.train_split, True), make_dataset(args, args.val_split, False)
    ann = C.load_annotations(args.annotations)
    run.log(f"train {len(train_ds)} clips, val {len(val_ds)}; batch {run.per_proc} x {run.world}; audio "
            f"{CLIP_SECONDS:g} s at {SR} Hz -> spectrogram 257x200")
    for epoch in run.epochs():
        net.train()
        losses = []
        for batch in run.batches(train_ds, epoch):     # reseeded per epoch: exact resume
            inputs = batch_to_device(batch, run.device, args, True)
            if inputs is not None:
                losses.append(train_step(net, opt, amp, inputs, args).item())
        run.end_epoch(epoch, {"loss": losses}, lambda: evaluate(model, val_ds, ann, args, run.device, ogl=False,
                                                                baselines=False))
    if run.finish():
        run_eval(args, run.device, run.log, run.seconds())


def benchmark(args):
    """--benchmark (common.run_benchmark): a few training steps, timed; writes benchmark.json, never a checkpoint."""
    run = C.Run(args, METHOD)
    model = build_model(args).to(run.device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    net, amp = run.prepare(model, opt, model.imgnet)
    return C.run_benchmark(run, lambda: make_dataset(args, args.train_split, True), batch_to_device, train_step,
                           net, opt, amp)


# ----------------------------------------------------------------------------------------------------------
# Evaluate
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def compute_maps(model, ds, device, args, obj_model=None):
    """{id: S^AVL} and, given f_obj, {id: S^OBJ}, each at its feature resolution (float32 numpy)."""
    model.eval()
    avl, obj = {}, {}
    for batch in torch.utils.data.DataLoader(ds, args.batch_size, num_workers=args.workers, collate_fn=C.collate_av):
        inputs = batch_to_device(batch, device, args, False)
        if inputs is None:
            continue
        avl.update(zip(batch["ids"], avl_map(*model(*inputs)).cpu().numpy()))
        if obj_model is not None:
            obj.update(zip(batch["ids"], obj_model(inputs[0]).float().cpu().numpy()))
    return avl, obj


def evaluate(model, ds, ann, args, device, ogl=True, baselines=True, obj_model=None, keep_maps=None):
    """The test map under the protocol; with OGL, rows for AVL, OBJ and AVL+OBJ (Eq. 9, blended after the resize to
    224, as the official test). res["maps"]: the scored maps of the ids in keep_maps (default all)."""
    avl, obj = compute_maps(model, ds, device, args, obj_model if ogl else None)
    kw = dict(ids=ds.ids, protocol=args.protocol, align_corners=args.align_corners)
    if not obj:
        return dict(C.evaluate_maps(avl, ann, baselines=baselines, **kw), maps=avl)
    res = C.evaluate_maps(avl, ann, baselines=baselines, extra_baselines={"obj (audio-free)": obj},
                          fuse=(obj, lambda a, o: ogl_blend(a, o, args.alpha)), **kw)
    res["rows"] = {"avl": C.evaluate_maps(avl, ann, baselines=False, **kw)["test"],
                   "obj": res["baselines"]["obj (audio-free)"], "avl+obj": res["test"]}
    res["maps"] = blend_maps(avl, obj, args.alpha, args.align_corners, keep_maps)
    return res


def load_model(path, args, device):
    """Our checkpoints carry their settings; the official release is {'model': state_dict} (module.-prefixed)."""
    path = Path(path) / "best.pt" if Path(path).is_dir() else path
    ck = C.load_checkpoint(path, method=METHOD)
    if "args" in ck:
        a = C.checkpoint_args(ck, path, METHOD, ("encoder", "dim", "image_size", "preset"))
        args.ckpt_seed, args.encoder, args.dim, args.image_size, args.preset = (a.get("seed"), a["encoder"], a["dim"],
                                                                                a["image_size"], a["preset"])
        args.imagenet_trained = a["encoder"] == "resnet18" and not a.get("no_pretrained")
    else:                                              # the authors' release: the paper architecture
        args.encoder, args.dim, args.image_size = "resnet18", 512, 224
    model = EZVSL(args.encoder, args.dim)
    sd = ck.get("model")
    C.load_state(model, C.strip_prefix(sd) if isinstance(sd, dict) else sd, path, METHOD)
    return model.to(device).eval()


def make_obj_model(args, log, device):
    """f_obj for OGL, or None (the AVL map only, said in the log): OGL needs ImageNet weights, which are fetched only
    for a checkpoint trained from them (the authors' ones too), else with --weights."""
    if args.no_ogl or args.no_pretrained:
        log("OGL skipped (--no-ogl / --no-pretrained): AVL map only")
        return None
    if not getattr(args, "imagenet_trained", True) and not args.weights:
        log("OGL skipped: the checkpoint was trained without ImageNet weights (cpu preset or --no-pretrained); "
            "--weights PATH to an ImageNet ResNet-18 adds OGL")
        return None
    try:
        return ObjectPrior(args.obj_prior, args.weights or "imagenet").to(device)
    except C.UserError as e:
        log(f"OGL skipped (AVL map only): {e}")
        return None


def run_eval(args, device, log, seconds_train=0.0):
    t0 = time.time()
    model = load_model(args.ckpt, args, device)
    ds, ann = make_dataset(args, args.test_split, False), C.load_annotations(args.annotations)
    obj_model = make_obj_model(args, log, device)
    keep = None if args.save_maps else ds.ids[: args.viz]          # 224x224 blended maps: only those written
    res = evaluate(model, ds, ann, args, device, obj_model=obj_model, keep_maps=keep)
    swapped = evaluate(model, C.SwapAudio(ds), ann, args, device, obj_model=obj_model, baselines=False,
                       keep_maps=[]) if len(ds) > 1 else None
    if args.negatives:
        thr = NEG_THRESHOLD if args.neg_threshold is None else args.neg_threshold
        res["negatives"], res["negatives_maps"] = C.run_negatives(
            lambda d: compute_maps(model, d, device, args)[0], ds, ann, thr, NEG_SCALE, args.align_corners)
    for name, row in res.get("rows", {}).items():
        log(f"[test] EZ-VSL row {name:<8} {C.fmt_metrics(row)}   ({res['protocol']}, N={res['n']})")
    inter = C.interactive_split(args, lambda a: evaluate(model, make_dataset(a, a.test_split, False), ann, a, device,
                                                         obj_model=obj_model, baselines=False, keep_maps=[]))
    return C.save_results(args, METHOD, res, swapped, ann, log, time.time() - t0 + seconds_train,
                          "avl+obj" if "rows" in res else "avl", {"ezvsl_rows": res.get("rows"), "interactive": inter})


@torch.no_grad()
def predict(args, log=print):
    device = C.resolve_device(args.device)
    model = load_model(args.ckpt, args, device)
    obj_model = make_obj_model(args, log, device)
    up = lambda m: C.resize_maps(m.float(), C.GT_SIZE, args.align_corners)  # noqa: E731

    def maps(img, wav):                                # (B, h, w) S^AVL, or (B, 224, 224) with OGL
        heat = avl_map(*model(img, C.log_spectrogram(wav, SR)))
        if obj_model is not None:                      # as the official test: both up-sampled to 224, then Eq. 9
            heat = ogl_blend(up(heat), up(obj_model(img)), args.alpha)
        return heat
    if args.video:                                     # the test's window, centred on each frame
        return C.predict_video(args, maps, ("squash", args.image_size, "bicubic"), (SR, CLIP_SECONDS, "center"),
                               device, log)
    img = C.image_transform("squash", args.image_size)(C.load_image(args.image))[None].to(device)
    wav, _, _ = C.read_wav_window(args.audio, CLIP_SECONDS, "center", sample_rate=SR)     # the test's window
    heat = maps(img, torch.from_numpy(wav)[None].to(device))
    C.save_overlay_png(args.out or "heat.png", C.denormalize(img[0]), heat[0].cpu().numpy())
    log(f"heat map written to {args.out or 'heat.png'}")


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------
def main(argv=None):
    args = C.parse_args(build_parser(), argv)
    C.setup(args, PRESETS, synthetic_data, protocol="median", align_corners=True)   # the official test.py
    if args.predict:
        return predict(args)
    if args.benchmark:
        return benchmark(args)
    if args.train:
        return C.train_seeds(args, train) if args.seeds else train(args)
    return run_eval(args, C.resolve_device(args.device), C.RunLog())


if __name__ == "__main__":
    C.run_cli(main)
