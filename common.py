"""common.py - the plumbing shared by the four method files (lvs_hardway.py, ez_vsl.py, sspl.py,
csol_classaware.py). Method logic (losses, heads, localization maps) never lives here.

Sections, top to bottom:
  1. Encoders: ResNet-18 trunks (stride 16 / 32, 3- or 1-channel), VGG16 conv5_3, VGGish, small CPU CNNs,
     pretrained-weight loading (torchvision weights API or a local .pth) with a clear offline error.
  2. Audio front ends (batched torch, run on the training device): the LVS/EZ-VSL log spectrogram, the VGGish
     log-mel examples, the CSOL log-mel.
  3. Data: WAV reading with `wave`, the standard layout, the dataset reader, clip windows, image transforms.
  4. (empty: the synthetic benchmark generator lives in data_prep.py; resolve_data imports it only when a method
     runs without --data, so a method file and common.py copied elsewhere train on that project's data alone.)
  5. The evaluator: ground-truth maps, named protocols (each exactly its official script, in float32), batched
     cIoU / AUC, baselines, CSOL's class-aware metrics, the negative-audio protocol (SLAVC AP / max-F1, pIA).
  6. Helpers: seeding, device/AMP, the CUDA habits (cudnn.benchmark, channels_last, --compile), DDP under
     torchrun, atomic checkpoints (validated on load, recording their method), progress bar, heat-map overlays,
     run folders, the command line every method shares, the preflight every training run passes before its run
     folder exists, resume settings, one-line errors (also under torchrun), the atomic writing of evaluation
     outputs and the --benchmark timing harness.

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
import shutil
import sys
import tempfile
import threading
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
    x = wav.float()                                         # float32: within 1e-6 of float64 (see the README)
    frames = x.unfold(-1, nperseg, hop)                     # (B, T, 512)
    frames = frames - frames.mean(-1, keepdim=True)         # detrend='constant'
    w64 = _tukey_periodic(nperseg)
    w, scale = w64.to(x.device, torch.float32), float(sr * (w64 ** 2).sum())
    spec = torch.view_as_real(torch.fft.rfft(frames * w, dim=-1)).square().sum(-1) / scale   # |X|^2
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
    frames are dropped. 3 s -> 298 frames -> 3 patches. Computed in float64 (as numpy in the official
    vggish_input) and returned in the input's float dtype (float32 for integer input).
    """
    if sr != 16000:
        raise ValueError("VGGish expects 16 kHz audio")
    win, hop, n_fft = 400, 160, 512
    x = wav.double()                                          # float64 as numpy; the result takes the input's dtype
    frames = x.unfold(-1, win, hop)                           # (B, T, 400)
    w = 0.5 - 0.5 * torch.cos(2 * math.pi * torch.arange(win, device=x.device, dtype=torch.float64) / win)
    mag = torch.fft.rfft(frames * w, n=n_fft, dim=-1).abs()   # (B, T, 257)
    mel = mag @ torch.from_numpy(vggish_mel_matrix()).to(x.device)
    logmel = torch.log(mel + 0.01)                            # (B, T, 64)
    n_patch = (logmel.shape[1] - 96) // 96 + 1
    if n_patch < 1:
        raise ValueError("VGGish needs at least 0.975 s of audio")
    out = logmel[:, :n_patch * 96].reshape(x.shape[0], n_patch, 1, 96, 64)
    return out.to(wav.dtype if wav.is_floating_point() else torch.float32)


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
    Computed in float64 (in float32 the bins near the 80 dB floor are rounding noise: up to 2.4 dB off librosa
    on a chirp) and returned in the input's float dtype (float32 for integer input).
    """
    x = wav.double()
    w = torch.hann_window(160, periodic=True, dtype=torch.float64, device=x.device)
    spec = torch.stft(x, n_fft=160, hop_length=80, win_length=160, window=w, center=True, pad_mode="constant",
                      return_complex=True).abs()              # (B, 81, T)
    mel = torch.einsum("fm,bft->btm", torch.from_numpy(slaney_mel_matrix(160, sr, 64)).to(x.device), spec)
    db = 10.0 * torch.log10(mel.clamp_min(1e-10))
    db = torch.maximum(db, db.amax(dim=(1, 2), keepdim=True) - 80.0)
    return db.unsqueeze(1).to(wav.dtype if wav.is_floating_point() else torch.float32)


# =====================================================================================================
# 3. Data: WAV files, the standard layout, the dataset reader
# =====================================================================================================
def _wav_open(path, vid: str | None = None):
    """Parse a PCM WAV header with `wave` -> (byte offset of the samples, channels, sample width, rate, frames
    actually in the file).

    A streaming header (data size 0 or 0xFFFFFFFF, as FFmpeg writes to a pipe) means "to the end of the file"; a
    header that promises more frames than the file holds is "truncated". Every problem is BadMedia."""
    path = Path(path)
    if not path.is_file():
        raise BadMedia(path, vid, "missing audio file")
    try:
        with wave.open(str(path), "rb") as f:
            ch, width, sr, n = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
            # the data chunk's offset is counted from the RIFF chunk's data, which starts at byte 8
            offset, declared = f._file.offset + f._data_chunk.offset, f._data_chunk.chunksize
    except (wave.Error, EOFError) as e:
        raise BadMedia(path, vid, f"not a PCM WAV file the reader understands ({e}); convert it with data_prep.py "
                                  f"(mono 16-bit PCM)") from None
    if width not in (2, 3, 4):
        raise BadMedia(path, vid, f"{8 * width}-bit WAV is not supported (PCM 16/24/32-bit only); convert it with "
                                  f"data_prep.py")
    in_file = max(0, path.stat().st_size - offset) // (width * ch)
    if declared in (0, 0xFFFFFFFF):                  # streaming header: the data runs to the end of the file
        n = in_file
    if n == 0:
        raise BadMedia(path, vid, "the WAV file holds no samples")
    if in_file < n:
        raise BadMedia(path, vid, f"truncated WAV (header says {n} frames, file holds {in_file})")
    return offset, ch, width, sr, n


def _read_frames(path, offset: int, frame_bytes: int, start: int, count: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset + start * frame_bytes)
        return fh.read(count * frame_bytes)


def _pcm_to_float(raw: bytes, width: int, ch: int) -> np.ndarray:
    """Interleaved little-endian PCM -> float32 mono in [-1, 1] (channels averaged)."""
    raw = raw[:len(raw) // (width * ch) * width * ch]
    if width == 2 and ch == 1:                               # the common case, exact in float32 (x / 2^15)
        return np.frombuffer(raw, "<i2").astype(np.float32) / np.float32(32768)
    if width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        x = (b[:, 0].astype(np.int32) | (b[:, 1].astype(np.int32) << 8) | (b[:, 2].astype(np.int32) << 16))
        x = np.where(x >= 1 << 23, x - (1 << 24), x).astype(np.float64) / (1 << 23)
    else:
        dt = {2: np.int16, 4: np.int32}[width]
        x = np.frombuffer(raw, dt).astype(np.float64) / float(-np.iinfo(dt).min)
    return x.reshape(-1, ch).mean(1).astype(np.float32)


def read_wav(path) -> tuple[np.ndarray, int]:
    """Read a whole PCM WAV (16/24/32-bit, any channel count) with the standard library -> (float32 mono in
    [-1, 1], sr).

    Multi-channel files are averaged to mono. Anything else (float or compressed WAV, empty or truncated files)
    is a BadMedia (a UserError) naming the file.
    """
    offset, ch, width, sr, n = _wav_open(path)
    return _pcm_to_float(_read_frames(path, offset, width * ch, 0, n), width, ch), sr


def read_wav_window(path, seconds: float, where: str = "center", vid: str | None = None,
                    sample_rate: int | None = None):
    """Read only the window a method uses (header parsed by `wave`, then one seek + read of the window's bytes, not
    the whole file) -> (float32 mono of exactly round(sr * seconds) samples, sr, tiled).

    Equal to clip_window(read_wav(path)[0], ...). A clip shorter than the window is tiled as the official code does
    (tiled=True, the caller counts them); one shorter than a quarter of the window is BadMedia. sample_rate: the
    rate the method expects (another rate is a UserError pointing to data_prep.py; we never resample silently)."""
    offset, ch, width, sr, total = _wav_open(path, vid)
    if sample_rate is not None and sr != sample_rate:
        raise UserError(f"{path}: sample rate {sr} Hz, this method expects {sample_rate} Hz; re-run data_prep.py "
                        f"with --sr {sample_rate}")
    n = int(round(sr * seconds))
    if total >= n:
        start = 0 if where == "start" else total // 2 - n // 2 if where == "center_tiled" else (total - n) // 2
        return _pcm_to_float(_read_frames(path, offset, width * ch, start, n), width, ch), sr, False
    if 4 * total < n:
        raise BadMedia(path, vid, f"audio too short: {total / sr:.3f} s, the method needs {seconds:g} s")
    x = _pcm_to_float(_read_frames(path, offset, width * ch, 0, total), width, ch)
    return clip_window(x, sr, seconds, where), sr, True


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

    where='center': centred on the clip's middle (EZ-VSL's 3 s, CSOL); a shorter clip is tiled and its first
    seconds are kept. 'start': the first seconds (LVS's 10 s test input). 'center_tiled' (SSPL's official
    rule): a shorter clip is tiled int(n / len) + 1 times and the window is centred in the tiled signal,
    start = len // 2 - n // 2 (the same window as 'center' for a clip at least n long and even n).
    Returns exactly round(sr * seconds) samples.
    """
    n = int(round(sr * seconds))
    if where == "center_tiled":
        if len(x) < n:
            x = np.tile(x, n // len(x) + 1)
        start = len(x) // 2 - n // 2
        return x[start:start + n]
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
    ids = [ln.split(",")[0].strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()]   # strips a BOM
    ids = [i for i in ids if i]
    if not ids:
        raise UserError(f"split file {path} lists no ids (empty file)")
    return ids


def load_image(path, vid: str | None = None) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise BadMedia(path, vid, "missing frame")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:
        raise BadMedia(path, vid, f"cannot decode image ({e})") from None


def check_layout(root, ids) -> None:
    """Fail with one message listing every id of a split that lacks its frame or wav (never a silent skip)."""
    root = Path(root)
    bad = [i for i in ids if not (root / "frames" / f"{i}.jpg").is_file() or not (root / "audio" / f"{i}.wav").is_file()]
    if bad:
        raise UserError(f"{len(bad)} of {len(ids)} ids have no frames/<id>.jpg or audio/<id>.wav under {root} "
                        f"(first: {', '.join(bad[:5])}); run data_prep.py, or remove them from the split")


class _Bad:
    """What a DataLoader worker returns instead of a sample it cannot read (the main process raises or skips it,
    so the user sees one error line, not a worker traceback). fatal: a UserError that --skip-bad must not hide."""

    def __init__(self, err: UserError, n_samples: int = 0):
        self.fatal, self.n_samples = not isinstance(err, BadMedia), n_samples
        self.path, self.vid = getattr(err, "path", ""), getattr(err, "vid", None)
        self.reason = getattr(err, "reason", "")
        self.msg = str(err)

    def error(self) -> UserError:
        return UserError(self.msg) if self.fatal else BadMedia(self.path, self.vid, self.reason)


class AVDataset(torch.utils.data.Dataset):
    """Reads the standard layout: item -> (image, waveform (float32 tensor), id).

    image_tf: callable on the PIL frame (a method's augmentation; may return a tuple of views); None selects the
    fast path: the item's image is then ("jpeg", the file's bytes), ("raw", decoded (3, H, W) uint8) or
    ("resized", the frame-cache entry (3, h, w) uint8), decoded and augmented per batch by batch_images().
    seconds / where: the audio window (see read_wav_window). sample_rate: the rate the method expects; a file at
    another rate is an error that points to data_prep.py (we never resample silently).
    cache: keep decoded frames and waveforms in memory (small datasets: the synthetic benchmark).
    frame_cache: {id: path} of pre-resized uint8 frames (build_frame_cache), fast path only.
    loader_items: for DataLoaders (collate_av): items become (image, wav, id, tiled) and an unreadable sample
    becomes a _Bad marker instead of an exception raised inside a worker.
    """

    def __init__(self, root, ids, image_tf, seconds: float, where: str = "center", sample_rate: int = 16000,
                 cache: bool = False, frame_cache: dict | None = None, loader_items: bool = False):
        self.root, self.ids, self.image_tf = Path(root), list(ids), image_tf
        self.seconds, self.where, self.sr = seconds, where, sample_rate
        if not self.ids:
            raise UserError(f"empty id list for {root} (an empty split file, or --limit)")
        check_layout(self.root, self.ids)
        self._cache = {} if cache else None
        self.frame_cache, self.loader_items = frame_cache or {}, loader_items

    def __len__(self):
        return len(self.ids)

    def audio(self, i):
        """(window float32, tiled) of clip i."""
        vid = self.ids[i]
        path = self.root / "audio" / f"{vid}.wav"
        x, _, tiled = read_wav_window(path, self.seconds, self.where, vid, self.sr)
        return x, tiled

    def frame(self, i):
        """The fast path's frame: cached pre-resized uint8, else the file's bytes (never decoded here)."""
        vid = self.ids[i]
        if vid in self.frame_cache:
            try:
                return "resized", torch.from_numpy(np.load(self.frame_cache[vid])).permute(2, 0, 1)
            except (OSError, ValueError):
                pass                                    # a vanished/damaged entry: read the frame itself
        path = self.root / "frames" / f"{vid}.jpg"
        try:
            data = np.fromfile(path, np.uint8)
        except OSError as e:
            raise BadMedia(path, vid, f"cannot read frame ({e})") from None
        if data.size == 0:
            raise BadMedia(path, vid, "empty frame file")
        return "jpeg", torch.from_numpy(data)

    def raw(self, i):
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        vid = self.ids[i]
        if self.image_tf is None:
            kind, img = self.frame(i)
            if self._cache is not None and kind == "jpeg":  # in memory: keep the decoded frame
                kind, img = "raw", decode_frame(img, self.root / "frames" / f"{vid}.jpg", vid)
            img = (kind, img)
        else:
            img = load_image(self.root / "frames" / f"{vid}.jpg", vid)
        item = (img, *self.audio(i))
        if self._cache is not None:
            self._cache[i] = item
        return item

    def __getitem__(self, i):
        if not self.loader_items:
            img, x, _ = self.raw(i)
            return self.image_tf(img) if self.image_tf else img, torch.from_numpy(x.copy()), self.ids[i]
        try:
            img, x, tiled = self.raw(i)
        except UserError as e:
            return _Bad(e, int(round(self.sr * self.seconds)))
        return self.image_tf(img) if self.image_tf else img, torch.from_numpy(x.copy()), self.ids[i], tiled


class SwapAudio(torch.utils.data.Dataset):
    """The audio-swapped control: item i keeps its frame and id but gets the audio of clip perm[i]
    (default: the fixed derangement i -> i+1 mod N)."""

    def __init__(self, ds: AVDataset, perm=None):
        self.ds, self.ids, self.perm = ds, ds.ids, perm or derangement(len(ds))

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item, other = self.ds[i], self.ds[self.perm[i]]
        if isinstance(item, _Bad) or isinstance(other, _Bad):
            return item if isinstance(item, _Bad) else other
        return (item[0], other[1], *item[2:])


def image_transform(kind: str, size: int = 224, interpolation: str = "bicubic"):
    """The image pipelines the four methods use (ImageNet normalisation; resizes bicubic by default, as the
    LVS/EZ-VSL/SSPL official code; CSOL passes interpolation='bilinear', torchvision's default in its official
    dataset):
    'crop_flip'   Resize(int(1.1 size)) -> RandomCrop(size) -> RandomHorizontalFlip   (LVS/EZ-VSL/SSPL train)
    'squash'      Resize((size, size)), no crop, so full-frame boxes stay aligned      (test; EZ-VSL, CSOL)
    'center_crop' Resize(size) -> CenterCrop(size)                                     (LVS/SSPL official test)
    'csol_train'  Resize((1.143 size)^2) -> RandomCrop(size) -> flip, brightness, colour U(0.7, 1.3)
    """
    import torchvision.transforms as T
    modes = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}
    if interpolation not in modes:
        raise ValueError(f"unknown interpolation {interpolation}")
    bic = modes[interpolation]
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


# ---------------------------------------------------------------------------------------------------------
# The data path the methods train with. --decode fast (default): DataLoader workers only read bytes (the frame
# file, or its pre-resized uint8 cache entry, and the audio window); batch_images() decodes, resizes, crops, flips,
# jitters and normalises the whole batch with torch ops on the training device (nvJPEG on CUDA). --decode pil:
# today's per-sample PIL pipeline (image_transform) in the workers, bit for bit the official augmentation.
# ---------------------------------------------------------------------------------------------------------
class MediaLog:
    """Samples this process skipped (--skip-bad) and clips it tiled (shorter than the audio window); reset by
    resolve_data at the start of a run, reported by save_results."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.skipped, self.tiled = {}, set()


MEDIA = MediaLog()


def resize_target(kind: str, size: int, h: int, w: int) -> tuple[int, int]:
    """The (height, width) image_transform(kind, size) resizes an h x w frame to (torchvision's Resize rules)."""
    if kind in ("crop_flip", "center_crop"):
        s = int(size * 1.1) if kind == "crop_flip" else size
        return (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
    if kind == "squash":
        return size, size
    if kind == "csol_train":
        big = int(round(size * 256 / 224))
        return big, big
    raise ValueError(f"unknown image transform {kind}")


def decode_frame(data: torch.Tensor, path, vid=None) -> torch.Tensor:
    """JPEG/PNG bytes -> (3, H, W) uint8 RGB on the CPU; BadMedia naming the file if it does not decode."""
    from torchvision.io import ImageReadMode, decode_image
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except Exception as e:
        raise BadMedia(path, vid, f"cannot decode image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None


def _decode_on(datas: list, paths: list, ids: list, device) -> list:
    """Byte tensors -> (3, H, W) uint8 frames on `device` (one batched nvJPEG call on CUDA), or a BadMedia in place
    of each frame that does not decode."""
    if device.type == "cuda" and datas:
        from torchvision.io import ImageReadMode, decode_jpeg
        try:
            return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        except Exception:
            pass                                             # find the culprit(s) one by one below
    out = []
    for d, p, vid in zip(datas, paths, ids):
        try:
            out.append(decode_frame(d, p, vid).to(device, non_blocking=True))
        except BadMedia as e:
            out.append(e)
    return out


def augment_params(kind: str, size: int, shapes: list) -> list:
    """The random draws of image_transform(kind, size) for frames resized to `shapes`, made with torchvision's own
    calls in its order (RandomCrop's two randint unless the frame is already size x size, RandomHorizontalFlip's
    rand, ColorJitter's randperm and factors), one sample after the other: with --workers 0 the fast path draws
    exactly the crops, flips and jitters --decode pil would. -> [(i, j, flip, brightness, saturation,
    brightness_first)] (None where the pipeline has no randomness)."""
    if kind not in ("crop_flip", "csol_train"):
        return [None] * len(shapes)
    out = []
    for h, w in shapes:
        i = j = 0
        if (h, w) != (size, size):
            i, j = int(torch.randint(0, h - size + 1, size=(1,))), int(torch.randint(0, w - size + 1, size=(1,)))
        flip = bool(torch.rand(1) < 0.5)
        b = s = 1.0
        first = True
        if kind == "csol_train":
            order = torch.randperm(4).tolist()               # brightness, contrast, saturation, hue (None: skipped)
            b, s = float(torch.empty(1).uniform_(0.7, 1.3)), float(torch.empty(1).uniform_(0.7, 1.3))
            first = order.index(0) < order.index(2)
        out.append((i, j, flip, b, s, first))
    return out


def augment_frames(frames: list, kind: str, size: int, params: list | None = None,
                   interpolation: str = "bicubic") -> torch.Tensor:
    """Decoded (3, H, W) uint8 frames (any sizes, on one device) -> (B, 3, size, size) ImageNet-normalised float32:
    image_transform(kind, size, interpolation) for a whole batch. Resizes are bicubic (CSOL: bilinear) with
    antialias (PIL's filter; on the CPU
    torch's uint8 kernel, on CUDA in float32 rounded to the uint8 grid); a frame already at its resize target (a
    frame-cache entry) is not resized again.
    Random crops, flips and jitter factors are augment_params(), drawn from torch's global generator in the main
    process (reseeded per epoch by the methods): a run is reproducible whatever --workers is."""
    dev = frames[0].device if frames else torch.device("cpu")
    B = len(frames)
    if B == 0:
        return torch.zeros(0, 3, size, size, device=dev)
    resized = [None] * B
    groups = {}
    for k, f in enumerate(frames):
        t = resize_target(kind, size, *f.shape[-2:])
        if tuple(f.shape[-2:]) == t:
            resized[k] = f
        else:
            groups.setdefault((tuple(f.shape), t), []).append(k)
    for (_, t), idx in groups.items():
        if dev.type == "cpu":        # torch's uint8 kernel (PIL's integer arithmetic), one frame at a time: decoded
            for k in idx:            # frames are already channels-last in memory, a stack would copy them twice
                resized[k] = F.interpolate(frames[k][None].contiguous(memory_format=torch.channels_last), size=t,
                                           mode=interpolation, antialias=True, align_corners=False)[0]
            continue
        y = F.interpolate(torch.stack([frames[k] for k in idx]).float(), size=t, mode=interpolation,
                          antialias=True, align_corners=False)
        for k, yk in zip(idx, y.round_().clamp_(0, 255).to(torch.uint8)):
            resized[k] = yk
    if params is None:
        params = augment_params(kind, size, [tuple(x.shape[-2:]) for x in resized])
    crops = []
    for x, prm in zip(resized, params):
        h, w = x.shape[-2:]
        if prm is not None:                                  # RandomCrop(size), RandomHorizontalFlip
            i, j, flip = prm[:3]
            x = x[:, i:i + size, j:j + size]
            crops.append(x.flip(-1) if flip else x)
        else:                                                # CenterCrop(size) (squash: already size x size)
            i, j = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
            crops.append(x[:, i:i + size, j:j + size])
    x = torch.stack(crops).float()
    if kind == "csol_train":                                 # ColorJitter(brightness=0.3, saturation=0.3), random order
        b = torch.tensor([prm[3] for prm in params], device=dev)[:, None, None, None]
        s = torch.tensor([prm[4] for prm in params], device=dev)[:, None, None, None]

        def bright(z):                                       # PIL's blend with black, truncated to uint8
            return (z * b).clamp_(0, 255).floor_()

        def sat(z):                                          # blend with the frame's grey (PIL's "L", rounded)
            g = torch.floor((z[:, 0:1] * 19595 + z[:, 1:2] * 38470 + z[:, 2:3] * 7471 + 32768) / 65536)
            return (g + s * (z - g)).clamp_(0, 255).floor_()
        first = torch.tensor([prm[5] for prm in params], device=dev)[:, None, None, None]
        x = torch.where(first, sat(bright(x)), bright(sat(x)))
    mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
    return x.div_(255).sub_(mean).div_(std)


def _bad(err: UserError, args) -> None:
    """Stop with this error, or (--skip-bad, a BadMedia) record the sample as skipped."""
    if not (getattr(args, "skip_bad", False) and isinstance(err, BadMedia)):
        raise err
    MEDIA.skipped[err.vid] = f"{err.path}: {err.reason}"


def batch_images(batch: dict, device, args, kind: str, size: int, interpolation: str = "bicubic",
                 views: int = 1):
    """The image half of a method's batch_to_device: a collate_av batch -> (B, 3, size, size) normalised float32 on
    `device` (a tuple of `views` independently augmented views). An unreadable sample stops the run with one
    BadMedia, or under --skip-bad is dropped from the batch (batch["ids"] and batch["wav"] too) and recorded."""
    for b in batch.pop("bad", []):
        _bad(b.error(), args)
    MEDIA.tiled.update(batch.pop("tiled", []))
    if "images" in batch:                                    # --decode pil: augmented per sample in the workers
        ims = batch["images"]
        if views > 1:
            return tuple(x.to(device, non_blocking=True) for x in ims)
        return ims.to(device, non_blocking=True)
    device = torch.device(device)
    root = Path(args.data) / "frames"
    jpeg = [k for k, (fmt, _) in enumerate(batch["frames"]) if fmt == "jpeg"]
    decoded = dict(zip(jpeg, _decode_on([batch["frames"][k][1] for k in jpeg],
                                        [root / f"{batch['ids'][k]}.jpg" for k in jpeg],
                                        [batch["ids"][k] for k in jpeg], device)))
    frames, keep = [], []
    for k, (fmt, f) in enumerate(batch["frames"]):
        f = decoded.get(k, f)
        if isinstance(f, BadMedia):
            _bad(f, args)
            continue
        frames.append(f.to(device, non_blocking=True))
        keep.append(k)
    if len(keep) < len(batch["ids"]):
        batch["ids"], batch["wav"] = [batch["ids"][k] for k in keep], batch["wav"][keep]
    shapes = [resize_target(kind, size, *f.shape[-2:]) for f in frames]
    # the draws sample by sample, each sample's views in turn, as the per-sample pipeline makes them
    draws = [augment_params(kind, size, [hw]) for hw in shapes for _ in range(views)]
    out = tuple(augment_frames(frames, kind, size, [d[0] for d in draws[v::views]], interpolation)
                for v in range(views))
    return out if views > 1 else out[0]


def collate_av(items: list) -> dict:
    """DataLoader collate for AVDataset(loader_items=True): {"ids", "wav" (B, N) float32, "tiled": ids whose audio
    was tiled, "bad": _Bad markers, and "frames" [(format, uint8 tensor)] (fast) or "images" (pil)}."""
    good = [it for it in items if not isinstance(it, _Bad)]
    bad = [it for it in items if isinstance(it, _Bad)]
    n = good[0][1].shape[0] if good else bad[0].n_samples
    batch = {"ids": [it[2] for it in good], "bad": bad, "tiled": [it[2] for it in good if it[3]],
             "wav": torch.stack([it[1] for it in good]) if good else torch.zeros(0, n)}
    if good and isinstance(good[0][0], tuple) and isinstance(good[0][0][0], str):
        batch["frames"] = [it[0] for it in good]
    elif good:
        batch["images"] = torch.utils.data.default_collate([it[0] for it in good])
    else:
        batch["frames"] = []
    return batch


class _Views:
    """n independently augmented views of one frame (SSPL's two views) for the per-sample PIL path."""

    def __init__(self, tf, n: int):
        self.tf, self.n = tf, n

    def __call__(self, img):
        return tuple(self.tf(img) for _ in range(self.n))


def build_frame_cache(root, ids, kind: str, size: int, log=print, interpolation: str = "bicubic",
                      stats: dict | None = None) -> dict:
    """The pre-resized frame cache of a random-crop training pipeline: ROOT/cache/frames_<kind><size>/<id>.<source
    mtime_ns>.npy holds the frame after image_transform(kind, size)'s PIL resize (uint8, so the fast path's crops
    start from the official pixels). Entries are written atomically (temp file + rename) by a thread pool on first
    use; a frame whose file changed (new mtime) gets a new entry and its stale one is removed. Returns {id: path}
    of the entries present (a frame that cannot be read is left for the reader to report)."""
    import concurrent.futures as cf
    import torchvision.transforms as T
    root = Path(root)
    d = root / "cache" / (f"frames_{kind}{size}" + ("" if interpolation == "bicubic" else f"_{interpolation}"))
    entries, todo = {}, []
    for vid in ids:
        try:
            m = (root / "frames" / f"{vid}.jpg").stat().st_mtime_ns
        except OSError:
            continue
        entries[vid] = d / f"{vid}.{m}.npy"
        if not entries[vid].is_file():
            todo.append(vid)
    if not todo:
        return entries
    t0 = time.time()
    stale = {}                                               # id -> entries of older versions of its frame
    for dirpath, _, names in os.walk(d):
        for name in names:
            stem, _, rest = name[:-4].rpartition(".") if name.endswith(".npy") else ("", "", "")
            if rest.isdigit():
                vid = str((Path(dirpath) / stem).relative_to(d))
                if vid in entries and entries[vid].name != name:
                    stale.setdefault(vid, []).append(Path(dirpath) / name)
    resize = T.Resize(int(size * 1.1) if kind == "crop_flip" else resize_target(kind, size, 1, 1),
                      T.InterpolationMode(interpolation))

    def one(vid):
        path = entries[vid]
        try:
            arr = np.asarray(resize(load_image(root / "frames" / f"{vid}.jpg", vid)))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.part")
            with open(tmp, "wb") as f:
                np.save(f, arr)
            os.replace(tmp, path)
            for old in stale.get(vid, []):
                old.unlink(missing_ok=True)
        except BadMedia:
            entries.pop(vid, None)
        except OSError as e:
            return e

    with cf.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as ex:
        errors = [e for e in ex.map(one, todo) if e is not None]
    if errors:
        log(f"frame cache: cannot write under {d} ({errors[0]}); decoding the frames instead (--no-cache hides this)")
        return {}
    if stats is not None:
        stats["build_s"] = time.time() - t0                 # --benchmark reports it (cache_build_s)
    log(f"frame cache: {len(todo)} frames pre-resized for {kind} {size} px under {d} in {time.time() - t0:.1f} s "
        f"(built once, rebuilt per changed frame; --no-cache skips it)")
    return {vid: p for vid, p in entries.items() if vid not in todo or p.is_file()}


def av_dataset(args, split_file, kind: str, seconds: float, where: str, sample_rate: int, views: int = 1,
               interpolation: str = "bicubic"):
    """A method's dataset of one split (first --limit ids) for the image pipeline `kind` (see image_transform) and
    the audio window (seconds, where). --decode pil: the per-sample PIL transform in the workers; fast: the
    workers read bytes and the method's batch_to_device calls batch_images(kind). The synthetic cpu preset keeps
    its clips in memory; a random-crop training pipeline (crop_flip, csol_train) otherwise reads the pre-resized
    frame cache (built on first use, --no-cache skips it)."""
    ids = read_split(split_file)[: args.limit]
    memory = args.preset == "cpu"
    if args.decode == "pil":
        tf = image_transform(kind, args.image_size, interpolation)
        return AVDataset(args.data, ids, _Views(tf, views) if views > 1 else tf, seconds, where, sample_rate,
                         cache=memory, loader_items=True)
    ds = AVDataset(args.data, ids, None, seconds, where, sample_rate, cache=memory, loader_items=True)  # checks
    stats = {}                                                                                  # the layout first
    if kind in ("crop_flip", "csol_train") and not memory and not args.no_cache:
        log = print if int(os.environ.get("RANK", "0")) == 0 else (lambda *a: None)
        ds.frame_cache = build_frame_cache(args.data, ids, kind, args.image_size, log, interpolation, stats)
    ds.cache_build_s = stats.get("build_s")                 # seconds if this call built the frame cache, else None
    return ds


# =====================================================================================================
# 4. (The synthetic benchmark generator lives in data_prep.py; resolve_data imports it only without --data.)
# =====================================================================================================


# =====================================================================================================
# 5. The evaluator
# =====================================================================================================
# Every protocol reproduces its official script's arithmetic: the map is cast to float32 (the official scripts get
# float32 maps from torch and stay in float32), resized to 224x224 with torch's bilinear kernel (align_corners=False
# stands for the official cv2.resize INTER_LINEAR, the same half-pixel rule for up-sampling; True is EZ-VSL's
# F.interpolate), normalised with the official normalize_img (a constant map is returned unchanged) and thresholded
# with the official rule, ties and constant maps included. The one difference that stays: cv2's float arithmetic
# may round an interpolated value differently in the last bit from torch's (cv2 is not a dependency here).
PROTOCOLS = {
    "median": "EZ-VSL test.py + utils.Evaluator exactly: q = normalize_img(map), P = q >= sorted(q)[25088] (the "
              "per-image median; a constant map: every pixel)",
    "median_strict": "LVS test.py exactly: p = 1 - normalize_img(-map), thr = sorted(p)[25088], "
                     "p[p > thr] = 1, p[p < 1] = 0 (pixels equal to the maximum are kept; a constant map c: every "
                     "pixel if 1 + c >= 1, none otherwise)",
    "abs0.5": "SSPL test exactly: min-max normalise, P = map >= 0.5 (a constant map is 0/0 = NaN: no pixel)",
    "rel0.1": "CSOL tools.py exactly: P = map > 0.1 * max(map), no min-max (the threshold is computed in float64 and "
              "compared in float32, NumPy 1.x rules)",
}
AUC_THRESHOLDS = [0.05 * i for i in range(21)]  # exactly the official list (0.05*3 = 0.15000000000000002)
MEDIAN_INDEX = GT_SIZE * GT_SIZE // 2           # 25088: the official np.sort(m.flatten())[int(224 * 224 / 2)]
EVAL_CHUNK = 32                                 # maps scored at once (32 x 224 x 224 float32 = 6.4 MB per tensor)


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
    """[x1, y1, x2, y2] normalised -> integer pixel slice bounds, as the official code: int(size * max(v, 0))
    (a bound above `size` is cut by the slice, as numpy's)."""
    return [int(size * max(v, 0.0)) for v in box]


def box_outside(box) -> bool:
    """True when a coordinate lies outside [0, 1] (vggss.json has 12 boxes at -2.88e16; the official code clamps)."""
    return any(v < 0.0 or v > 1.0 for v in box)


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


def gt_maps_batch(entries, size: int = GT_SIZE, device="cpu") -> torch.Tensor:
    """The ground-truth maps of several entries at once, (B, size, size) float32, equal to gt_map() of each:
    the number of boxes covering a pixel is rows^T @ cols of the boxes' row/column indicator vectors (exact small
    integers), then the union (> 0) or the consensus (count / 2 capped at 1)."""
    k = max([len(e["bbox"]) for e in entries] + [1])
    lim = torch.tensor([[rasterize_box(b, size) for b in e["bbox"]] + [[0, 0, 0, 0]] * (k - len(e["bbox"]))
                        for e in entries], dtype=torch.long).reshape(len(entries), k, 4).to(device)
    ax = torch.arange(size, device=device)
    rows = ((ax >= lim[..., 1:2]) & (ax < lim[..., 3:4])).float()        # (B, K, size): y1 <= y < y2
    cols = ((ax >= lim[..., 0:1]) & (ax < lim[..., 2:3])).float()        # (B, K, size): x1 <= x < x2
    count = torch.bmm(rows.transpose(1, 2), cols)                         # (B, size, size)
    consensus = torch.tensor([e.get("gt", "union") == "consensus" for e in entries], device=device)[:, None, None]
    return torch.where(consensus, (count / 2.0).clamp_max(1.0), (count > 0).float())


_WORKSPACE: dict = {}
_NUMPY_ON_CPU = True     # CPU chunks: numpy selection / counts; False runs the torch code path of the GPU (tests)


def _buffer(name: str, shape, dtype=torch.float32) -> torch.Tensor:
    """A reused CPU buffer (the evaluator's chunks are large: fresh allocations cost page faults every time)."""
    b = _WORKSPACE.get(name)
    if b is None or tuple(b.shape) != tuple(shape) or b.dtype != dtype:
        b = _WORKSPACE[name] = torch.empty(tuple(shape), dtype=dtype)
    return b


def resize_maps(t: torch.Tensor, size: int = GT_SIZE, align_corners: bool = False, reuse: bool = False) -> torch.Tensor:
    """(B, h, w) float32 -> (B, size, size) with torch's bilinear kernel (identity when already that size).
    reuse (CPU): write into a reused buffer (the same kernel as F.interpolate, bit for bit; the result is
    overwritten by the next call)."""
    if t.shape[-2:] == (size, size):
        return t
    if reuse and t.device.type == "cpu":
        out = _buffer("resize", (t.shape[0], 1, size, size))
        torch._C._nn.upsample_bilinear2d(t[:, None], [size, size], align_corners, None, None, out=out)
        return out[:, 0]
    return F.interpolate(t[:, None], size=(size, size), mode="bilinear", align_corners=align_corners)[:, 0]


def resize_map(m, size: int = GT_SIZE, align_corners: bool = False) -> np.ndarray:
    """Bilinear resize of one 2-D map to size x size in float32 (align_corners=False: the official cv2.resize
    INTER_LINEAR of LVS / SSPL / CSOL when up-sampling; True: EZ-VSL's test)."""
    return resize_maps(torch.as_tensor(np.asarray(m, np.float32))[None], size, align_corners)[0].numpy()


def minmax(m):
    """The official normalize_img: (m - min) / (max - min) over the last two axes; a constant map is returned
    unchanged (the official `if not (vmax - vmin) == 0`). numpy (H, W) or torch (..., H, W); keeps the dtype."""
    if not isinstance(m, torch.Tensor):
        return minmax(torch.as_tensor(np.asarray(m)))[...].numpy()
    flat = m.flatten(-2)
    lo, hi = flat.amin(-1)[..., None, None], flat.amax(-1)[..., None, None]
    r = hi - lo
    return torch.where(r == 0, m, (m - lo) / torch.where(r == 0, torch.ones_like(r), r))


def _kth(t: torch.Tensor, k: int) -> torch.Tensor:
    """Per map, the value at index k of the ascending sort (the official np.sort(m.flatten())[k]), (B, 1, 1):
    on the CPU an exact windowed selection (_kth_window), torch.kthvalue on a GPU."""
    flat = t.flatten(1)
    if flat.device.type == "cpu" and _NUMPY_ON_CPU:
        return torch.from_numpy(_kth_window(np.ascontiguousarray(flat.numpy()), k))[:, None, None]
    return flat.kthvalue(k + 1, dim=1).values[:, None, None]


def _row_counts(m: np.ndarray) -> np.ndarray:
    """True values per row of a 2-D bool array (np.count_nonzero row by row: 15x cheaper than with axis=1)."""
    return np.array([np.count_nonzero(r) for r in m], np.int64)


def _kth_window(x: np.ndarray, k: int, step: int = 13) -> np.ndarray:
    """Exact k-th smallest of each row of x (B, L) without selecting over all L values: a window [a, b] is taken
    around the k-th value of a strided subsample (every 13th value, +-2.5% of its ranks); when
    #(x < a) <= k < #(x <= b) the answer is the (k - #(x < a))-th smallest value inside the window (about 5% of
    the row); otherwise that row falls back to np.partition of the whole row."""
    sub = x[:, ::step]
    ks, d = k // step, max(8, sub.shape[1] // 40)
    lo_i, hi_i = max(ks - d, 0), min(ks + d, sub.shape[1] - 1)
    part = np.partition(sub, [lo_i, hi_i], axis=1)
    a, b = part[:, lo_i:lo_i + 1], part[:, hi_i:hi_i + 1]
    ge = _buffer("ge", x.shape, torch.bool).numpy()
    inwin = _buffer("inwin", x.shape, torch.bool).numpy()
    np.greater_equal(x, a, out=ge)
    below = x.shape[1] - _row_counts(ge)
    np.less_equal(x, b, out=inwin)
    np.logical_and(inwin, ge, out=inwin)
    cnt = _row_counts(inwin)
    j = k - below
    ok = (j >= 0) & (j < cnt)
    vals, ends = x[inwin], np.cumsum(cnt)
    out = np.empty(x.shape[0], x.dtype)
    for i in range(x.shape[0]):
        if ok[i]:
            out[i] = np.partition(vals[ends[i] - cnt[i]:ends[i]], j[i])[j[i]]
        else:
            out[i] = np.partition(x[i], k)[k]
    return out


_BELOW_ONE = float(np.nextafter(np.float32(1), np.float32(0)))   # the largest float32 below 1


def _range(t: torch.Tensor):
    flat = t.flatten(1)                     # amin + amax: 30x cheaper than torch.aminmax(dim=1) on the CPU here
    return flat.amin(1)[:, None, None], flat.amax(1)[:, None, None]


def binarize_batch(t: torch.Tensor, protocol: str, threshold: float | None = None,
                   inplace: bool = False) -> torch.Tensor:
    """Binary predictions P (B, 224, 224) bool from 224x224 float32 maps under a named protocol, with the
    official arithmetic in float32 (see PROTOCOLS). protocol 'fixed' (the negative-audio protocol): P = map >=
    threshold on the method's fixed scale, no normalisation. inplace: t may be overwritten (saves a copy)."""
    if protocol in ("median", "median_strict", "abs0.5"):
        lo, hi = _range(t)
        flat = (hi == lo).flatten()                           # constant maps: normalize_img returns them unchanged
        const = t[flat].clone() if flat.any() else None
        w = t if inplace else t.clone()
    if protocol == "median":                                  # EZ-VSL: q = normalize_img(h), P = q >= the median
        q = w.sub_(lo).div_(hi - lo)
        if const is not None:
            q[flat] = const
        return q >= _kth(q, MEDIAN_INDEX).to(t.device)
    if protocol == "median_strict":                           # LVS: p = 1 - normalize_img(-h); >thr -> 1; <1 -> 0
        # normalize_img(-h) = (-h - min(-h)) / (max(-h) - min(-h)) = (max h - h) / (max h - min h), the same
        # float32 operations (hi - h computed as (-h) + hi, 1 - n as (-n) + 1: the same roundings);
        # P = {p > thr} | {p >= 1} = {p > thr} if thr < 1, else {p > largest float below 1}
        p = w.neg_().add_(hi).div_(hi - lo).neg_().add_(1.0)
        if const is not None:
            p[flat] = torch.rsub(-const, 1.0)
        thr = _kth(p, MEDIAN_INDEX).to(t.device)
        return p > torch.where(thr < 1.0, thr, torch.full_like(thr, _BELOW_ONE))
    if protocol == "abs0.5":                                  # SSPL: (h - min) / (max - min) >= 0.5 (NaN if flat)
        return w.sub_(lo).div_(hi - lo) >= 0.5
    if protocol == "rel0.1":                                  # CSOL: h > 0.1 * max(h)
        thr = (0.1 * t.flatten(1).amax(1).double()).float()[:, None, None]
        return t > thr
    if protocol == "fixed":
        return t >= threshold
    raise UserError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")


def binarize(m: np.ndarray, protocol: str) -> np.ndarray:
    """One 224x224 map -> binary P under a named protocol (binarize_batch on a batch of one)."""
    return binarize_batch(torch.as_tensor(np.asarray(m, np.float32))[None], protocol)[0].numpy()


def ciou(pred: np.ndarray, gt: np.ndarray) -> float:
    """cIoU = sum(P*G) / (sum(G) + sum(P*[G==0])) with P binary and G in [0, 1] (LVS appendix A). Both empty ->
    0/0 = NaN, as the official Evaluator (such a sample fails every threshold, t = 0 included)."""
    p = np.asarray(pred).astype(np.float64)
    g = np.asarray(gt, np.float64)
    den = g.sum() + (p * (g == 0)).sum()
    return float((p * g).sum() / den) if den > 0 else float("nan")


class _GtChunk:
    """The ground truth of a chunk of entries, for scoring. A single-box union entry (most of VGG-SS) is kept as its
    row and column indicator vectors r, c (G = r c^T, never built: sum(P*G) = r^T P c); the others are built as
    maps (gt_maps_batch). Every sum is exact (integers and halves in float32), the cIoU division float64."""

    def __init__(self, entries, device):
        self.n, self.device = len(entries), device
        k = max([len(e["bbox"]) for e in entries] + [1])
        lim = torch.tensor([[rasterize_box(b, GT_SIZE) for b in e["bbox"]] + [[0, 0, 0, 0]] * (k - len(e["bbox"]))
                            for e in entries], dtype=torch.long).reshape(len(entries), k, 4)
        ax = torch.arange(GT_SIZE)
        rows = ((ax >= lim[..., 1:2]) & (ax < lim[..., 3:4])).float()
        cols = ((ax >= lim[..., 0:1]) & (ax < lim[..., 2:3])).float()
        single = [e.get("gt", "union") == "union" and len(e["bbox"]) == 1 for e in entries]
        self.single = torch.tensor(single)
        self.box = [[max(0, min(GT_SIZE, v)) for v in lim[i, 0].tolist()] for i in range(len(entries))]
        self.r, self.c = rows[:, 0].to(device), cols[:, 0].to(device)
        self.multi = [i for i, sg in enumerate(single) if not sg]
        self.G = gt_maps_batch([entries[i] for i in self.multi], GT_SIZE, device) if self.multi else None
        self.g_sum = (self.r.sum(1) * self.c.sum(1)).double()
        self.n_pos = self.g_sum.clone()
        if self.multi:
            m = torch.tensor(self.multi, device=device)
            self.g_sum[m] = self.G.flatten(1).sum(1).double()
            self.n_pos[m] = (self.G > 0).flatten(1).sum(1).double()

    def ciou(self, P: torch.Tensor, pos) -> np.ndarray:
        """cIoU of binary P (b, 224, 224) for the chunk positions `pos`; 0/0 -> NaN."""
        pos_t = torch.tensor(pos, device=self.device)
        if P.device.type == "cpu" and _NUMPY_ON_CPU:   # numpy counts on the bool map: r^T P c = the count inside the box
            Pn = P.numpy()
            p_sum = torch.from_numpy(_row_counts(Pn.reshape(len(pos), -1)).astype(np.float64))
            inter = torch.tensor([float(np.count_nonzero(Pn[j, y1:y2, x1:x2])) for j, (x1, y1, x2, y2) in
                                  enumerate(self.box[q] for q in pos)], dtype=torch.float64)
        else:
            Pf = P.float()
            rc = torch.stack([self.c[pos_t], torch.ones_like(self.c[pos_t])], 2)      # (b, 224, 2)
            o = torch.bmm(Pf, rc)                                                       # (P c, row sums of P)
            inter = (self.r[pos_t] * o[..., 0]).sum(1).double()
            p_sum = o[..., 1].sum(1).double()
        p_in = inter.clone()
        where = {q: j for j, q in enumerate(pos)}
        sel = [(where[q], gi) for gi, q in enumerate(self.multi) if q in where]
        if sel:
            lp, gi = torch.tensor([a for a, _ in sel], device=self.device), torch.tensor([b for _, b in sel],
                                                                                        device=self.device)
            G = self.G[gi].flatten(1)
            Pm = P[lp].flatten(1).float()
            inter[lp] = (Pm * G).sum(1).double()
            p_in[lp] = (Pm * (G > 0).float()).sum(1).double()
        den = self.g_sum[pos_t] + p_sum - p_in
        out = inter / den
        return torch.where(den > 0, out, torch.full_like(out, float("nan"))).cpu().numpy()

    def ciou_fixed(self, P: torch.Tensor) -> np.ndarray:
        """cIoU of one binary map P (224, 224) (a baseline) against every entry of the chunk."""
        Pf = P.float()
        inter = (self.r * (self.c @ Pf.T)).sum(1).double()                              # r^T P c per entry
        p_in = inter.clone()
        if self.multi:
            m = torch.tensor(self.multi, device=self.device)
            inter[m] = (self.G.flatten(1) * Pf.flatten()).sum(1).double()
            p_in[m] = ((self.G > 0).float().flatten(1) * Pf.flatten()).sum(1).double()
        den = self.g_sum + Pf.sum().double() - p_in
        out = inter / den
        return torch.where(den > 0, out, torch.full_like(out, float("nan"))).cpu().numpy()


_trapezoid = getattr(np, "trapezoid", None) or np.trapz    # what sklearn.metrics.auc computes (x increasing)


def summarize(scores, nan_mean: str = "zero") -> dict:
    """cIoU@0.5 = fraction of samples with cIoU >= 0.5 (what the papers print as 'cIoU'), AUC = the trapezoid of
    sklearn.metrics.auc (the same np.trapezoid call, without importing sklearn's 74 MB) over the official 21
    thresholds 0.05*i of the fraction with cIoU >= t (official: np.sum(s >= t) / len(s), so a NaN sample fails every
    threshold), and the mean cIoU (nan_mean 'zero': a NaN sample counts 0, where the official EZ-VSL Avg-cIoU would
    print NaN; 'skip': the mean over the non-NaN samples)."""
    s = np.asarray(scores, np.float64)
    if s.size == 0:
        return {"ciou@0.5": float("nan"), "auc": float("nan"), "mean_ciou": float("nan")}
    succ = [float(np.sum(s >= t) / len(s)) for t in AUC_THRESHOLDS]
    auc = lambda x, y: float(_trapezoid(np.asarray(y, np.float64), np.asarray(x, np.float64)))  # noqa: E731
    mean = float(np.nan_to_num(s, nan=0.0).mean()) if nan_mean == "zero" else \
        (float(np.nanmean(s)) if np.isfinite(s).any() else float("nan"))
    return {"ciou@0.5": float(np.sum(s >= 0.5) / len(s)), "auc": float(auc(AUC_THRESHOLDS, succ)), "mean_ciou": mean}


def check_map(vid: str, m, where: str = "prediction") -> np.ndarray:
    """A 2-D, non-empty, finite map as float32 (the official scripts' precision); (1, h, w) is accepted."""
    m = np.asarray(m)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise UserError(f"{where} for {vid}: expected a 2-D map, got shape {m.shape}")
    if m.size == 0:
        raise UserError(f"{where} for {vid}: empty map of shape {m.shape}")
    if not (np.issubdtype(m.dtype, np.number) or m.dtype == bool) or np.iscomplexobj(m):
        raise UserError(f"{where} for {vid}: not a real-valued map (dtype {m.dtype})")
    m = m.astype(np.float32)
    if not np.isfinite(m).all():
        raise UserError(f"{where} for {vid}: the map contains NaN or inf (after the cast to float32)")
    return m


def center_prior(size: int = GT_SIZE) -> np.ndarray:
    """The centred-prior baseline map: a cone 1 - d / d_corner (median protocol -> a centred disk of half the
    image; abs0.5 -> a centred disk of radius half the centre-corner distance)."""
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size]
    d = np.hypot(yy - c, xx - c)
    return 1.0 - d / d.max()


def _stack(maps: dict, ids, where: str = "prediction") -> list[tuple[list[int], torch.Tensor]]:
    """Group the maps of `ids` by shape: [(positions in ids, (B, h, w) float32 tensor)]."""
    groups: dict = {}
    for pos, vid in enumerate(ids):
        m = check_map(vid, maps[vid], where)
        groups.setdefault(m.shape, ([], []))
        groups[m.shape][0].append(pos)
        groups[m.shape][1].append(m)
    return [(p, torch.from_numpy(np.stack(ms))) for p, ms in groups.values()]


def _prepared(maps: dict, ids, align_corners: bool, device, fuse=None, where: str = "prediction",
              reuse: bool = False):
    """Yield (positions, (B, 224, 224) float32 maps on `device`) for the ids of one chunk; `fuse` = (other maps,
    fn): fn(resized maps, resized other maps) -> the map to score (EZ-VSL's OGL blend at 224, as official).
    reuse: the maps may live in a reused buffer (valid until the next chunk)."""
    for pos, t in _stack(maps, ids, where):
        t = resize_maps(t.to(device), GT_SIZE, align_corners, reuse=reuse and fuse is None)
        if fuse is not None:
            other, fn = fuse
            o = torch.empty_like(t)
            for opos, ot in _stack(other, [ids[p] for p in pos], where):
                o[opos] = resize_maps(ot.to(device), GT_SIZE, align_corners)
            t = fn(t, o)
        yield pos, t


def _unique_ids(ids):
    seen, uniq, dup = set(), [], []
    for i in ids:
        if i in seen:
            dup.append(i)
        else:
            seen.add(i)
            uniq.append(i)
    return uniq, sorted(set(dup))


def evaluate_maps(maps: dict, ann: dict, ids=None, protocol: str = "median", align_corners: bool = False,
                  baselines: bool = True, extra_baselines: dict | None = None, device="cpu",
                  chunk: int = EVAL_CHUNK, fuse=None) -> dict:
    """Score predicted maps against annotations, batched in torch (chunks of `chunk` maps; `device` cpu or cuda).

    maps: {id: 2-D map of any size}. ids: the test list (default: every id of `maps`; an id listed twice is scored
    once and reported). Every prediction must have an annotation (else an error); listed ids without a prediction
    are reported as missing, never dropped silently. Entries whose ground truth is empty are scored (cIoU 0, or
    NaN when nothing is predicted either, as the official code) and reported; boxes with a coordinate outside
    [0, 1] are counted (clamped as the official code). fuse: see _prepared (EZ-VSL's OGL).
    Returns {"protocol", "resize", "n", "n_listed", "missing", "duplicates", "empty_gt", "boxes_outside",
    "test": summary, "per_sample": {id: cIoU}, "baselines": {"center": ..., "full_image": ..., **extra}} (the
    baseline maps go through the same protocol; the full image is P = 1 everywhere).
    """
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    unknown = [i for i in maps if i not in ann]
    if unknown:
        raise UserError(f"{len(unknown)} predicted ids have no annotation (first: {', '.join(unknown[:5])})")
    listed, dups = _unique_ids(list(maps) if ids is None else list(ids))
    not_annotated = [i for i in listed if i not in ann]
    if not_annotated:
        raise UserError(f"{len(not_annotated)} ids of the test list have no annotation "
                        f"(first: {', '.join(not_annotated[:5])})")
    present = [i for i in listed if i in maps]
    missing = [i for i in listed if i not in maps]
    device = torch.device(device)
    extra = dict(extra_baselines or {})
    scores = {k: np.zeros(len(present)) for k in ["test", "center", "full_image", *extra]}
    empty, outside = [], 0
    cp = binarize_batch(torch.from_numpy(center_prior().astype(np.float32))[None].to(device), protocol)[0]
    with torch.no_grad():
        for s in range(0, len(present), chunk):
            ids_c = present[s:s + chunk]
            entries = [ann[i] for i in ids_c]
            outside += sum(box_outside(b) for e in entries for b in e["bbox"])
            gt = _GtChunk(entries, device)
            empty += [i for i, z in zip(ids_c, (gt.n_pos == 0).tolist()) if z]
            for name, mp, fz in [("test", maps, fuse), *[(k, v, None) for k, v in extra.items()]]:
                for pos, t in _prepared(mp, ids_c, align_corners, device, fz, reuse=True):
                    scores[name][[s + p for p in pos]] = gt.ciou(binarize_batch(t, protocol, inplace=True), pos)
            if baselines:
                scores["center"][s:s + len(ids_c)] = gt.ciou_fixed(cp)
                den = gt.g_sum + (GT_SIZE * GT_SIZE - gt.n_pos)        # P = 1: sum(G) / (sum(G) + #[G == 0])
                scores["full_image"][s:s + len(ids_c)] = torch.where(
                    den > 0, gt.g_sum / den, torch.full_like(den, float("nan"))).cpu().numpy()
    per = dict(zip(present, scores["test"].tolist()))
    out = {"protocol": protocol, "resize": f"bilinear align_corners={align_corners}", "n": len(present),
           "n_listed": len(listed), "missing": missing, "duplicates": dups, "empty_gt": empty,
           "boxes_outside": outside, "test": summarize(scores["test"]), "per_sample": per, "baselines": {}}
    if baselines:
        out["baselines"]["center"] = summarize(scores["center"])
        out["baselines"]["full_image"] = summarize(scores["full_image"])
    for name in extra:
        out["baselines"][name] = summarize(scores[name])
    return out


def fmt_metrics(m: dict) -> str:
    return f"cIoU@0.5 {100 * m['ciou@0.5']:6.2f}  AUC {100 * m['auc']:6.2f}  mean cIoU {100 * m['mean_ciou']:6.2f}"


def format_report(res: dict, title: str = "test") -> str:
    """Every number printed with its protocol, resize variant and N evaluated / N listed."""
    lines = [f"[{title}] protocol={res['protocol']} ({PROTOCOLS[res['protocol']]})",
             f"[{title}] resize={res['resize']}  N evaluated {res['n']} / listed {res['n_listed']}"
             + (f"  ({len(res['missing'])} missing)" if res["missing"] else "")]
    if res.get("duplicates"):
        lines.append(f"[{title}] warning: {len(res['duplicates'])} ids are listed more than once in the split and "
                     f"scored once: {', '.join(res['duplicates'][:10])}")
    if res.get("boxes_outside"):
        lines.append(f"[{title}] warning: {res['boxes_outside']} annotation boxes have a coordinate outside [0, 1]; "
                     f"clamped as the official code (int(224 * max(v, 0)), cut at 224)")
    if res["empty_gt"]:
        lines.append(f"[{title}] warning: {len(res['empty_gt'])} entries have an empty ground truth and score 0 "
                     f"(0/0 = NaN, failing every threshold, when nothing is predicted either): "
                     f"{', '.join(res['empty_gt'][:10])}")
    width = max([len("model")] + [len(k) for k in res.get("baselines", {})])
    lines.append(f"[{title}] {'model':<{width}}  {fmt_metrics(res['test'])}   ({res['protocol']}, N={res['n']})")
    for k, v in res.get("baselines", {}).items():
        lines.append(f"[{title}] {k:<{width}}  {fmt_metrics(v)}   ({res['protocol']}, N={res['n']})")
    return "\n".join(lines)


# CSOL's metrics (as its tools.py / eval.py compute them; see csol_classaware.py for the paper's variants).
def class_aware_scores(class_maps: dict, sounding: dict, silent, ciou_frac: float = 0.5, nsa_tau: float = 0.2,
                       size: int = GT_SIZE, align_corners: bool = False):
    """One cocktail image, as CSOL's eval.py: class_maps {class: 2-D map (softmax probability per pixel)}, sounding
    {class: [boxes]}, silent: the classes without a sounding box. Maps are resized in float32.
    Returns (ciou_n, nsa_n): ciou_n = mean over sounding classes c of IoU(P_c = map_c > ciou_frac*max(map_c), G_c)
    (the threshold computed in float64 and compared in float32, NumPy 1.x rules), NaN when the image has no
    sounding box (np.mean of an empty list, as official); nsa_n = mean over silent classes of the fraction of
    pixels with map_c <= nsa_tau (None if no silent class).
    """
    ious = []
    for c, boxes in sounding.items():
        m = resize_map(class_maps[c], size, align_corners)
        ious.append(ciou(m > np.float32(ciou_frac * float(m.max())), boxes_to_map(boxes, "union", size)))
    nsa = [float(np.mean(resize_map(class_maps[c], size, align_corners) <= np.float32(nsa_tau))) for c in silent]
    return (float(np.mean(ious)) if ious else float("nan")), (float(np.mean(nsa)) if nsa else None)


def summarize_class_aware(cious, nsas) -> dict:
    """CIoU@0.3 = fraction of images whose mean class IoU >= 0.05*6 (CSOL's eval.py literally: 0.30000000000000004),
    AUC over the same scores and CIoU@0.5 (an image without a sounding box scores NaN and fails every threshold,
    t = 0 included, as official), the mean class IoU over the images with a sounding box, and NSA = mean
    silent-area score."""
    s = summarize(cious, nan_mean="skip")
    arr = np.asarray(cious, np.float64)
    valid = [v for v in nsas if v is not None]
    return {"ciou@0.3": float(np.sum(arr >= 0.05 * 6) / len(arr)) if len(arr) else float("nan"),
            "ciou@0.5": s["ciou@0.5"], "auc": s["auc"], "mean_ciou": s["mean_ciou"],
            "nsa": float(np.mean(valid)) if valid else float("nan")}


# The negative-audio protocol (--negatives): SLAVC's extended metrics (Mo & Morgado, NeurIPS 2022) and pIA.
NEGATIVE_KINDS = ("silence", "noise", "offscreen")
NOISE_STD = 0.1          # white noise: N(0, 0.1^2) per sample (-20 dBFS RMS), torch seed = the clip's index


class NegativeAudio(torch.utils.data.Dataset):
    """Item i keeps its frame and id; its audio becomes a negative of `kind`: 'silence' (zeros), 'noise' (white
    Gaussian noise of std NOISE_STD, the same in every run and method: seeded by i), 'offscreen' (the audio of
    clip derangement(N)[i], another clip's sound: the audio-swapped control, SwapAudio)."""

    def __init__(self, ds, kind: str):
        if kind not in NEGATIVE_KINDS:
            raise ValueError(f"negative kind {kind!r}")
        self.ds, self.ids, self.kind = SwapAudio(ds) if kind == "offscreen" else ds, ds.ids, kind

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        item = self.ds[i]                          # (image, waveform, id, ...) or an unreadable-sample marker
        if isinstance(item, _Bad) or self.kind == "offscreen":
            return item
        wav = item[1]
        if self.kind == "silence":
            wav = torch.zeros_like(wav)
        else:
            wav = (torch.randn(wav.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
                   * NOISE_STD).to(wav.dtype)
        return (item[0], wav, *item[2:])


def confidence_batch(t: torch.Tensor) -> torch.Tensor:
    """SLAVC-style confidence of (B, 224, 224) maps on the method's fixed scale: the mean of the top quarter of
    the pixels (no per-image normalisation), float64."""
    flat = t.flatten(1)
    return flat.topk(flat.shape[1] // 4, dim=1).values.double().mean(1)


def detection_ap(conf, correct, n_pos: int) -> tuple[float, float]:
    """SLAVC's AP and max-F1: pairs ranked by confidence; at each confidence threshold (ties enter together)
    TP = detected positives localised correctly, FP = every other detected pair (negatives, and positives with
    cIoU < 0.5); precision = TP / (TP + FP), recall = TP / (all positive pairs). AP = sum_k (R_k - R_{k-1}) P_k."""
    conf, correct = np.asarray(conf, np.float64), np.asarray(correct, bool)
    if n_pos == 0 or conf.size == 0:
        return float("nan"), float("nan")
    order = np.argsort(-conf, kind="stable")
    c, y = conf[order], correct[order]
    last = np.r_[c[1:] != c[:-1], True]
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    prec, rec = tp / (tp + fp), tp / n_pos
    ap = float(np.sum(np.diff(np.r_[0.0, rec]) * prec))
    f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-300), 0.0)
    return ap, float(f1.max())


def negative_metrics(pos: dict, neg: dict, ann: dict, ids, threshold: float, align_corners: bool = False,
                     device="cpu", chunk: int = EVAL_CHUNK, iou: float = 0.5) -> dict:
    """The negative-audio protocol on raw maps (the method's fixed scale, never min-max normalised).

    pos: {id: map with the clip's own audio}; neg: {kind: {id: map with that negative audio}}. Every map is
    resized to 224 (bilinear, align_corners as the method) and P = map >= threshold (the fixed threshold).
    Returns {"threshold", "n", "positives": cIoU@0.5 / AUC / mean cIoU of the positives under P, "pia": {kind:
    mean fraction of the image predicted}, "pia_positive", "confidence": {"positive"|kind: mean confidence},
    "ap", "max_f1" (positives against all negatives), "per_kind": {kind: {"ap", "max_f1"}} (against that kind
    only)}. A detected positive is correct when its cIoU >= iou.
    """
    listed, _ = _unique_ids(list(ids))
    present = [i for i in listed if i in pos and all(i in m for m in neg.values())]
    if not present:
        raise UserError("negative-audio protocol: no id has a positive map and every negative map")
    device = torch.device(device)
    cious, conf = np.zeros(len(present)), {k: np.zeros(len(present)) for k in ["positive", *neg]}
    area = {k: np.zeros(len(present)) for k in ["positive", *neg]}
    with torch.no_grad():
        for s in range(0, len(present), chunk):
            ids_c = present[s:s + chunk]
            gt = _GtChunk([ann[i] for i in ids_c], device)
            for kind, mp in [("positive", pos), *neg.items()]:
                for p, t in _prepared(mp, ids_c, align_corners, device):
                    rows = [s + q for q in p]
                    P = binarize_batch(t, "fixed", threshold)
                    conf[kind][rows] = confidence_batch(t).cpu().numpy()
                    area[kind][rows] = P.flatten(1).double().mean(1).cpu().numpy()
                    if kind == "positive":
                        cious[rows] = gt.ciou(P, p)
    correct = cious >= iou
    n = len(present)
    all_conf = np.concatenate([conf["positive"], *[conf[k] for k in neg]])
    all_ok = np.concatenate([correct, *[np.zeros(n, bool) for _ in neg]])
    ap, f1 = detection_ap(all_conf, all_ok, n)
    per_kind = {}
    for k in neg:
        a, f = detection_ap(np.concatenate([conf["positive"], conf[k]]), np.r_[correct, np.zeros(n, bool)], n)
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
             f"[{title}] positives at the fixed threshold  {fmt_metrics(r['positives'])}  "
             f"(predicted area {100 * r['pia_positive']:.2f}%)",
             f"[{title}] SLAVC extended (confidence = mean of the top quarter of the map; correct = cIoU >= 0.5): "
             f"AP {100 * r['ap']:6.2f}  max-F1 {100 * r['max_f1']:6.2f}  (all {len(r['kinds'])} kinds)"]
    for k in r["kinds"]:
        lines.append(f"[{title}] {k:<9}  pIA {100 * r['pia'][k]:6.2f}%  AP {100 * r['per_kind'][k]['ap']:6.2f}  "
                     f"max-F1 {100 * r['per_kind'][k]['max_f1']:6.2f}  mean confidence {r['confidence'][k]:.4f} "
                     f"(positives {r['confidence']['positive']:.4f})")
    return "\n".join(lines)


def run_negatives(compute, ds, ann, threshold: float, scale: str, align_corners: bool, log, device="cpu"):
    """--negatives in a method's --eval: compute(dataset) -> {id: raw map} is called on the test set and on its
    three negative-audio copies (save_results prints the report). Returns (metrics, {"raw": positive maps, "neg":
    {kind: maps}, "per_sample", "meta"}) (the second for save_maps)."""
    raw = compute(ds)
    neg = {k: compute(NegativeAudio(ds, k)) for k in NEGATIVE_KINDS}
    r = negative_metrics(raw, neg, ann, ds.ids, threshold, align_corners, device)
    r["scale"] = scale
    return r, {"raw": raw, "neg": neg, "per_sample": r["per_sample"],
               "meta": {"threshold": threshold, "scale": scale, "align_corners": align_corners}}


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

    def step(self, loss, *optimizers):
        """zero_grad, (scaled) backward, step every optimizer given (CSOL's classification passes step two)."""
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        for opt in optimizers:
            self.scaler.step(opt)
        self.scaler.update()

    def describe(self):
        """What benchmark.json records: the autocast dtype actually used ("bfloat16" / "float16"), or False."""
        return str(self.dtype).replace("torch.", "") if self.enabled else False


def gpu_habits(args, device: torch.device, image_trunk: nn.Module, compiled=()) -> None:
    """The CUDA habits of every method's training (call before wrapping in DDP): cuDNN autotuning and the image
    trunk in channels_last (NHWC) memory format; with --compile, nn.Module.compile() in place on each module of
    `compiled` (parameter names, checkpoints and DDP unchanged). On CPU nothing changes unless --compile is given."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        image_trunk.to(memory_format=torch.channels_last)
    if args.compile:
        for m in compiled:
            m.compile()


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """A CUDA image batch in channels_last memory format (matches the trunk of gpu_habits); CPU tensors as they are."""
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


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


def load_checkpoint(path, map_location="cpu", method: str | None = None) -> dict:
    """torch.load a checkpoint (a run folder means its last.pt). Anything that is not a readable checkpoint (empty,
    truncated, a text file) is one UserError naming the file; with `method`, a checkpoint that records another
    method (ours record it in their args) is refused. Checkpoints without a record (the authors' releases) pass:
    each method's load_model checks their content."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # PytorchStreamReader failed / EOFError / UnpicklingError ... all mean the same here
        msg = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserError(f"{path}: not a readable PyTorch checkpoint (empty, truncated or another kind of file: "
                        f"{type(e).__name__}{': ' + msg if msg else ''})") from None
    if not isinstance(ck, dict):
        raise UserError(f"{path}: not a checkpoint (holds a {type(ck).__name__}, expected a dict)")
    saved = checkpoint_method(ck)
    if method and saved and saved != method:
        raise UserError(f"{path}: a checkpoint of {saved}, not of {method}; use {saved}.py with it")
    return ck


def checkpoint_method(ck: dict) -> str | None:
    """The method a checkpoint records (in its args, set by preflight), None for the authors' releases."""
    a = ck.get("args")
    a = vars(a) if isinstance(a, argparse.Namespace) else a
    return ck.get("method") or (a.get("method") if isinstance(a, dict) else None)


def checkpoint_args(ck: dict, path, method: str, keys) -> dict:
    """The saved settings a method's load_model needs; a checkpoint without them is not this method's."""
    a = ck.get("args")
    missing = [k for k in keys if not isinstance(a, dict) or k not in a]
    if missing:
        raise UserError(f"{path}: not a {method} checkpoint (its settings lack {', '.join(missing)})")
    return a


def load_state(model: nn.Module, sd, path, method: str) -> None:
    """model.load_state_dict with one line naming the file when the weights are not this model's."""
    if not isinstance(sd, dict):
        raise UserError(f"{path}: no model weights a {method} model can use (not a {method} checkpoint)")
    try:
        model.load_state_dict(sd)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()
        raise UserError(f"{path}: the weights do not fit the {method} model (another method or architecture: "
                        f"{' '.join(first[:2])[:200]})") from None


def strip_prefix(sd: dict, prefix: str = "module.") -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def write_text_atomic(path, text: str) -> None:
    """Write to a temporary name then rename: a reader never sees a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


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


def save_maps(path, maps: dict, negatives: dict | None = None, meta: dict | None = None) -> None:
    """One float32 map per id in an .npz (the format eval_cioU.py reads), key = the id, written atomically; meta (json under
    __eval__: the protocol and align_corners the maps were scored with) lets eval_cioU.py resize them the same way.
    With negatives (from run_negatives, --eval --negatives) the same file also holds, for eval_cioU.py:
      raw/<id>           the positive map on the method's fixed scale (the clip's own audio, never normalised)
      neg/<kind>/<id>    the raw map with the negative audio <kind> (silence, noise, offscreen)
      __confidence__     float64 (N, 1 + kinds): the confidences (mean of the top quarter), rows in the order of
                         the ids in __negatives__, columns positive then the kinds
      __negatives__      a json string: threshold, scale, align_corners, kinds, ids"""
    out = {k: np.asarray(v, np.float32) for k, v in maps.items()}
    if meta:
        out["__eval__"] = np.array(json.dumps(meta))
    if negatives:
        for k, v in negatives["raw"].items():
            out[f"raw/{k}"] = np.asarray(v, np.float32)
        for kind, m in negatives["neg"].items():
            for k, v in m.items():
                out[f"neg/{kind}/{k}"] = np.asarray(v, np.float32)
        meta = dict(negatives["meta"], kinds=list(negatives["neg"]))
        if negatives.get("per_sample"):
            ps = negatives["per_sample"]
            meta["ids"] = ps["ids"]
            out["__confidence__"] = np.stack([np.asarray(ps["confidence"][k], np.float64)
                                              for k in ["positive", *meta["kinds"]]], 1)
        out["__negatives__"] = np.array(json.dumps(meta))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **out)
    os.replace(tmp, path)


def _read_npz(path) -> dict:
    """Every array of an .npz; one error line for a missing, non-npz (.npy, empty, garbage) or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prediction file not found: {path}")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:
        raise UserError(f"{path}: not a readable .npz archive ({type(e).__name__}: {e})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise UserError(f"{path}: a single .npy array, not an .npz archive with one map per id "
                        f"(write it with numpy.savez(path, **{{id: map}}))")
    try:
        with z:
            return {k: z[k] for k in z.files}
    except Exception as e:
        raise UserError(f"{path}: corrupt .npz archive ({type(e).__name__}: {e})") from None


def load_maps(path, with_negatives: bool = False):
    """The maps of an .npz written by save_maps (or any {id: 2-D map} npz), each checked (2-D, non-empty,
    finite). with_negatives: returns (maps, negatives, eval_meta) with negatives = {"raw", "neg", "meta"} or None
    and eval_meta = the __eval__ dict ({} if absent)."""
    data = _read_npz(path)
    maps = {k: check_map(k, v, f"{path}: map") for k, v in data.items() if "/" not in k and not k.startswith("__")}
    if not maps:
        raise UserError(f"{path}: no maps in the archive")
    if not with_negatives:
        return maps
    try:
        eval_meta = json.loads(str(data["__eval__"])) if "__eval__" in data else {}
    except json.JSONDecodeError:
        raise UserError(f"{path}: __eval__ is not valid json") from None
    if "__negatives__" not in data:
        return maps, None, eval_meta
    try:
        meta = json.loads(str(data["__negatives__"]))
    except json.JSONDecodeError:
        raise UserError(f"{path}: __negatives__ is not valid json") from None
    raw = {k[4:]: check_map(k, v, f"{path}: map") for k, v in data.items() if k.startswith("raw/")}
    neg = {kind: {k[len(f"neg/{kind}/"):]: check_map(k, v, f"{path}: map") for k, v in data.items()
                  if k.startswith(f"neg/{kind}/")} for kind in meta.get("kinds", [])}
    return maps, {"raw": raw, "neg": neg, "meta": meta}, eval_meta


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
    a("--align-corners", action=argparse.BooleanOptionalAction, default=None,
      help="bilinear resize of the maps with align_corners=True / False (default: the method's official test: "
           "True for EZ-VSL, False = cv2 INTER_LINEAR for LVS, SSPL, CSOL)")
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
    a("--neg-threshold", type=float, help="--negatives: the fixed threshold on the raw map (default: the method's, "
      "see its header)")
    a("--out", help="--train: parent folder of run folders (default runs/); --eval: folder for results.json; "
      "--predict: output PNG")
    a("--resume", help="continue a run from its last.pt (path to the file or the run folder)")
    a("--weights", help="local .pth with the image-encoder weights (instead of torchvision's download)")
    a("--no-pretrained", action="store_true", help="do not load any pretrained weights")
    a("--max-steps", type=int, help="stop each epoch after this many steps (smoke tests)")
    a("--limit", type=int, help="use only the first N ids of each split (smoke tests)")
    return p


def run_folder(path) -> Path:
    """The run folder a --resume / --ckpt path names: the folder itself, or the one holding the checkpoint file."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def resolve_data(args, log=print):
    """Fill the data arguments: no --data -> a resumed run's own data, or at --eval the data the checkpoint was
    trained on (its run folder's args.json), else the synthetic benchmark (generated once) and the cpu preset; real
    data -> the paper preset; splits and annotations default to the standard layout's files."""
    evaluating = getattr(args, "eval", False) and not getattr(args, "train", False)
    resume = getattr(args, "resume", None)
    src = resume or (getattr(args, "ckpt", None) if evaluating else None)
    trained_on = None                    # at --eval: the args.json that named the data
    if args.data is None and src:        # resumed: its own data (see apply_resume); --eval: what it was trained on
        saved = run_folder(src) / "args.json"
        try:
            args.data = json.loads(saved.read_text()).get("data")
        except FileNotFoundError:                     # not a run folder (e.g. released weights): --data or synthetic
            pass
        except (OSError, ValueError, AttributeError) as e:
            if not resume:                              # a resumed run's checkpoint is checked by apply_resume
                raise UserError(f"{saved}: unreadable ({type(e).__name__}), so the checkpoint's data is unknown; pass "
                                f"--data ROOT") from None
        if args.data and not resume:
            trained_on = saved
    MEDIA.reset()
    if args.data is None:
        try:
            import data_prep                            # the generator: only needed for the synthetic default
        except ModuleNotFoundError as e:
            if e.name != "data_prep":
                raise
            raise UserError(f"no --data given, and the synthetic benchmark needs data_prep.py (its generator) beside "
                            f"common.py in {Path(__file__).resolve().parent}; pass --data ROOT or copy data_prep.py "
                            "there") from None
        args.data = str(data_prep.ensure_synthetic(log=log))
        args.preset = args.preset or "cpu"
    root = Path(args.data)
    if not root.is_dir():
        raise UserError(f"{trained_on}: the checkpoint was trained on --data {args.data}, which is not there; pass "
                        f"--data ROOT to test it on a dataset" if trained_on else f"--data {root}: no such directory")
    if trained_on:
        log(f"data: {args.data} (the data the checkpoint was trained on, from {trained_on}; pass --data ROOT to test "
            f"on other data)")
    args.preset = args.preset or ("cpu" if (root / "synth.json").is_file() else "paper")  # data_prep.py synth wrote it
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


# ---- command line, resume settings, preflight -------------------------------------------------------------
def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """parser.parse_args(argv), plus args.given_options: the options the user actually typed (a resumed run
    takes every other setting from its checkpoint; only a typed flag can contradict it)."""
    args = parser.parse_args(argv)
    unset = object()
    ns = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=ns)        # argparse fills defaults only for attributes not already set
    args.given_options = sorted(k for k, v in vars(ns).items() if v is not unset)
    return args


# Options that say what to do with a run, where to write, or on what hardware: never taken from a checkpoint,
# never a contradiction. Every other option is a training setting a resumed run takes from its checkpoint.
RESUME_FREE = {"train", "eval", "predict", "ckpt", "image", "audio", "resume", "out", "device", "workers", "amp",
               "compile", "no_cache", "skip_bad", "benchmark", "steps", "negatives", "save_maps", "viz",
               "given_options", "method"}
RESUME_RAISABLE = {"epochs"}        # taken from the checkpoint unless given: a resumed run may train longer


def _same_setting(key: str, a, b) -> bool:
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str) and (key in ("data", "annotations", "weights") or
                                                      key.endswith("_split")):
        return os.path.realpath(a) == os.path.realpath(b)
    return False


def apply_resume(args, ck: dict, path, free=(), raisable=()) -> None:
    """A resumed run takes its settings (seed, batch size, --limit, preset, architecture, lr ...) from the
    checkpoint's args; a flag the user gave that contradicts one is refused in one line naming both values."""
    saved = ck.get("args")
    if not isinstance(saved, dict):
        raise UserError(f"--resume {path}: the checkpoint records no settings (not written by a --train run)")
    given = set(getattr(args, "given_options", vars(args)))
    free, raisable = RESUME_FREE | set(free), RESUME_RAISABLE | set(raisable)
    for k, v in saved.items():
        if k in free or not hasattr(args, k):
            continue
        cur = getattr(args, k)
        if k in given and not _same_setting(k, cur, v):
            if k in raisable:
                continue
            raise UserError(f"--resume {path}: --{k.replace('_', '-')} {cur} contradicts the checkpoint's "
                            f"{k} = {v}; drop the flag (a resumed run keeps its settings) or start a new run")
        setattr(args, k, v)


def check_writable(folder, what: str) -> None:
    """The folder exists and is writable, or can be created: tested on its nearest existing ancestor with a
    temporary file (nothing is created)."""
    p = Path(folder).absolute()
    anc = p
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


def check_numbers(args) -> None:
    """--batch-size, --epochs (CSOL --epochs2), --limit, --max-steps >= 1 and --workers >= 0 where given."""
    for k, lo in (("batch_size", 1), ("epochs", 1), ("epochs2", 1), ("limit", 1), ("max_steps", 1), ("workers", 0)):
        v = getattr(args, k, None)
        if v is not None and v < lo:
            raise UserError(f"--{k.replace('_', '-')} {v}: must be at least {lo}")


def check_command(args) -> None:
    """What a command line can be checked for before any work: its numbers and its outputs."""
    check_numbers(args)
    check_outputs(args)


def check_outputs(args) -> None:
    """Every output the command will write can be written: checked before any work."""
    if getattr(args, "predict", False):
        check_file_writable(args.out or "heat.png", "--out")
        return
    if getattr(args, "train", False):
        check_writable(args.out or "runs", "--out" if args.out else "the run folder's parent (choose one with --out)")
    elif args.ckpt:
        check_writable(args.out or Path(args.ckpt).parent,
                       "--out" if args.out else "the output folder (the checkpoint's; choose one with --out)")
    if args.save_maps:
        check_file_writable(args.save_maps, "--save-maps")


_PREFLIGHT_PASSED = False   # under torchrun, a UserError before this is the same on every rank: rank 0 reports it


def preflight(args, method: str, resume=None, splits=("train_split", "val_split", "test_split"),
              annotated=("val_split", "test_split"), ckpt=None, world: int = 1, train_key="train_split",
              free=(), raisable=()):
    """Everything a training run can check before its first step and before its run folder exists; each
    failure is one UserError. Records args.method (saved in every checkpoint's args).
      numbers: --batch-size, --epochs >= 1, --limit, --max-steps >= 1, --workers >= 0;
      resume: the checkpoint is readable and of this method; its settings replace the command line's (a typed
        flag that contradicts one is refused); ckpt: another checkpoint the run reads (readable, this method);
      splits: each exists and lists ids whose frame and WAV exist; every id of the `annotated` splits has an
        annotation; DDP: the training split gives every process at least one whole per-process batch;
      outputs: --out (or the resumed run folder) and --save-maps are writable.
    Returns the loaded resume checkpoint (or None)."""
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
        path = getattr(args, k)
        ids = read_split(path)[: args.limit]
        check_layout(args.data, ids)
        counts[k] = len(ids)
        if k in annotated:
            ann = ann if ann is not None else load_annotations(args.annotations)
            miss = [i for i in ids if i not in ann]
            if miss:
                raise UserError(f"{len(miss)} of {len(ids)} ids of {path} have no annotation in {args.annotations} "
                                f"(first: {', '.join(miss[:5])}); add them, or remove them from the split")
    if train_key and train_key in counts:
        n, b = counts[train_key], args.batch_size
        if b % world:
            raise UserError(f"--batch-size {b} cannot be split evenly over {world} processes; use a multiple of "
                            f"{world}")
        per, share = b // world, n // world
        if share < per and world == 1:
            raise UserError(f"{n} training clips ({getattr(args, train_key)}) are fewer than one batch of {b} "
                            f"(--batch-size): no whole batch to train on; use --batch-size {n} or less, or more clips")
        if share < per:
            raise UserError(f"{n} training clips ({getattr(args, train_key)}) over {world} processes give {share} "
                            f"per process, fewer than one batch of {per} (--batch-size {b} / {world}): no whole "
                            f"batch to train on; use --batch-size {share * world if share else world} or less, "
                            f"or more clips" + ("" if share else " (at least one per process)"))
    if resume:
        check_writable(run_folder(resume), "--resume run folder")
        if args.save_maps:
            check_file_writable(args.save_maps, "--save-maps")
    else:
        check_outputs(args)                                # --out and --save-maps
    global _PREFLIGHT_PASSED
    _PREFLIGHT_PASSED = True
    return ck


class Run:
    """What a training run needs before its model exists: the preflight (before the process group and the run
    folder), rank / world / device (DDP under torchrun), the seed, the run folder (new, or the one of --resume
    with its checkpoint loaded into .ck) and the log."""

    def __init__(self, args, method: str, free=(), raisable=()):
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.ck = preflight(args, method, args.resume, world=world, free=free, raisable=raisable)
        if self.ck and self.ck.get("epoch", 0) >= args.epochs:
            raise UserError(f"--resume {args.resume}: the run has already trained {self.ck.get('epoch')} epochs "
                            f"(--epochs {args.epochs}); give a larger --epochs to train longer")
        self.rank, self.world, self.device = init_distributed(args.device)
        self.main = self.rank == 0
        seed_everything(args.seed)
        if args.resume:
            self.dir = run_folder(args.resume)
        else:
            self.dir = make_run_dir(args, method) if self.main else None
        self.log = RunLog(self.dir / "log.txt" if self.main else None, self.main)
        self.per_proc = args.batch_size // self.world

    def wrap(self, model):
        """DistributedDataParallel under torchrun, the model itself otherwise."""
        if self.world == 1:
            return model
        ids = [self.device] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def loader(self, ds, args, epoch: int):
        """The epoch's shuffled loader: reseeds python/numpy/torch from (seed, epoch) first, so an epoch is
        reproducible on its own and a resumed run continues exactly; DistributedSampler under DDP. Every process
        gets the same number of whole batches (floor(N / world) clips each, the rest dropped; preflight refused
        a split with less than one batch per process)."""
        seed_everything(args.seed * 1000 + epoch)
        sampler = None
        if self.world > 1:
            sampler = torch.utils.data.distributed.DistributedSampler(ds, self.world, self.rank, seed=args.seed,
                                                                      drop_last=True)
            sampler.set_epoch(epoch)
        return torch.utils.data.DataLoader(ds, self.per_proc, shuffle=sampler is None, sampler=sampler,
                                           num_workers=args.workers, drop_last=True,
                                           generator=torch.Generator().manual_seed(args.seed * 1000 + epoch),
                                           collate_fn=collate_av)

    def sums(self, *values):
        """Sum per-epoch totals (loss sum, step count, ...) over the DDP processes, so `total / steps` is the
        mean over every rank's steps; under DDP the main process logs each rank's mean loss and step count."""
        if self.world == 1:
            return values
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        parts = [torch.zeros_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t)
        per = [p.tolist() for p in parts]
        self.log("per-rank loss (steps): " + ", ".join(f"rank {r} {p[0] / max(p[1], 1):.4f} ({p[1]:.0f})"
                                                         for r, p in enumerate(per)))
        tot = [sum(p[i] for p in per) for i in range(len(values))]
        return tuple(type(v)(x) for v, x in zip(values, tot))


def _peer_failure(e: BaseException) -> bool:
    """An error of a collective because another process died (it has reported its own error)."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(s in text for s in (
        "gloo", "Gloo", "Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL",
        "ProcessGroup", "Socket Timeout"))


def _torchrun_error_file(msg: str, root_cause: bool = True) -> None:
    """The message torchrun's failure summary shows for this process ('traceback :'), instead of its pointer to
    the elastic-errors documentation. torchrun names the failure with the smallest timestamp (whole seconds) the
    root cause; the process that met the error dates it one second back so that it wins over the processes that
    stopped because of it in the same second."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        ts = str(int(time.time()) - (1 if root_cause else 0))
        with contextlib.suppress(OSError):       # the format torchrun's own @record writes
            Path(path).write_text(json.dumps({"message": {"message": msg, "extraInfo": {"py_callstack": msg,
                                                                                       "timestamp": ts}}}))


def run_cli(main_fn) -> None:
    """Run a CLI entry point; a UserError becomes one 'error: ...' line and exit status 2, not a traceback.

    Under torchrun (WORLD_SIZE > 1) a run stops with ONE line as well: the other ranks wait a few seconds before
    printing theirs, so an error every rank meets (the preflight's, missing weights) is printed by rank 0 alone
    (torchrun stops the others when it exits); an error of one rank (a bad file in its share) is printed by that
    rank; the ranks whose collectives then fail exit without a traceback of their own. Processes end with os._exit so that no
    rank waits on a process group whose peers are gone; torchrun still prints its own failure summary, whose
    root cause then shows the same message."""
    from tqdm import tqdm
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        main_fn()
    except UserError as e:
        if world == 1:
            tqdm.write(f"error: {e}", file=sys.stderr)         # on its own line, below an unfinished progress bar
            sys.exit(2)
        if int(os.environ.get("RANK", "0")) != 0:
            # an error every rank meets (the preflight's, missing weights ...) is reported by rank 0, and torchrun
            # stops this process meanwhile; an error of this rank alone is printed after the wait
            sys.stdout.flush()
            time.sleep(3 if _PREFLIGHT_PASSED else 10)
        tqdm.write(f"error: {e}", file=sys.stderr)
        sys.stderr.flush(), sys.stdout.flush()
        _torchrun_error_file(str(e))
        os._exit(2)
    except Exception as e:
        if world > 1 and _peer_failure(e):
            _torchrun_error_file("stopped: another process failed (its error is above)", root_cause=False)
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(3)
        raise
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def save_results(args, method: str, res: dict, swapped, ann: dict, log, seconds: float, map_name: str,
                 extra: dict | None = None) -> dict:
    """Print the report, then write --save-maps, the --viz overlays, missing_ids.txt and results.json last.

    Called only once everything they report on has been computed; every file is written to a temporary name and
    renamed, and results.json comes last, so a failure never leaves a results.json beside missing outputs.
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
               "seed": getattr(args, "ckpt_seed", None),     # the checkpoint's training seed (None: not ours)
               "resize": res["resize"], "n": res["n"], "n_listed": res["n_listed"], "seconds": round(seconds, 1),
               "test": res["test"], "baselines": res["baselines"],
               "audio_swapped": swapped["test"] if swapped else None, "map": map_name,
               "missing": res["missing"], "duplicates": res.get("duplicates", []), "empty_gt": res["empty_gt"],
               "boxes_outside": res.get("boxes_outside", 0), "skipped": len(MEDIA.skipped), **(extra or {})}
    if res.get("negatives"):
        results["negatives"] = {k: v for k, v in res["negatives"].items() if k != "per_sample"}
        log(format_negatives(res["negatives"], "test negatives"))
    viz = None
    if args.viz:                                   # rendered into a temporary folder first (the slow part)
        viz = out / "viz"
        tmp = out / "viz.part"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        ids = [i for i in res["per_sample"]][: args.viz]
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
    if viz is not None:
        viz.mkdir(exist_ok=True)
        for f in sorted(tmp.iterdir()):
            os.replace(f, viz / f.name)
        tmp.rmdir()
        log(f"{len(ids)} overlays written to {viz}")
    if res["missing"]:
        write_text_atomic(out / "missing_ids.txt", "\n".join(res["missing"]) + "\n")
    elif (out / "missing_ids.txt").is_file():
        (out / "missing_ids.txt").unlink()          # a stale list from an earlier evaluation
    if MEDIA.tiled:
        log(f"{len(MEDIA.tiled)} clips shorter than the audio window were tiled to fill it (official rule)")
    if MEDIA.skipped:
        write_text_atomic(out / "skipped_ids.txt", "".join(f"{k}\t{v}\n" for k, v in sorted(MEDIA.skipped.items())))
        log(f"--skip-bad: skipped {len(MEDIA.skipped)} unreadable samples, listed in {out / 'skipped_ids.txt'}")
    write_json(out / "results.json", results)
    log(f"results written to {out / 'results.json'}")
    return results


# --benchmark: the timing harness every method calls from its benchmark(args) (run plumbing, no method logic).
BENCHMARK_KEYS = ("loader_samples_per_s", "reference_loader_samples_per_s", "model_samples_per_s",
                  "train_samples_per_s", "peak_memory_mb", "cache_build_s")


def single_process(what: str) -> None:
    """Stop with one line when launched with torchrun over several processes (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"{what} runs in one process; launch it with python (or torchrun --nproc_per_node=1)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _n_samples(inputs) -> int:
    """Samples in a prepared batch: the first dimension of its first tensor (nested tuples allowed)."""
    if torch.is_tensor(inputs):
        return inputs.shape[0]
    return _n_samples(inputs[0])


def _endless(loader):
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def _samples_per_s(step, steps: int, warmup: int, device: torch.device) -> float:
    """Run step() warmup times untimed, then steps times timed (CUDA synchronised at both ends); step() returns
    the number of samples it processed."""
    for _ in range(warmup):
        step()
    _sync(device)
    t0, n = time.perf_counter(), 0
    for _ in range(steps):
        n += step()
    _sync(device)
    return n / (time.perf_counter() - t0)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource                                     # the process's peak RSS (kB on Linux), workers not included
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10


def run_benchmark(args, method: str, device: torch.device, run_dir, log, make_loader, batch_to_device, train_step,
                  net, opt, amp: Amp, warmup: int = 2) -> dict:
    """--benchmark: samples per second of (1) the loader: files on disk -> a batch of normalised images and
    spectrograms on the device (the method's training DataLoader + batch_to_device), with args.decode as given and
    again with --decode pil (the reference); (2) the model: train_step (forward + loss + backward + optimizer
    step) on one prepared batch reused; (3) end to end (loader + batch_to_device + train_step). Warm-up steps
    are excluded, CUDA is synchronised around every timed span. Writes run_dir/benchmark.json; never saves a
    checkpoint. make_loader() builds the dataset from args (so it follows args.decode) and its training loader."""
    steps = args.steps or max(3, math.ceil(256 / max(1, args.batch_size)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    decode = args.decode
    net.train()
    res, last = {}, {}

    def loader_rate(mode):
        args.decode = mode
        loader = make_loader()
        batches = _endless(loader)

        def step():
            last["inputs"] = batch_to_device(next(batches), device, args, True)
            return _n_samples(last["inputs"])
        rate = _samples_per_s(step, steps, warmup, device)
        return rate, getattr(loader.dataset, "cache_build_s", None)

    try:
        res["loader_samples_per_s"], cache_s = loader_rate(decode)
        res["reference_loader_samples_per_s"], _ = loader_rate("pil")
    finally:
        args.decode = decode
    inputs = last["inputs"]

    def model_step():
        train_step(net, opt, amp, inputs, args)
        return _n_samples(inputs)
    res["model_samples_per_s"] = _samples_per_s(model_step, steps, warmup, device)
    batches = _endless(make_loader())

    def train_one():
        x = batch_to_device(next(batches), device, args, True)
        train_step(net, opt, amp, x, args)
        return _n_samples(x)
    res["train_samples_per_s"] = _samples_per_s(train_one, steps, warmup, device)
    res["peak_memory_mb"] = _peak_memory_mb(device)
    res["cache_build_s"] = cache_s
    res = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in res.items()}
    meta = {"method": method, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "batch_size": args.batch_size, "workers": args.workers, "amp": amp.describe(),
            "compile": bool(args.compile), "image_size": args.image_size, "preset": args.preset, "decode": decode,
            "steps": steps, "warmup_steps": warmup, "data": str(args.data), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    out = {**meta, **res}
    width = max(map(len, out))
    log("\n".join(f"{k:<{width}}  {v}" for k, v in out.items()))
    write_json(Path(run_dir) / "benchmark.json", out)
    log(f"benchmark written to {Path(run_dir) / 'benchmark.json'}")
    return out


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
        secs = [r.get("seconds") for _, r in runs]
        row["seconds"] = f"{np.mean(secs):.0f}" if all(isinstance(v, (int, float)) for v in secs) else "-"
        negs = [_flat_numbers(r.get("negatives")) for _, r in runs]
        for k in sorted(set.intersection(*(set(n) for n in negs))) if all(negs) else []:
            row[f"neg {k}"] = _mean_std([n[k] for n in negs])
            neg_cols += [] if f"neg {k}" in neg_cols else [f"neg {k}"]
        rows.append(row)
    head = list(rows[0])[:6] + [f"{name} {k}" for name, _ in parts for k in TABLE_KEYS] + neg_cols + ["seconds"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(row.get(h, "-") for h in head) + " |" for row in rows]
    return "\n".join(out) + (f"\n(mean ± sample std over the runs, in %; seconds: mean wall time of train + test; "
                              f"{len(paths)} results files)")
