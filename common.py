"""common.py - what the four method files share, and nothing else: encoders, the log spectrogram, the data reader,
the evaluator and the run plumbing. Losses, heads and localization maps live in the method files.

The standard data layout (written by data_prep.py, read by the methods and the evaluator):
  ROOT/frames/<id>.jpg        one RGB frame per clip
  ROOT/audio/<id>.wav         mono PCM16 WAV of the whole clip (each method reads its own window)
  ROOT/splits/<name>.txt      one id per line (train.txt, val.txt, test.txt, ...)
  ROOT/annotations.json       [{"file": id, "class": str, "bbox": [[x1, y1, x2, y2], ...]}, ...] (VGG-SS format,
                              boxes normalised to [0, 1]); optional "gt": "union" (default) | "consensus"
                              (Flickr-SoundNet), "objects": [{"class", "bbox", "sounding"}] (CSOL), "mask": PNG
                              path relative to ROOT (AVSBench, "bbox": []), "group": the image (IS3)
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import ctypes
import datetime
import functools
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GT_SIZE = 224                                   # every benchmark is scored on 224x224 maps


class UserError(Exception):
    """A problem with the user's input or environment: printed as one `error:` line, never a traceback."""


class BadMedia(UserError):
    """An unreadable frame or WAV of a dataset (path, clip id, reason): stops the run, or is skipped with --skip-bad."""

    def __init__(self, path, vid, reason: str):
        self.path, self.vid, self.reason = str(path), vid, reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):                          # DataLoader workers send it to the main process
        return BadMedia, (self.path, self.vid, self.reason)


# =====================================================================================================================
# 1. Encoders
# =====================================================================================================================
class ResNet18Trunk(nn.Module):
    """torchvision's ResNet-18 up to layer4 -> (B, 512, h, w), with torchvision's parameter names (its weights load).
    stride 32: the standard net (224 px -> 7x7; EZ-VSL); 16: layer4 without down-sampling (224 px -> 14x14; LVS, CSOL).
    in_channels 1: the audio trunk (a 1-channel 7x7 stem)."""

    def __init__(self, in_channels: int = 3, stride: int = 32):
        super().__init__()
        import torchvision
        r = torchvision.models.resnet18(weights=None)
        if in_channels != 3:
            r.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if stride == 16:
            r.layer4[0].conv1.stride = r.layer4[0].downsample[0].stride = (1, 1)
        self.conv1, self.bn1, self.relu, self.maxpool = r.conv1, r.bn1, r.relu, r.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = r.layer1, r.layer2, r.layer3, r.layer4

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class SmallCNN(nn.Module):
    """The `cpu` preset's encoder: a 3x3 conv-BN-ReLU stem with stride strides[0] and a 2x2 max-pool, then one 3x3
    conv-BN-ReLU per further width/stride. Total stride 2 * prod(strides): (2, 1, 2, 2) -> 16 (112 px -> 7x7),
    (2, 1, 2, 1) -> 8 (112 px -> 14x14), (2, 2, 2, 2) -> 32 (audio). final_relu=False ends on the last conv."""

    def __init__(self, in_channels: int, widths=(32, 64, 128, 128), strides=(2, 1, 2, 2), final_relu: bool = True):
        super().__init__()
        layers = [nn.Conv2d(in_channels, widths[0], 3, stride=strides[0], padding=1, bias=False),
                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        for c_in, w, s in zip(widths[:-1], widths[1:], strides[1:]):
            layers += [nn.Conv2d(c_in, w, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*(layers if final_relu else layers[:-2]))
        self.out_channels = widths[-1]

    def forward(self, x):
        return self.net(x)


def imagenet_state_dict(arch: str = "resnet18") -> dict:
    """ImageNet weights through torchvision's weights API (downloaded once into TORCH_HOME)."""
    import torchvision.models as tvm
    weights = {"resnet18": tvm.ResNet18_Weights.IMAGENET1K_V1, "vgg16": tvm.VGG16_Weights.IMAGENET1K_V1}[arch]
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:                      # offline, proxy, corrupt cache ...
        raise UserError(f"could not obtain torchvision's ImageNet {arch} weights ({type(e).__name__}: {e}). Put the "
                        f"file in TORCH_HOME's hub/checkpoints cache, pass --weights PATH to a local .pth, or pass "
                        f"--no-pretrained") from None


def load_weights(module: nn.Module, source, arch: str = "resnet18", prefix: str = "") -> list[str]:
    """Load "imagenet" (torchvision) or a local .pth (a state dict, or one under 'state_dict' / 'model' /
    'model_state_dict') into `module`; only keys under `prefix` (removed), of matching shape. Returns the keys of the
    module that got no weight."""
    sd = imagenet_state_dict(arch) if source == "imagenet" else safe_load(source, "weights file")
    for k in ("state_dict", "model", "model_state_dict"):                  # (torchvision's has none of these)
        if isinstance(sd, dict) and isinstance(sd.get(k), dict):
            sd = sd[k]
    sd = {k[len(prefix):]: v for k, v in strip_prefix(sd).items() if k.startswith(prefix)}
    own = module.state_dict()
    usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise UserError(f"no parameter of {source} matches the {type(module).__name__} being loaded")
    module.load_state_dict(usable, strict=False)
    return [k for k in own if k not in usable]


def strip_prefix(sd: dict, prefix: str = "module.") -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


# =====================================================================================================================
# 2. The LVS / EZ-VSL log spectrogram (SSPL's and CSOL's front ends live in their files)
# =====================================================================================================================
def log_spectrogram(wav: torch.Tensor, sr: int, nperseg: int = 512, noverlap: int = 274) -> torch.Tensor:
    """(B, N) waveform -> (B, 1, 257, T): log(scipy.signal.spectrogram(x, sr, nperseg=512, noverlap=274) + 1e-7) / 12
    (frames of 512, hop 238, no padding, mean removed per frame, periodic Tukey(0.25), density scaling, one-sided), in
    float32 (within 1e-6 of float64). 16 kHz: 3 s -> 257x200, 10 s -> 257x671."""
    from scipy.signal import get_window
    x = wav.float()
    frames = x.unfold(-1, nperseg, nperseg - noverlap)                  # (B, T, 512)
    frames = frames - frames.mean(-1, keepdim=True)                      # detrend='constant'
    w64 = torch.from_numpy(get_window(("tukey", 0.25), nperseg))        # periodic, float64
    w, scale = w64.to(x.device, torch.float32), float(sr * (w64 ** 2).sum())
    spec = torch.view_as_real(torch.fft.rfft(frames * w, dim=-1)).square().sum(-1) / scale   # |X|^2
    spec[..., 1:-1] *= 2.0                                               # one-sided: all but DC and Nyquist doubled
    return (torch.log(spec + 1e-7) / 12.0).transpose(-1, -2).unsqueeze(1)


# =====================================================================================================================
# 3. Data: WAV files, the dataset reader, the image pipelines (per sample with PIL, or batched on the device)
# =====================================================================================================================
def _wav_open(path, vid=None):
    """Parse a 16-bit PCM WAV header -> (byte offset of the samples, channels, rate, frames in the file). A streaming
    header (data size 0 or 0xFFFFFFFF, as FFmpeg writes to a pipe) runs to the end of the file."""
    path = Path(path)
    if not path.is_file():
        raise BadMedia(path, vid, "missing audio file")
    try:
        with wave.open(str(path), "rb") as f:
            ch, width, sr, n = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
            offset, declared = f._file.offset + f._data_chunk.offset, f._data_chunk.chunksize
    except (wave.Error, EOFError) as e:
        raise BadMedia(path, vid, f"not a PCM WAV file the reader understands ({str(e) or 'its header is cut short'}); "
                                  f"make it again with data_prep.py (mono 16-bit PCM)") from None
    if width != 2:
        raise BadMedia(path, vid, f"{8 * width}-bit WAV is not supported (16-bit PCM only, as data_prep.py writes); "
                                  f"make it again with data_prep.py")
    in_file = max(0, path.stat().st_size - offset) // (2 * ch)
    n = in_file if declared in (0, 0xFFFFFFFF) else n
    if n == 0:
        raise BadMedia(path, vid, "the WAV file holds no samples")
    if in_file < n:
        raise BadMedia(path, vid, f"truncated WAV (header says {n} frames, file holds {in_file})")
    return offset, ch, sr, n


def _read_pcm(path, offset: int, ch: int, start: int, count: int) -> np.ndarray:
    """Frames [start, start + count) of little-endian 16-bit PCM -> float32 mono x / 2^15 (channels averaged)."""
    with open(path, "rb") as fh:
        fh.seek(offset + start * 2 * ch)
        x = np.frombuffer(fh.read(count * 2 * ch), "<i2")
    return (x if ch == 1 else x.reshape(-1, ch).mean(1)).astype(np.float32) / np.float32(32768)


def read_wav(path) -> tuple[np.ndarray, int]:
    """A whole 16-bit PCM WAV (any channel count) -> (float32 mono in [-1, 1], rate); BadMedia otherwise."""
    offset, ch, sr, n = _wav_open(path)
    return _read_pcm(path, offset, ch, 0, n), sr


def read_wav_window(path, seconds: float, where: str = "center", vid=None, sample_rate: int | None = None):
    """Only the window a method uses (one seek + read) -> (float32 mono of round(sr * seconds) samples, sr, tiled);
    equal to clip_window(read_wav(path)[0], ...). Another rate than sample_rate is an error (never resampled); a clip
    shorter than a quarter of the window is BadMedia (`audio too short`), a shorter one is tiled (tiled=True)."""
    offset, ch, sr, total = _wav_open(path, vid)
    if sample_rate is not None and sr != sample_rate:
        raise UserError(f"{path}: sample rate {sr} Hz, this method expects {sample_rate} Hz; re-run data_prep.py "
                        f"with --sr {sample_rate}")
    n = int(round(sr * seconds))
    if total >= n:
        start = 0 if where == "start" else total // 2 - n // 2 if where == "center_tiled" else (total - n) // 2
        return _read_pcm(path, offset, ch, start, n), sr, False
    if 4 * total < n:
        raise BadMedia(path, vid, f"audio too short: {total / sr:.3f} s, the method needs {seconds:g} s")
    return clip_window(_read_pcm(path, offset, ch, 0, total), sr, seconds, where), sr, True


def clip_window(x: np.ndarray, sr: int, seconds: float, where: str = "center") -> np.ndarray:
    """round(sr * seconds) samples of a mono waveform. 'center': the centred window (EZ-VSL, CSOL); 'start': the first
    seconds (LVS's test); a shorter clip is tiled and its start kept (LVS, EZ-VSL). 'center_tiled' (SSPL): a shorter
    clip is tiled n // len + 1 times and the window centred in the tiling, start = len // 2 - n // 2."""
    n = int(round(sr * seconds))
    if len(x) < n:
        x = np.tile(x, n // len(x) + 1)
        if where != "center_tiled":
            return x[:n]
    start = 0 if where == "start" else len(x) // 2 - n // 2 if where == "center_tiled" else (len(x) - n) // 2
    return x[start:start + n]


def read_split(path) -> list[str]:
    """One id per line (the first comma-separated column, so csv lists work too); a BOM and blank lines ignored."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"split file not found: {path}")
    ids = [i for i in (ln.split(",")[0].strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()) if i]
    if not ids:
        raise UserError(f"split file {path} lists no ids (empty file)")
    return ids


def load_image(path, vid=None) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise BadMedia(path, vid, "missing frame")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:
        raise BadMedia(path, vid, f"cannot decode image ({e})") from None


def check_layout(root, ids) -> None:
    """One error listing the ids of a split without frames/<id>.jpg or audio/<id>.wav (never a silent skip)."""
    root = Path(root)
    bad = [i for i in ids
           if not (root / "frames" / f"{i}.jpg").is_file() or not (root / "audio" / f"{i}.wav").is_file()]
    if bad:
        raise UserError(f"{len(bad)} of {len(ids)} ids have no frames/<id>.jpg or audio/<id>.wav under {root} "
                        f"(first: {', '.join(bad[:5])}); run data_prep.py, or remove them from the split")


def image_transform(kind: str, size: int = 224, interpolation: str = "bicubic"):
    """The per-sample PIL pipelines of the official code (ImageNet normalisation; bicubic, CSOL bilinear):
    'crop_flip'   Resize(int(1.1 size)) -> RandomCrop(size) -> RandomHorizontalFlip     (LVS/EZ-VSL/SSPL training)
    'squash'      Resize((size, size)): no crop, full-frame boxes stay aligned           (test)
    'center_crop' Resize(size) -> CenterCrop(size)                                       (LVS/SSPL official test)
    'csol_train'  Resize((1.143 size)^2) -> RandomCrop(size) -> flip, brightness and saturation U(0.7, 1.3)"""
    import torchvision.transforms as T
    mode = T.InterpolationMode(interpolation)
    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    big = int(round(size * 256 / 224))
    return T.Compose({
        "crop_flip": [T.Resize(int(size * 1.1), mode), T.RandomCrop(size), T.RandomHorizontalFlip()],
        "squash": [T.Resize((size, size), mode)],
        "center_crop": [T.Resize(size, mode), T.CenterCrop(size)],
        "csol_train": [T.Resize((big, big), mode), T.RandomCrop(size), T.RandomHorizontalFlip(),
                       T.ColorJitter(brightness=0.3, saturation=0.3)]}[kind] + norm)


def resize_target(kind: str, size: int, h: int, w: int) -> tuple[int, int]:
    """The (height, width) image_transform(kind, size) resizes an h x w frame to (torchvision's Resize rules)."""
    if kind in ("crop_flip", "center_crop"):
        s = int(size * 1.1) if kind == "crop_flip" else size
        return (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
    big = int(round(size * 256 / 224))
    return (size, size) if kind == "squash" else (big, big)


def denormalize(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) ImageNet-normalised tensor -> (H, W, 3) uint8."""
    m, s = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (img.detach().cpu().float() * s + m).clamp(0, 1).mul(255).byte().permute(1, 2, 0).numpy()


class AVDataset(torch.utils.data.Dataset):
    """The standard layout, item i -> (image, waveform window (float32 tensor), id, tiled), or the BadMedia / UserError
    of an unreadable sample *returned*, not raised (a DataLoader worker never prints a traceback). image_tf: a PIL
    pipeline (--decode pil; may return a tuple of views); None: the fast path, where the image is the file's bytes,
    decoded per batch by batch_images()."""

    def __init__(self, root, ids, seconds: float, where: str = "center", sample_rate: int = 16000, image_tf=None):
        if not ids:
            raise UserError(f"empty id list for {root} (an empty split file, or --limit)")
        self.root, self.ids, self.image_tf = Path(root), list(ids), image_tf
        self.seconds, self.where, self.sr = seconds, where, sample_rate
        check_layout(self.root, self.ids)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        vid = self.ids[i]
        path = self.root / "frames" / f"{vid}.jpg"
        try:
            if self.image_tf is None:
                try:
                    img = torch.from_numpy(np.fromfile(path, np.uint8))
                except OSError as e:
                    raise BadMedia(path, vid, f"cannot read frame ({e})") from None
            else:
                img = self.image_tf(load_image(path, vid))
            wav, _, tiled = read_wav_window(self.root / "audio" / f"{vid}.wav", self.seconds, self.where, vid, self.sr)
        except UserError as e:
            return e
        return img, torch.from_numpy(wav), vid, tiled


class SwapAudio(torch.utils.data.Dataset):
    """Item i keeps its frame and id, with other audio: 'next' (the audio-swapped control) or 'offscreen' clip (i + 1)
    mod N's (or donors[i]'s), 'silence' zeros, 'noise' white noise N(0, NOISE_STD^2) seeded by i (the same each run)."""

    def __init__(self, ds: AVDataset, kind: str = "next", donors=None):
        self.ds, self.ids, self.kind, self.donors = ds, ds.ids, kind, donors

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = self.ds[i]
        if self.kind in ("next", "offscreen"):
            other = self.ds[self.donors[i] if self.donors else (i + 1) % len(self.ds)]
            bad = [x for x in (item, other) if isinstance(x, Exception)]
            return bad[0] if bad else (item[0], other[1], *item[2:])
        if isinstance(item, Exception):
            return item
        wav = torch.zeros_like(item[1]) if self.kind == "silence" else (torch.randn(
            item[1].shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64) * NOISE_STD).float()
        return (item[0], wav, *item[2:])


def augmented_views(tf, n: int, img) -> tuple:
    """n independently augmented views of a frame (SSPL's two views) in the per-sample PIL pipeline."""
    return tuple(tf(img) for _ in range(n))


def collate_av(items: list) -> dict:
    """{"ids", "wav" (B, N), "tiled" (ids whose audio was tiled), "bad" (the errors of unreadable samples), and
    "frames" [the files' bytes as uint8 tensors] (fast path) or "images" (PIL path)}."""
    good = [it for it in items if not isinstance(it, Exception)]
    batch = {"ids": [it[2] for it in good], "tiled": [it[2] for it in good if it[3]],
             "bad": [it for it in items if isinstance(it, Exception)],
             "wav": torch.stack([it[1] for it in good]) if good else torch.zeros(0, 0)}
    if good and not (torch.is_tensor(good[0][0]) and good[0][0].dim() == 1):
        batch["images"] = torch.utils.data.default_collate([it[0] for it in good])
    else:
        batch["frames"] = [it[0] for it in good]
    return batch


MEDIA = argparse.Namespace(skipped={}, tiled=set())    # what this process skipped (--skip-bad) and tiled (audio
                                                       # shorter than the window): reported by save_results


def skip_or_raise(err: UserError, args) -> None:
    if not (args.skip_bad and isinstance(err, BadMedia)):
        raise err
    MEDIA.skipped[err.vid] = f"{err.path}: {err.reason}"


def decode_frame(data: torch.Tensor, path, vid=None) -> torch.Tensor:
    """JPEG/PNG bytes -> (3, H, W) uint8 RGB on the CPU; BadMedia naming the file when it does not decode."""
    from torchvision.io import ImageReadMode, decode_image
    try:
        x = decode_image(data, mode=ImageReadMode.RGB)
    except Exception as e:
        raise BadMedia(path, vid, f"cannot decode image ({(str(e).splitlines() or [type(e).__name__])[0]})") from None
    if x.dtype != torch.uint8:                           # a 16-bit PNG: PIL's 8-bit conversion, as --decode pil
        x = torch.from_numpy(np.array(load_image(path, vid))).permute(2, 0, 1)
    return x


def augment_params(kind: str, size: int, shape) -> tuple | None:
    """The random draws image_transform(kind, size) makes for a frame resized to `shape`, with torchvision's own calls
    in its order (RandomCrop's two randint unless already size x size, RandomHorizontalFlip's rand, ColorJitter's
    randperm and factors): with --workers 0 the fast path draws the crops, flips and jitters --decode pil draws.
    -> (i, j, flip, brightness, saturation, brightness_first), None for a pipeline without randomness."""
    if kind not in ("crop_flip", "csol_train"):
        return None
    h, w = shape
    i = j = 0
    if (h, w) != (size, size):
        i, j = int(torch.randint(0, h - size + 1, size=(1,))), int(torch.randint(0, w - size + 1, size=(1,)))
    flip = bool(torch.rand(1) < 0.5)
    if kind == "crop_flip":
        return i, j, flip, 1.0, 1.0, True
    order = torch.randperm(4).tolist()                   # brightness, contrast, saturation, hue (0 and 2 are used)
    b, s = float(torch.empty(1).uniform_(0.7, 1.3)), float(torch.empty(1).uniform_(0.7, 1.3))
    return i, j, flip, b, s, order.index(0) < order.index(2)


def augment_frames(frames: list, kind: str, size: int, params: list | None = None,
                   interpolation: str = "bicubic") -> torch.Tensor:
    """Decoded (3, H, W) uint8 frames (any sizes, one device) -> (B, 3, size, size) normalised float32:
    image_transform(kind, size, interpolation) for a whole batch. The resize is antialiased (PIL's filter): on the CPU
    torch's uint8 kernel, on CUDA in float32 rounded to uint8; a frame already at its target size is not resized.
    params: augment_params() per frame (drawn here when None)."""
    dev = frames[0].device
    resized, groups = list(frames), {}
    for k, f in enumerate(frames):
        t = resize_target(kind, size, *f.shape[-2:])
        if tuple(f.shape[-2:]) != t:
            groups.setdefault((tuple(f.shape), t), []).append(k)
    for (_, t), idx in groups.items():
        if dev.type == "cpu":    # torch's uint8 kernel, frame by frame (channels-last as decoded: no copy)
            for k in idx:
                resized[k] = F.interpolate(frames[k][None].contiguous(memory_format=torch.channels_last), size=t,
                                           mode=interpolation, antialias=True)[0]
        else:                    # one float32 call per frame size
            y = F.interpolate(torch.stack([frames[k] for k in idx]).float(), size=t, mode=interpolation, antialias=True)
            for k, yk in zip(idx, y.round_().clamp_(0, 255).to(torch.uint8)):
                resized[k] = yk
    if params is None:
        params = [augment_params(kind, size, x.shape[-2:]) for x in resized]
    crops = []
    for x, prm in zip(resized, params):
        h, w = x.shape[-2:]
        if prm is None:                                  # CenterCrop(size) (squash: already size x size)
            i, j = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
            crops.append(x[:, i:i + size, j:j + size])
        else:                                            # RandomCrop(size), RandomHorizontalFlip
            x = x[:, prm[0]:prm[0] + size, prm[1]:prm[1] + size]
            crops.append(x.flip(-1) if prm[2] else x)
    x = torch.stack(crops).float()
    if kind == "csol_train":                             # ColorJitter(brightness, saturation) in its random order
        b, s, first = (torch.tensor([p[k] for p in params], device=dev)[:, None, None, None] for k in (3, 4, 5))

        def bright(z):                                   # PIL's blend with black, truncated to uint8
            return (z * b).clamp_(0, 255).floor_()

        def sat(z):                                      # blend with the frame's grey (PIL's "L", rounded)
            g = torch.floor((z[:, 0:1] * 19595 + z[:, 1:2] * 38470 + z[:, 2:3] * 7471 + 32768) / 65536)
            return (g + s * (z - g)).clamp_(0, 255).floor_()
        x = torch.where(first, sat(bright(x)), bright(sat(x)))
    mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
    return x.div_(255).sub_(mean).div_(std)


NVJPEG_FAILED = []                                      # said once: a batch nvJPEG could not decode


def nvjpeg(datas: list, device) -> list | None:
    """JPEG bytes -> (3, H, W) uint8 frames on the GPU in one nvJPEG call, or None when it fails (the caller decodes on
    the CPU, which names the culprit; said once). The current stream is synchronised first: nvJPEG decodes on its own
    stream, which does not wait for work queued before it (torchvision #9606)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    torch.cuda.current_stream(device).synchronize()
    try:
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    except Exception as e:
        if not NVJPEG_FAILED:
            print(f"nvJPEG could not decode a batch ({(str(e).splitlines() or [type(e).__name__])[0][:120]}); such "
                  f"batches are decoded on the CPU", file=sys.stderr)
        NVJPEG_FAILED.append(1)
        return None


def batch_images(batch: dict, device, args, kind: str, size: int, interpolation: str = "bicubic", views: int = 1):
    """The image half of a method's batch_to_device: a collate_av batch -> (B, 3, size, size) normalised float32 on
    `device` (a tuple of `views` views), or None when no sample is left. An unreadable sample stops the run with one
    error line, or (--skip-bad) is dropped from the batch (batch["ids"] and batch["wav"] too) and recorded."""
    for err in batch["bad"]:
        skip_or_raise(err, args)
    MEDIA.tiled.update(batch["tiled"])
    if "images" in batch:                                # --decode pil: augmented per sample in the workers
        ims = batch["images"]
        return (tuple(x.to(device, non_blocking=True) for x in ims) if views > 1 else
                ims.to(device, non_blocking=True)) if batch["ids"] else None
    device, root = torch.device(device), Path(args.data) / "frames"
    frames, keep = [], []
    on_gpu = nvjpeg(batch["frames"], device) if device.type == "cuda" and batch["frames"] else None
    for k, (vid, data) in enumerate(zip(batch["ids"], batch["frames"])):
        try:
            f = on_gpu[k] if on_gpu else decode_frame(data, root / f"{vid}.jpg", vid)
        except BadMedia as e:
            skip_or_raise(e, args)
            continue
        frames.append(f.to(device, non_blocking=True))
        keep.append(k)
    if len(keep) < len(batch["ids"]):
        batch["ids"], batch["wav"] = [batch["ids"][k] for k in keep], batch["wav"][keep]
    if not frames:
        return None
    # the draws sample by sample, each sample's views in turn, as the per-sample pipeline makes them
    draws = [augment_params(kind, size, resize_target(kind, size, *f.shape[-2:])) for f in frames for _ in range(views)]
    out = tuple(augment_frames(frames, kind, size, draws[v::views], interpolation) for v in range(views))
    return out if views > 1 else out[0]


def av_dataset(args, split_file, kind: str, seconds: float, where: str, sample_rate: int, views: int = 1,
               interpolation: str = "bicubic") -> AVDataset:
    """A method's dataset of one split (its first --limit ids), image pipeline `kind` and audio window. --decode pil:
    the PIL pipeline in the workers; fast: the files' bytes, decoded and augmented per batch by batch_images()."""
    ids = read_split(split_file)[: args.limit]
    if args.decode == "fast":
        return AVDataset(args.data, ids, seconds, where, sample_rate)
    tf = image_transform(kind, args.image_size, interpolation)
    tf = functools.partial(augmented_views, tf, views) if views > 1 else tf
    return AVDataset(args.data, ids, seconds, where, sample_rate, tf)


# =====================================================================================================================
# 4. The evaluator: each protocol is its official script's arithmetic, in float32, on maps resized to 224x224
# =====================================================================================================================
PROTOCOLS = {
    "median": "EZ-VSL test.py + utils.Evaluator exactly: q = normalize_img(map), P = q >= sorted(q)[25088] (the "
              "per-image median; a constant map: every pixel)",
    "median_strict": "LVS test.py exactly: p = 1 - normalize_img(-map), thr = sorted(p)[25088], p[p > thr] = 1, "
                     "p[p < 1] = 0 (pixels equal to the maximum are kept; a constant map c: every pixel if "
                     "1 + c >= 1, none otherwise)",
    "abs0.5": "SSPL test exactly: min-max normalise, P = map >= 0.5 (a constant map is 0/0 = NaN: no pixel)",
    "rel0.1": "CSOL tools.py exactly: P = map > 0.1 * max(map), no min-max (the threshold is computed in float64 and "
              "compared in float32, NumPy 1.x rules)",
    "is3": "SSLalignment test.py + utils.Evaluator_iiou: q = normalize_img(map), P = q > sorted(q)[25088]; adaptive: "
           "q > sorted(q)[50176 - |gt|]; IIoU / IAUC: an image counts if all its annotations have cIoU >= t",
    "avsbench": "ACL-SSL AVSBench/eval_utils.py Evaluator, q = normalize_img(map): mIoU of q > 0.5 (cIoU too) and q > "
                "sorted(q)[25088]; F-score (beta^2 0.3, 255 thresholds): one mean curve over the frames, then its max",
}
F_THRESHOLDS = torch.linspace(0, 1 - 1e-10, 255).numpy()   # AVSBench _eval_pr's list, in float32 as official
AUC_THRESHOLDS = [0.05 * i for i in range(21)]  # the official list (0.05*3 = 0.15000000000000002)
MEDIAN_INDEX = GT_SIZE * GT_SIZE // 2           # 25088: the official np.sort(m.flatten())[int(224 * 224 / 2)]
SIZE_BINS = {"small": 32 ** 2, "medium": 96 ** 2, "large": 144 ** 2, "huge": math.inf}   # SLAVC: area < bound
EVAL_CHUNK = 4                                  # maps scored at once: 4 x 224 x 224 float32 = 0.8 MB a tensor, which
                                                # a CPU core's cache holds (16 maps at once took 1.5x as long)


def _box(box, where: str) -> list[float]:
    try:
        vals = [float(v) for v in box]
    except (TypeError, ValueError):
        vals = []
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise UserError(f"{where}: a box must be four finite numbers [x1, y1, x2, y2], got {box!r}")
    return vals


def load_annotations(path) -> dict:
    """{id: entry} from the standard annotations.json (VGG-SS format), the original vggss.json, or a folder of the
    original Flickr XML files (consensus entries, data_prep.flickr_annotations). A malformed entry is an error naming
    it."""
    path = Path(path)
    if path.is_dir():                                    # the original Flickr XMLs: read by data_prep.py
        return data_prep_module("a folder of Flickr XML files").flickr_annotations(path)
    if not path.is_file():
        raise UserError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid json ({e})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a json list of {{'file', 'class', 'bbox'}} entries")
    out = {}
    for i, e in enumerate(data):
        where = f"{path} entry {i}" + (f" ({e.get('file')})" if isinstance(e, dict) else "")
        if not isinstance(e, dict) or not isinstance(e.get("file"), str) or not isinstance(e.get("bbox"), list) or \
                not isinstance(e.get("mask", ""), str):
            raise UserError(f"{where}: an entry needs a string 'file' and a list 'bbox' (and 'mask': a PNG path)")
        if e.get("gt", "union") not in ("union", "consensus"):
            raise UserError(f"{where}: 'gt' must be 'union' or 'consensus'")
        if e["file"] in out:
            raise UserError(f"{where}: duplicate id {e['file']}")
        out[e["file"]] = dict(e, bbox=[_box(b, where) for b in e["bbox"]])     # a mask: relative to the file's folder
        out[e["file"]].update({"mask": str(path.parent / e["mask"])} if "mask" in e else {})
        if "objects" in e:
            out[e["file"]]["objects"] = [dict(o, bbox=_box(o.get("bbox"), where)) for o in e["objects"]]
    return out


def rasterize_box(box, size: int = GT_SIZE) -> list[int]:
    """Normalised [x1, y1, x2, y2] -> pixel slice bounds as the official code: int(size * max(v, 0)) (a bound above
    size is cut by the slice)."""
    return [int(size * max(v, 0.0)) for v in box]


def boxes_to_map(boxes, kind: str = "union", size: int = GT_SIZE) -> np.ndarray:
    """The ground truth: 'union' of the boxes (VGG-SS), or 'consensus': boxes summed, / 2, capped at 1
    (Flickr-SoundNet, C = 2 annotators). A box fills [y1:y2, x1:x2]."""
    g = np.zeros((size, size), np.float32)
    for b in boxes:
        x1, y1, x2, y2 = rasterize_box(b, size)
        g[y1:y2, x1:x2] = 1.0 if kind == "union" else g[y1:y2, x1:x2] + 1.0
    return np.minimum(g / 2.0, 1.0) if kind == "consensus" else g


def gt_map(entry: dict, size: int = GT_SIZE) -> np.ndarray:
    if "mask" in entry:                                  # an AVSBench mask: read by data_prep.py
        return data_prep_module("an AVSBench mask").read_mask(entry["mask"])
    return boxes_to_map(entry["bbox"], entry.get("gt", "union"), size)


def resize_maps(t: torch.Tensor, size: int = GT_SIZE, align_corners: bool = False) -> torch.Tensor:
    """(B, h, w) float32 -> (B, size, size) with torch's bilinear kernel. align_corners=False stands for the official
    cv2.resize INTER_LINEAR of LVS / SSPL / CSOL (the same half-pixel rule when up-sampling), True is EZ-VSL's."""
    if t.shape[-2:] == (size, size):
        return t
    return F.interpolate(t[:, None], size=(size, size), mode="bilinear", align_corners=align_corners)[:, 0]


def minmax(m):
    """The official normalize_img: (m - min) / (max - min) per map (last two axes), a constant map unchanged."""
    if not isinstance(m, torch.Tensor):
        return minmax(torch.as_tensor(np.asarray(m))).numpy()
    lo, hi = m.amin((-2, -1), keepdim=True), m.amax((-2, -1), keepdim=True)
    q = (m - lo).div_(torch.where(hi == lo, 1.0, hi - lo))    # in place: a second full-size temporary costs a page
    return torch.where(hi == lo, m, q) if (hi == lo).any() else q     # fault per use on the CPU (glibc's heap trim)


def binarize(t: torch.Tensor, protocol: str, threshold: float | None = None) -> torch.Tensor:
    """(B, 224, 224) float32 maps -> the official binary prediction P (bool), in float32 (see PROTOCOLS); 'fixed'
    (the negative-audio protocol): P = map >= threshold on the method's own scale."""
    def kth(x):          # np.sort(x.flatten())[25088] per map, exactly (np.partition: 15x torch.kthvalue's speed)
        k = np.partition(x.flatten(1).cpu().numpy(), MEDIAN_INDEX, axis=1)[:, MEDIAN_INDEX]
        return torch.from_numpy(k).to(x.device)[:, None, None]
    if protocol == "median":                              # EZ-VSL
        return (q := minmax(t)) >= kth(q)
    if protocol == "median_strict":                       # LVS: p[p > thr] = 1; p[p < 1] = 0
        p = minmax(-t).neg_().add_(1)                     # 1 - normalize_img(-map): the same roundings
        return (p > kth(p)) | (p >= 1)
    if protocol == "abs0.5":                              # SSPL (a constant map: 0/0 = NaN, never >= 0.5)
        lo, hi = t.amin((1, 2), keepdim=True), t.amax((1, 2), keepdim=True)
        return (t - lo).div_(hi - lo) >= 0.5
    if protocol == "rel0.1":                              # CSOL: float64 threshold, float32 comparison
        return t > (0.1 * t.amax((1, 2), keepdim=True).double()).float()
    if protocol == "fixed":
        return t >= threshold
    if protocol == "is3":                                 # SSLalignment: infer > sorted(infer)[int(224 * 224 * 0.5)]
        return (q := minmax(t)) > kth(q)
    if protocol == "avsbench":                            # AVSBench mask_iou: sigmoid(logit) > 0.5, here q > 0.5
        return minmax(t) > 0.5
    raise UserError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")


def ground_truth(G: torch.Tensor, consensus: bool = True):
    """What cIoU needs of ground-truth maps G (..., 224, 224), computed once: G, [G > 0] (G itself when no map is a
    consensus map, whose values include 0.5) and sum(G)."""
    return G, G.ceil() if consensus else G, G.sum((-2, -1))


def ciou(P: torch.Tensor, gt) -> torch.Tensor:
    """cIoU = sum(P G) / (sum(G) + sum(P [G == 0])) per map (LVS appendix A), float64; P binary, gt =
    ground_truth(G) with G in [0, 1]. Both empty: 0/0 = NaN, as the official Evaluator (such a sample fails every
    threshold). The float32 sums are exact (whole and half pixels, below 2^23)."""
    G, G_pos, g = gt
    P = P.float()
    inter = (P * G).sum((-2, -1))
    outside = P.sum((-2, -1)) - (inter if G_pos is G else (P * G_pos).sum((-2, -1)))
    return inter.double() / (g.double() + outside.double())


def extra_scores(t: torch.Tensor, P: torch.Tensor, gt, protocol: str) -> dict:
    """Per-sample scores beside cIoU, on q = normalize_img(map). is3: SSLalignment's adaptive cIoU, P = q >
    sorted(q)[H W - |gt|] (|gt| = #(G != 0), or H W // 2 if empty). avsbench, in float32: AVSBench utility.mask_iou
    of P (q > 0.5) and of q > median: sum(P G) / (sum(max(P, G)) + 1e-7), an empty mask sum((1 - P)(1 - G)) / (H W +
    1e-7); the F curve of _eval_pr + Eval_Fmeasure: P = q >= t in F_THRESHOLDS, prec = TP / (#P + 1e-20), rec = TP /
    (#G + 1e-20), F = 1.3 prec rec / (0.3 prec + rec), NaN -> 0 (counts by sorting: exact); an empty mask: NaNs."""
    q, G, n = minmax(t), gt[0], gt[0][0].numel()
    if protocol == "is3":
        k = [n - (c or n // 2) for c in (G != 0).flatten(1).sum(1).tolist()]
        thr = [np.partition(r, j)[j] for r, j in zip(q.flatten(1).cpu().numpy(), k)]
        return {"adap": ciou(q > torch.tensor(thr, device=q.device)[:, None, None], gt).cpu().numpy()}
    empty, out = G.sum((1, 2)) == 0, {}
    for name, B in (("iou", P.float()), ("iou_median", binarize(t, "is3").float())):
        inter = torch.where(empty, ((1 - B) * (1 - G)).sum((1, 2)), (B * G).sum((1, 2)))
        out[name] = (inter / (torch.where(empty, float(n), torch.maximum(B, G).sum((1, 2))) + 1e-7)).cpu().numpy()
    qs, gs, eps = q.cpu().numpy(), G.cpu().numpy() > 0, np.float32(1e-20)
    out["f"] = np.full((len(qs), len(F_THRESHOLDS)), np.nan, np.float32)
    count = lambda x: (x.size - np.searchsorted(np.sort(x, None), F_THRESHOLDS)).astype(np.float32)  # noqa: E731
    for b in np.flatnonzero(gs.any((1, 2))):
        tp = count(qs[b][gs[b]])
        prec, rec = tp / (count(qs[b]) + eps), tp / (np.float32(gs[b].sum()) + eps)
        with np.errstate(invalid="ignore"):
            f = np.float32(1.3) * prec * rec / (np.float32(0.3) * prec + rec)
        out["f"][b] = np.where(f != f, np.float32(0), f)
    return out


def interactive(images, scores) -> dict:
    """SSLalignment Evaluator_iiou.finalize_cIoU / finalize_IAUC: at each AUC threshold t the mean over images of the
    min over the image's annotations of [cIoU >= t]; IIoU at t = 0.5, IAUC the trapezoid over the 21 thresholds."""
    groups = collections.defaultdict(list)
    [groups[g].append(c) for g, c in zip(images, scores)]
    curve = [float(np.mean([min(c >= t for c in g) for g in groups.values()])) for t in AUC_THRESHOLDS]
    return {"iiou": curve[10], "iauc": float(np.trapezoid(curve, AUC_THRESHOLDS)), "n_images": len(groups)}


def summarize(scores, nan_mean: str = "zero") -> dict:
    """cIoU@0.5 = share of samples with cIoU >= 0.5 (the papers' "cIoU"); AUC = the trapezoid rule (what the official
    sklearn.metrics.auc computes) over the 21 official thresholds of the share with cIoU >= t (a NaN sample fails every
    threshold, as official); mean cIoU (nan_mean 'zero': a NaN counts 0; 'skip': the mean of the others)."""
    s = np.asarray(scores, np.float64)
    if s.size == 0:
        return {"ciou@0.5": float("nan"), "auc": float("nan"), "mean_ciou": float("nan")}
    mean = np.nan_to_num(s).mean() if nan_mean == "zero" else (np.nanmean(s) if np.isfinite(s).any() else np.nan)
    return {"ciou@0.5": float(np.sum(s >= 0.5) / len(s)),
            "auc": float(np.trapezoid([np.sum(s >= t) / len(s) for t in AUC_THRESHOLDS], AUC_THRESHOLDS)),
            "mean_ciou": float(mean)}


def check_map(vid: str, m, where: str = "prediction") -> np.ndarray:
    """A non-empty, finite 2-D map ((1, h, w) accepted) as float32, the official scripts' precision."""
    m = np.asarray(m)
    m = m[0] if m.ndim == 3 and m.shape[0] == 1 else m
    if m.ndim != 2 or m.size == 0:
        raise UserError(f"{where} for {vid}: expected a 2-D map, got an {'empty map' if m.size == 0 else 'array'} "
                        f"of shape {m.shape}")
    if not (np.issubdtype(m.dtype, np.number) or m.dtype == bool) or np.iscomplexobj(m):
        raise UserError(f"{where} for {vid}: not a real-valued map (dtype {m.dtype})")
    m = m.astype(np.float32)
    if not np.isfinite(m).all():
        raise UserError(f"{where} for {vid}: the map contains NaN or inf (after the cast to float32)")
    return m


def center_prior(size: int = GT_SIZE) -> np.ndarray:
    """The centred-prior baseline: a cone 1 - d / d_corner (median: a centred disk of half the image)."""
    d = np.hypot(*(np.mgrid[0:size, 0:size] - (size - 1) / 2.0))
    return (1.0 - d / d.max()).astype(np.float32)


def _resized(maps: dict, ids, align_corners: bool, device, where: str = "prediction") -> torch.Tensor:
    """The maps of `ids` (any sizes) resized to (B, 224, 224) float32 on `device`, one resize per size."""
    by_shape = {}
    for k, vid in enumerate(ids):
        m = check_map(vid, maps[vid], where)
        by_shape.setdefault(m.shape, []).append((k, m))
    out = torch.empty(len(ids), GT_SIZE, GT_SIZE, device=device)
    for group in by_shape.values():
        out[[k for k, _ in group]] = resize_maps(torch.from_numpy(np.stack([m for _, m in group])).to(device), GT_SIZE,
                                                 align_corners)
    return out


def evaluate_maps(maps: dict, ann: dict, ids=None, protocol: str = "median", align_corners: bool = False,
                  baselines: bool = True, extra_baselines: dict | None = None, device="cpu", chunk: int = EVAL_CHUNK,
                  fuse=None) -> dict:
    """Score {id: 2-D map of any size} against the annotations, `chunk` maps at a time (cpu or cuda).

    ids: the test list (default: the ids of `maps`; an id listed twice is scored once and reported). A prediction or
    listed id without annotation is an error; a listed id without prediction is reported as missing. fuse = (other
    maps, fn): the scored map is fn(map, other map), both at 224 (EZ-VSL's object-guided blend, as official).
    Returns {"protocol", "resize", "n", "n_listed", "missing", "duplicates", "empty_gt", "boxes_outside",
    "test": summary, "per_sample": {id: cIoU}, "baselines": {"center", "full_image", **extra_baselines}, "by_size":
    {bin: summary and n} (SLAVC's bins of the ground truth's area sum(G) in pixels at 224, SIZE_BINS)}."""
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    unknown = [i for i in maps if i not in ann]
    if unknown:
        raise UserError(f"{len(unknown)} predicted ids have no annotation (first: {', '.join(unknown[:5])})")
    ids = list(maps if ids is None else ids)
    listed, dups = list(dict.fromkeys(ids)), sorted(k for k, c in collections.Counter(ids).items() if c > 1)
    lacking = [i for i in listed if i not in ann]
    if lacking:
        raise UserError(f"{len(lacking)} ids of the test list have no annotation (first: {', '.join(lacking[:5])})")
    present, missing = [i for i in listed if i in maps], [i for i in listed if i not in maps]
    if not present:
        raise UserError(f"none of the {len(listed)} listed ids has a map to score (first listed: "
                        f"{', '.join(listed[:3])})")
    if protocol == "is3":                                 # an image is scored with all its annotations, or refused
        image = {i: e.get("group") or "_".join(i.split("_")[:-1]) for i, e in ann.items()}   # SSLalignment short_name
        has, got = (collections.Counter(image[i] for i in x) for x in (ann, present))
        for g in (g for g in got if got[g] < max(has[g], 2)):
            raise UserError(f"IS3 image {g}: {got[g]} of its {has[g]} annotations listed with a map (each IS3 image "
                            f"has two sources, each annotated with its own audio)")
    device, extra = torch.device(device), dict(extra_baselines or {})
    names = ["test", *extra] + (["center", "full_image"] if baselines else [])
    scores, area = {k: np.zeros(len(present)) for k in names}, np.zeros(len(present))
    prior = binarize(torch.from_numpy(center_prior())[None].to(device), protocol)
    outside, more = 0, collections.defaultdict(list)     # per-sample extras of the is3 and avsbench protocols
    with torch.no_grad():
        for s in range(0, len(present), chunk):
            ids_c = present[s:s + chunk]
            gt = ground_truth(torch.from_numpy(np.stack([gt_map(ann[i]) for i in ids_c])).to(device),
                              any(ann[i].get("gt") == "consensus" for i in ids_c))
            area[s:s + len(ids_c)] = gt[2].cpu().numpy()
            outside += sum(any(v < 0 or v > 1 for v in b) for i in ids_c for b in ann[i]["bbox"])
            for name in names:
                if name in ("test", *extra):
                    t = _resized(maps if name == "test" else extra[name], ids_c, align_corners, device)
                    if name == "test" and fuse is not None:
                        t = fuse[1](t, _resized(fuse[0], ids_c, align_corners, device))
                    P = binarize(t, protocol)
                    for k, v in (extra_scores(t, P, gt, protocol) if name == "test" and protocol in (
                            "is3", "avsbench") else {}).items():
                        more[k].append(v)
                elif name == "center":
                    P = prior
                else:                                     # P = 1: sum(G) / (sum(G) + #[G == 0])
                    g = gt[2].double()
                    scores[name][s:s + len(ids_c)] = (g / (g + GT_SIZE ** 2 - gt[1].sum((1, 2)))).cpu().numpy()
                    continue
                scores[name][s:s + len(ids_c)] = ciou(P, gt).cpu().numpy()
    test, more = summarize(scores["test"]), {k: np.concatenate(v) for k, v in more.items()}
    if protocol == "is3":
        imgs = [image[i] for i in present]
        adap = dict(summarize(more["adap"]), **interactive(imgs, more["adap"]))
        test.update(interactive(imgs, scores["test"]),
                    **{f"{k.replace('@0.5', '')}_adap": v for k, v in adap.items() if k != "n_images"})
    if protocol == "avsbench":                            # means in float64 (ACL-SSL's: float32)
        f, mean = more["f"][~np.isnan(more["f"][:, 0])], lambda x: float(x.astype(np.float64).mean())  # noqa: E731
        test.update(miou=mean(more["iou"]), miou_median=mean(more["iou_median"]), n_empty_mask=len(more["f"]) - len(f),
                    fscore=float(f.astype(np.float64).mean(0).max()) if len(f) else float("nan"))
    empty, by_size, lower = [i for i, g in zip(present, area) if g == 0], {}, 0.0
    for name, upper in SIZE_BINS.items():                 # lower <= area < upper; an empty ground truth in no bin
        sel = (area > 0) & (area >= lower) & (area < upper)
        by_size[name], lower = dict(summarize(scores["test"][sel]), n=int(sel.sum())), upper
    return {"protocol": protocol, "resize": f"bilinear align_corners={align_corners}", "n": len(present),
            "n_listed": len(listed), "missing": missing, "duplicates": dups, "empty_gt": empty,
            "empty_gt_causes": {i: "empty mask" if "mask" in ann[i] else empty_cause(ann[i]["bbox"])
                                for i in empty[:10]},
            "boxes_outside": outside, "test": test, "f_curves": more.get("f"),
            "per_sample": dict(zip(present, scores["test"].tolist())),
            "baselines": {k: summarize(scores[k]) for k in names[1:]}, "by_size": by_size}


def empty_cause(boxes) -> str:
    """Why boxes rasterise to nothing at 224 px: named in the report, with the boxes."""
    bad = [b for b in boxes if b[2] <= b[0] or b[3] <= b[1]]
    if bad:
        return f"x2 <= x1 or y2 <= y1 in {bad[0]}"
    if boxes and all(min(b) > 1 for b in boxes):
        return f"every coordinate above 1 in {boxes[0]}: pixel units? boxes are normalised to [0, 1]"
    return f"no box, or boxes thinner than a pixel at 224 px: {boxes}"


def fmt_metrics(m: dict) -> str:
    return f"cIoU@0.5 {100 * m['ciou@0.5']:6.2f}  AUC {100 * m['auc']:6.2f}  mean cIoU {100 * m['mean_ciou']:6.2f}"


def format_report(res: dict, title: str = "test") -> str:
    """Every number with its protocol, resize and N evaluated / N listed, and the baselines beside it."""
    lines = [f"[{title}] protocol={res['protocol']} ({PROTOCOLS[res['protocol']]})",
             f"[{title}] resize={res['resize']}  N evaluated {res['n']} / listed {res['n_listed']}"
             + (f"  ({len(res['missing'])} missing)" if res["missing"] else "")]
    if res["duplicates"]:
        lines.append(f"[{title}] warning: {len(res['duplicates'])} ids are listed more than once in the split and "
                     f"scored once: {', '.join(res['duplicates'][:10])}")
    if res["boxes_outside"]:
        lines.append(f"[{title}] warning: {res['boxes_outside']} annotation boxes have a coordinate outside [0, 1]; "
                     f"clamped as the official code (int(224 * max(v, 0)), cut at 224)")
    if res["empty_gt"]:
        lines.append(f"[{title}] warning: {len(res['empty_gt'])} entries have an empty ground truth and score 0 "
                     f"(0/0 = NaN, failing every threshold, when nothing is predicted either): " + "; ".join(
                         f"{i} ({c})" for i, c in res.get("empty_gt_causes", {}).items()))
    width = max([5] + [len(k) for k in res["baselines"]])
    for k, v in [("model", res["test"]), *res["baselines"].items()]:
        lines.append(f"[{title}] {k:<{width}}  {fmt_metrics(v)}   ({res['protocol']}, N={res['n']})")
    t = {k: 100 * v for k, v in res["test"].items()}
    lines += [f"[{title}] IS3 adaptive cIoU@0.5 {t['ciou_adap']:6.2f}  AUC {t['auc_adap']:6.2f} | IIoU "
              f"{t['iiou']:6.2f}  IAUC {t['iauc']:6.2f} | adaptive IIoU {t['iiou_adap']:6.2f}  IAUC "
              f"{t['iauc_adap']:6.2f}   "
              f"({res['test']['n_images']} images, N={res['n']} annotations)"] if "iiou" in t else []
    lines += [f"[{title}] AVSBench mIoU {t['miou']:6.2f} (q > 0.5)  {t['miou_median']:6.2f} (q > median)  F-score "
              f"{t['fscore']:6.2f} (beta^2 0.3, one curve over the frames)   (N={res['n']} frames, "
              f"{res['test']['n_empty_mask']} with an empty mask)"] if "miou" in t else []
    lines.append(f"[{title}] by box area (SLAVC's bins, pixels at 224: < 32^2, 96^2, 144^2, larger), cIoU@0.5: "
                 + ", ".join(f"{k} {100 * v['ciou@0.5']:.2f} (N={v['n']})" for k, v in res["by_size"].items()))
    return "\n".join(lines)


# ---- the negative-audio protocol (--negatives): SLAVC's extended metrics (Mo & Morgado, NeurIPS 2022) and pIA ----
NEGATIVE_KINDS = ("silence", "noise", "offscreen")
NOISE_STD = 0.1          # white noise N(0, 0.1^2) (-20 dBFS RMS), seeded by the clip's index: the same in every run


def detection_ap(conf, correct, n_pos: int) -> tuple[float, float]:
    """SLAVC's AP and max-F1: pairs ranked by confidence (ties enter together); TP = a detected positive pair
    localised correctly, FP = every other detected pair; recall over all positive pairs; AP = sum (R_k - R_k-1) P_k."""
    conf, correct = np.asarray(conf, np.float64), np.asarray(correct, bool)
    if n_pos == 0 or conf.size == 0:
        return float("nan"), float("nan")
    order = np.argsort(-conf, kind="stable")
    c, y = conf[order], correct[order]
    last = np.r_[c[1:] != c[:-1], True]
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    prec, rec = tp / (tp + fp), tp / n_pos
    f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-300), 0.0)
    return float(np.sum(np.diff(np.r_[0.0, rec]) * prec)), float(f1.max())


def negative_metrics(pos: dict, neg: dict, ann: dict, ids, threshold: float, align_corners: bool = False,
                     device="cpu", chunk: int = EVAL_CHUNK, iou: float = 0.5) -> dict:
    """The negative-audio protocol on raw maps (the method's fixed scale, never min-max normalised), resized to 224,
    P = map >= threshold. pos: {id: map with the clip's audio}; neg: {kind: {id: map}}. Confidence = the mean of the
    top quarter of the map; a positive pair is correct when its cIoU >= iou. Returns the positives' summary, pIA per
    kind (mean share of the image predicted), AP / max-F1 over all kinds and per kind, mean confidences."""
    present = [i for i in dict.fromkeys(ids) if i in pos and all(i in m for m in neg.values())]
    if not present:
        raise UserError("negative-audio protocol: no id has a positive map and every negative map")
    device, n, kinds = torch.device(device), len(present), ["positive", *neg]
    cious, conf, area = np.zeros(n), {k: np.zeros(n) for k in kinds}, {k: np.zeros(n) for k in kinds}
    with torch.no_grad():
        for s in range(0, n, chunk):
            ids_c = present[s:s + chunk]
            gt = ground_truth(torch.from_numpy(np.stack([gt_map(ann[i]) for i in ids_c])).to(device))
            for kind, maps in [("positive", pos), *neg.items()]:
                t = _resized(maps, ids_c, align_corners, device)
                P = binarize(t, "fixed", threshold)
                conf[kind][s:s + len(ids_c)] = t.flatten(1).topk(t[0].numel() // 4, 1).values.double().mean(1).cpu()
                area[kind][s:s + len(ids_c)] = P.flatten(1).double().mean(1).cpu()
                if kind == "positive":
                    cious[s:s + len(ids_c)] = ciou(P, gt).cpu().numpy()
    correct, wrong = cious >= iou, np.zeros(n, bool)
    ap, f1 = detection_ap(np.concatenate([conf[k] for k in kinds]), np.concatenate([correct] + [wrong] * len(neg)), n)
    per_kind = {}
    for k in neg:
        a, f = detection_ap(np.r_[conf["positive"], conf[k]], np.r_[correct, wrong], n)
        per_kind[k] = {"ap": a, "max_f1": f}
    return {"threshold": float(threshold), "resize": f"bilinear align_corners={align_corners}", "n": n,
            "positives": summarize(cious), "pia_positive": float(area["positive"].mean()),
            "pia": {k: float(area[k].mean()) for k in neg}, "ap": ap, "max_f1": f1, "per_kind": per_kind,
            "confidence": {k: float(v.mean()) for k, v in conf.items()}, "kinds": list(neg),
            "per_sample": {"ids": present, "ciou": cious.tolist(),
                           "confidence": {k: v.tolist() for k, v in conf.items()}}}


def format_negatives(r: dict, title: str = "negatives") -> str:
    lines = [f"[{title}] negative audio ({', '.join(r['kinds'])}; noise std {NOISE_STD}), N={r['n']} clips; fixed "
             f"threshold P = map >= {r['threshold']:g} on the raw map ({r.get('scale', 'method scale')}), "
             f"{r['resize']}",
             f"[{title}] positives at the fixed threshold  {fmt_metrics(r['positives'])}  (predicted area "
             f"{100 * r['pia_positive']:.2f}%)",
             f"[{title}] SLAVC extended (confidence = mean of the top quarter of the map; correct = cIoU >= 0.5): "
             f"AP {100 * r['ap']:6.2f}  max-F1 {100 * r['max_f1']:6.2f}  (all {len(r['kinds'])} kinds)"]
    for k in r["kinds"]:
        lines.append(f"[{title}] {k:<9}  pIA {100 * r['pia'][k]:6.2f}%  AP {100 * r['per_kind'][k]['ap']:6.2f}  "
                     f"max-F1 {100 * r['per_kind'][k]['max_f1']:6.2f}  mean confidence {r['confidence'][k]:.4f} "
                     f"(positives {r['confidence']['positive']:.4f})")
    return "\n".join(lines)


def run_negatives(compute, ds, ann, threshold: float, scale: str, align_corners: bool):
    """--negatives in a method's --eval: compute(dataset) -> {id: raw map} on the test set and on its three
    negative-audio copies. Returns (metrics, {"raw", "neg", "per_sample", "meta"}) (the second for save_maps)."""
    raw = compute(ds)
    pos = {v: k for k, v in enumerate(ds.ids)}          # IS3: the clip of another class data_prep.py is3 chose
    donors = [pos.get(ann[v].get("offscreen"), (k + 1) % len(pos)) for k, v in enumerate(ds.ids)]
    neg = {k: compute(SwapAudio(ds, k, donors)) for k in NEGATIVE_KINDS}
    r = dict(negative_metrics(raw, neg, ann, ds.ids, threshold, align_corners), scale=scale)
    return r, {"raw": raw, "neg": neg, "per_sample": r["per_sample"],
               "meta": {"threshold": threshold, "scale": scale, "align_corners": align_corners}}


def interactive_split(args, evaluate) -> dict | None:
    """The synthetic benchmark's IS3-style split (each frame twice, once with each of its two objects' sound), scored
    under protocol is3 when --data has one and the test split is ROOT/splits/test.txt. evaluate(args) -> an
    evaluate_maps result. The adaptive IIoU leads: the median threshold predicts half the frame, more than an object."""
    split = Path(args.data) / "splits" / "interactive_test.txt"
    if not split.is_file() or Path(args.test_split).resolve() != split.with_name("test.txt").resolve():
        return None
    t = evaluate(argparse.Namespace(**dict(vars(args), protocol="is3", test_split=str(split))))["test"]
    return {k: t[k] for k in ("iiou_adap", "iauc_adap", "iiou", "iauc", "ciou_adap", "n_images")}


# =====================================================================================================================
# 5. Run plumbing: the shared command line, preflight, DDP, checkpoints, outputs, --benchmark, --seeds
# =====================================================================================================================
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: not a device this program runs on; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available; use --device cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    return dev


class Amp:
    """Mixed precision on CUDA: bfloat16 where the GPU has it natively (compute capability 8.0 or later), else float16
    with a GradScaler; nothing on the CPU. Losses and maps are computed outside autocast, in float32. AVSL_AMP_DTYPE=
    float16 in the environment forces float16 + GradScaler on any GPU (.ci/gpu tests that path on a bf16 GPU)."""

    def __init__(self, device: torch.device, enabled: bool):
        self.enabled, self.device_type = bool(enabled) and device.type == "cuda", device.type
        native_bf16 = self.enabled and torch.cuda.get_device_capability(device) >= (8, 0) \
            and os.environ.get("AVSL_AMP_DTYPE") != "float16"
        self.dtype = torch.bfloat16 if native_bf16 else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.enabled and not native_bf16)

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype) if self.enabled else contextlib.nullcontext()

    def step(self, loss, *optimizers):
        """zero_grad, (scaled) backward, a step of each optimizer (CSOL's classification passes step two)."""
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        for opt in optimizers:
            self.scaler.step(opt)
        self.scaler.update()

    def describe(self):
        return str(self.dtype).replace("torch.", "") if self.enabled else False


def gpu_habits(args, device: torch.device, image_trunk: nn.Module, compiled=()) -> None:
    """On CUDA: cuDNN autotuning, the image trunk in channels_last; --compile: nn.Module.compile() on each module of
    `compiled` in place (parameter names and checkpoints unchanged). Nothing else changes on the CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        image_trunk.to(memory_format=torch.channels_last)
    if args.compile:
        for m in compiled:
            m.compile()


def keep_freed_memory() -> None:
    """CPU runs: glibc gives large freed blocks back to the OS (own mappings, heap trimming), so each step faults the
    pages of its activations in again (the cpu presets' --train took 22-75% longer: README). Keep freed memory in the
    process for reuse (Linux glibc; elsewhere nothing). The numbers computed are unchanged."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(-4, 0)                                 # M_MMAP_MAX: no block gets a mapping of its own
    mallopt(-1, 2 ** 31 - 1)                       # M_TRIM_THRESHOLD: the heap's free top is kept


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


# Loading never runs code from a file: torch.load(weights_only=True) takes tensors and plain data only, plus NumPy
# scalars (EZ-VSL's released checkpoints store their best scores as numpy.float64).
_SCALAR = np._core.multiarray.scalar
SAFE_GLOBALS = [np.dtype, _SCALAR, (_SCALAR, "numpy.core.multiarray.scalar")] + [
    type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)]


def safe_load(path, what: str = "checkpoint"):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        unsafe = []
        if "Weights only load failed" in str(e):        # a pickle that names other Python objects, or no pickle
            with contextlib.suppress(Exception):
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        if unsafe:
            raise UserError(f"{path}: refused: it holds Python objects ({', '.join(unsafe[:3])}) beyond tensors and "
                            f"plain data, and loading those could run code from the file") from None
        msg = (str(e).strip().splitlines() or [""])[0][:160]
        msg = "" if msg.startswith("Weights only") else f": {msg}"
        raise UserError(f"{path}: not a readable PyTorch checkpoint (empty, truncated or another kind of file: "
                        f"{type(e).__name__}{msg})") from None


def save_checkpoint(path, obj: dict) -> None:
    """torch.save to a temporary file, then an atomic rename: an interrupted or failed save leaves the old file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    try:
        torch.save(obj, tmp)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        reason = os.strerror(e.errno) if getattr(e, "errno", None) else (str(e).splitlines() or ["?"])[0][:120]
        raise UserError(f"{path}: cannot write the checkpoint ({reason}; is the disk full?); the previous "
                        f"{path.name}, if any, is intact") from None
    os.replace(tmp, path)


def load_checkpoint(path, method: str | None = None) -> dict:
    """A checkpoint (a run folder means its last.pt, as --resume reads it; --ckpt's best.pt is each load_model's) as a
    dict; one that records another method is refused. The authors' releases record none: load_model checks them."""
    path = Path(path) / "last.pt" if Path(path).is_dir() else Path(path)
    ck = safe_load(path)
    if not isinstance(ck, dict):
        raise UserError(f"{path}: not a checkpoint (holds a {type(ck).__name__}, expected a dict)")
    a = ck.get("args") if isinstance(ck.get("args"), dict) else {}
    if method and a.get("method") and a["method"] != method:
        raise UserError(f"{path}: a checkpoint of {a['method']}, not of {method}; use {a['method']}.py with it")
    return ck


def checkpoint_args(ck: dict, path, method: str, keys) -> dict:
    """The saved settings a method's load_model needs; a checkpoint without them is not this method's."""
    a = ck.get("args")
    missing = [k for k in keys if not isinstance(a, dict) or k not in a]
    if missing:
        raise UserError(f"{path}: not a {method} checkpoint (its settings lack {', '.join(missing)})")
    return a


def load_state(model: nn.Module, sd, path, method: str) -> None:
    """model.load_state_dict, with one line naming the file when the weights are not this model's."""
    try:
        model.load_state_dict(sd)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as e:
        first = " ".join(str(e).strip().splitlines()[:2])[:200]
        raise UserError(f"{path}: the weights do not fit the {method} model (another method or architecture: "
                        f"{first})") from None


def write_text_atomic(path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


def data_prep_module(what: str):
    """data_prep.py, imported only by what needs it (--video, overlay PNGs, Flickr XML folders, AVSBench masks; frames
    and WAVs never), else one error line; --video also needs PyAV."""
    try:
        import data_prep
        if what == "--video":
            import av  # noqa: F401
    except ImportError as e:
        raise UserError(f"{what} needs {'PyAV (pip install av)' if e.name == 'av' else 'data_prep.py beside common.py'}"
                        f" ({e})") from None
    return data_prep


def predict_video(args, *a, **kw):
    return data_prep_module("--video").predict_video(args, *a, **kw)


def progress(iterable, desc: str = "", total=None, enabled: bool = True, unit: str = "it"):
    from tqdm import tqdm
    # a live bar on a terminal only: redirected output (a log file, CI) keeps the one epoch line
    return tqdm(iterable, desc=desc, total=total, disable=None if enabled else True, leave=False, dynamic_ncols=True,
                mininterval=1.0, unit=unit)


def save_overlay_png(path, frame: np.ndarray, heat: np.ndarray, boxes=None) -> None:
    """--predict's and --viz's PNG: frame + boxes | heat map | blend, drawn by data_prep.overlay."""
    data_prep_module("the overlay PNG (--predict, --viz)").save_overlay_png(path, frame, heat, boxes)


def save_maps(path, maps: dict, negatives: dict | None = None, meta: dict | None = None) -> None:
    """One float32 map per id in an .npz (what eval_cioU.py reads), written atomically; __eval__ (json): the protocol
    and align_corners they were scored with. With negatives (run_negatives), also raw/<id> (the positive raw map),
    neg/<kind>/<id>, __confidence__ (N x (1 + kinds), rows in the order of __negatives__'s ids) and __negatives__
    (json: threshold, scale, align_corners, kinds, ids)."""
    out = {k: np.asarray(v, np.float32) for k, v in maps.items()}
    if meta:
        out["__eval__"] = np.array(json.dumps(meta))
    if negatives:
        out.update({f"raw/{k}": np.asarray(v, np.float32) for k, v in negatives["raw"].items()})
        for kind, m in negatives["neg"].items():
            out.update({f"neg/{kind}/{k}": np.asarray(v, np.float32) for k, v in m.items()})
        ps = negatives["per_sample"]
        info = dict(negatives["meta"], kinds=list(negatives["neg"]), ids=ps["ids"])
        out["__confidence__"] = np.stack([np.asarray(ps["confidence"][k], np.float64)
                                          for k in ["positive", *info["kinds"]]], 1)
        out["__negatives__"] = np.array(json.dumps(info))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **out)
    os.replace(tmp, path)


class RunLog:
    """print() that also appends to a run's log.txt; silent on the other DDP processes."""

    def __init__(self, path=None, enabled: bool = True):
        self.path, self.enabled = (Path(path) if path else None), enabled

    def __call__(self, *msg):
        if self.enabled:
            s = " ".join(str(m) for m in msg)
            print(s, flush=True)
            if self.path:
                with open(self.path, "a") as f:
                    f.write(s + "\n")


def add_standard_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command line every method shares. Method defaults (lr, batch, epochs, image size ...) are None here and
    come from the method's preset."""
    a = p.add_argument
    a("--train", action="store_true", help="train, select on the validation split, then evaluate on the test split")
    a("--eval", action="store_true", help="evaluate a checkpoint (--ckpt) on the test split")
    a("--predict", action="store_true", help="heat map for one pair: --image IMG --audio WAV [--out heat.png]")
    a("--benchmark", action="store_true", help="loader / model / end-to-end samples per second and peak memory "
      "(benchmark.json in a run folder under --out)")
    a("--ckpt", help="checkpoint (.pt) to evaluate / predict with, or a run folder (uses best.pt)")
    a("--image", help="--predict: the frame")
    a("--audio", help="--predict: the WAV (with --video: the sound, for a clip without its own)")
    a("--video", help="--predict: a video -> --out heat.mp4: frame | map | blend per frame, with the sound (README)")
    a("--fps", type=float, help="--video: output frame rate (default: the source's, at most 25)")
    a("--start", type=float, default=0.0, help="--video: the segment's start (s on the clip's clock)")
    a("--duration", type=float, help="--video: the segment's length (s; default: to the video's end)")
    a("--norm", choices=["video", "frame"], default="video", help="--video: colours over the segment or per frame")
    a("--data", help="dataset root in the standard layout (default: the built-in synthetic benchmark)")
    a("--train-split", help="train id list (default ROOT/splits/train.txt)")
    a("--val-split", help="validation id list, for checkpoint selection (default ROOT/splits/val.txt)")
    a("--test-split", help="test id list (default ROOT/splits/test.txt)")
    a("--annotations", help="annotations: json (VGG-SS format) or a Flickr XML folder (default ROOT/annotations.json)")
    a("--protocol", choices=list(PROTOCOLS), help="evaluation protocol (default: the method's official one)")
    a("--align-corners", action=argparse.BooleanOptionalAction, default=None, help="bilinear resize of the maps with "
      "align_corners=True / False (default: the method's official test: True for EZ-VSL, False = cv2 for the others)")
    a("--save-maps", help="--eval: the test maps as .npz (for eval_cioU.py); --video: raw maps (T, h, w), times")
    a("--viz", type=int, default=0, help="write N PNG overlays (frame + boxes, heat map, blend)")
    a("--preset", choices=["cpu", "paper"], help="cpu: small encoders and images; paper: the official set-up "
      "(default: cpu on the synthetic benchmark, paper on real data)")
    a("--epochs", type=int, help="training epochs")
    a("--batch-size", type=int, help="global batch size (split over the DDP processes)")
    a("--lr", type=float, help="learning rate")
    a("--seed", type=int, default=0, help="random seed (reseeded per epoch: exact resume)")
    a("--seeds", help="--train: comma-separated seeds (e.g. 0,1,2), one run each (eval_cioU.py --table tables them)")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    a("--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision on CUDA (bf16 where the GPU "
      "has it, else fp16 with a gradient scaler); --no-amp: float32")
    a("--compile", action="store_true", help="torch.compile the model (slower start, faster steps)")
    a("--workers", type=int, default=0, help="data-loading worker processes")
    a("--decode", choices=["fast", "pil"], default="fast", help="fast: batched decode and augmentation on the training "
      "device; pil: the official per-sample PIL pipeline, bit for bit")
    a("--skip-bad", action="store_true", help="skip unreadable frames / WAVs (counted, listed in the run folder)")
    a("--steps", type=int, help="--benchmark: timed steps (default: a few hundred samples)")
    a("--negatives", action="store_true", help="--eval: also score silence, white noise and off-screen audio (SLAVC "
      "AP / max-F1, pIA)")
    a("--neg-threshold", type=float, help="--negatives: the fixed threshold on the raw map (default: the method's)")
    a("--out", help="--train/--benchmark: parent of the run folders (default runs/); --eval: output folder (default: "
      "the checkpoint's); --predict: the PNG (default heat.png), --video: the MP4 (heat.mp4)")
    a("--resume", help="continue a run from its last.pt (the file or the run folder)")
    a("--weights", help="local .pth with the image encoder's weights (instead of torchvision's download)")
    a("--no-pretrained", action="store_true", help="do not load any pretrained weights")
    a("--max-steps", type=int, help="stop each epoch after this many steps (smoke tests)")
    a("--limit", type=int, help="use only the first N ids of each split (smoke tests)")
    return p


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """parser.parse_args(argv) plus args.given_options, the options actually typed (a resumed run takes every other
    setting from its checkpoint)."""
    args, unset = parser.parse_args(argv), object()
    ns = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=ns)            # argparse fills defaults only for attributes not already set
    args.given_options = sorted(k for k, v in vars(ns).items() if v is not unset)
    return args


AT_LEAST = {"batch_size": 1, "epochs": 1, "epochs2": 1, "limit": 1, "max_steps": 1, "workers": 0, "steps": 1,
            "viz": 0, "image_size": 32, "dim": 1, "clusters": 1, "class_iter": 1, "pcm_cycles": 0}
POSITIVE = ("lr", "lr_head", "tau", "temperature", "map_temp", "fps", "duration")


def check_numbers(args) -> None:
    """Every number of the command line in its range, before any work (one line each)."""
    for k, v in vars(args).items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"{flag} {v}: must be a finite number")
        if isinstance(v, int) and not isinstance(v, bool) and k in AT_LEAST and v < AT_LEAST[k]:
            raise UserError(f"{flag} {v}: must be at least {AT_LEAST[k]}")
        if isinstance(v, (int, float)) and k in POSITIVE and v <= 0:
            raise UserError(f"{flag} {v}: must be greater than 0")


def check_writable(folder, what: str) -> None:
    """The folder exists and is writable, or can be created (tested on its nearest existing ancestor)."""
    anc = Path(folder).absolute()
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise UserError(f"{what} {folder}: cannot write there ({anc} is a file, not a folder)")
    try:
        with tempfile.TemporaryFile(dir=anc):
            pass
    except OSError as e:
        raise UserError(f"{what} {folder}: not writable ({e.strerror or e})") from None


def check_file_writable(path, what: str) -> None:
    if Path(path).is_dir():
        raise UserError(f"{what} {path}: is a folder, expected a file name")
    check_writable(Path(path).absolute().parent, what)


def check_outputs(args) -> None:
    """Every output the command writes can be written: checked before any work."""
    if args.predict:
        return check_file_writable(args.out or ("heat.mp4" if args.video else "heat.png"), "--out")
    if args.save_maps:
        check_file_writable(args.save_maps, "--save-maps")
    if args.train or args.benchmark:
        check_writable(args.out or "runs", "--out" if args.out else "the run folder's parent (choose one with --out)")
    else:
        check_writable(eval_folder(args), "--out" if args.out else "the output folder (beside the checkpoint; choose "
                                                                   "one with --out)")


def eval_folder(args) -> Path:
    """Where --eval writes: --out, else eval_<checkpoint name>/ beside the checkpoint (never over a training run's
    results.json)."""
    ckpt = Path(args.ckpt or ".")
    return Path(args.out) if args.out else run_folder(ckpt) / f"eval_{'best' if ckpt.is_dir() else ckpt.stem}"


def run_folder(path) -> Path:
    """The run folder a --resume / --ckpt path names: the folder itself, or the one holding the checkpoint."""
    return Path(path) if Path(path).is_dir() else Path(path).parent


def setup(args, presets: dict, synthetic, protocol: str, align_corners: bool, log=print) -> None:
    """The start of every method's main: the command checked before any work (what to do, its numbers, device and
    outputs), the data (resolve_data), the preset's defaults, the method's evaluation protocol and resize."""
    if not (args.train or args.eval or args.predict or args.benchmark):
        raise UserError("choose one of --train, --eval, --predict, --benchmark (see --help)")
    if args.predict and not (args.ckpt and (args.video or args.image and args.audio)):
        raise UserError("--predict needs --ckpt and either --image and --audio, or --video")
    if args.eval and not args.train and not args.ckpt:
        raise UserError("--eval needs --ckpt")
    if args.benchmark and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--benchmark runs in one process; launch it with python (or torchrun --nproc_per_node=1)")
    if args.skip_bad and args.train and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--skip-bad under torchrun would leave the processes with unequal batches; run `data_prep.py "
                        "check` and remove the bad clips from the split, or train in one process")
    check_numbers(args)
    if resolve_device(args.device).type == "cpu":
        keep_freed_memory()
    check_outputs(args)
    if args.predict or args.viz:                          # the PNG / MP4 is drawn by data_prep.py
        data_prep_module("--video" if args.video else "--predict" if args.predict else "--viz")
    if not args.predict:
        resolve_data(args, synthetic, log)
    args.preset = args.preset or "paper"
    for k, v in presets[args.preset].items():            # explicit command-line values win
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.protocol = args.protocol or protocol
    args.align_corners = align_corners if args.align_corners is None else args.align_corners


def resolve_data(args, synthetic, log=print):
    """--data, else a resumed run's own data, else at --eval the data the checkpoint was trained on (its run folder's
    args.json), else the synthetic benchmark made by synthetic(log) (cpu preset). Real data defaults to the paper
    preset; splits and annotations to the standard layout's files."""
    src = args.resume or (args.ckpt if args.eval and not args.train else None)
    trained_on = None
    if args.data is None and src:
        saved = run_folder(src) / "args.json"
        try:
            args.data = json.loads(saved.read_text()).get("data")
            trained_on = None if args.resume else saved
        except FileNotFoundError:                         # not a run folder (released weights): the default below
            pass
        except (OSError, ValueError, AttributeError) as e:
            if not args.resume:                           # a resumed run's checkpoint is checked by the preflight
                raise UserError(f"{saved}: unreadable ({type(e).__name__}), so the checkpoint's data is unknown; pass "
                                f"--data ROOT") from None
    MEDIA.skipped, MEDIA.tiled = {}, set()
    if args.data is None:
        try:
            args.data = str(synthetic(log))
        except ModuleNotFoundError as e:
            if e.name != "data_prep":
                raise
            raise UserError("no --data given, and the synthetic benchmark needs data_prep.py (its generator) beside "
                            "the method file; pass --data ROOT or copy data_prep.py there") from None
        args.preset = args.preset or "cpu"
    root = Path(args.data)
    if not root.is_dir():
        raise UserError(f"{trained_on}: the checkpoint was trained on --data {args.data}, which is not there; pass "
                        f"--data ROOT to test it on a dataset" if trained_on else f"--data {root}: no such directory")
    if trained_on:
        log(f"data: {args.data} (the data the checkpoint was trained on, from {trained_on}; pass --data ROOT to test "
            f"on other data)")
    args.preset = args.preset or ("cpu" if (root / "synth.json").is_file() else "paper")   # data_prep.py synth
    for k in ("train", "val", "test"):
        setattr(args, f"{k}_split", getattr(args, f"{k}_split") or str(root / "splits" / f"{k}.txt"))
    args.annotations = args.annotations or str(root / "annotations.json")


# Options that say what to do, where to write or on what hardware: never taken from a checkpoint. Every other option
# is a setting a resumed run takes from its checkpoint.
RESUME_FREE = {"train", "eval", "predict", "ckpt", "image", "audio", "resume", "out", "device", "workers", "amp",
               "compile", "skip_bad", "benchmark", "steps", "negatives", "save_maps", "viz",
               "given_options", "method"}


def apply_resume(args, ck: dict, path, free=(), raisable=()) -> None:
    """A resumed run's settings are its checkpoint's; a typed flag that contradicts one is refused, except --epochs
    (and `raisable`), which may train the run longer."""
    saved = ck.get("args")
    if not isinstance(saved, dict):
        raise UserError(f"--resume {path}: the checkpoint records no settings (not written by a --train run)")
    for k, v in saved.items():
        if k in RESUME_FREE or k in free or not hasattr(args, k):
            continue
        cur = getattr(args, k)
        same = cur == v or (isinstance(cur, str) and isinstance(v, str) and os.path.realpath(cur) == os.path.realpath(v)
                            and (k in ("data", "annotations", "weights") or k.endswith("_split")))
        if k in args.given_options and not same:
            if k == "epochs" or k in raisable:
                continue
            raise UserError(f"--resume {path}: --{k.replace('_', '-')} {cur} contradicts the checkpoint's {k} = {v}; "
                            f"drop the flag (a resumed run keeps its settings) or start a new run")
        setattr(args, k, v)


_PREFLIGHT_PASSED = False   # under torchrun, an error before this is every rank's: rank 0 reports it


def preflight(args, method: str, resume=None, splits=("train_split", "val_split", "test_split"),
              annotated=("val_split", "test_split"), ckpt=None, world: int = 1, train_key="train_split",
              free=(), raisable=()):
    """Everything a training run can check before its first step and its run folder: a --resume checkpoint (readable,
    this method's; its settings replace the command line's), another checkpoint it reads (ckpt), the numbers, each
    split (exists, lists ids whose frame and WAV exist; the `annotated` ones annotated), one whole batch per DDP
    process, the outputs. Records args.method. Returns the resume checkpoint or None."""
    args.method = method
    ck = None
    if resume:
        ck = load_checkpoint(resume, method=method)
        apply_resume(args, ck, resume, free, raisable)
    check_numbers(args)
    if ckpt:
        load_checkpoint(ckpt, method=method)
    ann, counts = None, {}
    for k in splits:
        ids = read_split(getattr(args, k))[: args.limit]
        check_layout(args.data, ids)
        counts[k] = len(ids)
        if k in annotated:
            ann = ann if ann is not None else load_annotations(args.annotations)
            miss = [i for i in ids if i not in ann]
            if miss:
                raise UserError(f"{len(miss)} of {len(ids)} ids of {getattr(args, k)} have no annotation in "
                                f"{args.annotations} (first: {', '.join(miss[:5])}); add them, or remove them from "
                                f"the split")
    if train_key in counts:
        n, b, path = counts[train_key], args.batch_size, getattr(args, train_key)
        if b % world:
            raise UserError(f"--batch-size {b} cannot be split evenly over {world} processes; use a multiple of "
                            f"{world}")
        per, share = b // world, n // world
        if share < per:
            over = f" over {world} processes give {share} per process," if world > 1 else " are"
            raise UserError(f"{n} training clips ({path}){over} fewer than one batch of {per} (--batch-size {b}"
                            f"{f' / {world}' if world > 1 else ''}): no whole batch to train on; use --batch-size "
                            f"{share * world if share else world} or less, or more clips")
    if resume:
        check_writable(run_folder(resume), "--resume run folder")
    check_outputs(args)
    global _PREFLIGHT_PASSED
    _PREFLIGHT_PASSED = True
    return ck


def make_run_dir(args, method: str) -> Path:
    """A new run folder OUT/<method>__<data>__s<seed>__<date-time>[-k], with args.json (-k: another run started in the
    same second)."""
    stamp = f"{method}__{Path(args.data).name}__s{args.seed}__{datetime.datetime.now():%Y%m%d-%H%M%S}"
    for k in range(1000):
        d = Path(args.out or "runs") / (stamp + (f"-{k}" if k else ""))
        try:
            d.mkdir(parents=True)
            break
        except FileExistsError:
            continue
    write_json(d / "args.json", vars(args))
    return d


RUN_DIR = None           # the run folder this process writes: named in the one line a Ctrl-C prints


def lock_run_folder(d: Path):
    """Hold RUN/.lock while this process writes the run folder: a second process (a --resume of a run that is still
    training) is refused in one line instead of writing the same files."""
    import fcntl
    global RUN_DIR
    f = open(d / ".lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UserError(f"{d}: another process is writing this run folder (a run still training?); resume it once "
                        f"that process has ended") from None
    RUN_DIR = d
    return f


class Run:
    """A training run: the preflight (before the process group and the run folder), DDP under torchrun (one plain
    process otherwise), the seed, the run folder (new, or --resume's) and its log; then per epoch the reseeded loader,
    the losses averaged over the DDP processes, validation, last.pt and best.pt (main process) and the run's ETA."""

    def __init__(self, args, method: str, resume=None, **preflight_kw):
        self.args, self.world = args, int(os.environ.get("WORLD_SIZE", "1"))
        self.ck = preflight(args, method, resume or args.resume, world=self.world, **preflight_kw)
        if self.ck and preflight_kw.get("train_key", "train_split") and self.ck.get("epoch", 0) >= args.epochs:
            raise UserError(f"--resume {args.resume}: the run has already trained {self.ck.get('epoch')} epochs "
                            f"(--epochs {args.epochs}); give a larger --epochs to train longer")
        self.rank, self.device = 0, resolve_device(args.device)
        if self.world > 1:
            local, cuda = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.is_available() and args.device != "cpu"
            backend = os.environ.get("AVSL_DDP_BACKEND") or ("nccl" if cuda else "gloo")   # gloo: ranks may share a GPU
            if cuda:
                local = local % torch.cuda.device_count() if backend == "gloo" else local
                torch.cuda.set_device(local)
            dist.init_process_group(backend)
            self.rank, self.device = dist.get_rank(), torch.device(f"cuda:{local}" if cuda else "cpu")
        self.main = self.rank == 0
        seed_everything(args.seed)
        self.dir = run_folder(args.resume) if args.resume else make_run_dir(args, method) if self.main else None
        self.lock = lock_run_folder(self.dir) if self.main else None
        self.log = RunLog(self.dir / "log.txt" if self.main else None, self.main)
        self.per_proc, self.start, self.best, self.history, self.t0 = args.batch_size // self.world, 0, -1.0, [], 0.0

    def prepare(self, model: nn.Module, opt, image_trunk: nn.Module, compiled=None):
        """The resumed model / optimizer / gradient-scaler state, the CUDA habits, DDP -> (net, amp)."""
        amp = Amp(self.device, self.args.amp)
        if self.ck:
            model.load_state_dict(self.ck["model"])
            opt.load_state_dict(self.ck["optimizer"])
            if amp.scaler.is_enabled() and self.ck.get("scaler"):
                amp.scaler.load_state_dict(self.ck["scaler"])
            self.start, self.best, self.history = self.ck["epoch"], self.ck["best"], self.ck["history"]
            self.log(f"resumed from {self.args.resume} at epoch {self.start}")
        if amp.enabled:
            self.log(f"mixed precision: {amp.describe()}{' with a GradScaler' if amp.scaler.is_enabled() else ''}")
        gpu_habits(self.args, self.device, image_trunk, [model] if compiled is None else compiled)
        self.model, self.opt, self.amp, self.t0 = model, opt, amp, time.time()
        if self.world == 1:
            return model, amp
        return nn.parallel.DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda"
                                                   else None), amp

    def loader(self, ds, epoch: int):
        """The epoch's shuffled loader of whole batches, python / numpy / torch reseeded from (seed, epoch, rank)
        first: an epoch is reproducible on its own (exact resume), each DDP process draws its own augmentation (rank 0
        the single-process stream) and gets floor(N / world) clips (DistributedSampler)."""
        seed = self.args.seed * 1000 + epoch + 1_000_003 * self.rank
        seed_everything(seed)
        sampler = None
        if self.world > 1:
            sampler = torch.utils.data.distributed.DistributedSampler(ds, self.world, self.rank, seed=self.args.seed,
                                                                      drop_last=True)
            sampler.set_epoch(epoch)
        return torch.utils.data.DataLoader(ds, self.per_proc, shuffle=sampler is None, sampler=sampler,
                                           num_workers=self.args.workers, drop_last=True, collate_fn=collate_av,
                                           generator=torch.Generator().manual_seed(seed),
                                           pin_memory=self.device.type == "cuda")

    def epochs(self):
        return range(self.start, self.args.epochs)

    def batches(self, ds, epoch: int):
        """The epoch's batches (the loader above) with a progress bar, up to --max-steps."""
        bar = progress(self.loader(ds, epoch), f"epoch {epoch + 1}/{self.args.epochs}", enabled=self.main)
        for step, batch in enumerate(bar):
            if self.args.max_steps and step >= self.args.max_steps:
                break
            yield batch

    def end_epoch(self, epoch: int, values: dict, validate) -> None:
        """values: {name: one number per step} ("loss" first), averaged over every DDP process's steps (logged per rank
        too); then on the main process validate() (an evaluate_maps result), the log line with the run's ETA, last.pt
        and, when the validation cIoU@0.5 is the best so far, best.pt."""
        sums = [len(values["loss"])] + [sum(v) for v in values.values()]
        if self.world > 1:      # the last entry: a checksum of the weights, equal on every process unless DDP broke
            mine = sums + [sum(p.detach().double().sum().item() for p in self.model.parameters())]
            parts = [torch.zeros(len(mine), dtype=torch.float64, device=self.device) for _ in range(self.world)]
            dist.all_gather(parts, torch.tensor(mine, dtype=torch.float64, device=self.device))
            per = [p.tolist() for p in parts]
            same = len({p[-1] for p in per}) == 1
            self.log("per-rank loss (steps): " + ", ".join(f"rank {r} {p[1] / max(p[0], 1):.4f} ({p[0]:.0f})"
                                                             for r, p in enumerate(per))
                     + ("; weights identical on every process" if same else
                        "; WARNING: the weights differ between processes: " + ", ".join(f"{p[-1]:.9g}" for p in per)))
            sums = [sum(p[i] for p in per) for i in range(len(sums))]
        means = {k: s / max(sums[0], 1) for k, s in zip(values, sums[1:])}
        if self.main:
            res = validate()
            score = res["test"]["ciou@0.5"]
            self.history.append({"epoch": epoch + 1, **means, "val": res["test"]})
            elapsed = time.time() - self.t0
            eta = elapsed / (epoch + 1 - self.start) * (self.args.epochs - epoch - 1)
            self.log(f"epoch {epoch + 1}/{self.args.epochs} " + " ".join(f"{k} {v:.4f}" for k, v in means.items())
                     + f" | val {fmt_metrics(res['test'])} ({res['protocol']}, N={res['n']}) | {elapsed:.0f}s, run "
                       f"ETA {eta / 60:.1f} min")
            self.best = max(self.best, score)
            state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "epoch": epoch + 1,
                     "best": self.best, "history": self.history, "args": vars(self.args),
                     "scaler": self.amp.scaler.state_dict()}
            save_checkpoint(self.dir / "last.pt", state)
            if score >= self.best:
                save_checkpoint(self.dir / "best.pt", state)
        if self.world > 1:
            dist.barrier()

    def finish(self) -> bool:
        """The main process logs the end of training and points args.ckpt / args.out at best.pt and the run folder, for
        the test that follows. Returns whether this is the main process."""
        if self.main:
            self.log(f"training done in {time.time() - self.t0:.0f}s; best val cIoU@0.5 {100 * self.best:.2f}; "
                     f"testing best.pt")
            self.args.ckpt, self.args.out = str(self.dir / "best.pt"), str(self.dir)
            self.lock.close()
        return self.main

    def seconds(self) -> float:
        return time.time() - self.t0


def _torchrun_error_file(msg: str, root_cause: bool = True) -> None:
    """The message torchrun's failure summary shows for this process. torchrun names the failure with the smallest
    timestamp (whole seconds) the root cause; the process that met the error dates it a second back so that it wins
    over the processes that stopped because of it."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        ts = str(int(time.time()) - (1 if root_cause else 0))
        with contextlib.suppress(OSError):
            Path(path).write_text(json.dumps({"message": {"message": msg, "extraInfo": {"py_callstack": msg,
                                                                                       "timestamp": ts}}}))


def run_cli(main_fn) -> None:
    """Run a command line; a UserError is one `error: ...` line and exit status 2, never a traceback. Under torchrun
    the run also stops with one line: an error every rank meets (the preflight's) is printed by rank 0 while the
    others wait; an error of one rank (a bad file in its share) by that rank; the ranks whose collectives then fail
    exit without a traceback (os._exit, so that none waits on a process group whose peers are gone)."""
    from tqdm import tqdm
    world, pid = int(os.environ.get("WORLD_SIZE", "1")), os.getpid()

    def interrupted(*_):     # a handler, not KeyboardInterrupt, which a finaliser it lands in would swallow
        if os.getpid() == pid:                           # (a DataLoader worker leaves silently)
            saved = sorted(p.name for p in RUN_DIR.glob("*.pt")) if RUN_DIR else []
            tqdm.write("interrupted" + (f"; the run's checkpoints ({', '.join(saved)}) are in {RUN_DIR}: continue "
                                        f"with python {Path(sys.argv[0]).name} --train --resume {RUN_DIR}" if saved
                                        else f"; no checkpoint was written yet in {RUN_DIR}" if RUN_DIR else ""),
                       file=sys.stderr)
        os._exit(130)
    signal.signal(signal.SIGINT, interrupted)
    try:
        main_fn()
    except UserError as e:
        if world == 1:
            tqdm.write(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        if int(os.environ.get("RANK", "0")) != 0:
            sys.stdout.flush()
            time.sleep(3 if _PREFLIGHT_PASSED else 10)   # torchrun stops this process when rank 0 reports first
        tqdm.write(f"error: {e}", file=sys.stderr)
        sys.stderr.flush(), sys.stdout.flush()
        _torchrun_error_file(str(e))
        os._exit(2)
    except Exception as e:
        peer = isinstance(e, getattr(dist, "DistError", ())) or isinstance(e, RuntimeError) and any(
            s in str(e) for s in ("gloo", "Gloo", "Connection closed by peer", "Connection reset by peer",
                                  "Broken pipe", "NCCL", "ProcessGroup", "Socket Timeout"))
        if world > 1 and peer:                           # another process failed and reported its own error
            _torchrun_error_file("stopped: another process failed (its error is above)", root_cause=False)
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(3)
        raise
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def save_results(args, method: str, res: dict, swapped, ann: dict, log, seconds: float, map_name: str,
                 extra: dict | None = None) -> dict:
    """Print the report, then write --save-maps, the --viz overlays, missing_ids.txt and results.json, each to a
    temporary name then renamed, results.json last (a failure never leaves a results.json beside missing outputs).
    res: evaluate_maps() of the test, with res["maps"]; swapped: the same for the audio-swapped control (or None)."""
    log(format_report(res, f"test {map_name}"))
    uses_sound = None
    if swapped:
        log(f"[test] audio-swapped  {fmt_metrics(swapped['test'])}   ({res['protocol']}, N={swapped['n']}; each clip "
            f"gets the next clip's audio)")
        gaps = {k: (100 * (res["test"][k] - swapped["test"][k]), 100 * (res["test"][k] - res["baselines"]["center"][k]))
                for k in ("ciou@0.5", "mean_ciou")}
        uses_sound = min(gaps["ciou@0.5"]) >= 10 and min(gaps["mean_ciou"]) >= 5
        log(f"[test] {'uses the sound' if uses_sound else 'does NOT clearly use the sound'}: "
            f"{gaps['ciou@0.5'][0]:+.2f} cIoU@0.5 and {gaps['mean_ciou'][0]:+.2f} mean cIoU over the audio-swapped "
            f"control, {gaps['ciou@0.5'][1]:+.2f} and {gaps['mean_ciou'][1]:+.2f} over the centred prior (the bar: "
            f"+10 and +5 over both)")
    if (extra or {}).get("interactive"):
        t = {k: 100 * v for k, v in extra["interactive"].items()}
        log(f"[test] interactive (a frame heard with each of its two objects' sounds; is3): adaptive IIoU "
            f"{t['iiou_adap']:6.2f}  IAUC {t['iauc_adap']:6.2f} | IIoU {t['iiou']:6.2f}  IAUC {t['iauc']:6.2f}   "
            f"({extra['interactive']['n_images']} frames)")
    out = eval_folder(args)
    out.mkdir(parents=True, exist_ok=True)
    results = {"method": method, "data": str(args.data), "split": str(args.test_split), "protocol": res["protocol"],
               "seed": getattr(args, "ckpt_seed", None), "resize": res["resize"], "n": res["n"],
               "n_listed": res["n_listed"], "seconds": round(seconds, 1), "test": res["test"],
               "baselines": res["baselines"], "by_size": res["by_size"],
               "audio_swapped": dict(swapped["test"], n=swapped["n"]) if swapped else None,
               "map": map_name, "missing": res["missing"], "duplicates": res["duplicates"], "empty_gt": res["empty_gt"],
               "boxes_outside": res["boxes_outside"], "skipped": len(MEDIA.skipped), "uses_sound": uses_sound,
               "nvjpeg_fallback_batches": len(NVJPEG_FAILED), **(extra or {})}
    if res.get("negatives"):
        results["negatives"] = {k: v for k, v in res["negatives"].items() if k != "per_sample"}
        log(format_negatives(res["negatives"], "test negatives"))
    tmp, ids = out / "viz.part", list(res["per_sample"])[: args.viz]
    if ids:                                              # rendered into a temporary folder first (the slow part)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for vid in ids:
                img = np.asarray(load_image(Path(args.data) / "frames" / f"{vid}.jpg"))
                save_overlay_png(tmp / f"{vid}.png", img, res["maps"][vid], ann[vid]["bbox"])
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if args.save_maps:
        save_maps(args.save_maps, res["maps"], res.get("negatives_maps"),
                  {"protocol": res["protocol"], "align_corners": res["resize"].endswith("True"), "map": map_name})
        log(f"maps written to {args.save_maps}")
    if ids:
        shutil.rmtree(out / "viz", ignore_errors=True)   # an earlier evaluation's overlays
        os.replace(tmp, out / "viz")
        log(f"{len(ids)} overlays written to {out / 'viz'}")
    if res["missing"]:
        write_text_atomic(out / "missing_ids.txt", "\n".join(res["missing"]) + "\n")
    else:
        (out / "missing_ids.txt").unlink(missing_ok=True)          # a stale list of an earlier evaluation
    if MEDIA.tiled:
        log(f"{len(MEDIA.tiled)} clips shorter than the audio window were tiled to fill it (official rule)")
    if MEDIA.skipped:
        write_text_atomic(out / "skipped_ids.txt", "".join(f"{k}\t{v}\n" for k, v in sorted(MEDIA.skipped.items())))
        log(f"--skip-bad: skipped {len(MEDIA.skipped)} unreadable samples, listed in {out / 'skipped_ids.txt'}")
    write_json(out / "results.json", results)
    log(f"results written to {out / 'results.json'}")
    return results


def run_benchmark(run: Run, make_dataset, batch_to_device, train_step, net, opt, amp, warmup: int = 2) -> dict:
    """--benchmark: samples per second of (1) the loader, files on disk -> a batch on the device (the training
    DataLoader and batch_to_device, with args.decode); (2) the model, train_step on one prepared batch reused; (3) end
    to end. Warm-up steps excluded, CUDA synchronised around every timed span; the timed steps' peak memory (CUDA:
    allocated and reserved) and host ms per step in next(loader), batch_to_device (on CUDA it waits for queued GPU
    work before nvJPEG) and train_step; the batches nvJPEG left to the CPU. Writes benchmark.json (no checkpoint)."""
    args, device, log = run.args, run.device, run.log
    steps, res, cuda = args.steps or max(3, math.ceil(256 / args.batch_size)), {}, device.type == "cuda"
    peak, spent, fallbacks, last = [0, 0], {}, len(NVJPEG_FAILED), {}

    def timed(key, fn, *a):
        t0, out = time.perf_counter(), fn(*a)
        spent[key] = spent.get(key, 0.0) + time.perf_counter() - t0
        return out

    def rate(name: str, what: str, step) -> None:
        log(f"benchmark: {name}_samples_per_s ({what}), {warmup} + {steps} steps of {args.batch_size}")
        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        spent.clear()
        t0, n = time.perf_counter(), sum(step() for _ in range(steps))
        if cuda:
            torch.cuda.synchronize(device)
            peak[:] = max(peak[0], torch.cuda.max_memory_allocated(device)), \
                max(peak[1], torch.cuda.max_memory_reserved(device))
        res[f"{name}_samples_per_s"] = round(n / (time.perf_counter() - t0), 2)
        if spent:
            res[f"{name}_ms_per_step"] = {k: round(1000 * v / steps, 2) for k, v in spent.items()}

    def endless():                                       # the training loader, epoch after epoch
        ds = make_dataset()
        while True:
            yield from run.loader(ds, 0)

    def size(x):
        return len(x) if torch.is_tensor(x) else size(x[0])

    def load():                                          # the next batch, on the device
        last["x"] = timed("batch_to_device", batch_to_device, timed("next_batch", next, batches), device, args, True)
        return size(last["x"])

    def model_step():
        train_step(net, opt, amp, last["x"], args)
        return size(last["x"])

    def train_one():
        n = load()
        timed("train_step", train_step, net, opt, amp, last["x"], args)
        return n

    net.train()
    batches = endless()
    rate("loader", f"--decode {args.decode}", load)
    rate("model", "train_step on one prepared batch", model_step)
    batches = endless()                                  # a fresh loader: its start falls in the warm-up steps
    rate("train", "end to end", train_one)
    res["peak_memory_mb"] = round(peak[0] / 2 ** 20 if cuda else
                                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10, 2)
    res["peak_reserved_mb"] = round(peak[1] / 2 ** 20, 2) if cuda else None
    res["nvjpeg_fallback_batches"] = len(NVJPEG_FAILED) - fallbacks
    out = {"method": args.method, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
           "batch_size": args.batch_size, "workers": args.workers, "amp": amp.describe(), "compile": args.compile,
           "image_size": args.image_size, "preset": args.preset, "decode": args.decode, "steps": steps,
           "warmup_steps": warmup, "data": str(args.data), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "date": datetime.datetime.now().isoformat(timespec="seconds"), **res}
    log("\n".join(f"{k:<31} {v}" for k, v in out.items()))
    write_json(run.dir / "benchmark.json", out)
    log(f"benchmark written to {run.dir / 'benchmark.json'}")
    return out


def train_seeds(args, train_fn, log=print) -> list[Path]:
    """--seeds 0,1,2: one run per seed (sibling run folders under --out, every other setting the same), then the
    command that tables them (eval_cioU.py --table: mean ± std). Returns the results.json paths."""
    try:
        seeds = [int(t) for t in str(args.seeds).split(",") if t.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {args.seeds!r}: give distinct comma-separated integers, e.g. 0,1,2")
    if args.resume:
        raise UserError("--seeds starts new runs; resume each run on its own with --resume RUN/last.pt")
    paths = []
    for seed in seeds:
        train_fn(copy.deepcopy(argparse.Namespace(**dict(vars(args), seed=seed, seeds=None))))
        paths += [RUN_DIR / "results.json"] if RUN_DIR else []     # the folder its run wrote (the main process)
    if int(os.environ.get("RANK", "0")) == 0:
        log(f"{len(paths)} runs; their mean ± std: python eval_cioU.py --table " + " ".join(str(p) for p in paths))
    return paths
