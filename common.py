"""common.py - the plumbing shared by the four method files (lvs_hardway.py, ez_vsl.py, sspl.py,
csol_classaware.py). Method logic (losses, heads, localization maps) never lives here.

Sections, top to bottom:
  1. Encoders: ResNet-18 trunks (stride 16 / 32, 3- or 1-channel), VGG16 conv5_3, VGGish, small CPU CNNs,
     pretrained-weight loading (torchvision weights API or a local .pth) with a clear offline error.
  2. Audio front ends (batched torch, run on the training device): the LVS/EZ-VSL log spectrogram, the VGGish
     log-mel examples, the CSOL log-mel.
  3. Data: WAV reading with `wave`, the standard layout, the dataset reader, clip windows, image transforms.
  4. The synthetic benchmark generator (`python data_prep.py synth --out DIR` calls it; so does every method
     when run without --data).
  5. The evaluator: ground-truth maps, named protocols, cIoU / AUC, baselines, CSOL's class-aware metrics.
  6. Helpers: seeding, device/AMP, DDP under torchrun, atomic checkpoints, progress bar, heat-map overlays,
     run folders and the command line every method shares.

The standard data layout (the contract between data_prep.py, the methods and the evaluator):
  ROOT/frames/<id>.jpg        one RGB frame per clip
  ROOT/audio/<id>.wav         mono PCM16 WAV, the whole clip (each method crops its own window)
  ROOT/splits/<name>.txt      one id per line (train.txt, val.txt, test.txt, ...)
  ROOT/annotations.json       a list of entries in the VGG-SS json format:
      {"file": id, "class": str, "bbox": [[x1, y1, x2, y2], ...]}   boxes normalised to [0, 1] by width/height
    optional keys:
      "gt": "union" (default; binary union of the boxes, VGG-SS) or "consensus" (Flickr-SoundNet: every
            annotator's box added, divided by 2, capped at 1)
      "objects": [{"class": str, "bbox": [x1, y1, x2, y2], "sounding": bool}, ...]   multi-source (CSOL)
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import random
import sys
import time
import wave
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GT_SIZE = 224  # every benchmark is scored on 224x224 maps


class UserError(Exception):
    """A problem with the user's input or environment: printed as one line, never as a traceback."""


class BadMedia(UserError):
    """A frame or WAV of the dataset that cannot be read or decoded. `path` names the file, `vid` the clip id.
    Stops a run with one line by default; with --skip-bad the sample is skipped, counted and listed."""

    def __init__(self, path, vid: str | None, reason: str):
        self.path, self.vid, self.reason = str(path), vid, reason
        super().__init__(f"{path}: {reason}")


# =====================================================================================================
# 1. Encoders
# =====================================================================================================
class ResNet18Trunk(nn.Module):
    """torchvision ResNet-18 up to layer4 (no avgpool / fc); returns the (B, 512, h, w) feature map.

    stride=32: the standard network (224 px -> 7x7; EZ-VSL).  stride=16: layer4 without down-sampling
    (224 px -> 14x14; LVS, CSOL), which keeps every parameter shape, so ImageNet weights still load.
    in_channels=1 gives the audio trunk (a 1-channel 7x7 stem, as LVS's conv1_a and EZ-VSL's audio net).
    Parameter names are torchvision's, so `torchvision.models.resnet18` state dicts load directly.
    """

    def __init__(self, in_channels: int = 3, stride: int = 32):
        super().__init__()
        import torchvision
        r = torchvision.models.resnet18(weights=None)
        if in_channels != 3:
            r.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if stride == 16:
            r.layer4[0].conv1.stride = (1, 1)
            r.layer4[0].downsample[0].stride = (1, 1)
        elif stride != 32:
            raise ValueError("ResNet18Trunk stride must be 16 or 32")
        self.conv1, self.bn1, self.relu, self.maxpool = r.conv1, r.bn1, r.relu, r.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = r.layer1, r.layer2, r.layer3, r.layer4

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def vgg16_conv5_3() -> nn.Sequential:
    """VGG16 `features[:29]`: conv1_1 ... conv5_3 *before* its ReLU (224 px -> 512x14x14; SSPL)."""
    import torchvision
    return torchvision.models.vgg16(weights=None).features[:29]


class VGGish(nn.Module):
    """The AudioSet VGG-like audio network: (N, 1, 96, 64) log-mel patch -> (N, 128) embedding (after ReLU).

    Module and parameter names follow the public `torchvggish` port (features.{0,3,6,8,11,13},
    embeddings.{0,2,4}), so its `vggish-10086976.pth` state dict loads with `load_weights(..., path)`.
    The PCA/quantisation post-processor is not used (SSPL uses the raw 128-d ReLU output).
    """

    def __init__(self):
        super().__init__()
        layers, c_in = [], 1
        for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=True)]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.embeddings = nn.Sequential(nn.Linear(512 * 4 * 6, 4096), nn.ReLU(True), nn.Linear(4096, 4096),
                                        nn.ReLU(True), nn.Linear(4096, 128), nn.ReLU(True))

    def forward(self, x):
        x = self.features(x)                        # (N, 512, 6, 4)
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # TF's channel-last flattening, as torchvggish
        return self.embeddings(x)


class SmallCNN(nn.Module):
    """A fast conv net for the `cpu` preset; returns a (B, C, h, w) map.

    A ResNet-like stem (3x3 conv with stride strides[0], BN, ReLU, 2x2 max-pool) then one 3x3 conv-BN-ReLU per
    remaining width/stride. Total stride = 2 * prod(strides): (2, 1, 2, 2) -> 16 (112 px -> 7x7, like the stride-32
    ResNet at 224), (2, 1, 2, 1) -> 8 (112 px -> 14x14, like the stride-16 ResNet), (2, 2, 2, 2) -> 32 (audio).
    About 40-60 MMAC per 112-px image or 3 s spectrogram, so a 2-core CPU trains it in minutes.
    """

    def __init__(self, in_channels: int, widths=(32, 64, 128, 128), strides=(2, 1, 2, 2), final_relu: bool = True):
        super().__init__()
        layers = [nn.Conv2d(in_channels, widths[0], 3, stride=strides[0], padding=1, bias=False),
                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        for c_in, w, s in zip(widths[:-1], widths[1:], strides[1:]):
            layers += [nn.Conv2d(c_in, w, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        if not final_relu:   # end on the last convolution's pre-activation (like SSPL's conv5_3 before its ReLU)
            layers = layers[:-2]
        self.net = nn.Sequential(*layers)
        self.out_channels = widths[-1]

    def forward(self, x):
        return self.net(x)


def _torchvision_state_dict(arch: str) -> dict:
    """ImageNet weights through torchvision's weights API (downloads once into TORCH_HOME)."""
    import torchvision.models as tvm
    weights = {"resnet18": tvm.ResNet18_Weights.IMAGENET1K_V1, "vgg16": tvm.VGG16_Weights.IMAGENET1K_V1}[arch]
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as e:  # offline, proxy, corrupt cache ...
        raise UserError(f"could not obtain torchvision's ImageNet {arch} weights ({type(e).__name__}: {e}). "
                        f"Put the file in TORCH_HOME's hub/checkpoints cache, pass --weights PATH to a local "
                        f".pth, or pass --no-pretrained") from None


def load_weights(module: nn.Module, source, arch: str = "resnet18", prefix: str = "") -> list[str]:
    """Load pretrained weights into `module`.

    source: None (keep the initialisation), "imagenet" (torchvision weights API for `arch`), or a path to a
    local .pth (a state dict, or a dict holding one under 'state_dict' / 'model' / 'model_state_dict').
    prefix: only keys starting with it are used, with it removed (e.g. 'features.' for VGG16's trunk).
    Keys the module does not have (fc.*, classifier.*) are ignored; shape mismatches (conv1 of a 1-channel
    trunk) are skipped. Returns the list of the module's keys that received no weight.
    """
    if source is None:
        return list(module.state_dict())
    if source == "imagenet":
        sd = _torchvision_state_dict(arch)
    else:
        p = Path(source)
        if not p.is_file():
            raise UserError(f"weights file not found: {p}")
        sd = torch.load(p, map_location="cpu", weights_only=False)
        for k in ("state_dict", "model", "model_state_dict"):
            if isinstance(sd, dict) and k in sd and isinstance(sd[k], dict):
                sd = sd[k]
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    own = module.state_dict()
    usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise UserError(f"no parameter of {source} matches the {type(module).__name__} being loaded")
    module.load_state_dict(usable, strict=False)
    return [k for k in own if k not in usable]


# =====================================================================================================
# 2. Audio front ends (batched; waveforms (B, N) float in [-1, 1] on any device)
# =====================================================================================================
def _tukey_periodic(n: int, alpha: float = 0.25) -> torch.Tensor:
    """scipy.signal.get_window(('tukey', alpha), n): the *periodic* Tukey window (n+1 symmetric, last dropped)."""
    m = n + 1
    x = np.arange(m, dtype=np.float64)
    w = np.ones(m)
    width = int(np.floor(alpha * (m - 1) / 2.0))
    lo, hi = x[:width + 1], x[m - width - 1:]
    w[:width + 1] = 0.5 * (1 + np.cos(np.pi * (-1 + 2.0 * lo / alpha / (m - 1))))
    w[m - width - 1:] = 0.5 * (1 + np.cos(np.pi * (-2.0 / alpha + 1 + 2.0 * hi / alpha / (m - 1))))
    return torch.from_numpy(w[:n])


def log_spectrogram(wav: torch.Tensor, sr: int, nperseg: int = 512, noverlap: int = 274) -> torch.Tensor:
    """LVS / EZ-VSL audio input: (B, N) -> (B, 1, 257, T).

    Equal to `log(scipy.signal.spectrogram(x, sr, nperseg=512, noverlap=274)[2] + 1e-7) / 12`: frames of 512 with
    hop 238 and no padding, per-frame mean removed, periodic Tukey(0.25) window, |rfft|^2 / (sr * sum(w^2)),
    doubled for every bin but DC and Nyquist ("density" scaling, one-sided). 16 kHz: 3 s -> 257x200, 10 s -> 257x671.
    """
    hop = nperseg - noverlap
    x = wav.double()
    frames = x.unfold(-1, nperseg, hop)                     # (B, T, 512)
    frames = frames - frames.mean(-1, keepdim=True)         # detrend='constant'
    w = _tukey_periodic(nperseg).to(x.device)
    spec = torch.fft.rfft(frames * w, dim=-1).abs() ** 2 / (sr * (w ** 2).sum())
    spec[..., 1:-1] *= 2.0                                  # one-sided: double all but DC and Nyquist (even n)
    out = torch.log(spec + 1e-7) / 12.0
    return out.transpose(-1, -2).unsqueeze(1).to(wav.dtype if wav.is_floating_point() else torch.float32)


def _hz_to_mel_htk(f):
    return 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)


def vggish_mel_matrix(n_fft: int = 512, sr: int = 16000, n_mels: int = 64, fmin: float = 125.0,
                      fmax: float = 7500.0) -> np.ndarray:
    """VGGish's mel filterbank (257, 64): HTK mel, triangles on the spectrogram-bin grid, DC row zeroed."""
    bins_mel = _hz_to_mel_htk(np.linspace(0.0, sr / 2.0, n_fft // 2 + 1))
    edges = np.linspace(_hz_to_mel_htk(fmin), _hz_to_mel_htk(fmax), n_mels + 2)
    lo, ce, hi = edges[:-2], edges[1:-1], edges[2:]
    up = (bins_mel[:, None] - lo) / (ce - lo)
    down = (hi - bins_mel[:, None]) / (hi - ce)
    m = np.maximum(0.0, np.minimum(up, down))
    m[0, :] = 0.0
    return m


def vggish_examples(wav: torch.Tensor, sr: int = 16000) -> torch.Tensor:
    """VGGish input: (B, N) 16 kHz waveform -> (B, P, 1, 96, 64) log-mel patches.

    25 ms periodic-Hann windows with 10 ms hop (no padding), |rfft| with 512 points (magnitude, not power),
    64 HTK mel bins 125-7500 Hz, log(mel + 0.01), cut into non-overlapping 96-frame patches (0.96 s); leftover
    frames are dropped. 3 s -> 298 frames -> 3 patches.
    """
    if sr != 16000:
        raise ValueError("VGGish expects 16 kHz audio")
    win, hop, n_fft = 400, 160, 512
    x = wav.float()
    frames = x.unfold(-1, win, hop)                           # (B, T, 400)
    w = (0.5 - 0.5 * torch.cos(2 * math.pi * torch.arange(win, device=x.device) / win)).float()
    mag = torch.fft.rfft(frames * w, n=n_fft, dim=-1).abs()   # (B, T, 257)
    mel = mag @ torch.from_numpy(vggish_mel_matrix()).float().to(x.device)
    logmel = torch.log(mel + 0.01)                            # (B, T, 64)
    n_patch = (logmel.shape[1] - 96) // 96 + 1
    if n_patch < 1:
        raise ValueError("VGGish needs at least 0.975 s of audio")
    return logmel[:, :n_patch * 96].reshape(x.shape[0], n_patch, 1, 96, 64)


def _hz_to_mel_slaney(f):
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    mel = f / f_sp
    return np.where(f >= min_log_hz, min_log_hz / f_sp + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mel)


def _mel_to_hz_slaney(m):
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def slaney_mel_matrix(n_fft: int, sr: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """librosa.filters.mel defaults (Slaney mel scale, Slaney area normalisation): (n_fft//2+1, n_mels)."""
    fmax = sr / 2.0 if fmax is None else fmax
    fft_f = np.linspace(0, sr / 2.0, n_fft // 2 + 1)
    mel_f = _mel_to_hz_slaney(np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_f[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    w = np.maximum(0, np.minimum(lower, upper))
    w *= (2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))[:, None]
    return w.T


def csol_log_mel(wav: torch.Tensor, sr: int = 16000) -> torch.Tensor:
    """CSOL audio input: (B, N) -> (B, 1, T, 64) with T = 1 + N // 80 (1 s at 16 kHz -> 201x64).

    STFT n_fft=160, hop 80, periodic Hann, centred with zero padding; 64 Slaney mel bins (fmax = sr/2) applied to
    the *magnitude* (librosa.feature.melspectrogram(S=|STFT|)); power_to_db (10 log10, amin 1e-10, ref 1) with
    the top_db=80 floor taken per clip. Two of the 64 filters are empty at n_fft 160 (as in librosa).
    """
    x = wav.float()
    w = torch.hann_window(160, periodic=True, device=x.device)
    spec = torch.stft(x, n_fft=160, hop_length=80, win_length=160, window=w, center=True, pad_mode="constant",
                      return_complex=True).abs()              # (B, 81, T)
    mel = torch.einsum("fm,bft->btm", torch.from_numpy(slaney_mel_matrix(160, sr, 64)).float().to(x.device), spec)
    db = 10.0 * torch.log10(mel.clamp_min(1e-10))
    db = torch.maximum(db, db.amax(dim=(1, 2), keepdim=True) - 80.0)
    return db.unsqueeze(1)


# =====================================================================================================
# 3. Data: WAV files, the standard layout, the dataset reader
# =====================================================================================================
def read_wav(path) -> tuple[np.ndarray, int]:
    """Read a PCM WAV (16/24/32-bit, any channel count) with the standard library -> (float32 mono in [-1, 1], sr).

    Multi-channel files are averaged to mono. Anything else (float or compressed WAV, empty or truncated files)
    is a UserError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing audio file: {path}")
    try:
        with wave.open(str(path), "rb") as f:
            ch, width, sr, n = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
            raw = f.readframes(n)
    except (wave.Error, EOFError) as e:
        raise UserError(f"{path}: not a PCM WAV file the reader understands ({e}); convert it with data_prep.py "
                        f"(mono 16-bit PCM)") from None
    if width not in (2, 3, 4):
        raise UserError(f"{path}: {8 * width}-bit WAV is not supported (PCM 16/24/32-bit only); convert it with "
                        f"data_prep.py")
    n_read = len(raw) // (width * ch)
    if n_read == 0:
        raise UserError(f"{path}: the WAV file holds no samples")
    if n_read < n:
        raise UserError(f"{path}: truncated WAV (header says {n} frames, file holds {n_read})")
    raw = raw[:n_read * width * ch]
    if width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        x = (b[:, 0].astype(np.int32) | (b[:, 1].astype(np.int32) << 8) | (b[:, 2].astype(np.int32) << 16))
        x = np.where(x >= 1 << 23, x - (1 << 24), x).astype(np.float64) / (1 << 23)
    else:
        dt = {2: np.int16, 4: np.int32}[width]
        x = np.frombuffer(raw, dt).astype(np.float64) / float(-np.iinfo(dt).min)
    return x.reshape(-1, ch).mean(1).astype(np.float32), sr


def write_wav(path, x: np.ndarray, sr: int):
    """Write mono PCM16 (clipped to [-1, 1]) atomically."""
    path = Path(path)
    pcm = (np.clip(np.asarray(x, np.float64), -1, 1) * 32767).round().astype("<i2")
    tmp = path.with_name(path.name + ".part")
    with wave.open(str(tmp), "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(sr)
        f.writeframes(pcm.tobytes())
    os.replace(tmp, path)


def clip_window(x: np.ndarray, sr: int, seconds: float, where: str = "center") -> np.ndarray:
    """Cut a window of `seconds` from a mono waveform, tiling it first if it is shorter (as LVS and EZ-VSL do).

    where='center': centred on the clip's middle (EZ-VSL's 3 s, SSPL, CSOL); 'start': the first seconds
    (LVS's 10 s test input). Returns exactly round(sr * seconds) samples.
    """
    n = int(round(sr * seconds))
    if len(x) < n:
        x = np.tile(x, n // len(x) + 1)
        return x[:n]
    start = 0 if where == "start" else (len(x) - n) // 2
    return x[start:start + n]


def read_split(path) -> list[str]:
    """One id per line (the first comma-separated column, so csv id lists work too); blank lines ignored."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"split file not found: {path}")
    ids = [ln.split(",")[0].strip() for ln in path.read_text().splitlines()]
    return [i for i in ids if i]


def load_image(path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing frame: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:
        raise UserError(f"{path}: cannot decode image ({e})") from None


def check_layout(root, ids) -> None:
    """Fail with one message listing every id of a split that lacks its frame or wav (never a silent skip)."""
    root = Path(root)
    bad = [i for i in ids if not (root / "frames" / f"{i}.jpg").is_file() or not (root / "audio" / f"{i}.wav").is_file()]
    if bad:
        raise UserError(f"{len(bad)} of {len(ids)} ids have no frames/<id>.jpg or audio/<id>.wav under {root} "
                        f"(first: {', '.join(bad[:5])}); run data_prep.py, or remove them from the split")


class AVDataset(torch.utils.data.Dataset):
    """Reads the standard layout: item -> (image, waveform (float32 tensor), id).

    image_tf: callable on the PIL frame (a method's augmentation; may return a tuple of views).
    seconds / where: the audio window (see clip_window). sample_rate: the rate the method expects; a file at
    another rate is an error that points to data_prep.py (we never resample silently).
    cache: keep decoded frames and waveforms in memory (small datasets: the synthetic benchmark).
    """

    def __init__(self, root, ids, image_tf, seconds: float, where: str = "center", sample_rate: int = 16000,
                 cache: bool = False):
        self.root, self.ids, self.image_tf = Path(root), list(ids), image_tf
        self.seconds, self.where, self.sr = seconds, where, sample_rate
        if not self.ids:
            raise UserError(f"empty split for {root}")
        check_layout(self.root, self.ids)
        self._cache = {} if cache else None

    def __len__(self):
        return len(self.ids)

    def raw(self, i):
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        vid = self.ids[i]
        img = load_image(self.root / "frames" / f"{vid}.jpg")
        x, sr = read_wav(self.root / "audio" / f"{vid}.wav")
        if sr != self.sr:
            raise UserError(f"{self.root / 'audio' / (vid + '.wav')}: sample rate {sr} Hz, this method expects "
                            f"{self.sr} Hz; re-run data_prep.py with --sr {self.sr}")
        item = (img, clip_window(x, sr, self.seconds, self.where))
        if self._cache is not None:
            self._cache[i] = item
        return item

    def __getitem__(self, i):
        img, x = self.raw(i)
        return self.image_tf(img), torch.from_numpy(x.copy()), self.ids[i]


class SwapAudio(torch.utils.data.Dataset):
    """The audio-swapped control: item i keeps its frame and id but gets the audio of clip perm[i]
    (default: the fixed derangement i -> i+1 mod N)."""

    def __init__(self, ds: AVDataset, perm=None):
        self.ds, self.ids, self.perm = ds, ds.ids, perm or derangement(len(ds))

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        img, _, vid = self.ds[i]
        return img, self.ds[self.perm[i]][1], vid


def image_transform(kind: str, size: int = 224):
    """The image pipelines the four methods use (bicubic resizes, ImageNet normalisation):
    'crop_flip'   Resize(int(1.1 size)) -> RandomCrop(size) -> RandomHorizontalFlip   (LVS/EZ-VSL/SSPL train)
    'squash'      Resize((size, size)), no crop, so full-frame boxes stay aligned      (test; EZ-VSL, CSOL)
    'center_crop' Resize(size) -> CenterCrop(size)                                     (LVS/SSPL official test)
    'csol_train'  Resize((1.143 size)^2) -> RandomCrop(size) -> flip, brightness, colour U(0.7, 1.3)
    """
    import torchvision.transforms as T
    bic = T.InterpolationMode.BICUBIC
    norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if kind == "crop_flip":
        return T.Compose([T.Resize(int(size * 1.1), bic), T.RandomCrop(size), T.RandomHorizontalFlip()] + norm)
    if kind == "squash":
        return T.Compose([T.Resize((size, size), bic)] + norm)
    if kind == "center_crop":
        return T.Compose([T.Resize(size, bic), T.CenterCrop(size)] + norm)
    if kind == "csol_train":
        big = int(round(size * 256 / 224))
        return T.Compose([T.Resize((big, big), bic), T.RandomCrop(size), T.RandomHorizontalFlip(),
                          T.ColorJitter(brightness=0.3, saturation=0.3)] + norm)
    raise ValueError(f"unknown image transform {kind}")


def denormalize(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) ImageNet-normalised tensor -> (H, W, 3) uint8 for overlays."""
    m = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (img.detach().cpu().float() * s + m).clamp(0, 1).mul(255).byte().permute(1, 2, 0).numpy()


# =====================================================================================================
# 4. The synthetic benchmark
# =====================================================================================================
# Each class has a look (colour, shape, texture) and a sound (fundamental, timbre = harmonic amplitudes,
# rhythm = pulse rate). Frames show the sounding object plus silent objects of other classes of the same size
# distribution on a cluttered grey background, so only the sound says which object to localise.
SYNTH_CLASSES = [  # name, RGB, shape, texture, f0 (Hz), harmonic amplitudes, pulses per second
    ("red_disc", (215, 45, 45), "disc", "plain", 300.0, (1.0, 0.5, 0.25, 0.12), 2.0),
    ("green_square", (45, 180, 60), "square", "stripes", 450.0, (1.0, 0.0, 0.6, 0.0), 3.0),
    ("blue_triangle", (50, 85, 225), "triangle", "dots", 675.0, (1.0, 0.8, 0.0, 0.4), 4.5),
    ("yellow_diamond", (230, 205, 40), "diamond", "plain", 1010.0, (1.0, 0.2, 0.2, 0.2), 6.0),
    ("magenta_cross", (205, 50, 195), "cross", "stripes", 1520.0, (1.0, 0.6, 0.0, 0.0), 1.5),
    ("cyan_ring", (40, 195, 205), "ring", "dots", 2280.0, (1.0, 0.0, 0.0, 0.3), 8.0),
    ("orange_disc", (240, 140, 30), "disc", "stripes", 370.0, (1.0, 0.9, 0.7, 0.5), 5.0),
    ("purple_square", (120, 50, 170), "square", "dots", 820.0, (1.0, 0.3, 0.6, 0.1), 2.5),
]
SYNTH_DEFAULTS = dict(seed=0, n_classes=6, image_size=128, seconds=3.0, sr=16000,
                      sizes=dict(train=1200, val=150, test=300, cocktail_train=800, cocktail_val=100, cocktail_test=200))


def default_synth_root() -> Path:
    """Where methods look for (and generate) the synthetic benchmark: $AVSL_SYNTH or data/synth beside this file."""
    return Path(os.environ.get("AVSL_SYNTH", Path(__file__).resolve().parent / "data" / "synth"))


def _class_sound(rng, c: int, n: int, sr: int) -> np.ndarray:
    _, _, _, _, f0, amps, rate = SYNTH_CLASSES[c]
    t = np.arange(n) / sr
    f0 = f0 * (1 + rng.uniform(-0.02, 0.02))
    tone = sum(a * np.sin(2 * np.pi * (h + 1) * f0 * t + rng.uniform(0, 2 * np.pi)) for h, a in enumerate(amps) if a)
    env = 0.15 + 0.85 / (1 + np.exp(-8 * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi))))
    return tone * env / sum(amps)


def synth_audio(rng, classes, n: int, sr: int) -> np.ndarray:
    """The mixture of the given classes' sounds plus white background noise, peak-normalised to 0.7."""
    x = sum(_class_sound(rng, c, n, sr) for c in classes) + rng.normal(0, rng.uniform(0.05, 0.2), n)
    return 0.7 * x / np.abs(x).max()


def _background(rng, size: int) -> Image.Image:
    low = rng.normal(0, 1, (6, 6))
    low = np.asarray(Image.fromarray(((low - low.min()) / (np.ptp(low) + 1e-9) * 255).astype(np.uint8))
                     .resize((size, size), Image.BICUBIC), np.float64)
    base = rng.uniform(90, 170) + (low - 127) * 0.25
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).convert("RGB")
    d = ImageDraw.Draw(img)
    for _ in range(rng.integers(6, 13)):  # grey clutter
        s = rng.uniform(0.06, 0.18) * size
        x, y = rng.uniform(-s / 2, size - s / 2, 2)
        g = int(rng.uniform(50, 210))
        fill = tuple(int(np.clip(g + rng.integers(-8, 9), 0, 255)) for _ in range(3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x, y, x + s, y + s * rng.uniform(0.5, 1.5)], fill=fill)
    return img


def _draw_object(img: Image.Image, rng, c: int, box) -> np.ndarray:
    """Draw class c filling the integer pixel box [x1, y1, x2, y2) (the shape touches all four sides).
    Returns the boolean mask of the drawn pixels."""
    _, rgb, shape, texture, *_ = SYNTH_CLASSES[c]
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    m = Image.new("L", img.size, 0)
    d = ImageDraw.Draw(m)
    r = [x1, y1, x2 - 1, y2 - 1]
    if shape == "disc":
        d.ellipse(r, fill=255)
    elif shape == "square":
        d.rectangle(r, fill=255)
    elif shape == "triangle":
        d.polygon([(x1 + (w - 1) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=255)
    elif shape == "diamond":
        d.polygon([(x1 + (w - 1) / 2, y1), (x2 - 1, y1 + (h - 1) / 2), (x1 + (w - 1) / 2, y2 - 1), (x1, y1 + (h - 1) / 2)],
                  fill=255)
    elif shape == "cross":
        d.rectangle([x1 + w // 3, y1, x2 - 1 - w // 3, y2 - 1], fill=255)
        d.rectangle([x1, y1 + h // 3, x2 - 1, y2 - 1 - h // 3], fill=255)
    elif shape == "ring":
        d.ellipse(r, fill=255)
        t = max(2, int(0.22 * min(w, h)))
        d.ellipse([x1 + t, y1 + t, x2 - 1 - t, y2 - 1 - t], fill=0)
    mask = np.asarray(m) > 0
    col = np.clip(np.array(rgb) + rng.integers(-12, 13, 3), 0, 255).astype(np.float64)
    tex = np.ones(img.size[::-1])
    yy, xx = np.mgrid[0:img.size[1], 0:img.size[0]]
    if texture == "stripes":
        tex[((xx + yy) // 3) % 3 == 0] = 0.78
    elif texture == "dots":
        tex[((xx % 6) < 2) & ((yy % 6) < 2)] = 0.78
    arr = np.asarray(img, np.float64).copy()
    arr[mask] = col * tex[mask][:, None]
    img.paste(Image.fromarray(arr.astype(np.uint8)))
    return mask


def _place(rng, size, sides, tries=200, max_overlap=0.2):
    """Random non-overlapping (up to max_overlap of the smaller box) integer boxes of the given side lengths."""
    boxes = []
    for s in sides:
        s = int(round(s * size))
        for _ in range(tries):
            x, y = rng.integers(0, size - s + 1, 2)
            b = (int(x), int(y), int(x) + s, int(y) + s)
            ok = all(max(0, min(b[2], o[2]) - max(b[0], o[0])) * max(0, min(b[3], o[3]) - max(b[1], o[1]))
                     <= max_overlap * min(s, o[2] - o[0]) ** 2 for o in boxes)
            if ok:
                boxes.append(b)
                break
    return boxes


def render_single(rng, n_classes: int, size: int):
    """One single-source scene: (PIL image, sounding class, its normalised box, objects list, sounding mask)."""
    img = _background(rng, size)
    c = int(rng.integers(n_classes))
    others = [int(o) for o in rng.permutation([k for k in range(n_classes) if k != c])[:rng.choice([1, 2], p=[0.6, 0.4])]]
    boxes = _place(rng, size, rng.uniform(0.48, 0.62, 1 + len(others)))
    others = others[:len(boxes) - 1]                # a distractor that does not fit is left out
    objects = []
    for k, b in zip(others, boxes[1:]):            # silent ones first; the sounding object is drawn on top
        _draw_object(img, rng, k, b)
        objects.append((k, b, False))
    mask = _draw_object(img, rng, c, boxes[0])
    objects.append((c, boxes[0], True))
    return img, c, objects, mask


def render_cocktail(rng, n_classes: int, size: int):
    """A 2x2 grid of four single-object tiles of distinct classes; two of them sound."""
    tile = size // 2
    img = Image.new("RGB", (size, size))
    classes = [int(k) for k in rng.permutation(n_classes)[:4]]
    sounding = set(int(i) for i in rng.permutation(4)[:2])
    objects = []
    for q, k in enumerate(classes):
        t = _background(rng, tile)
        s = int(round(rng.uniform(0.6, 0.85) * tile))
        x, y = (int(v) for v in rng.integers(0, tile - s + 1, 2))
        _draw_object(t, rng, k, (x, y, x + s, y + s))
        ox, oy = (q % 2) * tile, (q // 2) * tile
        img.paste(t, (ox, oy))
        objects.append((k, (ox + x, oy + y, ox + x + s, oy + y + s), q in sounding))
    return img, objects


def make_synthetic(root, seed: int = 0, n_classes: int = 6, image_size: int = 128, seconds: float = 3.0,
                   sr: int = 16000, sizes: dict | None = None, log=print) -> Path:
    """Write the synthetic benchmark in the standard layout (deterministic by seed; one rng per clip).

    Splits: train/val/test (single source: the sounding object plus 1-2 silent ones), cocktail_train/val/test
    (2x2 grids, two sounding + two silent tiles, audio mixed). annotations.json covers every id (the methods read
    boxes only for val/test; CSOL's evaluation reads the classes of the clustered items).
    """
    if not 4 <= n_classes <= len(SYNTH_CLASSES):
        raise UserError(f"n_classes must be between 4 and {len(SYNTH_CLASSES)}")
    sizes = dict(SYNTH_DEFAULTS["sizes"] if sizes is None else sizes)
    root = Path(root)
    for d in ("frames", "audio", "splits"):
        (root / d).mkdir(parents=True, exist_ok=True)
    names = [c[0] for c in SYNTH_CLASSES[:n_classes]]
    n = int(round(seconds * sr))
    ann, t0 = [], time.time()
    for si, (split, count) in enumerate(sizes.items()):
        ids = []
        for i in range(count):
            vid = f"{split}_{i:05d}"
            rng = np.random.default_rng([seed, si, i])
            if split.startswith("cocktail"):
                img, objects = render_cocktail(rng, n_classes, image_size)
                snd = [k for k, _, s in objects if s]
                audio = synth_audio(rng, snd, n, sr)
                entry_class = "+".join(names[k] for k in snd)
            else:
                img, c, objects, _ = render_single(rng, n_classes, image_size)
                audio = synth_audio(rng, [c], n, sr)
                entry_class = names[c]
            norm = lambda b: [round(v / image_size, 6) for v in b]  # noqa: E731
            tmp = root / "frames" / f"{vid}.jpg.part"
            img.save(tmp, format="JPEG", quality=95)
            os.replace(tmp, root / "frames" / f"{vid}.jpg")
            write_wav(root / "audio" / f"{vid}.wav", audio, sr)
            ann.append({"file": vid, "class": entry_class, "bbox": [norm(b) for _, b, s in objects if s],
                        "objects": [{"class": names[k], "bbox": norm(b), "sounding": bool(s)} for k, b, s in objects]})
            ids.append(vid)
        (root / "splits" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        log(f"  synthetic {split}: {count} clips")
    write_json(root / "annotations.json", ann)
    meta = dict(seed=seed, n_classes=n_classes, image_size=image_size, seconds=seconds, sr=sr, sizes=sizes,
                classes=names)
    write_json(root / "synth.json", meta)
    log(f"  synthetic benchmark written to {root} in {time.time() - t0:.1f}s")
    return root


def ensure_synthetic(root=None, log=print, **kw) -> Path:
    """Generate the synthetic benchmark once (announced on the console); reuse it when its synth.json matches."""
    root = Path(root) if root else default_synth_root()
    want = {**SYNTH_DEFAULTS, **kw}
    meta_path = root / "synth.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if all(meta.get(k) == v for k, v in want.items()):
            return root
        log(f"synthetic benchmark at {root} was made with other settings; regenerating")
    log(f"no --data given: generating the built-in synthetic benchmark at {root} (once; about a minute)")
    return make_synthetic(root, log=log, **want)


# =====================================================================================================
# 5. The evaluator
# =====================================================================================================
# Protocols (how a predicted map becomes the binary prediction P; the map is first resized to 224x224):
PROTOCOLS = {
    "median": "min-max normalise, P = map >= its per-image median (top half of the pixels; the LVS and EZ-VSL "
              "test scripts; LVS keeps strictly-greater pixels, see 'median_strict')",
    "median_strict": "as 'median' but P = map > median (the LVS test script exactly; one pixel fewer when "
                     "values are distinct)",
    "abs0.5": "min-max normalise, P = map >= 0.5 (the SSPL test script; the LVS paper's text)",
    "rel0.1": "P = map > 0.1 * max(map), no min-max (CSOL's single-source tools.py)",
}
AUC_THRESHOLDS = [0.05 * i for i in range(21)]  # exactly the official list (0.05*3 = 0.15000000000000002)


def _box_floats(box, where: str):
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise UserError(f"{where}: a box must be [x1, y1, x2, y2], got {box!r}")
    try:
        vals = [float(v) for v in box]
    except (TypeError, ValueError):
        raise UserError(f"{where}: non-numeric box {box!r}") from None
    if not all(math.isfinite(v) for v in vals):
        raise UserError(f"{where}: non-finite coordinate in box {box!r}")
    return vals


def parse_flickr_xml(path) -> list[list[float]]:
    """Boxes of one Flickr-SoundNet XML, normalised by the 256-px canvas the official code assumes.

    As the LVS/EZ-VSL/SSPL readers: every <bbox> grandchild of the root, its first sub-element skipped and the
    next four read as integer xmin, ymin, xmax, ymax. v/256 is exact in floating point, so int(224 * v/256)
    downstream equals the official int(224 * v / 256).
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise UserError(f"{path}: malformed XML ({e})") from None
    boxes = []
    for child in root:
        for g in child:
            if g.tag != "bbox":
                continue
            vals = [c.text for c in list(g)[1:5]]
            try:
                boxes.append([int(str(v).strip()) / 256.0 for v in vals])
            except ValueError:
                raise UserError(f"{path}: a <bbox> needs four integer coordinates after its first element, "
                                f"got {vals}") from None
            if len(vals) != 4:
                raise UserError(f"{path}: a <bbox> with {len(vals)} coordinates")
    if not boxes:
        raise UserError(f"{path}: no <bbox> element")
    return boxes


def load_annotations(path) -> dict:
    """Annotations -> {id: entry}. Accepts the standard layout's annotations.json (VGG-SS format, with the
    optional "gt" and "objects" keys), the original vggss.json, or a directory of original Flickr XML files
    (entries get "gt": "consensus"). Malformed entries are errors that name the entry."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.xml"))
        if not files:
            raise UserError(f"{path}: directory without .xml annotation files")
        return {f.stem: {"file": f.stem, "class": "", "bbox": parse_flickr_xml(f), "gt": "consensus"} for f in files}
    if not path.is_file():
        raise UserError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid json ({e})") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a json list of {{'file', 'class', 'bbox'}} entries")
    out = {}
    for i, e in enumerate(data):
        where = f"{path} entry {i}" + (f" ({e.get('file')})" if isinstance(e, dict) else "")
        if not isinstance(e, dict) or not isinstance(e.get("file"), str) or not isinstance(e.get("bbox"), list):
            raise UserError(f"{where}: an entry needs a string 'file' and a list 'bbox'")
        if e.get("gt", "union") not in ("union", "consensus"):
            raise UserError(f"{where}: 'gt' must be 'union' or 'consensus'")
        entry = dict(e, bbox=[_box_floats(b, where) for b in e["bbox"]])
        if "objects" in e:
            entry["objects"] = [dict(o, bbox=_box_floats(o.get("bbox"), where)) for o in e["objects"]]
        if e["file"] in out:
            raise UserError(f"{where}: duplicate id {e['file']}")
        out[e["file"]] = entry
    return out


def rasterize_box(box, size: int = GT_SIZE):
    """[x1, y1, x2, y2] normalised -> integer pixel slice bounds, as the official code: int(size * max(v, 0))."""
    return [int(size * max(v, 0.0)) for v in box]


def boxes_to_map(boxes, kind: str = "union", size: int = GT_SIZE) -> np.ndarray:
    """Ground-truth map: 'union' = binary union of the boxes (VGG-SS); 'consensus' = boxes summed, /2, capped
    at 1 (Flickr-SoundNet, C = 2 annotators; values 0, 0.5, 1). Boxes fill [y1:y2, x1:x2] (end exclusive)."""
    g = np.zeros((size, size), np.float64)
    for b in boxes:
        x1, y1, x2, y2 = rasterize_box(b, size)
        if kind == "union":
            g[y1:y2, x1:x2] = 1.0
        else:
            g[y1:y2, x1:x2] += 1.0
    if kind == "consensus":
        g = np.minimum(g / 2.0, 1.0)
    return g


def gt_map(entry: dict, size: int = GT_SIZE) -> np.ndarray:
    return boxes_to_map(entry["bbox"], entry.get("gt", "union"), size)


def resize_map(m, size: int = GT_SIZE, align_corners: bool = False) -> np.ndarray:
    """Bilinear resize of a 2-D map to size x size (align_corners=False matches OpenCV INTER_LINEAR when
    up-sampling, as LVS/SSPL; True is EZ-VSL's test)."""
    t = torch.as_tensor(np.asarray(m, np.float64))[None, None]
    if t.shape[-2:] == (size, size):
        return t[0, 0].numpy()
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=align_corners)[0, 0].numpy()


def minmax(m: np.ndarray) -> np.ndarray:
    """(m - min) / (max - min). A constant map becomes all zeros (defined here; the official scripts divide by
    zero or add 1e-12)."""
    lo, hi = float(m.min()), float(m.max())
    return np.zeros_like(m) if hi == lo else (m - lo) / (hi - lo)


def binarize(m: np.ndarray, protocol: str) -> np.ndarray:
    """Binary prediction P from a 224x224 map under a named protocol (see PROTOCOLS).

    Constant maps: 'median' predicts every pixel (all tie at the median), 'median_strict' and 'abs0.5' predict
    none (cIoU 0), 'rel0.1' predicts every pixel of a positive constant map and none of a non-positive one.
    """
    if protocol == "rel0.1":
        return m > 0.1 * m.max()
    p = minmax(m)
    if protocol in ("median", "median_strict"):
        thr = np.sort(p, axis=None)[p.size // 2]
        return p >= thr if protocol == "median" else p > thr
    if protocol == "abs0.5":
        return p >= 0.5
    raise UserError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")


def ciou(pred: np.ndarray, gt: np.ndarray) -> float:
    """cIoU = sum(P*G) / (sum(G) + sum(P*[G==0])) with P binary and G in [0, 1] (LVS appendix A). Both empty -> 0."""
    p = pred.astype(np.float64)
    den = gt.sum() + (p * (gt == 0)).sum()
    return float((p * gt).sum() / den) if den > 0 else 0.0


def summarize(scores) -> dict:
    """cIoU@0.5 = fraction of samples with cIoU >= 0.5 (what the papers print as 'cIoU'), AUC = sklearn's
    trapezoid over the official 21 thresholds of the fraction with cIoU >= t, and the mean cIoU."""
    from sklearn.metrics import auc
    s = np.asarray(scores, np.float64)
    if s.size == 0:
        return {"ciou@0.5": float("nan"), "auc": float("nan"), "mean_ciou": float("nan")}
    succ = [float(np.mean(s >= t)) for t in AUC_THRESHOLDS]
    return {"ciou@0.5": float(np.mean(s >= 0.5)), "auc": float(auc(AUC_THRESHOLDS, succ)), "mean_ciou": float(s.mean())}


def check_map(vid: str, m) -> np.ndarray:
    m = np.asarray(m)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise UserError(f"prediction for {vid}: expected a 2-D map, got shape {m.shape}")
    if not np.isfinite(m).all():
        raise UserError(f"prediction for {vid}: the map contains NaN or inf")
    return m.astype(np.float64)


def center_prior(size: int = GT_SIZE) -> np.ndarray:
    """The centred-prior baseline map: a cone 1 - d / d_corner (median protocol -> a centred disk of half the
    image; abs0.5 -> a centred disk of radius half the centre-corner distance)."""
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size]
    d = np.hypot(yy - c, xx - c)
    return 1.0 - d / d.max()


def evaluate_maps(maps: dict, ann: dict, ids=None, protocol: str = "median", align_corners: bool = False,
                  baselines: bool = True, extra_baselines: dict | None = None) -> dict:
    """Score predicted maps against annotations.

    maps: {id: 2-D map of any size}. ids: the test list (default: every id of `maps`). Every prediction must have
    an annotation (else an error); listed ids without a prediction are reported as missing, never dropped
    silently. Entries whose ground truth is empty are scored (cIoU 0, as the official code) and reported.
    Returns {"protocol", "resize", "n", "n_listed", "missing", "empty_gt", "test": summary, "per_sample": {id:
    cIoU}, "baselines": {"center": ..., "full_image": ..., **extra}} (the baseline maps go through the same
    protocol; the full image is P = 1 everywhere).
    """
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    unknown = [i for i in maps if i not in ann]
    if unknown:
        raise UserError(f"{len(unknown)} predicted ids have no annotation (first: {', '.join(unknown[:5])})")
    listed = list(maps) if ids is None else list(ids)
    not_annotated = [i for i in listed if i not in ann]
    if not_annotated:
        raise UserError(f"{len(not_annotated)} ids of the test list have no annotation "
                        f"(first: {', '.join(not_annotated[:5])})")
    present = [i for i in listed if i in maps]
    missing = [i for i in listed if i not in maps]
    gts = {i: gt_map(ann[i]) for i in present}
    empty = [i for i in present if gts[i].sum() == 0]
    per = {i: ciou(binarize(resize_map(check_map(i, maps[i]), GT_SIZE, align_corners), protocol), gts[i])
           for i in present}
    out = {"protocol": protocol, "resize": f"bilinear align_corners={align_corners}", "n": len(present),
           "n_listed": len(listed), "missing": missing, "empty_gt": empty, "test": summarize(list(per.values())),
           "per_sample": per, "baselines": {}}
    if baselines:
        cp = binarize(center_prior(), protocol)
        full = np.ones((GT_SIZE, GT_SIZE), bool)
        out["baselines"]["center"] = summarize([ciou(cp, gts[i]) for i in present])
        out["baselines"]["full_image"] = summarize([ciou(full, gts[i]) for i in present])
        for name, bmaps in (extra_baselines or {}).items():
            out["baselines"][name] = summarize([ciou(binarize(resize_map(check_map(i, bmaps[i]), GT_SIZE,
                                                                          align_corners), protocol), gts[i])
                                                for i in present])
    return out


def fmt_metrics(m: dict) -> str:
    return f"cIoU@0.5 {100 * m['ciou@0.5']:6.2f}  AUC {100 * m['auc']:6.2f}  mean cIoU {100 * m['mean_ciou']:6.2f}"


def format_report(res: dict, title: str = "test") -> str:
    """Every number printed with its protocol, resize variant and N evaluated / N listed."""
    lines = [f"[{title}] protocol={res['protocol']} ({PROTOCOLS[res['protocol']]})",
             f"[{title}] resize={res['resize']}  N evaluated {res['n']} / listed {res['n_listed']}"
             + (f"  ({len(res['missing'])} missing)" if res["missing"] else "")]
    if res["empty_gt"]:
        lines.append(f"[{title}] warning: {len(res['empty_gt'])} entries have an empty ground truth and score 0: "
                     f"{', '.join(res['empty_gt'][:10])}")
    width = max([len("model")] + [len(k) for k in res.get("baselines", {})])
    lines.append(f"[{title}] {'model':<{width}}  {fmt_metrics(res['test'])}   ({res['protocol']}, N={res['n']})")
    for k, v in res.get("baselines", {}).items():
        lines.append(f"[{title}] {k:<{width}}  {fmt_metrics(v)}   ({res['protocol']}, N={res['n']})")
    return "\n".join(lines)


# CSOL's metrics (as its tools.py / eval.py compute them; see csol_classaware.py for the paper's variants).
def class_aware_scores(class_maps: dict, sounding: dict, silent, ciou_frac: float = 0.5, nsa_tau: float = 0.2,
                       size: int = GT_SIZE, align_corners: bool = False):
    """One cocktail image: class_maps {class: 2-D map (softmax probability per pixel)}, sounding {class: [boxes]},
    silent: the classes without a sounding box.
    Returns (ciou_n, nsa_n): ciou_n = mean over sounding classes c of IoU(P_c = map_c > ciou_frac*max(map_c), G_c);
    nsa_n = mean over silent classes of the fraction of pixels with map_c <= nsa_tau (None if no silent class).
    """
    ious = []
    for c, boxes in sounding.items():
        m = resize_map(class_maps[c], size, align_corners)
        ious.append(ciou(m > ciou_frac * m.max(), boxes_to_map(boxes, "union", size)))
    nsa = [float(np.mean(resize_map(class_maps[c], size, align_corners) <= nsa_tau)) for c in silent]
    return float(np.mean(ious)) if ious else 0.0, (float(np.mean(nsa)) if nsa else None)


def summarize_class_aware(cious, nsas) -> dict:
    """CIoU@0.3 = fraction of images whose mean class IoU >= 0.3 (CSOL's eval.py), AUC over the same scores,
    CIoU@0.5, and NSA = mean silent-area score."""
    s = summarize(cious)
    valid = [v for v in nsas if v is not None]
    return {"ciou@0.3": float(np.mean(np.asarray(cious) >= 0.3)) if len(cious) else float("nan"),
            "ciou@0.5": s["ciou@0.5"], "auc": s["auc"], "mean_ciou": s["mean_ciou"],
            "nsa": float(np.mean(valid)) if valid else float("nan")}


# =====================================================================================================
# 6. Helpers: seeding, device / AMP, DDP, checkpoints, progress, overlays, run folders, the shared CLI
# =====================================================================================================
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA device is available; use --device cpu")
    return dev


class Amp:
    """Mixed precision on CUDA (bfloat16 where supported, else float16 with a GradScaler); a no-op on CPU."""

    def __init__(self, device: torch.device, enabled: bool):
        self.enabled = bool(enabled) and device.type == "cuda"
        self.dtype = torch.bfloat16 if self.enabled and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.enabled and self.dtype == torch.float16)
        self.device_type = device.type

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype) if self.enabled else contextlib.nullcontext()

    def step(self, loss, optimizer):
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()


def init_distributed(device_name: str = "auto"):
    """DDP set-up under torchrun (RANK/WORLD_SIZE/LOCAL_RANK in the environment), plain single process without.
    Returns (rank, world_size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and device_name != "cpu"
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        return dist.get_rank(), world, torch.device(f"cuda:{local}" if use_cuda else "cpu")
    return 0, 1, resolve_device(device_name)


def gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor across DDP ranks, keeping the gradient of the local slice (for global negatives)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def save_checkpoint(path, obj: dict) -> None:
    """torch.save to a temporary file then an atomic rename: an interrupted save never leaves a broken file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=False)


def strip_prefix(sd: dict, prefix: str = "module.") -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def write_json(path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def progress(iterable, desc: str = "", total=None, enabled: bool = True):
    """A progress bar with rate and ETA (tqdm), silent on non-main DDP ranks."""
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False, dynamic_ncols=True,
                mininterval=1.0)


def jet(x: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB uint8 with the classic jet colour map."""
    x = np.clip(x, 0, 1)[..., None]
    rgb = np.clip(np.concatenate([1.5 - np.abs(4 * x - 3), 1.5 - np.abs(4 * x - 2), 1.5 - np.abs(4 * x - 1)], -1), 0, 1)
    return (rgb * 255).astype(np.uint8)


def overlay(frame: np.ndarray, heat: np.ndarray, boxes=None, alpha: float = 0.5) -> Image.Image:
    """Frame (H, W, 3 uint8) blended with the min-max normalised heat map in jet; normalised boxes in green."""
    h, w = frame.shape[:2]
    hm = F.interpolate(torch.as_tensor(np.asarray(heat, np.float64))[None, None], size=(h, w), mode="bilinear",
                       align_corners=False)[0, 0].numpy()
    img = Image.fromarray((frame * (1 - alpha) + jet(minmax(hm)) * alpha).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for b in boxes or []:
        x1, y1, x2, y2 = (max(v, 0.0) for v in b)
        d.rectangle([x1 * w, y1 * h, x2 * w - 1, y2 * h - 1], outline=(0, 255, 0), width=2)
    return img


def save_overlay_png(path, frame: np.ndarray, heat: np.ndarray, boxes=None) -> None:
    """Three panels side by side: the frame with the ground-truth boxes, the heat map, the overlay."""
    h, w = frame.shape[:2]
    panel = Image.new("RGB", (3 * w, h))
    panel.paste(overlay(frame, np.zeros((2, 2)), boxes, alpha=0.0), (0, 0))
    panel.paste(overlay(np.zeros_like(frame), heat, None, alpha=1.0), (w, 0))
    panel.paste(overlay(frame, heat, boxes), (2 * w, 0))
    panel.save(path)


def derangement(n: int) -> list[int]:
    """The fixed derangement used for the audio-swapped control: clip i gets the audio of clip (i + 1) mod n."""
    return [(i + 1) % n for i in range(n)] if n > 1 else [0]


def save_maps(path, maps: dict) -> None:
    """One float map per id in an .npz (the format eval_cioU.py reads)."""
    np.savez_compressed(path, **{k: np.asarray(v, np.float32) for k, v in maps.items()})


def load_maps(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prediction file not found: {path}")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


class RunLog:
    """print() that also appends to <run>/log.txt (only on the main process)."""

    def __init__(self, path=None, enabled: bool = True):
        self.path, self.enabled = (Path(path) if path else None), enabled

    def __call__(self, *msg):
        if not self.enabled:
            return
        s = " ".join(str(m) for m in msg)
        print(s, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(s + "\n")


def add_standard_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command line every method shares (same spelling in all four). Method-specific defaults (lr, batch,
    epochs, image size ...) are None here and filled from the method's preset."""
    a = p.add_argument
    a("--train", action="store_true", help="train, select on the validation split, then evaluate on the test split")
    a("--eval", action="store_true", help="evaluate a checkpoint (--ckpt) on the test split")
    a("--predict", action="store_true", help="heat map for one pair: --image IMG --audio WAV [--out heat.png]")
    a("--ckpt", help="checkpoint (.pt) to evaluate / predict with, or a run folder (uses best.pt)")
    a("--image", help="--predict: the frame")
    a("--audio", help="--predict: the WAV")
    a("--data", help="dataset root in the standard layout (default: the built-in synthetic benchmark)")
    a("--train-split", help="train id list (default ROOT/splits/train.txt)")
    a("--val-split", help="validation id list used for checkpoint selection (default ROOT/splits/val.txt)")
    a("--test-split", help="test id list (default ROOT/splits/test.txt)")
    a("--annotations", help="annotations: json (VGG-SS format) or a Flickr XML folder (default ROOT/annotations.json)")
    a("--protocol", choices=list(PROTOCOLS), help="evaluation protocol (default: the method's official one)")
    a("--align-corners", action="store_true", help="resize maps with align_corners=True (EZ-VSL's test)")
    a("--save-maps", help="--eval: write the test maps to this .npz (for eval_cioU.py)")
    a("--viz", type=int, default=0, help="write N PNG overlays (frame + boxes, heat map, overlay)")
    a("--preset", choices=["cpu", "paper"], help="cpu: small encoders/images; paper: the official set-up "
      "(default: cpu on the synthetic benchmark, paper on real data)")
    a("--epochs", type=int, help="training epochs")
    a("--batch-size", type=int, help="global batch size (split across DDP processes)")
    a("--lr", type=float, help="learning rate")
    a("--seed", type=int, default=0, help="random seed (python, numpy, torch; per-epoch reseeding for exact resume)")
    a("--seeds", help="--train: comma-separated seeds (e.g. 0,1,2) run one after another into sibling run "
      "folders, then tabled as mean +- std")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    a("--amp", action=argparse.BooleanOptionalAction, default=True,
      help="mixed precision on CUDA (bf16 where supported, else fp16); on by default, --no-amp turns it off; "
           "ignored on CPU")
    a("--compile", action="store_true", help="torch.compile the model (CUDA; slower start, faster steps)")
    a("--workers", type=int, default=0, help="data-loading worker processes")
    a("--decode", choices=["fast", "pil"], default="fast",
      help="fast: batched torch decode/augment on the training device (default); pil: the official per-sample "
           "PIL pipeline, bit for bit")
    a("--no-cache", action="store_true", help="do not build or use the pre-resized frame cache")
    a("--skip-bad", action="store_true", help="skip unreadable frames/WAVs (counted, listed in the run folder) "
      "instead of stopping with an error")
    a("--benchmark", action="store_true", help="measure loader / model / end-to-end samples per second and peak "
      "memory; writes benchmark.json in a run folder under --out")
    a("--steps", type=int, help="--benchmark: measured steps (default: a few hundred samples)")
    a("--negatives", action="store_true", help="--eval: also score silence, white noise and off-screen audio "
      "(SLAVC extended metrics and pIA per negative kind)")
    a("--out", help="--train: parent folder of run folders (default runs/); --eval: folder for results.json; "
      "--predict: output PNG")
    a("--resume", help="continue a run from its last.pt (path to the file or the run folder)")
    a("--weights", help="local .pth with the image-encoder weights (instead of torchvision's download)")
    a("--no-pretrained", action="store_true", help="do not load any pretrained weights")
    a("--max-steps", type=int, help="stop each epoch after this many steps (smoke tests)")
    a("--limit", type=int, help="use only the first N ids of each split (smoke tests)")
    return p


def resolve_data(args, log=print):
    """Fill the data arguments: no --data -> the synthetic benchmark (generated once) and the cpu preset; real
    data -> the paper preset; splits and annotations default to the standard layout's files."""
    if args.data is None:
        args.data = str(ensure_synthetic(log=log))
        args.preset = args.preset or "cpu"
    args.preset = args.preset or "paper"
    root = Path(args.data)
    if not root.is_dir():
        raise UserError(f"--data {root}: no such directory")
    args.train_split = args.train_split or str(root / "splits" / "train.txt")
    args.val_split = args.val_split or str(root / "splits" / "val.txt")
    args.test_split = args.test_split or str(root / "splits" / "test.txt")
    args.annotations = args.annotations or str(root / "annotations.json")
    return args


def apply_preset(args, presets: dict) -> None:
    """Fill every option still None from the chosen preset (explicit command-line values win)."""
    for k, v in presets[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)


def make_run_dir(args, method: str) -> Path:
    name = f"{method}__{Path(args.data).name}__s{args.seed}__{datetime.datetime.now():%Y%m%d-%H%M%S}"
    d = Path(args.out or "runs") / name
    d.mkdir(parents=True, exist_ok=True)
    write_json(d / "args.json", vars(args))
    return d


class Run:
    """What a training run needs before its model exists: rank / world / device (DDP under torchrun), the seed,
    the run folder (new, or the one of --resume with its checkpoint loaded into .ck) and the log."""

    def __init__(self, args, method: str):
        self.rank, self.world, self.device = init_distributed(args.device)
        self.main = self.rank == 0
        seed_everything(args.seed)
        if args.resume:
            self.ck = load_checkpoint(args.resume)
            self.dir = Path(args.resume) if Path(args.resume).is_dir() else Path(args.resume).parent
        else:
            self.ck, self.dir = None, (make_run_dir(args, method) if self.main else None)
        self.log = RunLog(self.dir / "log.txt" if self.main else None, self.main)
        self.per_proc = max(1, args.batch_size // self.world)

    def wrap(self, model):
        """DistributedDataParallel under torchrun, the model itself otherwise."""
        if self.world == 1:
            return model
        ids = [self.device] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def loader(self, ds, args, epoch: int):
        """The epoch's shuffled loader: reseeds python/numpy/torch from (seed, epoch) first, so an epoch is
        reproducible on its own and a resumed run continues exactly; DistributedSampler under DDP."""
        seed_everything(args.seed * 1000 + epoch)
        sampler = None
        if self.world > 1:
            sampler = torch.utils.data.distributed.DistributedSampler(ds, self.world, self.rank, seed=args.seed)
            sampler.set_epoch(epoch)
        return torch.utils.data.DataLoader(ds, self.per_proc, shuffle=sampler is None, sampler=sampler,
                                           num_workers=args.workers, drop_last=len(ds) >= self.per_proc,
                                           generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))


def run_cli(main_fn) -> None:
    """Run a CLI entry point; a UserError becomes one 'error: ...' line and exit status 2, not a traceback."""
    try:
        main_fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def save_results(args, method: str, res: dict, swapped, ann: dict, log, seconds: float, map_name: str,
                 extra: dict | None = None) -> dict:
    """Print the report, then write results.json (the contract's keys), --save-maps and --viz overlays.

    res: an evaluate_maps() result with res["maps"] = the maps it scored; swapped: the same for the
    audio-swapped control (or None); out folder: --out, else the checkpoint's folder.
    """
    log(format_report(res, f"test {map_name}"))
    if swapped:
        log(f"[test] audio-swapped  {fmt_metrics(swapped['test'])}   ({res['protocol']}, N={res['n']}; each clip "
            f"gets the next clip's audio)")
    out = Path(args.out or Path(args.ckpt).parent)
    out.mkdir(parents=True, exist_ok=True)
    results = {"method": method, "data": str(args.data), "split": str(args.test_split), "protocol": res["protocol"],
               "seed": getattr(args, "seed", None),
               "resize": res["resize"], "n": res["n"], "n_listed": res["n_listed"], "seconds": round(seconds, 1),
               "test": res["test"], "baselines": res["baselines"],
               "audio_swapped": swapped["test"] if swapped else None, "map": map_name,
               "missing": res["missing"], "empty_gt": res["empty_gt"], **(extra or {})}
    write_json(out / "results.json", results)
    if res["missing"]:
        (out / "missing_ids.txt").write_text("\n".join(res["missing"]) + "\n")
    if args.save_maps:
        save_maps(args.save_maps, res["maps"])
        log(f"maps written to {args.save_maps}")
    if args.viz:
        d = out / "viz"
        d.mkdir(exist_ok=True)
        ids = [i for i in res["per_sample"]][: args.viz]
        for vid in ids:
            img = np.asarray(load_image(Path(args.data) / "frames" / f"{vid}.jpg"))
            save_overlay_png(d / f"{vid}.png", img, res["maps"][vid], ann[vid]["bbox"])
        log(f"{len(ids)} overlays written to {d}")
    log(f"results written to {out / 'results.json'}")
    return results


# ---- several seeds, and the table of many runs ------------------------------------------------------------
TABLE_KEYS = ("ciou@0.5", "auc", "mean_ciou")


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: give distinct seeds, e.g. 0,1,2")
    return seeds


def train_seeds(args, train_fn, log=print) -> list[Path]:
    """--seeds: train one run per seed (each its own run folder under --out, every other setting the same), then
    print the table of their results.json. Returns the results.json paths."""
    import copy
    if args.resume:
        raise UserError("--seeds starts new runs; resume each run on its own with --resume RUN/last.pt")
    parent = Path(args.out or "runs")
    paths = []
    for seed in parse_seeds(args.seeds):
        a = copy.deepcopy(args)
        a.seed, a.seeds, a.out = seed, None, str(parent)
        before = set(parent.iterdir()) if parent.is_dir() else set()
        train_fn(a)
        new = sorted(d for d in parent.iterdir() if d not in before and (d / "results.json").is_file())
        if int(os.environ.get("RANK", "0")) != 0:
            continue
        if len(new) != 1:
            raise UserError(f"--seeds: expected one new run folder with results.json under {parent} for seed {seed}, "
                            f"found {len(new)}")
        paths.append(new[0] / "results.json")
    if int(os.environ.get("RANK", "0")) == 0:
        log(results_table(paths))
    return paths


def _mean_std(values) -> str:
    v = np.asarray(values, np.float64) * 100
    if v.size == 1:
        return f"{v[0]:.2f}"
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"


def _flat_numbers(d, prefix="") -> dict:
    """{"a": {"b": 0.5}} -> {"a/b": 0.5}: the numeric leaves of a nested results dict."""
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = v
    return out


def results_table(paths) -> str:
    """Markdown table of several results.json files: one row per (method, data), mean ± sample std (ddof 1) over the
    runs of cIoU@0.5, AUC and mean cIoU (in %), with the centred prior and the audio-swapped control, and the
    negative-audio metrics when every run has them. Runs of one (method, data) that differ in split, protocol or N
    are not averaged: that is an error naming the files and the values."""
    groups: dict = {}
    for p in paths:
        p = Path(p)
        if p.is_dir():
            p = p / "results.json"
        try:
            r = json.loads(p.read_text())
        except FileNotFoundError:
            raise UserError(f"{p}: no such results file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{p}: not a results.json ({e})") from None
        if not isinstance(r, dict) or not all(k in r for k in ("method", "data", "split", "protocol", "n", "test")):
            raise UserError(f"{p}: not a method's results.json (needs method, data, split, protocol, n, test)")
        groups.setdefault((r["method"], r["data"]), []).append((p, r))
    if not groups:
        raise UserError("no results.json given")
    parts = [("model", lambda r: r["test"]), ("centred prior", lambda r: (r.get("baselines") or {}).get("center")),
             ("audio-swapped", lambda r: r.get("audio_swapped"))]
    rows, neg_cols = [], []
    for (method, data), runs in groups.items():
        for field in ("split", "protocol", "n"):
            if len({str(r[field]) for _, r in runs}) > 1:
                where = "; ".join(f"{r[field]} in {p}" for p, r in runs)
                raise UserError(f"cannot average {method} on {data}: the runs differ in {field} ({where}); "
                                f"table them separately")
        first = runs[0][1]
        row = {"method": method, "data": Path(data).name, "split": Path(first["split"]).name,
               "protocol": first["protocol"], "N": str(first["n"]),
               "runs (seeds)": f"{len(runs)} ({','.join(str(r.get('seed', '?')) for _, r in runs)})"}
        for name, get in parts:
            got = [get(r) for _, r in runs]
            for k in TABLE_KEYS:
                row[f"{name} {k}"] = _mean_std([g[k] for g in got]) if all(got) else "-"
        negs = [_flat_numbers(r.get("negatives")) for _, r in runs]
        for k in sorted(set.intersection(*(set(n) for n in negs))) if all(negs) else []:
            row[f"neg {k}"] = _mean_std([n[k] for n in negs])
            neg_cols += [] if f"neg {k}" in neg_cols else [f"neg {k}"]
        rows.append(row)
    head = list(rows[0])[:6] + [f"{name} {k}" for name, _ in parts for k in TABLE_KEYS] + neg_cols
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(row.get(h, "-") for h in head) + " |" for row in rows]
    return "\n".join(out) + f"\n(mean ± sample std over the runs, in %; {len(paths)} results files)"
