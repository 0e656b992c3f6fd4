"""The test suite: python -m pytest test_all.py

Numbers are checked against independent computations (scipy, numpy written from the definitions, torchaudio's
filter banks, hand-worked examples); learning is checked by a score going up on the synthetic benchmark.
Nothing here needs ../shared or the network.
"""
import json
import re
import shutil
import subprocess
import sys
import urllib.error
import wave
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import torch

import common as C
import csol_classaware as csol
import data_prep
import eval_cioU
import ez_vsl
import lvs_hardway as lvs
import sspl

HERE = Path(__file__).resolve().parent


def run_py(*args, cwd=HERE, check=True, env_extra=None, timeout=600):
    import os
    env = dict(os.environ, **(env_extra or {}))
    r = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny synthetic dataset in the standard layout (shared by the data and smoke tests)."""
    root = tmp_path_factory.mktemp("tiny")
    data_prep.make_synthetic(root, sizes=dict(train=24, val=8, test=8, cocktail_train=8, cocktail_test=6),
                             log=lambda *a: None)
    return root


# ---------------------------------------------------------------------------------------------------------
# Audio front ends
# ---------------------------------------------------------------------------------------------------------
def test_log_spectrogram_matches_scipy():
    rng = np.random.default_rng(1)
    for n in (48000, 160000, 33075):  # 3 s / 10 s at 16 kHz, 3 s at 11.025 kHz
        x = rng.normal(0, 0.3, n).astype(np.float32)
        sr = 11025 if n == 33075 else 16000
        _, _, s = scipy.signal.spectrogram(x.astype(np.float64), sr, nperseg=512, noverlap=274)
        ref = np.log(s + 1e-7) / 12
        ours = C.log_spectrogram(torch.from_numpy(x)[None], sr)[0, 0].numpy()
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert C.log_spectrogram(torch.zeros(2, 48000), 16000).shape == (2, 1, 257, 200)
    assert C.log_spectrogram(torch.zeros(1, 160000), 16000).shape == (1, 1, 257, 671)


def _htk(f):
    return 1127.0 * np.log(1.0 + f / 700.0)


def test_vggish_examples_against_numpy_definition():
    rng = np.random.default_rng(2)
    t = np.arange(48000) / 16000
    x = (0.5 * np.sin(2 * np.pi * 440 * t) + rng.normal(0, 0.05, t.size)).astype(np.float32)
    # independent: framing by index arithmetic, scipy's periodic Hann, a per-band loop for the mel weights
    frames = np.stack([x[i * 160:i * 160 + 400] for i in range(1 + (48000 - 400) // 160)]).astype(np.float64)
    mag = np.abs(np.fft.rfft(frames * scipy.signal.get_window("hann", 400), 512))
    bins = _htk(np.linspace(0, 8000, 257))
    edges = np.linspace(_htk(125.0), _htk(7500.0), 66)
    w = np.zeros((257, 64))
    for i in range(64):
        for k in range(1, 257):  # DC row stays zero
            lo = (bins[k] - edges[i]) / (edges[i + 1] - edges[i])
            hi = (edges[i + 2] - bins[k]) / (edges[i + 2] - edges[i + 1])
            w[k, i] = max(0.0, min(lo, hi))
    ref = np.log(mag @ w + 0.01)
    assert ref.shape == (298, 64)
    ours = sspl.vggish_examples(torch.from_numpy(x)[None])
    assert ours.shape == (1, 3, 1, 96, 64)
    np.testing.assert_allclose(ours[0, :, 0].reshape(288, 64).numpy(), ref[:288], atol=1e-6)   # float64 inside


def test_csol_log_mel_against_numpy_and_torchaudio_filterbank():
    import torchaudio
    rng = np.random.default_rng(3)
    x = rng.normal(0, 0.2, 16000).astype(np.float32)
    pad = np.pad(x.astype(np.float64), 80)
    frames = np.stack([pad[i * 80:i * 80 + 160] for i in range(201)])
    mag = np.abs(np.fft.rfft(frames * scipy.signal.get_window("hann", 160), axis=1))      # (201, 81)
    fb = torchaudio.functional.melscale_fbanks(81, 0.0, 8000.0, 64, 16000, norm="slaney", mel_scale="slaney").double().numpy()
    db = 10 * np.log10(np.maximum(mag @ fb, 1e-10))
    ref = np.maximum(db, db.max() - 80)
    ours = csol.csol_log_mel(torch.from_numpy(x)[None])
    assert ours.shape == (1, 1, 201, 64)
    np.testing.assert_allclose(ours[0, 0].numpy(), ref, atol=2e-4)         # the reference's filterbank is float32
    np.testing.assert_allclose(csol.slaney_mel_matrix(160, 16000, 64), fb, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Encoders and weights
# ---------------------------------------------------------------------------------------------------------
def test_encoder_output_shapes():
    img = torch.zeros(1, 3, 224, 224)
    assert C.ResNet18Trunk(3, stride=16)(img).shape == (1, 512, 14, 14)
    assert C.ResNet18Trunk(3, stride=32)(img).shape == (1, 512, 7, 7)
    assert C.ResNet18Trunk(1, stride=16)(torch.zeros(1, 1, 257, 200)).shape == (1, 512, 17, 13)  # LVS paper's 17x13
    assert C.ResNet18Trunk(1, stride=32)(torch.zeros(1, 1, 257, 200)).shape == (1, 512, 9, 7)
    assert C.ResNet18Trunk(1, stride=16)(torch.zeros(1, 1, 201, 64)).shape == (1, 512, 13, 4)    # CSOL audio
    assert sspl.vgg16_conv5_3()(img).shape == (1, 512, 14, 14)
    assert sspl.VGGish()(torch.zeros(3, 1, 96, 64)).shape == (3, 128)
    assert C.SmallCNN(3, strides=(2, 1, 2, 1))(torch.zeros(1, 3, 112, 112)).shape == (1, 128, 14, 14)
    assert C.SmallCNN(3, strides=(2, 1, 2, 2))(torch.zeros(1, 3, 112, 112)).shape == (1, 128, 7, 7)


def test_weights_local_path_and_offline_error(tmp_path, monkeypatch):
    import torchvision
    ref = torchvision.models.resnet18(weights=None)
    torch.save({"state_dict": ref.state_dict()}, tmp_path / "r18.pth")
    trunk = C.ResNet18Trunk(3, stride=16)
    missing = C.load_weights(trunk, str(tmp_path / "r18.pth"))
    assert missing == []
    assert torch.equal(trunk.layer4[0].conv1.weight, ref.layer4[0].conv1.weight)
    audio = C.ResNet18Trunk(1, stride=16)   # the 3-channel stem is skipped for a 1-channel trunk
    assert C.load_weights(audio, str(tmp_path / "r18.pth")) == ["conv1.weight"]
    # VGG16 conv5_3 trunk from a torchvision VGG16 state dict with the 'features.' prefix
    vgg = torchvision.models.vgg16(weights=None)
    torch.save(vgg.state_dict(), tmp_path / "vgg.pth")
    trunk = sspl.vgg16_conv5_3()
    assert C.load_weights(trunk, str(tmp_path / "vgg.pth"), prefix="features.") == []
    assert torch.equal(trunk[28].weight, vgg.features[28].weight)

    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(C.UserError, match="--no-pretrained"):
        C.load_weights(C.ResNet18Trunk(3), "imagenet")
    with pytest.raises(C.UserError, match="not found"):
        C.load_weights(C.ResNet18Trunk(3), str(tmp_path / "nope.pth"))


def test_vggish_loads_torchvggish_parameter_names():
    names = [f"features.{i}.{p}" for i in (0, 3, 6, 8, 11, 13) for p in ("weight", "bias")] + \
            [f"embeddings.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
    assert sorted(sspl.VGGish().state_dict()) == sorted(names)


# ---------------------------------------------------------------------------------------------------------
# Data: WAV, layout, reader, synthetic benchmark
# ---------------------------------------------------------------------------------------------------------
def _write_pcm(path, data: np.ndarray, width: int, sr=16000, channels=1):
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels), f.setsampwidth(width), f.setframerate(sr)
        if width == 3:
            b = data.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3]
            f.writeframes(b.tobytes())
        else:
            f.writeframes(data.astype({2: "<i2", 4: "<i4"}[width]).tobytes())


def test_read_wav_pcm_widths_and_errors(tmp_path):
    v16 = np.array([0, 16384, -32768, 32767])
    _write_pcm(tmp_path / "a16.wav", v16, 2)
    x, sr = C.read_wav(tmp_path / "a16.wav")
    assert sr == 16000
    np.testing.assert_allclose(x, [0, 0.5, -1, 32767 / 32768])
    for width in (3, 4):                                 # 16-bit only: the others are one line naming the file
        _write_pcm(tmp_path / f"a{8 * width}.wav", np.array([0, 1 << 20, -(1 << 20)]), width)
        with pytest.raises(C.UserError, match=f"a{8 * width}.wav: {8 * width}-bit WAV is not supported.*data_prep"):
            C.read_wav(tmp_path / f"a{8 * width}.wav")
    _write_pcm(tmp_path / "st.wav", np.array([16384, 0, 0, -16384]), 2, channels=2)   # interleaved L/R
    np.testing.assert_allclose(C.read_wav(tmp_path / "st.wav")[0], [0.25, -0.25])
    _write_pcm(tmp_path / "a8.wav", np.array([1, 2]), 2)
    raw = (tmp_path / "a8.wav").read_bytes()
    (tmp_path / "a8.wav").write_bytes(raw[:34] + (8).to_bytes(2, "little") + raw[36:])    # 8-bit header
    with pytest.raises(C.UserError, match="8-bit"):
        C.read_wav(tmp_path / "a8.wav")
    fl = bytearray((tmp_path / "a16.wav").read_bytes())
    fl[20:22] = (3).to_bytes(2, "little")                                                # IEEE float format tag
    (tmp_path / "float.wav").write_bytes(bytes(fl))
    with pytest.raises(C.UserError, match="data_prep"):
        C.read_wav(tmp_path / "float.wav")
    full = (tmp_path / "a16.wav").read_bytes()
    (tmp_path / "trunc.wav").write_bytes(full[:-3])
    with pytest.raises(C.UserError, match="truncated"):
        C.read_wav(tmp_path / "trunc.wav")
    _write_pcm(tmp_path / "empty.wav", np.array([], dtype=np.int16), 2)
    with pytest.raises(C.UserError, match="no samples"):
        C.read_wav(tmp_path / "empty.wav")
    with pytest.raises(C.UserError, match="missing audio"):
        C.read_wav(tmp_path / "nope.wav")


def test_clip_window():
    x = np.arange(10, dtype=np.float32)
    np.testing.assert_array_equal(C.clip_window(x, 2, 2, "center"), [3, 4, 5, 6])
    np.testing.assert_array_equal(C.clip_window(x, 2, 2, "start"), [0, 1, 2, 3])
    np.testing.assert_array_equal(C.clip_window(x[:3], 2, 3, "center"), [0, 1, 2, 0, 1, 2])   # tiled when short


def test_reader_on_tiny_dataset_and_bad_input(tiny, tmp_path):
    ids = C.read_split(tiny / "splits" / "test.txt")
    ds = C.AVDataset(tiny, ids, 3.0, image_tf=C.image_transform("squash", 96))
    img, wav, vid, tiled = ds[0]
    assert img.shape == (3, 96, 96) and wav.shape == (48000,) and vid == ids[0] and not tiled
    assert abs(float(wav.abs().max()) - 0.7) < 0.01
    with pytest.raises(C.UserError, match="no frames"):
        C.AVDataset(tiny, ids + ["not_there"], 3.0)
    # a corrupt JPEG and a wrong sample rate are errors that name the file
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    (bad / "frames" / f"{ids[0]}.jpg").write_bytes(b"\xff\xd8\xff garbage")
    err = C.AVDataset(bad, ids, 3.0, image_tf=lambda im: im)[0]         # returned, not raised: a worker never dies
    assert isinstance(err, C.BadMedia) and f"{ids[0]}.jpg" in str(err)
    data_prep.write_wav(bad / "audio" / f"{ids[1]}.wav", np.zeros(100), 8000)
    err = C.AVDataset(bad, ids, 3.0)[1]
    assert isinstance(err, C.UserError) and "--sr 16000" in str(err)


def test_synthetic_boxes_match_what_was_drawn(tiny):
    from PIL import Image
    ann = C.load_annotations(tiny / "annotations.json")
    colors = {c[0]: np.array(c[1], float) for c in data_prep.SYNTH_CLASSES}
    checked = 0
    for vid in C.read_split(tiny / "splits" / "test.txt") + C.read_split(tiny / "splits" / "cocktail_test.txt"):
        img = np.asarray(Image.open(tiny / "frames" / f"{vid}.jpg"), float)
        h, w = img.shape[:2]
        for obj in ann[vid]["objects"]:
            near = np.linalg.norm(img - colors[obj["class"]], axis=-1) < 70
            ys, xs = np.nonzero(near)
            found = np.array([xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h])
            if obj["sounding"] or vid.startswith("cocktail"):     # silent single-source objects may be occluded
                np.testing.assert_allclose(found, obj["bbox"], atol=3 / w)
                checked += 1
        assert [o["bbox"] for o in ann[vid]["objects"] if o["sounding"]] == ann[vid]["bbox"]
    assert checked >= 8 + 6 * 4


def test_synthetic_is_deterministic(tmp_path):
    sizes = dict(train=3, test=2)
    for d in ("a", "b"):
        data_prep.make_synthetic(tmp_path / d, seed=5, sizes=sizes, log=lambda *a: None)
    assert (tmp_path / "a/annotations.json").read_text() == (tmp_path / "b/annotations.json").read_text()
    assert (tmp_path / "a/audio/test_00001.wav").read_bytes() == (tmp_path / "b/audio/test_00001.wav").read_bytes()



def test_synthetic_styles_draw_what_they_say(tmp_path):
    """data_prep.py synth --background/--objects/--sound: each style has the property its help names (object sides,
    a coloured background, each class's sound in its band), checked on the written files."""
    from PIL import Image
    sizes = dict(train=2, test=12)
    root = data_prep.make_synthetic(tmp_path / "s", sizes=sizes, log=lambda *a: None, background="texture",
                                    objects="small", sound="noise")
    ann = C.load_annotations(root / "annotations.json")
    f0 = {c[0]: c[4] for c in data_prep.SYNTH_CLASSES}
    for vid in C.read_split(root / "splits" / "test.txt"):
        sides = [o["bbox"][2] - o["bbox"][0] for o in ann[vid]["objects"]]
        assert all(0.16 - 1 / 128 <= s <= 0.3 + 1 / 128 for s in sides), sides       # --objects small
        x, sr = C.read_wav(root / "audio" / f"{vid}.wav")
        p = np.abs(np.fft.rfft(x)) ** 2
        f = np.fft.rfftfreq(x.size, 1 / sr)
        band = (f > 0.8 * 0.98 * f0[ann[vid]["class"]]) & (f < 1.25 * 1.02 * f0[ann[vid]["class"]])
        assert p[band].mean() > 10 * p[~band].mean()               # --sound noise: the class's band over the noise
        hsv = np.asarray(Image.open(root / "frames" / f"{vid}.jpg").convert("HSV"), float)
        assert np.median(hsv[..., 1]) > 40                         # --background texture: coloured, not grey
    grey = data_prep.make_synthetic(tmp_path / "g", sizes=sizes, log=lambda *a: None, sound="chirp")
    hsv = np.asarray(Image.open(grey / "frames" / "test_00000.jpg").convert("HSV"), float)
    assert np.median(hsv[..., 1]) < 25                             # the default background is grey
    ann = C.load_annotations(grey / "annotations.json")
    x, sr = C.read_wav(grey / "audio" / "test_00000.wav")
    fc = f0[ann["test_00000"]["class"]]
    _, t, S = scipy.signal.spectrogram(x, sr, nperseg=1024)
    peak = scipy.signal.spectrogram(x, sr, nperseg=1024)[0][S.argmax(0)]
    loud = S.max(0) > 0.1 * S.max()
    assert np.all((peak[loud] > 0.95 * fc) & (peak[loud] < 1.65 * fc))          # --sound chirp: sweeps f0 .. 1.6 f0
    assert np.ptp(peak[loud]) > 0.3 * fc
    with pytest.raises(C.UserError, match="sound 'beep': choose one of tone, chirp, noise"):
        data_prep.make_synthetic(tmp_path / "x", sizes=sizes, log=lambda *a: None, sound="beep")

def test_synthetic_interactive_split_scores_who_follows_the_sound(tmp_path):
    """Issue 30 item 6: interactive_test lists each frame twice, once with each of its two objects' sound, grouped as
    IS3 does; common.interactive_split gives a map that follows the sound an adaptive IIoU of 1 and one that ignores
    it (the same map for both sounds) 0."""
    from argparse import Namespace
    from PIL import Image
    root = data_prep.make_synthetic(tmp_path / "s", sizes=dict(test=2, interactive_test=6), log=lambda *a: None,
                                    objects="mixed")
    ann, ids = C.load_annotations(root / "annotations.json"), C.read_split(root / "splits" / "interactive_test.txt")
    f0 = {c[0]: c[4] for c in data_prep.SYNTH_CLASSES}
    colors = {c[0]: np.array(c[1], float) for c in data_prep.SYNTH_CLASSES}
    assert len(ids) == 12
    for a, b in zip(ids[::2], ids[1::2]):
        assert a.endswith("_0") and b.endswith("_1") and ann[a]["group"] == ann[b]["group"] == a[:-2]
        assert (root / "frames" / f"{a}.jpg").read_bytes() == (root / "frames" / f"{b}.jpg").read_bytes()
        assert ann[a]["class"] != ann[b]["class"] and ann[a]["bbox"] != ann[b]["bbox"]
        img = np.asarray(Image.open(root / "frames" / f"{b}.jpg"), float)
        ys, xs = np.nonzero(np.linalg.norm(img - colors[ann[b]["class"]], axis=-1) < 70)   # drawn last: whole
        np.testing.assert_allclose([xs.min() / 128, ys.min() / 128, (xs.max() + 1) / 128, (ys.max() + 1) / 128],
                                   ann[b]["bbox"][0], atol=3 / 128)
        for v, other in ((a, b), (b, a)):          # each sound has its own object's pitch, not the other's
            x, sr = C.read_wav(root / "audio" / f"{v}.wav")
            p, f = np.abs(np.fft.rfft(x)) ** 2, np.fft.rfftfreq(x.size, 1 / sr)
            band = lambda c: p[np.abs(f - f0[ann[c]["class"]]) < 0.03 * f0[ann[c]["class"]]].mean()  # noqa: E731
            assert band(v) > 20 * band(other)
    args = Namespace(data=str(root), test_split=str(root / "splits" / "test.txt"), protocol="median")

    def scored(follows):
        def evaluate(a):
            assert a.protocol == "is3" and a.test_split.endswith("interactive_test.txt") and args.protocol == "median"
            rng = np.random.default_rng(0)              # is3 keeps q > the |gt|-th largest: a flat box is no map
            box = {i: C.gt_map(ann[i]) * (1 + 0.01 * rng.random((224, 224))) for i in C.read_split(a.test_split)}
            maps = {i: box[i] if follows else np.maximum(box[i[:-1] + "0"], box[i[:-1] + "1"]) for i in box}
            return C.evaluate_maps(maps, ann, protocol=a.protocol)
        return C.interactive_split(args, evaluate)
    assert scored(True)["iiou_adap"] == 1.0 and scored(True)["n_images"] == 6
    assert scored(False)["iiou_adap"] == 0.0
    assert C.interactive_split(Namespace(**dict(vars(args), test_split=str(root / "splits" / "val.txt"))), None) is None


def test_checkpoint_round_trip(tmp_path):
    m = torch.nn.Linear(3, 2)
    C.save_checkpoint(tmp_path / "last.pt", {"model": m.state_dict(), "epoch": 4})
    assert not list(tmp_path.glob("*.part"))
    ck = C.load_checkpoint(tmp_path)   # a run folder resolves to its last.pt
    m2 = torch.nn.Linear(3, 2)
    m2.load_state_dict(ck["model"])
    assert ck["epoch"] == 4 and torch.equal(m2.weight, m.weight)
    with pytest.raises(C.UserError, match="not found"):
        C.load_checkpoint(tmp_path / "missing.pt")


# ---------------------------------------------------------------------------------------------------------
# Evaluator
# ---------------------------------------------------------------------------------------------------------
def _bin(m, protocol):
    """common.binarize on one 224x224 map given as numpy."""
    return C.binarize(torch.as_tensor(np.asarray(m, np.float32))[None], protocol)[0]


def _resize(m, size=224, align_corners=False):
    return C.resize_maps(torch.as_tensor(np.asarray(m, np.float32))[None], size, align_corners)[0].numpy()


def _ciou(P, G):
    return C.ciou(torch.as_tensor(np.asarray(P)), C.ground_truth(torch.as_tensor(np.asarray(G, np.float32)))).item()


def _half_map():
    m = np.zeros((224, 224))
    m[:, :112] = 1.0           # the left half is 1
    return m


def test_ciou_hand_worked_both_protocols():
    g = C.boxes_to_map([[0, 0, 0.5, 0.5]])                 # 112x112 = 12544 pixels
    assert g.sum() == 12544
    # P = left half (25088 px): inter 12544, union 12544 + 12544 -> 0.5
    for proto in ("abs0.5", "median"):
        assert _ciou(_bin(_half_map(), proto), g) == pytest.approx(0.5)
    # ties at the median: the 0/1 map's median is 1; the official LVS rule (p[p > thr] = 1; p[p < 1] = 0) keeps the
    # pixels equal to 1, so the left half is predicted (issue 12: this test asserted 0 pixels before)
    assert _bin(_half_map(), "median_strict").sum() == 25088
    # a quarter at 1, the rest tied at 0: '>=' keeps everything, '>' keeps the quarter, abs0.5 the quarter
    q = np.zeros((224, 224))
    q[:112, :112] = 1
    assert _bin(q, "median").all()
    assert _ciou(_bin(q, "median_strict"), g) == 1.0
    assert _ciou(_bin(q, "abs0.5"), g) == 1.0
    assert _ciou(_bin(q, "median"), g) == pytest.approx(12544 / 50176)


def test_consensus_gt_hand_worked():
    # two annotators: A = [0, .5]^2, B = [.25, .75]^2; overlap 56x56 = 3136 px -> 1, the rest of A and B -> 0.5
    g = C.boxes_to_map([[0, 0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]], "consensus")
    assert set(np.unique(g)) == {0.0, 0.5, 1.0}
    assert (g == 1).sum() == 3136 and g.sum() == 12544
    p = C.boxes_to_map([[0, 0, 0.5, 0.5]]).astype(bool)
    assert _ciou(p, g) == pytest.approx((0.5 * (12544 - 3136) + 3136) / 12544)     # 0.625


def test_negative_coordinate_clamp_and_empty_box():
    # a real-world pattern (vggss.json has x2 = -2.88e16 in 12 boxes): the corrupt box rasterises to nothing
    g = C.boxes_to_map([[0.38, 0.86, 0.69, -2.88e16], [0.05, 0.35, 0.75, 0.98]])
    assert np.array_equal(g, C.boxes_to_map([[0.05, 0.35, 0.75, 0.98]]))
    assert C.rasterize_box([-0.1, 0.2, 0.5, 1.0]) == [0, 44, 112, 224]
    assert C.boxes_to_map([[0.27, 1.0, 0.75, 1.0]]).sum() == 0     # y1 == y2: empty (as M1P1xla8rg0_000000)
    ann = {"a": {"file": "a", "bbox": [[0.5, 0.5, -2.88e16, 0.9]]}, "b": {"file": "b", "bbox": [[0, 0, 0.5, 0.5]]}}
    res = C.evaluate_maps({"a": _half_map(), "b": _half_map()}, ann, protocol="median")
    assert res["empty_gt"] == ["a"] and res["n"] == 2 and res["per_sample"]["a"] == 0.0


def test_constant_map_is_defined():
    g = C.boxes_to_map([[0, 0, 0.5, 1]])   # half of the image
    const = np.full((7, 7), 3.0)
    assert _ciou(_bin(_resize(const), "median"), g) == pytest.approx(0.5)    # whole image predicted
    assert _ciou(_bin(_resize(const), "abs0.5"), g) == 0.0                   # nothing predicted


def test_resize_variants_hand_worked():
    m = np.array([[1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(_resize(m, 4, align_corners=False)[0], [1, 0.75, 0.25, 0])
    np.testing.assert_allclose(_resize(m, 4, align_corners=True)[0], [1, 2 / 3, 1 / 3, 0])


def test_auc_ties_at_thresholds_against_trapezoid():
    s = [0.0, 0.15, 0.5, 0.5, 1.0]
    # official thresholds are 0.05*i, and 0.05*3 = 0.15000000000000002 > 0.15: that sample fails at t3
    succ = [1, .8, .8, .6, .6, .6, .6, .6, .6, .6, .6] + [.2] * 10
    res = C.summarize(s)
    assert res["auc"] == pytest.approx(0.44, abs=1e-12)
    assert res["auc"] == pytest.approx(np.trapezoid(succ, [0.05 * i for i in range(21)]), abs=1e-15)
    assert res["ciou@0.5"] == pytest.approx(0.6) and res["mean_ciou"] == pytest.approx(0.43)


def test_evaluate_bad_input():
    ann = {"a": {"file": "a", "bbox": [[0, 0, 0.5, 0.5]]}}
    with pytest.raises(C.UserError, match="NaN"):
        C.evaluate_maps({"a": np.full((7, 7), np.nan)}, ann)
    with pytest.raises(C.UserError, match="2-D"):
        C.evaluate_maps({"a": np.zeros((2, 7, 7))}, ann)
    with pytest.raises(C.UserError, match="no annotation"):
        C.evaluate_maps({"a": np.eye(7), "zz": np.eye(7)}, ann)
    with pytest.raises(C.UserError, match="no annotation"):
        C.evaluate_maps({"a": np.eye(7)}, ann, ids=["a", "zz"])
    res = C.evaluate_maps({"a": np.eye(7)}, dict(ann, b={"file": "b", "bbox": [[0, 0, 1, 1]]}), ids=["a", "b"])
    assert res["missing"] == ["b"] and res["n"] == 1 and res["n_listed"] == 2


def test_annotation_parsers_and_errors(tmp_path):
    xml = ("<annotation><file>1</file><object><bbox><annotator>1</annotator><xmin>0</xmin><ymin>0</ymin>"
           "<xmax>128</xmax><ymax>128</ymax></bbox></object><object><bbox><annotator>2</annotator><xmin>64</xmin>"
           "<ymin>64</ymin><xmax>192</xmax><ymax>192</ymax></bbox></object></annotation>")
    d = tmp_path / "xml"
    d.mkdir()
    (d / "10000130166.xml").write_text(xml)
    ann = C.load_annotations(d)
    e = ann["10000130166"]
    assert e["gt"] == "consensus" and e["bbox"][1] == [0.25, 0.25, 0.75, 0.75]
    g = C.gt_map(e)
    assert g[0, 0] == 0.5 and g[100, 100] == 1.0 and (g == 1).sum() == (int(224 * 128 / 256) - int(224 * 64 / 256)) ** 2
    (d / "bad.xml").write_text("<annotation><object><bbox><a/><xmin>x</xmin></bbox></object></annotation>")
    with pytest.raises(C.UserError, match="bad.xml"):
        C.load_annotations(d)
    (d / "bad.xml").write_text("<annotation><object>")
    with pytest.raises(C.UserError, match="malformed XML"):
        C.load_annotations(d)
    j = tmp_path / "a.json"
    j.write_text(json.dumps([{"file": "x", "class": "c", "bbox": [[0, 0, 1]]}]))
    with pytest.raises(C.UserError, match="entry 0"):
        C.load_annotations(j)
    j.write_text(json.dumps([{"file": "x", "bbox": [[0, 0, 1, 1]]}, {"file": "x", "bbox": []}]))
    with pytest.raises(C.UserError, match="duplicate"):
        C.load_annotations(j)


def test_eval_cli_end_to_end(tmp_path):
    ann = [{"file": "a", "class": "c", "bbox": [[0, 0, 0.5, 1.0]]}, {"file": "b", "class": "c", "bbox": [[0.5, 0, 1, 1]]},
           {"file": "c", "class": "c", "bbox": [[0, 0, 1, 1]]}]
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    left = np.zeros((14, 14))
    left[:, :7] = 1
    C.save_maps(tmp_path / "maps.npz", {"a": left, "b": left})
    (tmp_path / "test.txt").write_text("a\nb\nc\n")
    r = run_py("eval_cioU.py", "--pred", tmp_path / "maps.npz", "--gt", tmp_path / "ann.json", "--split",
               tmp_path / "test.txt", "--protocol", "abs0.5", "--baselines", "--json", tmp_path / "s.json",
               "--per-sample", tmp_path / "p.csv")
    assert "protocol=abs0.5" in r.stdout and "N evaluated 2 / listed 3" in r.stdout and "center" in r.stdout
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["missing"] == ["c"] and s["n"] == 2
    per = dict(line.split(",") for line in (tmp_path / "p.csv").read_text().split()[1:])
    assert float(per["a"]) == pytest.approx(1.0, abs=0.02) and float(per["b"]) == 0.0
    assert s["test"]["ciou@0.5"] == 0.5
    bad = run_py("eval_cioU.py", "--pred", tmp_path / "none.npz", "--gt", tmp_path / "ann.json", check=False)
    assert bad.returncode == 2 and "error: prediction file not found" in bad.stderr and "Traceback" not in bad.stderr


def test_class_aware_scores_hand_worked():
    # classes A (sounding, left half) and B (silent): A's map lights the left half, B's map is dark
    a = np.zeros((14, 14))
    a[:, :7] = 0.9
    a[:, 7:] = 0.1
    b = np.full((14, 14), 0.1)
    ciou_n, nsa = csol.class_aware_scores({"A": a, "B": b}, {"A": [[0, 0, 0.5, 1]]}, ["B"])
    assert ciou_n == pytest.approx(1.0, abs=0.03) and nsa == 1.0
    s = csol.summarize_class_aware([1.0, 0.2], [1.0, 0.5])
    assert s["ciou@0.3"] == 0.5 and s["nsa"] == 0.75


# ---------------------------------------------------------------------------------------------------------
# EZ-VSL
# ---------------------------------------------------------------------------------------------------------


def _unit(x, dim):
    return torch.nn.functional.normalize(x, dim=dim)


def test_ezvsl_loss_matches_equations_3_to_5():
    g = torch.Generator().manual_seed(0)
    v, a, tau = _unit(torch.randn(3, 4, 2, 2, generator=g), 1), _unit(torch.randn(3, 4, generator=g), 1), 0.1
    sim = lambda i, k: max(float(v[i, :, y, x] @ a[k]) for y in range(2) for x in range(2))  # noqa: E731
    L_a2v = L_v2a = 0.0
    for i in range(3):   # Eq. 3: audio i against every image k; Eq. 4: image i against every audio k
        L_a2v += -np.log(np.exp(sim(i, i) / tau) / sum(np.exp(sim(k, i) / tau) for k in range(3))) / 3
        L_v2a += -np.log(np.exp(sim(i, i) / tau) / sum(np.exp(sim(i, k) / tau) for k in range(3))) / 3
    assert ez_vsl.ezvsl_loss(v, a, tau).item() == pytest.approx(L_a2v + L_v2a, rel=1e-5)   # Eq. 5: summed


def test_ezvsl_max_over_locations():
    # image 0 matches audio 0 at exactly one location; the other locations are orthogonal to every audio
    v = torch.zeros(2, 3, 2, 2)
    v[0, 0, 1, 1] = 1
    v[0, 2, :, :] = 1
    v[0, 2, 1, 1] = 0
    v[1, 1] = 1
    a = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    logits = ez_vsl.mil_logits(v, a, 1.0)
    assert torch.equal(logits, torch.eye(2))          # the best location decides, not the mean over locations
    v2 = v.clone()
    v2[0, :, 1, 1], v2[0, :, 0, 0] = v[0, :, 0, 0], v[0, :, 1, 1]   # move the matching location
    assert ez_vsl.ezvsl_loss(v2, a, 0.1).item() == pytest.approx(ez_vsl.ezvsl_loss(v, a, 0.1).item())


def test_ogl_blend_hand_worked():
    avl = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])    # minmax -> 0, .25, .5, 1
    obj = torch.tensor([[[10.0, 0.0], [0.0, 0.0]]])   # minmax -> 1, 0, 0, 0
    out = ez_vsl.ogl_blend(avl, obj, alpha=0.4)       # 0.4*avl + 0.6*obj = .6, .1, .2, .4 -> minmax
    np.testing.assert_allclose(out[0].numpy(), [[1.0, 0.0], [0.2, 0.6]], atol=1e-6)


def test_ezvsl_official_checkpoint_format_round_trip(tmp_path):
    args = ez_vsl.build_parser().parse_args(["--eval"])
    ref = ez_vsl.EZVSL("resnet18", 512)
    torch.save({"model": {f"module.{k}": v for k, v in ref.state_dict().items()}}, tmp_path / "best.pth")
    model = ez_vsl.load_model(tmp_path / "best.pth", args, torch.device("cpu"))
    assert args.encoder == "resnet18" and args.image_size == 224
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    v, a = model(torch.zeros(1, 3, 224, 224), torch.zeros(1, 1, 257, 200))
    assert v.shape == (1, 512, 7, 7) and a.shape == (1, 512)


# ---------------------------------------------------------------------------------------------------------
# LVS
# ---------------------------------------------------------------------------------------------------------
def _lvs_args(*extra):
    return lvs.build_parser().parse_args(["--train", *extra])


def test_lvs_masks_and_P_N_on_a_hand_made_map():
    S_ii = torch.tensor([[0.9, 0.9, 0.5], [0.5, 0.2, 0.2], [0.2, 0.2, 0.2]])
    m_p, m_n = lvs.soft_masks(S_ii, 0.65, 0.4, 0.03)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    np.testing.assert_allclose(m_p[0].numpy(), [sig(0.25 / 0.03)] * 2 + [sig(-0.15 / 0.03)], rtol=1e-5)
    np.testing.assert_allclose(m_n[1, 0].item(), sig(0.1 / 0.03), rtol=1e-5)
    vals, wp = S_ii.numpy().ravel(), m_p.numpy().ravel()
    wn = 1 - m_n.numpy().ravel()
    assert lvs.masked_mean(m_p, S_ii).item() == pytest.approx((wp * vals).sum() / wp.sum(), rel=1e-5)
    assert lvs.masked_mean(1 - m_n, S_ii).item() == pytest.approx((wn * vals).sum() / wn.sum(), rel=1e-5)
    # with sharp masks: positive = mean of the two 0.9 pixels, hard negative = mean of the five 0.2 pixels
    m_p, m_n = lvs.soft_masks(S_ii, 0.65, 0.4, 1e-4)
    assert lvs.masked_mean(m_p, S_ii).item() == pytest.approx(0.9)
    assert lvs.masked_mean(1 - m_n, S_ii).item() == pytest.approx(0.2)


def test_lvs_trimap_ignores_the_band():
    def parts(band_value, trimap):
        S = torch.full((1, 1, 3, 3), 0.2)
        S[0, 0, 0, :2] = 0.9
        S[0, 0, 1, 0] = band_value                       # a pixel between eps_n = 0.4 and eps_p = 0.65
        m_p, m_n = lvs.soft_masks(S, 0.65, 0.4, 1e-4)
        logits = lvs.lvs_official_logits(S, m_p, m_n, trimap=trimap, temperature=1.0)
        return logits[0, 0].item(), logits[0, -1].item()  # P_i, hard negative
    assert parts(0.45, True) == pytest.approx(parts(0.6, True))        # the band moves neither P nor N
    assert parts(0.45, False)[1] != pytest.approx(parts(0.6, False)[1])   # without the tri-map it counts


def test_lvs_official_logit_layout():
    g = torch.Generator().manual_seed(1)
    V, A = _unit(torch.randn(2, 4, 3, 3, generator=g), 1), _unit(torch.randn(2, 4, generator=g), 1)
    S = lvs.similarity(V, A)
    m_p, m_n = lvs.soft_masks(S, 0.65, 0.4, 0.03)
    logits = lvs.lvs_official_logits(S, m_p, m_n, temperature=0.07)
    assert logits.shape == (2, 4)
    wmean = lambda w, s: float((w * s).sum() / w.sum())  # noqa: E731
    for i in range(2):
        assert logits[i, 0].item() * 0.07 == pytest.approx(wmean(m_p[i, i], S[i, i]), rel=1e-5)
        assert logits[i, 3].item() * 0.07 == pytest.approx(wmean(1 - m_n[i, i], S[i, i]), rel=1e-5)
        for k in range(2):
            e = wmean(m_p[i, k], S[i, k]) * (-99 if i == k else 1)
            assert logits[i, 1 + k].item() * 0.07 == pytest.approx(e, rel=1e-5)
    # S[n, k] is image n against audio k
    assert S[1, 0, 2, 2].item() == pytest.approx(float(V[1, :, 2, 2] @ A[0]))


def test_lvs_oracle_masks_give_the_section_3_3_loss():
    g = torch.Generator().manual_seed(2)
    V, A = _unit(torch.randn(3, 4, 2, 2, generator=g), 1), _unit(torch.randn(3, 4, generator=g), 1)
    S = lvs.similarity(V, A)
    m = torch.zeros(3, 3, 2, 2)
    m[:, :, 0, :] = 1                                   # oracle: the top row sounds
    loss = lvs.lvs_paper_loss(S, m, m).item()
    ref = 0.0
    for i in range(3):
        Sii = S[i, i].numpy()
        P = Sii[0].mean()
        N = Sii[1].mean() + sum(S[j, i].numpy().mean() for j in range(3) if j != i)   # S_{i->j} = S[j, i]
        ref += -np.log(np.exp(P) / (np.exp(P) + np.exp(N))) / 3
    assert loss == pytest.approx(ref, rel=1e-5)


def test_lvs_official_checkpoint_names_load(tmp_path):
    ref = lvs.AVENet("resnet18")
    sd = {}
    for k, v in ref.state_dict().items():                 # the authors' names: conv1_a for audio, extra stems
        net, rest = k.split(".", 1)
        sd[f"module.{net}.{rest.replace('conv1.', 'conv1_a.') if net == 'audnet' else rest}"] = v
    sd["module.imgnet.conv1_flow.weight"] = torch.zeros(64, 6, 7, 7)
    sd["module.audnet.conv1.weight"] = torch.zeros(64, 3, 7, 7)
    sd["module.imgnet.fc.weight"] = torch.zeros(1000, 512)
    torch.save({"model_state_dict": sd}, tmp_path / "lvs.pth.tar")
    args = lvs.build_parser().parse_args(["--eval"])
    model = lvs.load_model(tmp_path / "lvs.pth.tar", args, torch.device("cpu"))
    assert torch.equal(model.audnet.conv1.weight, ref.audnet.conv1.weight)
    V, A = model(torch.zeros(1, 3, 224, 224), torch.zeros(1, 1, 257, 200))
    assert V.shape == (1, 512, 14, 14) and A.shape == (1, 512)


# ---------------------------------------------------------------------------------------------------------
# data_prep.py on real-style inputs (videos made here with PyAV)
# ---------------------------------------------------------------------------------------------------------


def _bits_frame(k):
    """A 64x64 frame whose 2x4 grid of 16-px blocks spells the frame index k in binary (robust to compression)."""
    img = np.zeros((64, 64, 3), np.uint8)
    for b in range(8):
        if (k >> b) & 1:
            img[(b // 4) * 16 + 16:(b // 4) * 16 + 32, (b % 4) * 16:(b % 4) * 16 + 16] = 255
    return img


def _read_bits(img):
    a = np.asarray(img.convert("L").resize((64, 64)), float)
    return sum(1 << b for b in range(8) if a[(b // 4) * 16 + 20:(b // 4) * 16 + 28, (b % 4) * 16 + 4:(b % 4) * 16 + 12].mean() > 128)


def _make_video(path, fps, seconds, sr=None, layout="stereo", acodec="pcm_s16le"):
    import av
    from fractions import Fraction
    with av.open(str(path), "w") as c:
        vs = c.add_stream("mpeg4", rate=Fraction(fps).limit_denominator(1001))
        vs.width, vs.height, vs.pix_fmt = 64, 64, "yuv420p"
        vs.codec_context.qscale = 2
        if sr:
            st = c.add_stream(acodec, rate=sr)
            st.layout = layout
        for k in range(int(seconds * fps)):
            for pkt in vs.encode(av.VideoFrame.from_ndarray(_bits_frame(k), format="rgb24")):
                c.mux(pkt)
        for pkt in vs.encode():
            c.mux(pkt)
        if sr:
            nch = {"mono": 1, "stereo": 2, "5.1": 6}[layout]
            t = np.arange(int(seconds * sr)) / sr
            sig = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            fmt, step = ("fltp", 1024) if acodec == "aac" else ("s16p", 1000)
            for i in range(0, len(sig), step):
                chunk = np.repeat(sig[None, i:i + step], nch, 0)
                if fmt == "s16p":
                    chunk = (chunk * 32767).astype(np.int16)
                fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format=fmt, layout=layout)
                fr.sample_rate, fr.pts = sr, i
                for pkt in st.encode(fr):
                    c.mux(pkt)
            for pkt in st.encode():
                c.mux(pkt)


@pytest.fixture(scope="session")
def video_root(tmp_path_factory):
    src = tmp_path_factory.mktemp("videos")
    _make_video(src / "fps25_000010.mkv", 25, 3.0, 44100, "stereo")
    _make_video(src / "ntsc.mkv", 30000 / 1001, 3.0, 48000, "5.1")
    _make_video(src / "fps30.mp4", 30, 3.0, 44100, "stereo", acodec="aac")
    _make_video(src / "slow.mkv", 8, 3.0, 16000, "mono")
    _make_video(src / "silent.mkv", 25, 2.0, None)
    _make_video(src / "short.mkv", 25, 1.0, 16000, "mono")
    (src / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    out = tmp_path_factory.mktemp("prepared")
    data_prep.main(["videos", str(src), "--out", str(out), "--time", "1.3"])
    return src, out


def test_data_prep_videos_frame_by_timestamp_and_audio(video_root):
    src, out = video_root
    rows = data_prep.read_manifest(out)
    for vid, fps in (("fps25_000010", 25), ("ntsc", 30000 / 1001), ("fps30", 30), ("slow", 8)):
        assert rows[vid]["status"] == "ok", rows[vid]
        k = _read_bits(C.load_image(out / "frames" / f"{vid}.jpg"))
        assert k == int(np.floor(1.3 * fps)), (vid, k)          # the frame on screen at t = 1.3 s
        assert abs(float(rows[vid]["fps"]) - fps) < 0.01
        x, sr = C.read_wav(out / "audio" / f"{vid}.wav")
        assert sr == 16000 and abs(len(x) - 48000) <= 1600       # the whole 3 s track at 16 kHz
        spec = np.abs(np.fft.rfft(x[4000:20000]))
        assert abs(np.argmax(spec) * 16000 / 16000 - 440) <= 2    # the 440 Hz tone survives down-mix + resampling
        assert 0.3 < np.abs(x[4000:20000]).max() < 0.7
    assert rows["fps25_000010"]["src_sr"] == "44100" and rows["ntsc"]["src_sr"] == "48000"


def test_data_prep_manifest_reasons_and_resume(video_root, capsys):
    src, out = video_root
    rows = data_prep.read_manifest(out)
    assert rows["silent"]["status"] == "failed" and rows["silent"]["reason"] == "no audio stream"
    assert rows["short"]["status"] == "failed" and rows["short"]["reason"].startswith("shorter")
    assert rows["corrupt"]["status"] == "failed" and rows["corrupt"]["reason"].startswith("cannot open")
    assert not (out / "frames" / "silent.jpg").exists() and not (out / "audio" / "corrupt.wav").exists()
    assert not list(out.rglob("*.part"))
    assert sorted(C.read_split(out / "splits" / "all.txt")) == ["fps25_000010", "fps30", "ntsc", "slow"]
    before = (out / "frames" / "ntsc.jpg").stat().st_mtime_ns
    data_prep.main(["videos", str(src), "--out", str(out), "--time", "1.3"])
    assert "4 already done, 3 to process" in capsys.readouterr().out
    assert (out / "frames" / "ntsc.jpg").stat().st_mtime_ns == before


def test_data_prep_flickr_and_vggss_feed_the_evaluator(tmp_path):
    src = tmp_path / "flickr"
    (src / "Annotations").mkdir(parents=True)
    (src / "Data" / "3").mkdir(parents=True)
    box = "<bbox><annotator>{a}</annotator><xmin>{x}</xmin><ymin>0</ymin><xmax>{x2}</xmax><ymax>128</ymax></bbox>"
    for vid in ("100", "101", "3908875357"):
        xml = "<annotation>" + "".join(f"<object>{box.format(a=a, x=0, x2=128)}</object>" for a in (1, 2)) + "</annotation>"
        (src / "Annotations" / f"{vid}.xml").write_text(xml)
    for vid in ("100", "101"):
        from PIL import Image
        Image.fromarray(np.full((80, 80, 3), 128, np.uint8)).save(src / "Data" / "3" / f"{vid}.jpg")
        data_prep.write_wav(src / "Data" / "3" / f"{vid}.wav", 0.1 * np.sin(np.arange(22050) / 5), 22050)
    out = tmp_path / "root"
    (src / "Data" / "dup").mkdir()
    (src / "Data" / "dup" / "100.jpg").write_bytes((src / "Data" / "3" / "100.jpg").read_bytes())
    with pytest.raises(C.UserError, match="1 ids name more than one file"):    # refused before anything is written
        data_prep.main(["flickr", str(src), "--out", str(out)])
    assert not out.exists()
    shutil.rmtree(src / "Data" / "dup")
    data_prep.main(["flickr", str(src), "--out", str(out)])
    rows = data_prep.read_manifest(out)
    assert rows["3908875357"]["status"] == "missing" and rows["100"]["status"] == "ok"
    assert C.read_split(out / "splits" / "flickr_test.txt") == ["100", "101"]
    assert C.read_wav(out / "audio" / "100.wav")[1] == 16000
    ann = C.load_annotations(out / "annotations.json")
    g = C.gt_map(ann["100"])
    assert ann["100"]["gt"] == "consensus" and g.max() == 1.0 and g.sum() == 112 * 112   # both annotators agree
    # VGG-SS: ids from a vggss.json excerpt, two of three clips present
    vj = tmp_path / "vggss.json"
    vj.write_text(json.dumps([{"file": "100", "class": "x", "bbox": [[0, 0, 0.5, 0.5]]},
                              {"file": "101", "class": "y", "bbox": [[0.1, 0.2, 0.3, -2.88e16]]},
                              {"file": "zzz_000000", "class": "z", "bbox": [[0, 0, 1, 1]]}]))
    data_prep.main(["vggss", "--json", str(vj), "--clips", str(out)])
    assert C.read_split(out / "splits" / "vggss_test.txt") == ["100", "101"]
    assert C.read_split(out / "splits" / "vggss_test.missing.txt") == ["zzz_000000"]
    ann = C.load_annotations(out / "annotations.json")
    assert ann["100"].get("gt", "union") == "union" and C.gt_map(ann["101"]).sum() == 0


# ---------------------------------------------------------------------------------------------------------
# Method command lines: determinism, resume, eval outputs, predict (tiny runs on the tiny dataset)
# ---------------------------------------------------------------------------------------------------------
METHODS = {"ez_vsl.py": ez_vsl, "lvs_hardway.py": lvs, "sspl.py": sspl}   # csol: its own test (two stages)


def _quick(tiny, out, *extra):
    return ["--train", "--data", str(tiny), "--preset", "cpu", "--batch-size", "8", "--max-steps", "2",
            "--out", str(out), *extra]


def _weights(run_dir):
    return torch.load(Path(run_dir) / "last.pt", weights_only=False)["model"]


@pytest.mark.parametrize("script", list(METHODS))
def test_same_seed_same_result_and_exact_resume(script, tiny, tmp_path):
    mod = METHODS[script]
    for name, epochs in (("a", "2"), ("b", "2"), ("c", "1")):
        mod.main(_quick(tiny, tmp_path / name, "--epochs", epochs, "--seed", "3"))
    run = {n: next((tmp_path / n).iterdir()) for n in "abc"}
    mod.main(_quick(tiny, tmp_path / "c", "--epochs", "2", "--seed", "3", "--resume", str(run["c"] / "last.pt")))
    wa, wb, wc = _weights(run["a"]), _weights(run["b"]), _weights(run["c"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)            # same seed -> same weights on CPU
    assert all(torch.equal(wa[k], wc[k]) for k in wa)            # 1 epoch + resume == 2 epochs
    assert torch.load(run["c"] / "last.pt", weights_only=False)["epoch"] == 2
    res = json.loads((run["a"] / "results.json").read_text())
    for key in ("method", "data", "split", "protocol", "n", "seconds", "test", "baselines", "audio_swapped"):
        assert key in res
    assert set(res["test"]) == {"ciou@0.5", "auc", "mean_ciou"} and "center" in res["baselines"]
    assert {"args.json", "log.txt", "best.pt", "last.pt"} <= {p.name for p in run["a"].iterdir()}


@pytest.mark.parametrize("script", list(METHODS))
def test_eval_maps_viz_and_predict(script, tiny, tmp_path):
    mod = METHODS[script]
    mod.main(_quick(tiny, tmp_path / "run", "--epochs", "1"))
    run = next((tmp_path / "run").iterdir())
    r = run_py(script, "--eval", "--ckpt", run / "best.pt", "--data", tiny, "--save-maps", tmp_path / "maps.npz",
               "--viz", "2", "--out", tmp_path / "ev", "--protocol", "abs0.5")
    assert "protocol=abs0.5" in r.stdout and "N evaluated 8 / listed 8" in r.stdout
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert len(list((tmp_path / "ev" / "viz").glob("*.png"))) == 2
    run_py("eval_cioU.py", "--pred", tmp_path / "maps.npz", "--gt", tiny / "annotations.json", "--split",
                tiny / "splits" / "test.txt", "--protocol", "abs0.5", "--json", tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text())["test"] == pytest.approx(res["test"])
    ids = C.read_split(tiny / "splits" / "test.txt")
    run_py(script, "--predict", "--ckpt", run / "best.pt", "--image", tiny / "frames" / f"{ids[0]}.jpg",
           "--audio", tiny / "audio" / f"{ids[0]}.wav", "--out", tmp_path / "heat.png")
    from PIL import Image
    assert Image.open(tmp_path / "heat.png").size[0] == 3 * Image.open(tmp_path / "heat.png").size[1]


@pytest.mark.parametrize("script", list(METHODS))
def test_clear_errors_not_tracebacks(script, tiny, tmp_path):
    # the paper preset (real data's default) needs ImageNet weights, which cannot be downloaded here
    r = run_py(script, "--train", "--data", tiny, "--preset", "paper", "--out", tmp_path, "--batch-size", "8", check=False,
               env_extra={"TORCH_HOME": str(tmp_path / "th"), "https_proxy": "http://127.0.0.1:9",
                          "HTTPS_PROXY": "http://127.0.0.1:9"})
    assert r.returncode == 2 and "--no-pretrained" in r.stderr and "Traceback" not in r.stderr
    r = run_py(script, "--eval", "--ckpt", tmp_path / "none.pt", "--data", tiny, check=False)
    assert r.returncode == 2 and "checkpoint not found" in r.stderr


@pytest.fixture(scope="session")
def learn_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("learn")
    data_prep.make_synthetic(root, n_classes=4, log=lambda *a: None,
                             sizes=dict(train=480, val=64, test=64, cocktail_train=256, cocktail_val=16, cocktail_test=32))
    return root


# The learning runs. Each learns with margin on every numerical path: every assertion below held with its margin
# under ATEN_CPU_CAPABILITY=default and avx2, 1 and 2 threads, seeds 0-4 (counts in the commit message). A run that
# already learns in its first epoch shows no rise from its first validation, so "the validation score goes up" is
# measured from the untrained model: the same run for one step at lr 1e-12.
LEARN = {
    # tau 0.1: from scratch with tau 0.03 (official) the AVL map starts on the background and leaves it at an epoch that
    # depends on the seed and the kernel path (the failure on AVX-512). lr 5e-3 and 6 epochs: the loss leaves chance
    # (2 log 16) after a number of steps that depends on the draw; with the preset's lr 2e-3 it stayed there for all of
    # 4 epochs on one draw (seed 3, default path, two threads), with lr 5e-3 and 4 epochs another draw (seed 4) beat
    # the centred prior by only 0.125; batch 8 did worse (3 of 14 draws below the prior's margin)
    "ez_vsl.py": ["--epochs", "6", "--batch-size", "16", "--lr", "5e-3", "--tau", "0.1"],
    "lvs_hardway.py": ["--epochs", "4", "--batch-size", "32", "--lr", "1e-3"],
    "sspl.py": ["--epochs", "5", "--batch-size", "32"],
}


# EZ-VSL's draws above were measured with its 7x7 small encoder; the cpu preset's 14x14 one learns the styled worlds
# in 12 epochs (README), but in 4 it beat the centred prior by 0.125 (seed 0, avx2) and 0.0 (seed 3, default, two
# threads; lr 2e-3), and at lr 5e-3 it stayed near chance on that draw
LEARN_PRESET = {"ez_vsl.py": {"encoder": "small"}}


def _learned(script, learn_root, out, *extra):
    """Train on learn_root (cpu preset + LEARN_PRESET + LEARN[script] + extra) -> (run folder, history, results)."""
    from unittest import mock
    with mock.patch.dict(METHODS[script].PRESETS["cpu"], LEARN_PRESET.get(script, {})):
        METHODS[script].main(["--train", "--data", str(learn_root), "--preset", "cpu", *LEARN[script], *extra,
                              "--out", str(out)])
    run = next(Path(out).iterdir())
    return run, torch.load(run / "last.pt", weights_only=False)["history"], json.loads((run / "results.json").read_text())


def _untrained_val(script, learn_root, out) -> float:
    extra = ["--lr-head", "1e-12"] if script == "sspl.py" else []
    return _learned(script, learn_root, out, "--epochs", "1", "--max-steps", "1", "--lr", "1e-12", *extra)[1][0]["val"]


@pytest.fixture(scope="session")
def trained_lvs_run(learn_root, tmp_path_factory):
    """LVS trained once on learn_root (the learning test; the video test reuses it)."""
    return _learned("lvs_hardway.py", learn_root, tmp_path_factory.mktemp("lvs_learned"))


@pytest.mark.parametrize("script", ["ez_vsl.py", "lvs_hardway.py"])
def test_short_synthetic_run_learns_and_uses_the_sound(script, learn_root, tmp_path, request):
    run, hist, res = (request.getfixturevalue("trained_lvs_run") if script == "lvs_hardway.py"
                      else _learned(script, learn_root, tmp_path / "run"))
    start = _untrained_val(script, learn_root, tmp_path / "untrained")["mean_ciou"]
    assert max(h["val"]["mean_ciou"] for h in hist) > start + 0.08, (start, hist)     # the validation score goes up
    # it uses the sound (by 0.05; LVS by any margin) and EZ-VSL beats the centred prior. LVS's 4-epoch run does not
    # beat the prior on every draw (seed 3 settles below it on both paths, 0.03 above the swapped audio), so it is not
    # asserted for LVS
    gap = 0.05 if script == "ez_vsl.py" else 0.0
    assert res["test"]["mean_ciou"] > res["audio_swapped"]["mean_ciou"] + gap, res
    if script == "ez_vsl.py":
        assert res["test"]["ciou@0.5"] > res["baselines"]["center"]["ciou@0.5"] + 0.15, res


# ---------------------------------------------------------------------------------------------------------
# SSPL
# ---------------------------------------------------------------------------------------------------------
def test_sspl_attention_module_hand_worked():
    V = torch.tensor([[[[3.0, 0.0]], [[4.0, 2.0]]]])        # (1, c=2, 1, 2): locations (3, 4) and (0, 2)
    fa = torch.tensor([[0.0, 1.0]])
    f_av, S, S_t = sspl.attention(V, fa)
    np.testing.assert_allclose(S[0, 0].numpy(), [0.8, 1.0], atol=1e-6)          # Eq. 3: cosines 4/5 and 2/2
    np.testing.assert_allclose(S_t[0, 0].numpy(), [0.0, 1.0], atol=1e-6)        # Eq. 5: min-max
    np.testing.assert_allclose(f_av[0].numpy(), [0.0, 2.0], atol=1e-5)          # Eq. 4: 0*(3,4) + 1*(0,2)


def test_sspl_loss_and_stop_gradient():
    torch.manual_seed(0)
    head = sspl.SimSiamHead(8, 16, 4)
    f1, f2 = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    loss = sspl.sspl_loss(head, f1, f2)
    z1, z2 = head.projector(f1), head.projector(f2)
    p1, p2 = head.predictor(z1), head.predictor(z2)
    cos = torch.nn.functional.cosine_similarity
    assert loss.item() == pytest.approx((-0.5 * cos(p1, z2).mean() - 0.5 * cos(p2, z1).mean()).item(), rel=1e-5)
    z = torch.randn(6, 16, requires_grad=True)
    sspl.ncs(torch.randn(6, 16, requires_grad=True), z).backward()
    assert z.grad is None                                  # SG(z): no gradient reaches z
    # the gradient reaching view 2 comes only through its own prediction p2 (z2 is a constant for p1's term)
    g_full = torch.autograd.grad(loss, f2, retain_graph=True)[0]
    g_p2 = torch.autograd.grad(-0.5 * cos(head.predictor(head.projector(f2)), z1.detach()).mean(), f2)[0]
    torch.testing.assert_close(g_full, g_p2)


def test_pcm_shapes_per_cycle_bn_parameter_count_and_gradients():
    pcm = sspl.PCM(512, 128, cycles=4)
    assert sum(p.numel() for p in pcm.parameters()) == 9_859_712          # the official PCNet count
    small = sspl.PCM(16, 8, cycles=3)
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[-2:])))
             for m in (small.feedback[1], small.feedback[2], small.feedforward[1], small.feedforward[2])]
    f_a = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    out = small(torch.randn(4, 16, 14, 14), f_a)
    for h in hooks:
        h.remove()
    assert out.shape == (4, 16, 14, 14)
    assert set(sizes) == {(3, 3), (7, 7), (14, 14)}                         # r1 3x3, r2 7x7, r3 14x14
    assert all(bn.num_batches_tracked.item() == 1 for bn in list(small.bn_pred) + list(small.bn_err))  # one BN per cycle
    out.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in list(small.a) + list(small.b))
    small.eval()
    for T in (1, 3, 6):                                                     # test-time cycles differ from training
        assert small(torch.randn(2, 16, 14, 14), f_a[:2], cycles=T).shape == (2, 16, 14, 14)
    fresh = sspl.PCM(16, 8, cycles=3)
    fresh.load_state_dict(small.state_dict())                               # same keys whatever T is used at test


# ---------------------------------------------------------------------------------------------------------
# CSOL
# ---------------------------------------------------------------------------------------------------------
def _csol_identity_net(c=3, K=2):
    net = csol.LocationNet("small", K)
    net.conv_v, net.fc_a = torch.nn.Identity(), torch.nn.Identity()
    return net


def test_csol_eq1_eq2_on_tiny_tensors():
    net = _csol_identity_net()
    v = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[0.0, 0.0]]]])          # (1, 3, 1, 2): e1 and e2
    a = torch.tensor([[1.0, 0.0, 0.0]])
    l = net.loc_map(v, a)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    np.testing.assert_allclose(l[0, 0].detach().numpy(), [sig(5.0), sig(0.0)], rtol=1e-6)   # Eq. 1, w = 5
    v2 = torch.cat([v, v.flip(-1)])                                          # image 1 has the match on the right
    a2 = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    loss = csol.stage1_loc_loss(net, v2, a2).item()
    # positives: GMP of own pair = sig(5) for both; negatives (audio i, image i-1): a0 vs v1 -> sig(5), a1 vs v0 -> sig(5)
    ref = -(2 * np.log(sig(5.0)) + 2 * np.log(1 - sig(5.0))) / 4
    assert loss == pytest.approx(ref, rel=1e-5)


def test_csol_masked_object_pooling():
    v = torch.arange(2 * 25, dtype=torch.float32).view(1, 2, 5, 5)
    l = torch.zeros(1, 5, 5)
    l[0, 2, 2] = 0.9                                                         # one interior pixel above 0.05
    o = csol.object_features(v, l, 0.05, "official")
    cross = [(2, 2), (1, 2), (3, 2), (2, 1), (2, 3)]                         # dilated by the 4-neighbour cross
    ref = [sum(v[0, c, y, x].item() for y, x in cross) / 25 for c in range(2)]
    np.testing.assert_allclose(o[0].numpy(), ref, rtol=1e-6)
    l2 = torch.zeros(1, 5, 5)
    l2[0, 0, 0] = 0.9                                                        # border pixels do not spread
    np.testing.assert_allclose(csol.object_features(v, l2)[0].numpy(), [v[0, c, 0, 0].item() / 25 for c in range(2)])
    lp = torch.rand(1, 5, 5)
    ref = (v * lp[:, None]).sum((2, 3)) / lp.sum()
    torch.testing.assert_close(csol.object_features(v, lp, pool="paper"), ref)   # Eq. 3


def test_csol_too_few_clusters_fail_before_training(tiny, tmp_path):
    ann = {e["file"]: e["class"] for e in json.loads((tiny / "annotations.json").read_text())}
    ids = C.read_split(tiny / "splits" / "train.txt") + C.read_split(tiny / "splits" / "val.txt")
    n = len({ann[i] for i in ids})
    with pytest.raises(C.UserError, match=f"K = {n - 1} clusters cannot cover the {n} classes"):
        csol.main(["--train", "--data", str(tiny), "--preset", "cpu", "--clusters", str(n - 1), "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())                              # refused before the run folder exists


def test_csol_dictionary_from_known_clusters():
    rng = np.random.default_rng(0)
    centers = np.array([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
    truth = np.repeat([0, 1, 2], 20)
    feats = centers[truth] + rng.normal(0, 0.3, (60, 3))
    D, labels, _ = csol.build_dictionary(feats, 3, seed=0)
    assert csol.nmi_score(truth, labels) == pytest.approx(1.0)
    for k in range(3):
        np.testing.assert_allclose(D[k], feats[labels == k].mean(0), rtol=1e-5)
        assert np.linalg.norm(D[k] - centers[truth[labels == k][0]]) < 0.3


def test_csol_hungarian_matches_brute_force():
    import itertools
    # P(cluster | class): cluster 0 is everyone's favourite, so per-cluster argmax would leave class 2 empty
    L = np.array([[0.6, 0.3, 0.1, 0.0],
                  [0.5, 0.1, 0.0, 0.4],
                  [0.4, 0.0, 0.35, 0.25]])
    assign = csol.hungarian_assign(L)
    score = lambda a: sum(L[a[j], j] for j in range(4))  # noqa: E731
    best = max((a for a in itertools.product(range(3), repeat=4) if set(a) == {0, 1, 2}), key=score)
    assert set(assign) == {0, 1, 2}
    assert score(assign) == pytest.approx(score(best))
    with pytest.raises(C.UserError):
        csol.hungarian_assign(L[:, :2])


def test_csol_eq7_to_11_with_a_silent_class():
    net = _csol_identity_net(K=2)
    net.D = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])                         # keys of class A and class B
    v = torch.tensor([[[[2.0, 0.0]], [[0.0, 3.0]], [[0.0, 0.0]]]])           # A at the left pixel, B at the right
    l = torch.tensor([[[1.0, 0.0]]])                                         # only the left pixel sounds (B silent)
    s = csol.class_maps(net, v, l, affine=False)
    np.testing.assert_allclose(s[0, :, 0].numpy(), [[2.0, 0.0], [0.0, 0.0]])  # Eq. 7-8: B is suppressed by l
    a_logits = torch.tensor([[1.0, -1.0]])
    pv = torch.softmax(torch.tensor([1.0, 0.0]), 0)                          # Eq. 9: GAP over 2 pixels -> (1, 0)
    pa = torch.softmax(a_logits[0], 0)                                       # Eq. 10
    kl_paper = float((pv * (pv / pa).log()).sum())
    kl_official = float((pa * (pa / pv).log()).sum() / 2)                    # reversed, mean over the K elements
    assert csol.kl_consistency(s, a_logits, "paper").item() == pytest.approx(kl_paper, rel=1e-5)
    assert csol.kl_consistency(s, a_logits, "official").item() == pytest.approx(kl_official, rel=1e-5)
    S = csol.final_maps(s, 1.0)                                              # Eq. 13: softmax over classes per pixel
    np.testing.assert_allclose(S[0, :, 0, 0].numpy(), torch.softmax(torch.tensor([2.0, 0.0]), 0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(S.sum(1).numpy(), 1.0, rtol=1e-6)


def test_sspl_short_run_learns_and_does_not_collapse(learn_root, tmp_path):
    """What holds on every numerical path: the validation score rises from the untrained model's and f_av does not
    collapse. Whether a short run uses the sound (beats the audio-swapped control) depends on the path and the seed
    (it failed on 1 of the first 6 draws measured): SSPL has no negatives, and the README's demo row says so."""
    run, hist, res = _learned("sspl.py", learn_root, tmp_path / "run")
    start = _untrained_val("sspl.py", learn_root, tmp_path / "untrained")["mean_ciou"]
    assert max(h["val"]["mean_ciou"] for h in hist) > start + 0.05, (start, hist)
    assert min(h["f_av_std"] for h in hist) > 0.5 / np.sqrt(64), hist      # no collapse of f_av (1/sqrt(c) if spread)


def test_csol_two_stage_run_beats_random_class_assignment(learn_root, tmp_path):
    csol.main(["--train", "--data", str(learn_root), "--preset", "cpu", "--clusters", "4", "--epochs", "4",
               "--epochs2", "3", "--out", str(tmp_path)])
    run = next(tmp_path.iterdir())
    res = json.loads((run / "results.json").read_text())
    ca = res["class_aware"]
    assert ca["n"] == 32 and ca["nmi"] > 0.3, ca
    assert ca["test"]["mean_ciou"] > ca["random_assignment"]["mean_ciou"] + 0.05, ca
    assert {"stage1.pt", "stage1_best.pt", "stage2.pt"} <= {p.name for p in run.iterdir()}


def test_sspl_test_time_pcm_cycles(tiny, tmp_path):
    sspl.main(_quick(tiny, tmp_path / "run", "--epochs", "1"))
    ck = next((tmp_path / "run").iterdir()) / "best.pt"
    for T in ("1", "4"):                                   # trained with 2 cycles (cpu preset), tested with T
        run_py("sspl.py", "--eval", "--ckpt", ck, "--data", tiny, "--pcm-cycles", T, "--out", tmp_path / T)
        assert json.loads((tmp_path / T / "results.json").read_text())["pcm_cycles_test"] == int(T)


def test_csol_cli_stages_eval_predict_and_torchrun_refusal(tiny, tmp_path):
    csol.main(["--train", "--data", str(tiny), "--preset", "cpu", "--epochs", "2", "--epochs2", "1", "--max-steps", "2",
               "--batch-size", "8", "--out", str(tmp_path / "a"), "--stage", "1"])
    run1 = next((tmp_path / "a").iterdir())
    assert {"stage1.pt", "stage1_best.pt", "results.json"} <= {p.name for p in run1.iterdir()}
    csol.main(["--train", "--data", str(tiny), "--preset", "cpu", "--epochs2", "1", "--max-steps", "2",
               "--batch-size", "8", "--out", str(tmp_path / "b"), "--stage", "2", "--ckpt", str(run1)])
    run2 = next((tmp_path / "b").iterdir())
    res = json.loads((run2 / "results.json").read_text())
    assert res["stage"] == 2 and "class_aware" in res and res["protocol"] == "rel0.1"
    ids = C.read_split(tiny / "splits" / "test.txt")
    for ck in (run2 / "stage2.pt", run2, run1):              # a run folder: its stage2.pt, else its stage1.pt
        run_py("csol_classaware.py", "--predict", "--ckpt", ck, "--image", tiny / "frames" / f"{ids[0]}.jpg",
               "--audio", tiny / "audio" / f"{ids[0]}.wav", "--out", tmp_path / "heat.png")
        assert (tmp_path / "heat.png").is_file()
        (tmp_path / "heat.png").unlink()
    r = run_py("csol_classaware.py", "--train", "--data", tiny, check=False, env_extra={"WORLD_SIZE": "2"})
    assert r.returncode == 2 and "torchrun" in r.stderr


def test_ezvsl_object_prior_from_local_weights(tmp_path):
    import torchvision
    ref = torchvision.models.resnet18(weights=None).eval()
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f = torch.nn.Sequential(*list(ref.children())[:-2])(img)            # torchvision's own layer4 map
        l1 = ez_vsl.ObjectPrior("l1", str(tmp_path / "r18.pth"))(img)
        cls = ez_vsl.ObjectPrior("cls", str(tmp_path / "r18.pth"))(img)
        post = torch.softmax(torch.einsum("bchw,oc->bohw", f, ref.fc.weight) + ref.fc.bias[:, None, None], 1)
    torch.testing.assert_close(l1, f.abs().mean(1))                         # Eq. 8 (official: mean |v'|)
    torch.testing.assert_close(cls, post.amax(1))                           # Eq. 7: max class posterior


def test_csol_resume_within_and_across_stages(tiny, tmp_path):
    base = ["--train", "--data", str(tiny), "--preset", "cpu", "--max-steps", "2", "--batch-size", "8", "--seed", "1"]
    csol.main(base + ["--epochs", "2", "--epochs2", "2", "--out", str(tmp_path / "a")])
    csol.main(base + ["--epochs", "1", "--stage", "1", "--out", str(tmp_path / "b")])
    rb = next((tmp_path / "b").iterdir())
    csol.main(base + ["--epochs", "2", "--stage", "1", "--resume", str(rb)])            # finish stage one
    csol.main(base + ["--epochs", "2", "--epochs2", "2", "--resume", str(rb)])          # then stage two
    ra = next((tmp_path / "a").iterdir())
    for f in ("stage1.pt", "stage2.pt"):
        wa, wb = (torch.load(r / f, weights_only=False)["model"] for r in (ra, rb))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f


def _write_audio_file(path, sr=22050, seconds=1.0, codec="flac"):
    import av
    t = np.arange(int(sr * seconds)) / sr
    sig = (0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)[None]
    with av.open(str(path), "w") as c:
        st = c.add_stream(codec, rate=sr)
        st.layout = "mono"
        fr = av.AudioFrame.from_ndarray(sig, format="s16", layout="mono")
        fr.sample_rate, fr.pts = sr, 0
        for pkt in list(st.encode(fr)) + list(st.encode()):
            c.mux(pkt)


def test_data_prep_audio_only_and_frames_subcommand(tmp_path):
    from PIL import Image
    src = tmp_path / "src"
    (src / "frames").mkdir(parents=True)
    (src / "sound").mkdir()
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(src / "frames" / "x1.png")
    _write_audio_file(src / "sound" / "x1.flac")
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(src / "frames" / "x2.jpg")   # no audio for x2
    _write_audio_file(src / "sound" / "x3.flac")                                        # no frame for x3
    (src / "frames" / "x4.jpg").write_bytes(b"not a jpeg")
    _write_audio_file(src / "sound" / "x4.flac")
    out = tmp_path / "out"
    data_prep.main(["frames", str(src), "--out", str(out)])
    rows = data_prep.read_manifest(out)
    assert rows["x1"]["status"] == "ok" and rows["x1"]["src_sr"] == "22050"
    assert (rows["x2"]["status"], rows["x2"]["reason"]) == ("missing", "no audio")
    assert (rows["x3"]["status"], rows["x3"]["reason"]) == ("missing", "no frame")
    assert rows["x4"]["status"] == "failed" and "cannot decode image" in rows["x4"]["reason"]
    x, sr = C.read_wav(out / "audio" / "x1.wav")
    assert sr == 16000 and abs(len(x) - 16000) <= 200
    assert C.load_image(out / "frames" / "x1.jpg").size == (60, 40)
    vids = tmp_path / "vids"
    vids.mkdir()
    _write_audio_file(vids / "audio_only.mkv", codec="pcm_s16le")
    with pytest.raises(C.UserError, match="no clip could be prepared"):                 # 0 clips: an error
        data_prep.main(["videos", str(vids), "--out", str(tmp_path / "o2")])
    r = data_prep.read_manifest(tmp_path / "o2")["audio_only"]
    assert r["status"] == "failed" and r["reason"] == "no video stream"


# ===== issue 11B: benchmark =====
ALL_METHODS = {**METHODS, "csol_classaware.py": csol}


@pytest.mark.parametrize("script", list(ALL_METHODS))
def test_benchmark_writes_every_key_and_runs_each_phase(script, tiny, tmp_path, monkeypatch, capsys):
    mod, seen, calls = ALL_METHODS[script], [], {"to_device": 0, "step": 0}
    make_dataset, to_device, step = mod.make_dataset, mod.batch_to_device, mod.train_step

    def counting_dataset(args, split, train):
        seen.append(args.decode)
        return make_dataset(args, split, train)

    def counting_to_device(*a):
        calls["to_device"] += 1
        return to_device(*a)

    def counting_step(*a):
        calls["step"] += 1
        return step(*a)
    monkeypatch.setattr(mod, "make_dataset", counting_dataset)
    monkeypatch.setattr(mod, "batch_to_device", counting_to_device)
    monkeypatch.setattr(mod, "train_step", counting_step)
    out = mod.main(["--benchmark", "--data", str(tiny), "--preset", "cpu", "--batch-size", "4", "--steps", "3",
                    "--out", str(tmp_path)])
    run = next(tmp_path.iterdir())
    b = json.loads((run / "benchmark.json").read_text())
    assert b == out and b["method"] == script[:-3]
    for k in ("loader_samples_per_s", "model_samples_per_s", "train_samples_per_s", "peak_memory_mb"):
        assert isinstance(b[k], float) and b[k] > 0, (k, b)
    assert (b["device"], b["batch_size"], b["workers"], b["amp"], b["compile"], b["image_size"], b["preset"],
            b["decode"], b["steps"]) == ("cpu", 4, 0, False, False, 112, "cpu", "fast", 3)
    assert b["torch"] == torch.__version__ and b["date"].startswith("20")
    # the loader alone, the model alone, then end to end (a fresh loader); 2 warm-up + 3 steps each
    assert seen == ["fast", "fast"]
    assert calls == {"to_device": 2 * 5, "step": 2 * 5}
    assert not list(run.glob("*.pt"))                                      # never a checkpoint
    phases = [ln.split()[1] for ln in capsys.readouterr().out.splitlines() if ln.startswith("benchmark: ")]
    assert phases[:3] == ["loader_samples_per_s", "model_samples_per_s", "train_samples_per_s"]  # said as it starts


def test_benchmark_refuses_several_processes(tiny, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(C.UserError, match="one process"):
        ez_vsl.main(["--benchmark", "--data", str(tiny), "--preset", "cpu"])


def test_copied_method_trains_on_given_data_and_needs_data_prep_only_for_the_synthetic_default(tiny, tmp_path):
    import shutil
    work = tmp_path / "elsewhere"
    work.mkdir()
    for f in ("ez_vsl.py", "common.py"):
        shutil.copy(HERE / f, work / f)
    env = {"PYTHONPATH": "", "AVSL_SYNTH": str(tmp_path / "synth")}
    r = run_py(work / "ez_vsl.py", "--train", "--out", tmp_path / "runs", cwd=work, check=False, env_extra=env)
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(errors) == 1 and errors[0].startswith("error:"), r.stderr
    assert "data_prep.py" in errors[0] and not (tmp_path / "synth").exists()
    run_py(work / "ez_vsl.py", *_quick(tiny, tmp_path / "runs", "--epochs", "1", "--no-pretrained"), cwd=work,
           env_extra=env)
    run = next((tmp_path / "runs").iterdir())
    assert {"last.pt", "best.pt", "results.json"} <= {p.name for p in run.iterdir()}
    vid = C.read_split(tiny / "splits" / "test.txt")[0]   # the pictures are drawn by data_prep.py: said before any work
    for what, cmd in (("--viz", ["--eval", "--ckpt", run, "--data", tiny, "--viz", "2", "--out", tmp_path / "ev"]),
                      ("--predict", ["--predict", "--ckpt", run, "--image", tiny / "frames" / f"{vid}.jpg", "--audio",
                                     tiny / "audio" / f"{vid}.wav", "--out", tmp_path / "heat.png"])):
        r = run_py(work / "ez_vsl.py", *cmd, cwd=work, check=False, env_extra=env)
        assert r.returncode == 2 and [ln for ln in r.stderr.splitlines() if ln.strip()] == [
            f"error: {what} needs data_prep.py beside common.py (No module named 'data_prep')"], r.stderr
    assert not (tmp_path / "ev").exists() and not (tmp_path / "heat.png").exists()


# ===== issue 13: reliability =====
def _torchrun(script, *args, timeout=300):
    import os
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script]  # free port
    return subprocess.run(cmd + list(map(str, args)), cwd=HERE, capture_output=True, text=True, env=env,
                          timeout=timeout)


def _one_error_line(stderr: str) -> str:
    """Exactly one 'error:' message; no traceback of a rank (gloo, DDP), only torchrun's own summary."""
    assert stderr.count("error: ") == 1, stderr
    assert stderr.count("Traceback") <= 1 and "ChildFailedError" in stderr, stderr       # torchrun's summary only
    for noise in ("gloo", "DistBackendError", "Connection closed", "UserError"):
        assert noise not in stderr, stderr
    return stderr[stderr.index("error: "):].splitlines()[0]


def test_ddp_torchrun_two_cpu_processes(tiny, tmp_path):
    import re
    common = ["--train", "--data", tiny, "--preset", "cpu", "--device", "cpu", "--epochs", "1", "--no-pretrained"]
    # 16 clips, global batch 8: 8 clips and 2 whole batches of 4 per process; the logged loss is the rank mean
    r = _torchrun("ez_vsl.py", *common, "--limit", "16", "--batch-size", "8", "--out", tmp_path / "ok")
    assert r.returncode == 0, r.stderr
    per = re.findall(r"rank (\d) ([\d.]+) \((\d+)\)", r.stdout)
    assert [p[0] for p in per] == ["0", "1"] and all(int(p[2]) == 2 for p in per), r.stdout      # equal, nonzero
    loss = float(re.search(r"epoch 1/1 loss ([\d.]+)", r.stdout).group(1))
    means = [float(p[1]) for p in per]
    assert means[0] != means[1] and abs(loss - sum(means) / 2) <= 1e-4 + 1e-9, r.stdout
    run = next((tmp_path / "ok").iterdir())
    assert json.loads((run / "results.json").read_text())["n"] == 8
    assert torch.load(run / "best.pt", weights_only=False)["args"]["method"] == "ez_vsl"   # checkpoints say whose
    # 6 clips cannot give each of 2 processes a batch of 4: refused before training, no run folder
    r = _torchrun("ez_vsl.py", *common, "--limit", "6", "--batch-size", "8", "--out", tmp_path / "few")
    line = _one_error_line(r.stderr)
    assert r.returncode != 0 and "6 training clips" in line and "2 processes" in line and "batch of 4" in line
    assert not (tmp_path / "few").exists()
    # a bad frame met by one rank mid-epoch: one line naming it; the other rank stops without a traceback
    bad = tmp_path / "bad"
    import shutil
    shutil.copytree(tiny, bad)
    vid = C.read_split(tiny / "splits" / "train.txt")[0]
    (bad / "frames" / f"{vid}.jpg").write_bytes((tiny / "frames" / f"{vid}.jpg").read_bytes()[:300])
    r = _torchrun("ez_vsl.py", *common, "--data", bad, "--limit", "8", "--batch-size", "8", "--out", tmp_path / "b")
    line = _one_error_line(r.stderr)
    assert r.returncode != 0 and f"frames/{vid}.jpg" in line
    assert f"traceback : {line[len('error: '):]}" in r.stderr           # torchrun's root cause shows the same line



def test_torchrun_two_nodes_on_localhost(tiny, tmp_path):
    """torchrun's multi-node launch (README): two single-process "nodes" meet at a c10d rendezvous on localhost
    (gloo); both train the same weights (the per-rank line's checksum) and only global rank 0 writes a run folder."""
    import os
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["--train", "--data", tiny, "--preset", "cpu", "--device", "cpu", "--epochs", "1", "--limit", "16",
            "--batch-size", "8", "--max-steps", "2", "--no-pretrained"]
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "t",
                               "--local-addr", "127.0.0.1", "lvs_hardway.py", *map(str, args),
                               "--out", str(tmp_path / f"node{n}")],
                              cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert not any("\r" in o + e for o, e in outs)                    # no progress-bar redraws in redirected output
    written = [n for n in (0, 1) if (tmp_path / f"node{n}").exists() and any((tmp_path / f"node{n}").iterdir())]
    assert len(written) == 1, outs                                       # global rank 0 alone wrote a run folder
    log = outs[written[0]][0]
    assert re.search(r"rank 0 [\d.]+ \(2\), rank 1 [\d.]+ \(2\); weights identical on every process", log), log
    run = next((tmp_path / f"node{written[0]}").iterdir())
    assert {"last.pt", "best.pt", "results.json"} <= {p.name for p in run.iterdir()}

def _prefl(tiny, out, *extra):
    return ["--train", "--data", str(tiny), "--preset", "cpu", "--batch-size", "8", "--max-steps", "1",
            "--epochs", "1", "--limit", "8", "--out", str(out), *extra]


def test_preflight_refuses_before_any_run_folder(tiny, tmp_path):
    import re
    ann = json.loads((tiny / "annotations.json").read_text())
    val0, test0 = C.read_split(tiny / "splits" / "val.txt")[0], C.read_split(tiny / "splits" / "test.txt")[0]
    for vid, name in ((val0, "noval.json"), (test0, "notest.json")):
        (tmp_path / name).write_text(json.dumps([e for e in ann if e["file"] != vid]))
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    out = tmp_path / "runs"
    cases = [(["--batch-size", "0"], "--batch-size 0: must be at least 1"),
             (["--batch-size", "-4"], "--batch-size -4"),
             (["--epochs", "0"], "--epochs 0: must be at least 1"),
             (["--limit", "0"], "--limit 0"),
             (["--annotations", tmp_path / "noval.json"], f"ids of {tiny / 'splits' / 'val.txt'} have no annotation"),
             (["--annotations", tmp_path / "notest.json"], f"(first: {test0})"),
             (["--val-split", tmp_path / "nope.txt"], "split file not found"),
             (["--test-split", tmp_path / "empty.txt"], f"split file {tmp_path / 'empty.txt'} lists no ids"),
             (["--batch-size", "16"], "8 training clips (" + str(tiny / "splits" / "train.txt") + ") are fewer "
                                      "than one batch of 16"),
             (["--resume", tmp_path / "text.pt"], "not a readable PyTorch checkpoint"),
             (["--out", tmp_path / "a_file" / "runs"], "is a file, not a folder"),
             (["--save-maps", tmp_path / "a_file" / "m.npz"], "--save-maps")]
    for mod in (ez_vsl, lvs, sspl):
        for extra, msg in cases:
            argv = _prefl(tiny, out, *map(str, extra))                       # a later --out wins
            with pytest.raises(C.UserError, match=re.escape(msg)):
                mod.main(argv)
        assert not out.exists()                                             # no run folder of a failed start
    with pytest.raises(C.UserError, match="annotation"):                    # CSOL: the same preflight
        csol.main(_prefl(tiny, out, "--annotations", str(tmp_path / "noval.json"), "--epochs", "2"))
    with pytest.raises(C.UserError, match="not a readable PyTorch checkpoint"):
        csol.main(_prefl(tiny, out, "--stage", "2", "--ckpt", str(tmp_path / "text.pt")))
    assert not out.exists()
    # a UTF-8 BOM (Windows editors) is not part of the first id
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfabc_000001\r\nabc_000002\n")
    assert C.read_split(tmp_path / "bom.txt") == ["abc_000001", "abc_000002"]


def test_resume_settings_from_checkpoint_and_checkpoint_errors(tiny, tmp_path, monkeypatch, capsys):
    import re
    # a checkpoint as train() writes it after epoch 1 (args after the preflight), without the minute of training
    args = C.parse_args(ez_vsl.build_parser(), _prefl(tiny, tmp_path / "a", "--seed", "3", "--limit", "16", "--lr",
                                                      "3e-3", "--no-ogl"))
    C.setup(args, ez_vsl.PRESETS, ez_vsl.synthetic_data, "median", True)
    C.preflight(args, ez_vsl.METHOD)
    run = tmp_path / "a" / "run"
    run.mkdir(parents=True)
    ck = run / "last.pt"
    C.save_checkpoint(ck, {"model": ez_vsl.build_model(args).state_dict(), "optimizer": {}, "epoch": 1, "best": 0.0,
                           "history": [], "args": vars(args)})
    C.write_json(run / "args.json", vars(args))
    # contradicting flags are refused, naming the flag and both values; --epochs may be raised
    for flag, val, saved in (("--batch-size", "4", "8"), ("--seed", "5", "3"), ("--limit", "12", "16"),
                             ("--dim", "64", "128"), ("--lr", "0.01", "0.003")):
        with pytest.raises(C.UserError, match=re.escape(f"{flag} {val} contradicts the checkpoint's "
                                                        f"{flag[2:].replace('-', '_')} = {saved}")):
            ez_vsl.main(["--train", "--data", str(tiny), "--epochs", "2", flag, val, "--resume", str(ck)])
    monkeypatch.setattr(data_prep, "ensure_synthetic",
                        lambda **k: pytest.fail("a resumed run uses its own data"))
    with pytest.raises(C.UserError, match="already trained 1 epochs"):           # no --data: the run's own
        ez_vsl.main(["--train", "--resume", str(run)])
    # flags not given come from the checkpoint (not from the cpu preset synthetic data gets: seed 0, no limit);
    # a given flag equal to the saved value is fine (test_same_seed_same_result_and_exact_resume trains on)
    real = tmp_path / "real"                   # the same clips without data_prep's synth.json: "real" data
    shutil.copytree(tiny, real, ignore=shutil.ignore_patterns("synth.json", "cache"))
    for root, preset in ((real, "paper"), (tiny, "cpu")):        # the default preset follows the data
        args = C.parse_args(ez_vsl.build_parser(), ["--train", "--data", str(root)])
        C.resolve_data(args, ez_vsl.synthetic_data)
        assert args.preset == preset
    # --eval without --data tests on the data the checkpoint was trained on (its args.json), and says so
    said = []
    args = C.parse_args(ez_vsl.build_parser(), ["--eval", "--ckpt", str(ck)])
    C.resolve_data(args, ez_vsl.synthetic_data, log=said.append)
    assert (args.data, args.preset) == (str(tiny), "cpu") and "trained on" in said[0], said
    args = C.parse_args(ez_vsl.build_parser(), ["--eval", "--ckpt", str(ck), "--data", str(real)])
    C.resolve_data(args, ez_vsl.synthetic_data)
    assert args.data == str(real)                                               # --data wins
    moved = tmp_path / "moved"
    moved.mkdir()
    C.write_json(moved / "args.json", {**json.loads((run / "args.json").read_text()), "data": str(tmp_path / "gone")})
    with pytest.raises(C.UserError, match=r"args\.json: the checkpoint was trained on --data .*gone, which is not there"):
        C.resolve_data(C.parse_args(ez_vsl.build_parser(), ["--eval", "--ckpt", str(moved / "best.pt")]),
                       ez_vsl.synthetic_data)
    (moved / "args.json").write_text("{not json")                              # unreadable: no silent default
    with pytest.raises(C.UserError, match=r"args\.json: unreadable \(JSONDecodeError\), so the checkpoint's data"):
        C.resolve_data(C.parse_args(ez_vsl.build_parser(), ["--eval", "--ckpt", str(moved / "best.pt")]),
                       ez_vsl.synthetic_data)
    args = C.parse_args(ez_vsl.build_parser(), ["--train", "--data", str(tiny), "--epochs", "2", "--batch-size", "8",
                                                "--resume", str(run)])
    C.setup(args, ez_vsl.PRESETS, ez_vsl.synthetic_data, "median", True)
    assert (args.preset, args.seed, args.limit, args.lr, args.dim) == ("cpu", 0, None, 2e-3, 128)   # synthetic data
    C.preflight(args, "ez_vsl", args.resume)
    assert (args.preset, args.seed, args.limit, args.lr, args.dim, args.epochs) == ("cpu", 3, 16, 3e-3, 128, 2)
    saved = torch.load(ck, weights_only=False)
    assert saved["args"]["method"] == "ez_vsl"
    assert saved["args"]["given_options"][:4] == ["batch_size", "data", "epochs", "limit"]    # what the user typed
    # unreadable checkpoints and other methods' checkpoints: one line naming the file
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "cut.pt").write_bytes(ck.read_bytes()[:5000])
    (tmp_path / "text.pt").write_text("hello\n")
    for f in ("empty.pt", "cut.pt", "text.pt"):
        for mod in (ez_vsl, lvs, sspl):
            with pytest.raises(C.UserError, match=re.escape(f"{tmp_path / f}: not a readable PyTorch checkpoint")):
                mod.load_model(tmp_path / f, _lvs_args(), "cpu")
    for mod, name in ((lvs, "lvs_hardway"), (sspl, "sspl"), (csol, "csol_classaware")):
        with pytest.raises(C.UserError, match=f"a checkpoint of ez_vsl, not of {name}"):
            mod.load_model(ck, _lvs_args(), "cpu")
    old = dict(saved, args={k: v for k, v in saved["args"].items() if k != "method"})   # written before issue 13
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(C.UserError, match="not a sspl checkpoint .its settings lack pcm"):
        sspl.load_model(tmp_path / "old.pt", _lvs_args(), "cpu")
    with pytest.raises(C.UserError, match="not a csol_classaware checkpoint"):
        csol.load_model(tmp_path / "old.pt", _lvs_args(), "cpu")
    with pytest.raises(C.UserError, match="not a lvs_hardway checkpoint .its settings lack loss"):
        lvs.load_model(tmp_path / "old.pt", _lvs_args(), "cpu")
    torch.save({"model": {"x": torch.zeros(1)}}, tmp_path / "official_like.pt")      # no args: official format
    with pytest.raises(C.UserError, match="weights do not fit the ez_vsl model"):
        ez_vsl.load_model(tmp_path / "official_like.pt", _lvs_args(), "cpu")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:                                        # the CLI wrapper: one line, status 2
        C.run_cli(lambda: sspl.main(["--eval", "--ckpt", str(tmp_path / "cut.pt"), "--data", str(tiny)]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("error: ") == 1 and "Traceback" not in err
    assert err.startswith(f"error: {tmp_path / 'cut.pt'}: not a readable PyTorch checkpoint")
    # --eval: an unwritable --save-maps is refused before any work; a failure while writing the outputs leaves
    # no results.json (and no maps) behind
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(C.UserError, match="--save-maps"):
        ez_vsl.main(["--eval", "--ckpt", str(ck), "--data", str(tiny), "--out", str(tmp_path / "ev"),
                     "--save-maps", str(tmp_path / "a_file" / "m.npz")])
    assert not (tmp_path / "ev").exists()

    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(C, "save_overlay_png", broken)
    with pytest.raises(OSError):
        ez_vsl.main(["--eval", "--ckpt", str(ck), "--data", str(tiny), "--out", str(tmp_path / "ev"), "--viz", "2",
                     "--save-maps", str(tmp_path / "m.npz"), "--no-ogl"])
    assert not (tmp_path / "ev" / "results.json").exists() and not (tmp_path / "m.npz").exists()
    assert not (tmp_path / "ev" / "viz").exists() and not (tmp_path / "ev" / "viz.part").exists()


def _timestamped_video(path, ts_ms, audio_seconds, sr=16000):
    """mpeg4 frames at the given timestamps (ms; header rate 25) and a mono PCM track of audio_seconds."""
    import av
    from fractions import Fraction
    with av.open(str(path), "w") as c:
        vs = c.add_stream("mpeg4", rate=25)
        vs.width, vs.height, vs.pix_fmt = 64, 64, "yuv420p"
        vs.codec_context.time_base = Fraction(1, 1000)
        st = c.add_stream("pcm_s16le", rate=sr)
        st.layout = "mono"
        for k, t in enumerate(ts_ms):
            fr = av.VideoFrame.from_ndarray(_bits_frame(k), format="rgb24")
            fr.pts, fr.time_base = t, Fraction(1, 1000)
            for pkt in vs.encode(fr):
                c.mux(pkt)
        for pkt in vs.encode():
            c.mux(pkt)
        for i in range(0, int(audio_seconds * sr), 1000):
            fr = av.AudioFrame.from_ndarray(np.full((1, 1000), 1000, np.int16), format="s16p", layout="mono")
            fr.sample_rate, fr.pts = sr, i
            for pkt in st.encode(fr):
                c.mux(pkt)
        for pkt in st.encode():
            c.mux(pkt)


def test_data_prep_time_settings_vfr_short_audio(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for bad in ("abc", "-1", "nan"):                                    # one argument error, before any clip
        with pytest.raises(SystemExit) as e:
            data_prep.main(["videos", str(src), "--out", str(tmp_path / "o"), "--time", bad])
        assert e.value.code == 2
    assert "argument --time" in capsys.readouterr().err and not (tmp_path / "o").exists()
    # variable frame rate: 1 s at 25 fps then 2 s at 10 fps (header rate 25); and 1 s of audio in a 3 s video
    ts = [40 * i for i in range(25)] + [1000 + 100 * i for i in range(1, 21)]
    _timestamped_video(src / "vfr.mkv", ts, 3.0)
    _timestamped_video(src / "short_audio.mkv", [40 * i for i in range(75)], 1.0)
    out = tmp_path / "root"
    data_prep.main(["videos", str(src), "--out", str(out)])
    rows = data_prep.read_manifest(out)
    measured = (len(ts) - 1) / ((ts[-1] - ts[0]) / 1000)                 # 14.67 fps, not the header's 25
    assert abs(float(rows["vfr"]["fps"]) - measured) < 0.01 and abs(float(rows["short_audio"]["fps"]) - 25) < 0.01
    assert abs(float(rows["vfr"]["audio_duration"]) - 3.0) < 0.01 and rows["vfr"]["reason"] == ""
    r = rows["short_audio"]
    assert r["status"] == "ok" and abs(float(r["audio_duration"]) - 1.0) < 0.01
    assert r["reason"].startswith("warning: audio much shorter than the video (1.00 s of 3.")
    assert "warning: audio much shorter than the video" in capsys.readouterr().out       # in the summary table
    # another --sr makes the clips again (recorded settings differ); the same settings skip them
    assert rows["vfr"]["settings"] == "sr=16000;time=middle"
    data_prep.main(["videos", str(src), "--out", str(out), "--sr", "8000"])
    assert "0 already done, 2 to process" in capsys.readouterr().out
    assert C.read_wav(out / "audio" / "vfr.wav")[1] == 8000
    assert data_prep.read_manifest(out)["vfr"]["settings"] == "sr=8000;time=middle"
    data_prep.main(["videos", str(src), "--out", str(out), "--sr", "8000"])
    assert "2 already done, 0 to process" in capsys.readouterr().out


def test_data_prep_check_decodes_every_clip(tiny, tmp_path, capsys):
    import shutil
    root = tmp_path / "root"
    shutil.copytree(tiny, root)
    ids = C.read_split(root / "splits" / "val.txt")
    (root / "frames" / f"{ids[1]}.jpg").write_bytes((tiny / "frames" / f"{ids[1]}.jpg").read_bytes()[:400])
    wav = (tiny / "audio" / f"{ids[4]}.wav").read_bytes()
    (root / "audio" / f"{ids[4]}.wav").write_bytes(wav[:44] + b"\x00")      # header only, no whole sample
    with pytest.raises(SystemExit) as e:
        data_prep.main(["check", str(root), "--split", "val", "--workers", "2"])
    out = capsys.readouterr().out
    assert e.value.code == 1 and f"checked {len(ids)} clips" in out and "2 bad" in out
    rows = dict(ln.split("\t", 1) for ln in (root / "check_val.txt").read_text().splitlines())
    assert set(rows) == {ids[1], ids[4]}
    assert "cannot decode image" in rows[ids[1]] and f"audio/{ids[4]}.wav" in rows[ids[4]]
    data_prep.main(["check", str(root), "--split", "test"])                     # all good: returns (status 0)
    assert "0 bad" in capsys.readouterr().out and (root / "check_test.txt").read_text() == ""


# ===== issue 14: fidelity =====
def _slaney_hz_to_mel(f):
    f = np.asarray(f, np.float64)                              # librosa htk=False: linear below 1 kHz, log above
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0), f * 3 / 200.0)


def _slaney_mel_to_hz(m):
    m = np.asarray(m, np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (m - 15.0)), m * 200.0 / 3)


def _librosa_csol_log_mel(x):
    """float64 numpy from librosa's definitions: stft(n_fft 160, hop 80, periodic Hann, center=True with zero
    padding) -> melspectrogram(S=|stft|, 64 Slaney bins, Slaney norm, fmax 8 kHz) -> power_to_db(amin 1e-10, top_db 80)."""
    x = np.pad(x.astype(np.float64), 80)
    w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(160) / 160)
    mag = np.abs(np.fft.rfft(np.stack([x[i * 80:i * 80 + 160] for i in range(1 + (len(x) - 160) // 80)]) * w))
    fft_f, hz = np.arange(81) * 100.0, _slaney_mel_to_hz(np.linspace(0.0, _slaney_hz_to_mel(8000.0), 66))
    fb = np.zeros((81, 64))
    for i in range(64):
        for k in range(81):
            rise, fall = (fft_f[k] - hz[i]) / (hz[i + 1] - hz[i]), (hz[i + 2] - fft_f[k]) / (hz[i + 2] - hz[i + 1])
            fb[k, i] = max(0.0, min(rise, fall)) * 2.0 / (hz[i + 2] - hz[i])
    db = 10.0 * np.log10(np.maximum(mag @ fb, 1e-10))
    return np.maximum(db, db.max() - 80.0)


def _vggish_numpy(x):
    """float64 numpy VGGish log-mel frames (vggish_input): 400/160 periodic Hann, |rfft 512|, HTK mel 125-7500 Hz."""
    frames = np.stack([x[i * 160:i * 160 + 400] for i in range(1 + (len(x) - 400) // 160)]).astype(np.float64)
    mag = np.abs(np.fft.rfft(frames * (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)), 512))
    bins, edges = _htk(np.linspace(0, 8000, 257)), np.linspace(_htk(125.0), _htk(7500.0), 66)
    lo, ce, hi = edges[:-2], edges[1:-1], edges[2:]
    w = np.maximum(0.0, np.minimum((bins[:, None] - lo) / (ce - lo), (hi - bins[:, None]) / (hi - ce)))
    w[0] = 0.0
    return np.log(mag @ w + 0.01)


def test_csol_log_mel_and_vggish_in_float64_against_numpy():
    t = np.arange(16000) / 16000
    chirp = (0.5 * scipy.signal.chirp(t, 50, 1.0, 7900)).astype(np.float32)
    sine = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for x in (chirp, sine):                        # float32 STFT was 6.2 dB (chirp) / 0.21 dB (sine) off here
        ref = _librosa_csol_log_mel(x)
        ours = csol.csol_log_mel(torch.from_numpy(x)[None])
        assert ours.dtype == torch.float32 and ours.shape == (1, 1, 201, 64)
        assert np.abs(ours[0, 0].numpy() - ref).max() < 2e-5                        # measured 3.8e-6 dB
        ours64 = csol.csol_log_mel(torch.from_numpy(x.astype(np.float64))[None])
        assert ours64.dtype == torch.float64 and np.abs(ours64[0, 0].numpy() - ref).max() < 1e-6   # 1.6e-8 dB
    t3 = np.arange(48000) / 16000
    chirp3 = (0.9 * scipy.signal.chirp(t3, 50, 3.0, 7900)).astype(np.float32)
    ref = _vggish_numpy(chirp3)[:288]
    ours = sspl.vggish_examples(torch.from_numpy(chirp3)[None])
    assert ours.dtype == torch.float32                                     # float32 FFT: 9.8e-4 off here
    assert np.abs(ours[0, :, 0].reshape(288, 64).numpy() - ref).max() < 1e-6      # measured 2.4e-7
    assert sspl.vggish_examples(torch.from_numpy(chirp3.astype(np.float64))[None]).dtype == torch.float64


def _one_clip_layout(root, vid, frame, wav, sr=16000):
    from PIL import Image
    for d in ("frames", "audio", "splits"):
        (root / d).mkdir(parents=True, exist_ok=True)
    Image.fromarray(frame).save(root / "frames" / f"{vid}.jpg", quality=95)
    data_prep.write_wav(root / "audio" / f"{vid}.wav", wav, sr)
    (root / "splits" / "s.txt").write_text(vid + "\n")
    return root / "splits" / "s.txt"


def test_csol_resize_is_torchvision_default_bilinear(tmp_path):
    import argparse
    import torchvision.transforms as T
    from PIL import Image
    rng = np.random.default_rng(4)
    frame = (rng.random((61, 97, 3)) * 255).astype(np.uint8)
    split = _one_clip_layout(tmp_path, "v0", frame, np.zeros(16000))
    args = argparse.Namespace(data=tmp_path, limit=None, image_size=40, preset="paper", decode="pil",
                              skip_bad=False)
    img = C.load_image(tmp_path / "frames" / "v0.jpg")
    # official test: torchvision Resize((224, 224)) with its default interpolation = PIL bilinear, ToTensor, Normalize
    off = np.asarray(img.resize((40, 40), Image.BILINEAR), np.float64) / 255.0
    off = ((off - np.array(C.IMAGENET_MEAN)) / np.array(C.IMAGENET_STD)).transpose(2, 0, 1)
    ours = csol.make_dataset(args, split, train=False)[0][0].numpy()
    np.testing.assert_allclose(ours, off, atol=1e-5)
    bicubic = C.image_transform("squash", 40)(img).numpy()                 # the other methods' default
    assert np.abs(bicubic - off).max() > 0.05
    tr = csol.make_dataset(args, split, train=True).image_tf.transforms[0]     # train: Resize((256/224 s)^2) bilinear
    assert isinstance(tr, T.Resize) and tr.interpolation == T.InterpolationMode.BILINEAR and tuple(tr.size) == (46, 46)
    args.decode = "fast"                                 # the batched path resizes bilinear too (2-3 grey levels)
    batch = C.collate_av([csol.make_dataset(args, split, train=False)[0]])
    fast = csol.batch_to_device(batch, torch.device("cpu"), args, False)[0][0].numpy()
    assert np.abs(fast - off).max() < 0.06 and np.abs(fast - off).max() < np.abs(bicubic - off).max() / 2
    # SSPL's default test transform `squash` equals the official resize-short-side + centre crop on a square frame only
    sq = Image.fromarray(frame[:, :61])
    np.testing.assert_allclose(C.image_transform("squash", 40)(sq).numpy(), C.image_transform("center_crop", 40)(sq).numpy())
    assert np.abs(C.image_transform("squash", 40)(img).numpy() - C.image_transform("center_crop", 40)(img).numpy()).max() > 0.1


def test_sspl_pil_path_gives_two_independent_views(tmp_path):
    """--decode pil: SSPL's training item holds two views of the frame, each the crop_flip pipeline's own draw (the
    fast path's equivalent is checked against it elsewhere); they collate into a pair of batches."""
    import argparse
    frame = (np.random.default_rng(5).random((61, 97, 3)) * 255).astype(np.uint8)
    split = _one_clip_layout(tmp_path, "v0", frame, np.zeros(48000))
    args = argparse.Namespace(data=tmp_path, limit=None, image_size=40, preset="paper", decode="pil", skip_bad=False)
    torch.manual_seed(0)
    views = sspl.make_dataset(args, split, train=True)[0][0]
    torch.manual_seed(0)
    tf = C.image_transform("crop_flip", 40)
    img = C.load_image(tmp_path / "frames" / "v0.jpg")
    want = [tf(img), tf(img)]
    assert len(views) == 2 and all(torch.equal(v, w) for v, w in zip(views, want)) and not torch.equal(*views)
    batch = C.collate_av([sspl.make_dataset(args, split, train=True)[0]] * 2)
    assert [tuple(x.shape) for x in batch["images"]] == [(2, 3, 40, 40)] * 2


def _sspl_official_window(x, n):
    """SSPL dataset/base.py _load_audio: tile int(n / len) + 1 times if shorter, start = int(len / 2) - int(n / 2)."""
    if len(x) < n:
        x = np.tile(x, int(n / len(x)) + 1)
    start = int(len(x) / 2) - int(n / 2)
    return x[start:start + n]


def test_sspl_short_clip_window_centred_in_the_tiling(tmp_path):
    import argparse
    for length, n in ((13, 48), (7, 20), (30, 20), (31, 20), (48, 48), (5, 21)):
        x = np.arange(length, dtype=np.float32)
        np.testing.assert_array_equal(C.clip_window(x, 4, n / 4, "center_tiled"), _sspl_official_window(x, n))
    x = np.arange(13, dtype=np.float32)
    assert not np.array_equal(C.clip_window(x, 4, 12, "center_tiled"), C.clip_window(x, 4, 12, "center"))
    rng = np.random.default_rng(5)
    wav = rng.uniform(-0.5, 0.5, 20800)                                    # 1.3 s: tiled 3 times, start 7200
    split = _one_clip_layout(tmp_path, "s0", np.zeros((32, 32, 3), np.uint8), wav)
    args = argparse.Namespace(data=tmp_path, limit=None, image_size=32, test_transform="squash", preset="paper",
                              decode="fast")
    got = sspl.make_dataset(args, split, train=False)[0][1].numpy()       # the windowed WAV read
    x, _ = C.read_wav(tmp_path / "audio" / "s0.wav")
    np.testing.assert_array_equal(got, _sspl_official_window(x, 48000))
    assert not np.array_equal(got, np.tile(x, 3)[:48000])                 # the previous rule (start of the tiling)
    three = rng.uniform(-1, 1, 48000).astype(np.float32)                   # the synthetic clips: exactly 3 s, unchanged
    np.testing.assert_array_equal(C.clip_window(three, 16000, 3.0, "center_tiled"), C.clip_window(three, 16000, 3.0))


def test_ezvsl_pcm_scale_deviation_is_bounded_as_documented(tmp_path):
    rng = np.random.default_rng(6)
    t = np.arange(48000) / 16000
    x = 0.6 * np.sin(2 * np.pi * 300 * t) + rng.normal(0, 0.05, t.size)
    data_prep.write_wav(tmp_path / "a.wav", x, 16000)
    ours, _ = C.read_wav(tmp_path / "a.wav")                               # int16 / 32768 (LVS's soundfile)
    with __import__("wave").open(str(tmp_path / "a.wav"), "rb") as f:
        pcm = np.frombuffer(f.readframes(f.getnframes()), "<i2")
    official = np.clip(pcm.astype(np.float64) / 32767, -1, 1)             # EZ-VSL audio_io: int16 / iinfo.max, clip
    d = (C.log_spectrogram(torch.from_numpy(official)[None], 16000)
         - C.log_spectrogram(torch.from_numpy(ours.astype(np.float64))[None], 16000)).numpy()
    bound = 2 * np.log(32768 / 32767) / 12                                # 5.09e-6: the EZ-VSL header, deviation 8
    tol = 2e-6      # each float32 spectrogram is within 1e-6 of float64 (its docstring) on any kernel path
    assert d.min() > -tol and d.max() < bound + tol and d.max() > 0.9 * bound


@pytest.mark.filterwarnings("ignore:reduction")
def test_csol_kl_default_is_about_k_times_the_official_kldivloss():
    torch.manual_seed(0)
    B, K = 16, 11
    a = torch.randn(B, K, dtype=torch.float64)
    for spread in (0.05, 1.0):
        v = a + spread * torch.randn(B, K, dtype=torch.float64)
        s = v[:, :, None, None]                                           # GAP of a 1x1 class map = the logits
        log_pv, log_pa = torch.log_softmax(v, 1), torch.log_softmax(a, 1)
        official = torch.nn.KLDivLoss(reduction="mean")(log_pv, log_pa.exp())   # training_stage_two.py
        reversed_batchmean = (log_pa.exp() * (log_pa - log_pv)).sum(1).mean()   # KL(p_a || p_v), batch mean
        assert csol.kl_consistency(s, a, "official").item() == pytest.approx(official.item(), rel=1e-12)
        assert official.item() == pytest.approx(reversed_batchmean.item() / K, rel=1e-12)    # exactly 1/K
        ratio = csol.kl_consistency(s, a, "paper").item() / official.item()
        if spread < 0.1:                                                  # KL is symmetric to second order
            assert ratio == pytest.approx(K, rel=0.05)
        else:
            assert K / 3 < ratio < 3 * K
    # balance: official KL + 0.5 L_loc  ==  (KL_paper-batchmean-reversed + 0.5 K L_loc) / K, i.e. --kl official
    # reproduces it exactly; with --kl paper, --lam 0.5 K restores L_loc's relative weight (about).


@torch.no_grad()
def test_sspl_attention_and_csol_class_maps_follow_the_input_dtype():
    torch.manual_seed(1)
    V, fa = torch.randn(2, 8, 3, 3), torch.randn(2, 8)
    out32, out64 = sspl.attention(V, fa), sspl.attention(V.double(), fa.double())
    for o32, o64 in zip(out32, out64):
        assert o32.dtype == torch.float32 and o64.dtype == torch.float64
        np.testing.assert_allclose(o64.numpy(), o32.double().numpy(), atol=1e-5, rtol=1e-6)
    net = csol.LocationNet("small", 3)
    net.D.normal_()
    v_fea, l = torch.rand(2, net.channels, 4, 4), torch.rand(2, 4, 4)
    s32, s64 = csol.class_maps(net, v_fea, l), csol.class_maps(net, v_fea.double(), l.double())
    assert s32.dtype == torch.float32 and s64.dtype == torch.float64
    np.testing.assert_allclose(s64.numpy(), s32.double().numpy(), rtol=1e-5, atol=1e-5)
    # whole models in float64, from the waveform: SSPL S of Eq. 3 and CSOL s of Eq. 8
    torch.manual_seed(2)
    img, wav = torch.randn(2, 3, 112, 112), 0.3 * torch.randn(2, 48000)
    m = sspl.SSPL("small", True, 2, 32, 16, False).eval()
    S32 = sspl.localization_map(m, img, wav)
    S64 = sspl.localization_map(m.double(), img.double(), wav.double())
    assert S64.dtype == torch.float64
    np.testing.assert_allclose(S64.numpy(), S32.double().numpy(), atol=1e-5)
    net.eval()
    v32, a32 = net.features(img, csol.csol_log_mel(wav[:, :16000]))
    s32 = csol.class_maps(net, v32, net.loc_map(v32, a32))
    net.double()
    v64, a64 = net.features(img.double(), csol.csol_log_mel(wav[:, :16000].double()))
    s64 = csol.class_maps(net, v64, net.loc_map(v64, a64))
    assert s64.dtype == torch.float64
    np.testing.assert_allclose(s64.numpy(), s32.double().numpy(), rtol=1e-5, atol=1e-5 * float(s64.abs().max()))


# ===== issue 11A: fast data path =====
from types import SimpleNamespace  # noqa: E402


def _photo_jpeg(path, h, w, seed=0):
    """A photo-like frame: 1/f amplitude spectrum (natural-image statistics), correlated colours, JPEG q90."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    f = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :])
    f[0, 0] = 1
    ch = [np.real(np.fft.ifft2(np.exp(2j * np.pi * rng.random((h, w))) / f)) for _ in range(3)]
    img = np.stack([ch[0] + 0.3 * ch[1], ch[0] + 0.3 * ch[2], ch[0] - 0.3 * ch[1]], -1)
    Image.fromarray(np.clip((img - img.mean()) / img.std() * 50 + 120, 0, 255).astype(np.uint8)).save(path, quality=90)


def test_fast_path_against_the_official_pil_transforms(tiny, tmp_path):
    """Same seed -> the same crops, flips and jitters as torchvision's per-sample transforms; pixels within the
    documented tolerance (exact for frames already at their resize target)."""
    from PIL import Image
    synth = C.read_split(tiny / "splits" / "test.txt")[0]
    paths = [tmp_path / "p0.jpg", tmp_path / "p1.jpg", tiny / "frames" / f"{synth}.jpg"]
    _photo_jpeg(paths[0], 180, 320, 0)                       # 16:9 and 4:3 photo-like frames, a synthetic frame
    _photo_jpeg(paths[1], 150, 200, 1)
    pils = [Image.open(p).convert("RGB") for p in paths]
    frames = [C.decode_frame(torch.from_numpy(np.fromfile(p, np.uint8)), p) for p in paths]
    for kind in ("crop_flip", "squash", "center_crop", "csol_train"):
        tf = C.image_transform(kind, 96)
        torch.manual_seed(5)
        ref = torch.stack([tf(p) for p in pils])
        torch.manual_seed(5)
        fast = C.augment_frames(frames, kind, 96)
        assert fast.shape == (3, 3, 96, 96) and fast.dtype == torch.float32
        d = (fast - ref).abs()
        assert float(d.max()) <= 0.06 and float(d.mean()) < 1e-3, (kind, float(d.max()))   # <= 3 grey levels
        if kind in ("crop_flip", "csol_train"):              # from PIL-resized pixels, only cropped: exact
            pre = [torch.from_numpy(np.array(p.resize(C.resize_target(kind, 96, p.height, p.width)[::-1],
                                                      Image.BICUBIC))).permute(2, 0, 1) for p in pils]
            torch.manual_seed(5)
            assert torch.equal(C.augment_frames(pre, kind, 96), ref)


def test_fast_path_crop_and_flip_geometry():
    frame = torch.zeros(3, 220, 220, dtype=torch.uint8)     # crop_flip at 200: Resize(220) is a no-op
    frame[0, :10, :10] = 255                                 # a red marker in the top-left corner
    frame[1] = torch.arange(220, dtype=torch.uint8)[None, :]  # green = source column
    frame[2] = torch.arange(220, dtype=torch.uint8)[:, None]  # blue = source row
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)                              # RandomCrop's draws, then RandomHorizontalFlip's
        i, j, flip = int(torch.randint(0, 21, (1,))), int(torch.randint(0, 21, (1,))), bool(torch.rand(1) < 0.5)
        torch.manual_seed(seed)
        out = torch.from_numpy(C.denormalize(C.augment_frames([frame], "crop_flip", 200)[0]).astype(np.int64))
        seen.add(flip)
        cols = (j + torch.arange(200)).flip(0) if flip else j + torch.arange(200)
        assert (out[:, :, 2] - (i + torch.arange(200))[:, None]).abs().max() <= 1          # rows: crop offset i
        assert (out[:, :, 1] - cols[None, :]).abs().max() <= 1                            # columns: offset j, mirrored
        red = out[:, :, 0] > 128
        x0 = 200 - (10 - j) if flip else 0
        hm, wm = max(0, 10 - i), max(0, 10 - j)                                           # the marker, cropped
        assert bool(red[:hm, x0:x0 + wm].all()) and int(red.sum()) == hm * wm
    assert seen == {True, False}


def test_windowed_wav_read_streaming_header_and_short_audio(tmp_path):
    rng = np.random.default_rng(0)
    for n, sr, seconds in ((50000, 16000, 3.0), (48000, 16000, 3.0), (30000, 16000, 3.0), (161000, 16000, 10.0)):
        x = rng.integers(-30000, 30000, n)
        _write_pcm(tmp_path / "a.wav", x, 2, sr)
        full, _ = C.read_wav(tmp_path / "a.wav")
        for where in ("center", "start"):
            win, sr2, tiled = C.read_wav_window(tmp_path / "a.wav", seconds, where)
            assert sr2 == sr and tiled == (n < sr * seconds)
            np.testing.assert_array_equal(win, C.clip_window(full, sr, seconds, where))
    st = rng.integers(-32768, 32768, 2 * 40000)
    _write_pcm(tmp_path / "st.wav", st, 2, channels=2)      # stereo: the mean of the two channels, / 2^15
    np.testing.assert_array_equal(C.read_wav(tmp_path / "st.wav")[0],
                                  (st.reshape(-1, 2).mean(1) / 32768).astype(np.float32))
    np.testing.assert_array_equal(C.read_wav_window(tmp_path / "st.wav", 1.0, "center")[0],
                                  C.clip_window(C.read_wav(tmp_path / "st.wav")[0], 16000, 1.0))
    raw = bytearray((tmp_path / "a.wav").read_bytes())      # FFmpeg to a pipe: RIFF and data sizes 0xFFFFFFFF
    assert raw[36:40] == b"data"
    raw[4:8] = raw[40:44] = b"\xff\xff\xff\xff"
    (tmp_path / "stream.wav").write_bytes(bytes(raw))
    np.testing.assert_array_equal(C.read_wav(tmp_path / "stream.wav")[0], C.read_wav(tmp_path / "a.wav")[0])
    np.testing.assert_array_equal(C.read_wav_window(tmp_path / "stream.wav", 3.0)[0],
                                  C.read_wav_window(tmp_path / "a.wav", 3.0)[0])
    _write_pcm(tmp_path / "short.wav", np.ones(16), 2)      # 1 ms, tiled 3000x today
    with pytest.raises(C.BadMedia, match=r"audio too short: 0.001 s, the method needs 3 s") as e:
        C.read_wav_window(tmp_path / "short.wav", 3.0, vid="short")
    assert e.value.vid == "short" and e.value.path.endswith("short.wav")


def _bad_copy(tiny, root):
    """tiny with an undecodable frame in the train split, a 1 ms WAV in the test split and a 1 s WAV (tiled to the
    3 s window) in the validation split."""
    import shutil
    shutil.copytree(tiny, root)
    tr, te = C.read_split(root / "splits" / "train.txt")[3], C.read_split(root / "splits" / "test.txt")[2]
    (root / "frames" / f"{tr}.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    data_prep.write_wav(root / "audio" / f"{te}.wav", np.ones(16) * 0.1, 16000)
    va = C.read_split(root / "splits" / "val.txt")[0]
    data_prep.write_wav(root / "audio" / f"{va}.wav", C.read_wav(root / "audio" / f"{va}.wav")[0][:16000], 16000)
    return tr, te


def test_bad_frame_under_workers_is_one_error_line_and_skip_bad_lists_it(tiny, tmp_path, capsys):
    tr, te = _bad_copy(tiny, tmp_path / "bad")
    r = run_py("ez_vsl.py", *_quick(tmp_path / "bad", tmp_path / "o1", "--epochs", "1", "--workers", "2"), check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"{tr}.jpg" in errors[0] and "cannot decode image" in errors[0]
    ez_vsl.main(_quick(tmp_path / "bad", tmp_path / "o2", "--epochs", "1", "--skip-bad", "--max-steps", "3"))
    run = next((tmp_path / "o2").iterdir())
    assert json.loads((run / "results.json").read_text())["skipped"] == 2
    listed = dict(ln.split("\t") for ln in (run / "skipped_ids.txt").read_text().splitlines())
    assert set(listed) == {tr, te} and "cannot decode image" in listed[tr] and "audio too short" in listed[te]
    out = capsys.readouterr().out
    assert "skipped 2 unreadable samples" in out and "1 clips shorter than the audio window were tiled" in out


def test_batch_images_drops_an_undecodable_frame_only_with_skip_bad(tiny):
    ids = C.read_split(tiny / "splits" / "test.txt")[:3]
    items = [(torch.from_numpy(np.fromfile(tiny / "frames" / f"{i}.jpg", np.uint8)), torch.full((8,), k * 1.0), i,
              False) for k, i in enumerate(ids)]
    items[1] = (torch.tensor([255, 216, 255, 1, 2, 3], dtype=torch.uint8), items[1][1], ids[1], False)
    args = SimpleNamespace(data=str(tiny), skip_bad=False)
    with pytest.raises(C.BadMedia, match=f"{ids[1]}.jpg: cannot decode image"):
        C.batch_images(C.collate_av(items), "cpu", args, "squash", 64)
    args.skip_bad = True
    C.MEDIA.skipped, C.MEDIA.tiled = {}, set()
    batch = C.collate_av(items)
    img = C.batch_images(batch, "cpu", args, "squash", 64)
    assert img.shape == (2, 3, 64, 64) and batch["ids"] == [ids[0], ids[2]]
    assert batch["wav"][:, 0].tolist() == [0.0, 2.0] and list(C.MEDIA.skipped) == [ids[1]]
    C.MEDIA.skipped, C.MEDIA.tiled = {}, set()


# ===== issue 16: results over seeds, the table of many runs =====
def _results_file(path, method="ez_vsl", data="/d/synth", protocol="abs0.5", n=300, split="/d/synth/splits/test.txt",
                  seed=0, test=(0.5, 0.4, 0.45), center=(0.2, 0.3, 0.25), swapped=(0.1, 0.2, 0.15)):
    trio = lambda t: dict(zip(("ciou@0.5", "auc", "mean_ciou"), t))  # noqa: E731
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps({
        "method": method, "data": data, "split": split, "protocol": protocol, "n": n, "seed": seed,
        "test": trio(test), "baselines": {"center": trio(center)}, "audio_swapped": trio(swapped)}))
    return path / "results.json"


def _table_cells(table, row_start):
    line = next(ln for ln in table.splitlines() if ln.startswith(row_start))
    head = table.splitlines()[0]
    return dict(zip([h.strip() for h in head.strip("|").split("|")], [c.strip() for c in line.strip("|").split("|")]))


def test_results_table_mean_and_sample_std(tmp_path):
    import statistics
    tests = [(0.61, 0.52, 0.55), (0.70, 0.50, 0.58), (0.52, 0.49, 0.50)]
    files = [_results_file(tmp_path / f"r{s}", seed=s, test=t, swapped=(0.1 * s, 0.2, 0.3)) for s, t in enumerate(tests)]
    files.append(_results_file(tmp_path / "lvs", method="lvs_hardway", protocol="median_strict", test=(1.0, 0.5, 0.6)))
    table = eval_cioU.results_table(files)
    row = _table_cells(table, "| ez_vsl")
    col = [t[0] * 100 for t in tests]
    assert row["model ciou@0.5"] == f"{statistics.mean(col):.2f} ± {statistics.stdev(col):.2f}"
    sw = [0.0, 10.0, 20.0]
    assert row["audio-swapped ciou@0.5"] == f"{statistics.mean(sw):.2f} ± {statistics.stdev(sw):.2f}"  # 10.00 ± 10.00
    assert row["centred prior mean_ciou"] == "25.00 ± 0.00" and row["runs (seeds)"] == "3 (0,1,2)"
    assert row["protocol"] == "abs0.5" and row["N"] == "300"
    assert _table_cells(table, "| lvs_hardway")["model ciou@0.5"] == "100.00"           # one run: no spread
    r = run_py("eval_cioU.py", "--table", *files)                                     # the CLI prints the same
    assert r.stdout.strip().startswith(table.splitlines()[0])


def test_results_table_refuses_mixed_runs(tmp_path):
    for field, kw in (("protocol", {"protocol": "median"}), ("n", {"n": 299})):      # (another split: another row)
        files = [_results_file(tmp_path / "a"), _results_file(tmp_path / field, seed=1, **kw)]
        with pytest.raises(C.UserError, match=f"differ in {field}"):
            eval_cioU.results_table(files)
    r = run_py("eval_cioU.py", "--table", *files, check=False)                  # one error line from the CLI
    assert r.returncode == 2 and "error: cannot average ez_vsl" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(C.UserError, match="no such results file"):
        eval_cioU.results_table([tmp_path / "nothing.json"])


def test_seeds_trains_sibling_runs_and_tables_them(tiny, tmp_path, capsys):
    lvs.main(_quick(tiny, tmp_path, "--epochs", "1", "--seeds", "0,1"))
    runs = sorted(tmp_path.iterdir())
    assert [r.name.split("__")[2] for r in runs] == ["s0", "s1"]
    seeds = [json.loads((r / "results.json").read_text())["seed"] for r in runs]
    assert seeds == [0, 1]
    out = capsys.readouterr().out
    command = out[out.index("python eval_cioU.py --table "):].splitlines()[0].split()
    table = eval_cioU_main(command[2:])
    assert "| lvs_hardway |" in table and "| 2 (0,1) |" in table


# ===== issue 12: exact evaluator =====
def _official_resize(m, align_corners):
    """The official resize: cv2.resize INTER_LINEAR (LVS, SSPL, CSOL) = torch bilinear align_corners=False when
    up-sampling (cv2 is not installed); EZ-VSL: F.interpolate bilinear align_corners=True. float32 in, float32 out."""
    m = np.asarray(m, np.float32)
    if m.shape == (224, 224):
        return m.copy()
    t = torch.from_numpy(m)[None, None]
    out = torch.nn.functional.interpolate(t, size=(224, 224), mode="bilinear", align_corners=align_corners)
    return out[0, 0].numpy()


def _official_normalize_img(v):                     # utils.normalize_img of LVS / EZ-VSL
    vmin, vmax = v.min(), v.max()
    if not (vmax - vmin) == 0:
        v = (v - vmin) / (vmax - vmin)
    return v


def _official_gt(entry):                            # LVS utils.testset_gt: VGG-SS union / Flickr consensus
    gt = np.zeros([224, 224])
    for b in entry["bbox"]:
        x1, y1, x2, y2 = [int(224 * max(v, 0)) for v in b]
        if entry.get("gt", "union") == "union":
            gt[y1:y2, x1:x2] = 1
        else:
            gt[y1:y2, x1:x2] += 1
    if entry.get("gt", "union") == "consensus":
        gt = gt / 2
        gt[gt > 1] = 1
    return gt


def _official_cal_ciou(infer, gtmap, thres):       # Evaluator.cal_CIOU
    infer_map = np.zeros((224, 224))
    infer_map[infer >= thres] = 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(infer_map * gtmap) / (np.sum(gtmap) + np.sum(infer_map * (gtmap == 0)))


def _official_ciou(m, entry, protocol, align_corners):
    h, gt = _official_resize(m, align_corners), _official_gt(entry)
    if protocol == "median_strict":                 # LVS test.py
        h = 1 - _official_normalize_img(-h)
        thr = np.sort(h.flatten())[int(h.shape[0] * h.shape[1] / 2)]
        h[h > thr] = 1
        h[h < 1] = 0
        return _official_cal_ciou(h, gt, 0.5)
    if protocol == "median":                        # EZ-VSL test.py
        p = _official_normalize_img(h)
        return _official_cal_ciou(p, gt, np.sort(p.flatten())[int(p.shape[0] * p.shape[1] / 2)])
    if protocol == "abs0.5":                        # SSPL: min-max without the guard, >= 0.5
        with np.errstate(invalid="ignore", divide="ignore"):
            return _official_cal_ciou((h - h.min()) / (h.max() - h.min()), gt, 0.5)
    thr = np.float32(0.1 * np.float64(h.max()))     # CSOL tools.py under NumPy 1.x: float64 product, float32 compare
    return _official_cal_ciou((h > thr).astype(np.float32), gt, 0.5)


def _issue12_cases():
    rng = np.random.default_rng(12)
    maps, ann = {}, {}
    for size in (7, 14, 224):
        for j in range(4):
            x1, x2 = sorted(rng.uniform(0, 1, 2))
            y1, y2 = sorted(rng.uniform(0, 1, 2))
            kind = "consensus" if j % 2 else "union"
            boxes = [[x1, y1, x2, y2]] + ([[0.1, 0.2, 0.6, 0.7]] if kind == "consensus" else [])
            for name, m in (("rand", rng.normal(size=(size, size))), ("bin", rng.random((size, size)) < 0.3),
                            ("levels", rng.integers(0, 3, (size, size)) * 0.7),
                            ("const", np.full((size, size), [-1.5, 0.0, 2.0, -1e-9][j]))):
                k = f"{name}{size}_{j}"
                maps[k], ann[k] = np.asarray(m, np.float32), {"file": k, "bbox": boxes, "gt": kind}
    # empty ground truth (a corrupt box, a zero-height box) with nothing / everything predicted: 0/0 = NaN and 0
    maps["empty_neg"], ann["empty_neg"] = np.full((7, 7), -1.0, np.float32), {"file": "e", "bbox": [[.5, .5, -3e16, 1]]}
    maps["empty_pos"], ann["empty_pos"] = np.full((7, 7), 1.0, np.float32), {"file": "e", "bbox": [[.27, 1., .75, 1.]]}
    return maps, ann


@pytest.mark.parametrize("protocol", ["median", "median_strict", "abs0.5", "rel0.1"])   # is3, avsbench: issue 30
def test_issue12_every_protocol_equals_the_official_per_sample_rule(protocol):
    maps, ann = _issue12_cases()
    for ac in (False, True):
        res = C.evaluate_maps(maps, ann, protocol=protocol, align_corners=ac, chunk=5)   # chunks and mixed sizes
        ref = np.array([_official_ciou(maps[k], ann[k], protocol, ac) for k in maps])
        ours = np.array([res["per_sample"][k] for k in maps])
        np.testing.assert_array_equal(ours, ref)   # bit for bit, NaN (0/0) included
        succ = [np.sum(ref >= 0.05 * i) / len(ref) for i in range(21)]
        assert res["test"]["auc"] == pytest.approx(np.trapezoid(succ, [0.05 * i for i in range(21)]), abs=1e-15)
        assert res["test"]["ciou@0.5"] == np.sum(ref >= 0.5) / len(ref)


def test_issue12_constant_and_tie_rules_hand_worked():
    g = C.boxes_to_map([[0, 0, 0.5, 1]])
    for c, whole in ((0.0, True), (2.0, True), (-1.5, False), (-1e-9, True)):   # LVS: 1 + c >= 1 in float32
        assert _bin(np.full((224, 224), c), "median_strict").all() == whole
        assert _bin(np.full((224, 224), c), "median_strict").any() == whole          # all or nothing
    assert _bin(np.full((224, 224), -3.0), "median").all()                 # EZ-VSL: normalize_img keeps it
    assert not _bin(np.full((224, 224), 5.0), "abs0.5").any()             # SSPL: 0/0 = NaN
    assert np.isnan(_ciou(np.zeros((4, 4), bool), np.zeros((4, 4))))
    assert _ciou(_bin(np.full((224, 224), 1.0), "median_strict"), g) == 0.5
    np.testing.assert_array_equal(C.minmax(np.full((3, 3), 7.0)), np.full((3, 3), 7.0))
    s = C.summarize([np.nan, 0.0, 1.0])      # NaN fails t = 0, the zero passes it
    assert s["auc"] == pytest.approx(np.trapezoid([2 / 3] + [1 / 3] * 20, [0.05 * i for i in range(21)]))
    assert s["mean_ciou"] == pytest.approx(1 / 3)


def test_issue12_csol_ciou_at_0p3_and_nan_without_sounding_box():
    # a mean class IoU of exactly 0.3 fails the official ">= 0.05*6" (= 0.30000000000000004)
    s = csol.summarize_class_aware([0.3, float("nan"), 1.0], [0.5, None, 1.0])
    assert s["ciou@0.3"] == pytest.approx(1 / 3) and s["mean_ciou"] == pytest.approx(0.65) and s["nsa"] == 0.75
    succ = [2 / 3] + [1 / 3] * 20            # the NaN image fails t = 0; the 0.3 image passes t <= 0.25 only
    succ[1:6] = [2 / 3] * 5
    assert s["auc"] == pytest.approx(np.trapezoid(succ, [0.05 * i for i in range(21)]))
    ciou_n, nsa = csol.class_aware_scores({"A": np.ones((14, 14))}, {}, ["A"])
    assert np.isnan(ciou_n) and nsa == 0.0


def test_issue12_ezvsl_ogl_blended_after_the_resize_to_224():
    rng = np.random.default_rng(3)
    avl, obj = {"a": rng.normal(size=(7, 7)).astype(np.float32)}, {"a": rng.random((4, 4)).astype(np.float32)}
    pa = _official_normalize_img(_official_resize(avl["a"], True))
    po = _official_normalize_img(_official_resize(obj["a"], True))
    ref = _official_normalize_img(pa * 0.4 + po * (1 - 0.4))
    np.testing.assert_array_equal(ez_vsl.blend_maps(avl, obj, 0.4)["a"], ref)
    args = ez_vsl.build_parser().parse_args(["--eval"])
    assert args.align_corners is None                                            # resolved by the method: True
    assert ez_vsl.build_parser().parse_args(["--no-align-corners"]).align_corners is False


def test_issue12_negative_metrics_hand_worked():
    ids = [f"c{i}" for i in range(6)]
    ann, pos = {}, {}
    for i, k in enumerate(ids):                       # boxes of different areas -> distinct confidences
        w = 0.3 + 0.1 * i
        ann[k] = {"file": k, "bbox": [[0, 0, w, w]]}
        m = -np.ones((224, 224), np.float32)
        m[: int(224 * w), : int(224 * w)] = 1.0      # exactly the box: cIoU 1 at the fixed threshold 0.5
        pos[k] = m
    # a model that ignores the audio: every negative gives the same map -> AP at chance (1 correct pair in 4)
    blind = C.negative_metrics(pos, {kind: pos for kind in C.NEGATIVE_KINDS}, ann, ids, 0.5)
    assert blind["positives"]["ciou@0.5"] == 1.0 and blind["ap"] == pytest.approx(0.25)
    assert blind["max_f1"] == pytest.approx(2 * 0.25 / 1.25)
    area = np.mean([(int(224 * (0.3 + 0.1 * i)) ** 2) / 224 ** 2 for i in range(6)])
    assert all(v == pytest.approx(area) for v in blind["pia"].values())
    assert all(v["ap"] == pytest.approx(0.5) for v in blind["per_kind"].values())
    # a perfect model: silent maps for every negative -> AP 1, pIA 0
    dark = {k: np.full((7, 7), -1.0, np.float32) for k in ids}
    perfect = C.negative_metrics(pos, {kind: dark for kind in C.NEGATIVE_KINDS}, ann, ids, 0.5)
    assert perfect["ap"] == 1.0 and perfect["max_f1"] == 1.0 and set(perfect["pia"].values()) == {0.0}
    # AP against sklearn's definition when every positive pair is correctly localised (then both agree)
    from sklearn.metrics import average_precision_score
    rng = np.random.default_rng(0)
    conf, y = rng.random(40), rng.random(40) < 0.3
    assert C.detection_ap(conf, y, int(y.sum()))[0] == pytest.approx(average_precision_score(y, conf))


def test_issue12_eval_cli_input_checks(tmp_path):
    ann = [{"file": f"v{i}", "class": "c", "bbox": [[0, 0, 0.5, 1.0]]} for i in range(15)]
    ann[0]["bbox"].append([0.38, 0.86, 0.69, -2.88e16])      # corrupt, as vggss.json
    ann[1]["bbox"] = [[0.0, 0.0, 1.2, 0.5]]                    # beyond the frame: cut at 224
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    rng = np.random.default_rng(1)
    maps = {f"v{i}": rng.normal(size=(7, 7)).astype(np.float32) for i in range(15)}
    C.save_maps(tmp_path / "maps.npz", maps)
    (tmp_path / "test.txt").write_text("\n".join([f"v{i}" for i in range(15)] + [f"v{i}" for i in range(5)]) + "\n")
    res = eval_cioU_main(["--pred", str(tmp_path / "maps.npz"), "--gt", str(tmp_path / "ann.json"), "--split",
                          str(tmp_path / "test.txt"), "--protocol", "median_strict"])
    assert res["n"] == 15 and res["n_listed"] == 15 and res["duplicates"] == [f"v{i}" for i in range(5)]
    assert res["boxes_outside"] == 2
    ref = [_official_ciou(maps[f"v{i}"], dict(ann[i]), "median_strict", False) for i in range(15)]
    assert [res["per_sample"][f"v{i}"] for i in range(15)] == ref
    np.save(tmp_path / "one.npy", np.zeros((7, 7)))
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "junk.npz").write_bytes(b"\x00garbage" * 10)
    np.savez(tmp_path / "zero.npz", v0=np.zeros((0, 7)))
    np.savez(tmp_path / "threed.npz", v0=np.zeros((2, 7, 7)))
    for name, msg in (("one.npy", "not an .npz"), ("empty.npz", "not a readable .npz"),
                      ("junk.npz", "not a readable .npz"), ("zero.npz", "empty map"), ("threed.npz", "2-D")):
        with pytest.raises(C.UserError, match=msg) as e:
            eval_cioU_main(["--pred", str(tmp_path / name), "--gt", str(tmp_path / "ann.json")])
        assert name in str(e.value)
    r = run_py("eval_cioU.py", "--pred", tmp_path / "junk.npz", "--gt", tmp_path / "ann.json", check=False)
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "Traceback" not in r.stderr


def eval_cioU_main(argv):
    import eval_cioU
    return eval_cioU.main(argv)


def test_issue12_ezvsl_eval_negatives_and_eval_cioU_round_trip(tiny, tmp_path):
    ez_vsl.main(["--train", "--data", str(tiny), "--preset", "cpu", "--batch-size", "8", "--max-steps", "1",
                 "--epochs", "1", "--no-pretrained", "--out", str(tmp_path / "run")])
    run = next((tmp_path / "run").iterdir())
    ez_vsl.main(["--eval", "--ckpt", str(run / "best.pt"), "--data", str(tiny), "--negatives", "--no-pretrained",
                 "--save-maps", str(tmp_path / "m.npz"), "--out", str(tmp_path / "ev")])
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    neg = res["negatives"]
    assert res["resize"] == "bilinear align_corners=True" and neg["n"] == 8 and neg["threshold"] == 0.5
    assert set(neg["pia"]) == {"silence", "noise", "offscreen"} and 0 <= neg["ap"] <= 1
    back = eval_cioU_main(["--pred", str(tmp_path / "m.npz"), "--gt", str(tiny / "annotations.json"), "--split",
                           str(tiny / "splits" / "test.txt")])
    assert back["test"] == pytest.approx(res["test"]) and back["resize"] == res["resize"]
    assert back["negatives"]["ap"] == pytest.approx(neg["ap"]) and back["negatives"]["pia"] == pytest.approx(neg["pia"])
    with np.load(tmp_path / "m.npz") as z:
        conf = z["__confidence__"]
    assert conf.shape == (8, 4)
    assert conf.mean(0) == pytest.approx([neg["confidence"][k] for k in ["positive", *neg["kinds"]]])


# ===== issue 22: a checkpoint never runs code; every bad input is one line =====
def _pwn(tmp_path):
    """A pickle that, when loaded with weights_only=False, creates tmp_path/pwned (open(path, 'w'))."""
    class Payload:
        def __reduce__(self):
            return open, (str(tmp_path / "pwned"), "w")
    return Payload()


def test_loading_a_checkpoint_or_weights_file_never_runs_code(tmp_path):
    torch.save({"model": _pwn(tmp_path), "args": {"method": "sspl"}}, tmp_path / "evil.pt")
    for load in (lambda: ez_vsl.load_model(tmp_path / "evil.pt", _lvs_args(), "cpu"),
                 lambda: lvs.load_model(tmp_path / "evil.pt", _lvs_args(), "cpu"),
                 lambda: sspl.load_model(tmp_path / "evil.pt", _lvs_args(), "cpu"),
                 lambda: csol.load_model(tmp_path / "evil.pt", _lvs_args(), "cpu"),
                 lambda: C.load_weights(C.ResNet18Trunk(3), str(tmp_path / "evil.pt")),
                 lambda: ez_vsl.ObjectPrior("l1", str(tmp_path / "evil.pt"))):
        with pytest.raises(C.UserError, match=r"evil.pt: refused: it holds Python objects \(.*open"):
            load()
    assert not (tmp_path / "pwned").exists()
    r = run_py("lvs_hardway.py", "--eval", "--ckpt", tmp_path / "evil.pt", "--data", tmp_path, check=False)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    assert not (tmp_path / "pwned").exists()
    # the authors' EZ-VSL format stores its scores as numpy scalars: still loads
    ref = ez_vsl.EZVSL("resnet18", 512)
    torch.save({"model": {f"module.{k}": v for k, v in ref.state_dict().items()}, "best_cIoU": np.float64(0.4),
                "best_Auc": np.float32(0.3), "epoch": np.int64(20)}, tmp_path / "best.pth")
    model = ez_vsl.load_model(tmp_path / "best.pth", _lvs_args(), "cpu")
    assert torch.equal(model.state_dict()["aud_proj.weight"], ref.state_dict()["aud_proj.weight"])


def test_a_16_bit_png_frame_decodes_as_pil_reads_it(tiny, tmp_path):
    from PIL import Image
    vid = C.read_split(tiny / "splits" / "test.txt")[0]
    root = tmp_path / "root"
    shutil.copytree(tiny, root)
    frame = root / "frames" / f"{vid}.jpg"                    # a 16-bit greyscale PNG named .jpg
    Image.fromarray((np.random.default_rng(0).random((40, 60)) * 65535).astype(np.uint16)).save(frame, format="PNG")
    ours = C.decode_frame(torch.from_numpy(np.fromfile(frame, np.uint8)), frame, vid)
    assert ours.dtype == torch.uint8
    assert torch.equal(ours, torch.from_numpy(np.array(C.load_image(frame))).permute(2, 0, 1))
    ds = C.AVDataset(root, [vid], 3.0)
    args = SimpleNamespace(data=str(root), skip_bad=False)
    img = C.batch_images(C.collate_av([ds[0]]), "cpu", args, "squash", 32)
    pil = C.image_transform("squash", 32)(C.load_image(frame))
    assert img.shape == (1, 3, 32, 32) and (img[0] - pil).abs().max() < 0.06


def test_bad_numbers_device_and_outputs_are_one_line_before_any_run_folder(tiny, tmp_path):
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "runs"
    for mod, extra, msg in ((ez_vsl, ["--lr", "-1"], "--lr -1.0: must be greater than 0"),
                            (lvs, ["--image-size", "7"], "--image-size 7: must be at least 32"),
                            (sspl, ["--image-size", "64", "--preset", "paper", "--no-pretrained"],
                             "--image-size 64: the PCM works on a 14x14 feature map"),
                            (sspl, ["--lr-head", "0"], "--lr-head 0.0: must be greater than 0"),
                            (csol, ["--epochs", "1"], "stage one builds its object dictionary from its second epoch"),
                            (ez_vsl, ["--device", "tpu"], "--device tpu: not a device"),
                            (lvs, ["--tau", "nan"], "--tau nan: must be a finite number")):
        with pytest.raises(C.UserError, match=re.escape(msg)):
            mod.main(_prefl(tiny, out, *extra))
    assert not out.exists()
    ck = tmp_path / "ck.pt"
    C.save_checkpoint(ck, {"model": {}, "args": {"method": "sspl"}})
    for argv, msg in ((["--eval", "--ckpt", ck, "--pcm-cycles", "-1"], "--pcm-cycles -1: must be at least 0"),
                      (["--eval", "--ckpt", ck, "--neg-threshold", "nan"], "--neg-threshold nan: must be a finite"),
                      (["--predict", "--ckpt", ck, "--image", "x", "--audio", "y", "--out", tmp_path / "a_file" / "h.png"],
                       "is a file, not a folder")):
        with pytest.raises(C.UserError, match=re.escape(msg)):
            sspl.main([str(a) for a in argv] + ["--data", str(tiny)])


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    import errno
    lvs.main(_quick(tiny, tmp_path / "runs", "--epochs", "1"))
    run = next((tmp_path / "runs").iterdir())
    before = (run / "last.pt").read_bytes()

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(C.UserError, match=r"last.pt: cannot write the checkpoint \(No space left on device"):
        lvs.main(["--train", "--resume", str(run), "--epochs", "2", "--max-steps", "2"])
    assert (run / "last.pt").read_bytes() == before and not list(run.glob("*.part"))


def test_predict_creates_its_output_folder_and_refuses_too_short_audio(tiny, tmp_path):
    vid = C.read_split(tiny / "splits" / "test.txt")[0]
    data_prep.write_wav(tmp_path / "short.wav", np.zeros(800), 16000)                 # 0.05 s: --eval refuses it too
    for mod in (lvs, sspl):
        mod.main(_quick(tiny, tmp_path / mod.METHOD, "--epochs", "1"))
        args = ["--predict", "--ckpt", str(next((tmp_path / mod.METHOD).iterdir()) / "best.pt"), "--image",
                str(tiny / "frames" / f"{vid}.jpg")]
        mod.main(args + ["--audio", str(tiny / "audio" / f"{vid}.wav"), "--out", str(tmp_path / "new" / "h.png")])
        assert (tmp_path / "new" / "h.png").is_file()
        (tmp_path / "new" / "h.png").unlink()
        with pytest.raises(C.UserError, match="short.wav: audio too short: 0.050 s, the method needs"):
            mod.main(args + ["--audio", str(tmp_path / "short.wav")])


def test_a_run_folder_is_written_by_one_process_and_runs_never_share_one(tiny, tmp_path):
    import fcntl
    lvs.main(_quick(tiny, tmp_path / "runs", "--epochs", "1"))
    run = next((tmp_path / "runs").iterdir())
    with open(run / ".lock", "a") as held:                       # as a run still training holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(C.UserError, match="another process is writing this run folder"):
            lvs.main(["--train", "--resume", str(run), "--epochs", "2"])
    lines = (run / "log.txt").read_text().splitlines()
    assert sum(ln.startswith("epoch 1/1") for ln in lines) == 1 and not any("epoch 2/2" in ln for ln in lines)
    args = C.parse_args(lvs.build_parser(), ["--train", "--data", str(tiny), "--out", str(tmp_path / "same")])
    C.setup(args, lvs.PRESETS, lvs.synthetic_data, "median_strict", False)
    a, b = C.make_run_dir(args, "lvs_hardway"), C.make_run_dir(args, "lvs_hardway")   # the same second
    assert a != b and (a / "args.json").is_file() and (b / "args.json").is_file()


def test_eval_writes_beside_the_training_run_and_names_empty_ground_truths(tiny, tmp_path):
    sspl.main(_quick(tiny, tmp_path / "runs", "--epochs", "1"))
    run = next((tmp_path / "runs").iterdir())
    trained = (run / "results.json").read_bytes()
    sspl.main(["--eval", "--ckpt", str(run / "best.pt")])                        # no --out, no --data
    assert (run / "results.json").read_bytes() == trained
    assert json.loads((run / "eval_best" / "results.json").read_text())["n"] == 8
    ann = {"a": {"file": "a", "bbox": [[0.6, 0.2, 0.3, 0.9]]}, "b": {"file": "b", "bbox": [[12, 30, 100, 140]]},
           "c": {"file": "c", "bbox": [[0, 0, 0.5, 0.5]]}}
    res = C.evaluate_maps({k: np.eye(7) for k in ann}, ann)
    report = C.format_report(res)
    assert res["empty_gt"] == ["a", "b"] and "a (x2 <= x1 or y2 <= y1" in report and "b (every coordinate above 1" \
        in report and "pixel units" in report


def test_scores_by_box_area_in_slavc_bins(tmp_path):
    """SLAVC's bins of the ground truth's area at 224 px (< 32^2, 96^2, 144^2, larger): hand-made boxes whose areas
    are worked out by hand, cIoUs from the definition in NumPy."""
    boxes = {"a": [0, 0, 0.1, 0.1], "b": [0, 0, 0.3, 0.3], "e": [0, 0, 0.5, 0.25], "c": [0, 0, 0.5, 0.5],
             "d": [0, 0, 1, 1], "f": [0.5, 0.5, 0.5, 0.5]}             # 22^2, 67^2, 112 x 56, 112^2, 224^2, 0 px
    ann = {k: {"file": k, "bbox": [b]} for k, b in boxes.items()}
    rng, maps, truth = np.random.default_rng(0), {}, {}
    for k, b in boxes.items():
        G = np.zeros((224, 224))
        x1, y1, x2, y2 = (int(224 * v) for v in b)
        G[y1:y2, x1:x2] = 1
        m = G + 0.01 * rng.random((224, 224)) if k in ("a", "e", "c") else np.roll(G, 112, axis=(0, 1)) if k == "b" \
            else (rng.random((224, 224)) > 0.9) * 1.0 + 0.01               # a right; b elsewhere; d a sparse map
        P = m > 0.1 * m.max()
        maps[k], truth[k] = m.astype(np.float32), (P * G).sum() / (G.sum() + (P * (G == 0)).sum())
    res = C.evaluate_maps(maps, ann, protocol="rel0.1")
    bins = {"small": ["a"], "medium": ["b", "e"], "large": ["c"], "huge": ["d"]}     # f (empty) in none
    for name, ids in bins.items():
        got, want = res["by_size"][name], np.array([truth[i] for i in ids])
        assert got["n"] == len(ids) and got["ciou@0.5"] == np.mean(want >= 0.5), (name, got)
        assert abs(got["mean_ciou"] - want.mean()) < 1e-12
    assert [res["by_size"][k]["ciou@0.5"] for k in bins] == [1.0, 0.5, 1.0, 0.0]
    assert "medium 50.00 (N=2)" in C.format_report(res)


def test_eval_cioU_refuses_outputs_it_cannot_write_and_a_split_without_maps_before_scoring(tmp_path, capsys):
    ann = [{"file": f"v{i}", "class": "c", "bbox": [[0, 0, 0.5, 1.0]]} for i in range(3)]
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    C.save_maps(tmp_path / "m.npz", {f"v{i}": np.eye(7) for i in range(3)})
    (tmp_path / "a_file").write_text("x")
    base = ["--pred", str(tmp_path / "m.npz"), "--gt", str(tmp_path / "ann.json")]
    for flag in ("--per-sample", "--json"):
        with pytest.raises(C.UserError, match=f"{flag} .*a_file"):
            eval_cioU_main(base + [flag, str(tmp_path / "a_file" / "x")])
        assert "cIoU@0.5" not in capsys.readouterr().out                       # nothing scored, nothing printed
    (tmp_path / "other.txt").write_text("w0\nw1\n")
    with pytest.raises(C.UserError, match="none of its 2 ids has a map"):
        eval_cioU_main(base + ["--split", str(tmp_path / "other.txt")])
    np.savez(tmp_path / "keyed.npz", **{"x/v0": np.eye(7), "v1": np.eye(7)})    # a key that is not an id: named
    with pytest.raises(C.UserError, match="x/v0"):
        eval_cioU_main(["--pred", str(tmp_path / "keyed.npz"), "--gt", str(tmp_path / "ann.json")])


def test_ctrl_c_prints_one_line_with_the_resume_command(tiny, tmp_path):
    import os
    import signal
    import time
    cmd = [sys.executable, "lvs_hardway.py", *_quick(tiny, tmp_path / "runs", "--epochs", "200")]
    p = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 240
    while not list((tmp_path / "runs").glob("*/last.pt")) and time.time() < deadline:
        time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    lines = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]
    assert p.returncode == 130 and "Traceback" not in err and len(lines) == 1, err
    run = next((tmp_path / "runs").iterdir())
    assert lines[0].startswith("interrupted; the run's checkpoints") and f"--train --resume {run}" in lines[0]


def test_the_report_says_whether_the_model_uses_the_sound_and_epochs_show_the_run_eta(tiny, tmp_path, capsys):
    ez_vsl.main(_quick(tiny, tmp_path / "runs", "--epochs", "2", "--no-pretrained"))
    out = capsys.readouterr().out
    run = next((tmp_path / "runs").iterdir())
    res = json.loads((run / "results.json").read_text())
    gap = 100 * (res["test"]["ciou@0.5"] - res["audio_swapped"]["ciou@0.5"])
    line = next(ln for ln in out.splitlines() if "use the sound" in ln or "uses the sound" in ln)
    assert f"{gap:+.2f} cIoU@0.5" in line and res["uses_sound"] == line.startswith("[test] uses the sound")
    assert res["audio_swapped"]["n"] == res["n"] == 8
    assert re.search(r"epoch 1/2 loss [\d.]+ \| val .* run ETA [\d.]+ min", out)
    assert "f_av_std" in sspl.build_parser().format_help() and "collapse" in sspl.build_parser().format_help()


# ===== issue 24: the CUDA paths, checked on the CPU =====
def _bare_run(rank, world=2, device="cpu", seed=3):
    run = C.Run.__new__(C.Run)
    run.args, run.rank, run.world, run.device = SimpleNamespace(seed=seed, workers=0), rank, world, torch.device(device)
    run.per_proc = 2
    return run


def test_each_ddp_process_draws_its_own_augmentation_and_one_process_keeps_its_stream(tiny):
    ds = C.AVDataset(tiny, C.read_split(tiny / "splits" / "train.txt")[:8], 3.0)

    def first_draws(rank, world):                 # the loader reseeds; then the batch's crop / flip draws
        loader = _bare_run(rank, world).loader(ds, epoch=4)
        return [C.augment_params("crop_flip", 96, (120, 160)) for _ in range(4)], loader.generator.initial_seed()
    (r0, g0), (r1, g1), (alone, g) = first_draws(0, 2), first_draws(1, 2), first_draws(0, 1)
    assert r0 != r1 and g0 != g1                                    # each rank its own augmentation (and workers)
    C.seed_everything(3 * 1000 + 4)                                 # one process: the stream of every earlier release
    assert alone == r0 == [C.augment_params("crop_flip", 96, (120, 160)) for _ in range(4)] and g == g0 == 3004


def test_losses_and_maps_stay_float32_under_autocast():
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        V, fa = torch.randn(2, 8, 3, 3, dtype=torch.bfloat16), torch.randn(2, 8, dtype=torch.bfloat16)
        f_av, S, S_t = sspl.attention(V, fa)
        const = sspl.attention(torch.ones(1, 8, 3, 3, dtype=torch.bfloat16), fa[:1])[2]
        head = sspl.SimSiamHead(8, 16, 4).eval()
        loss = sspl.sspl_loss(head, f_av, f_av.flip(0))
        v, a = torch.nn.functional.normalize(V, dim=1), torch.nn.functional.normalize(fa, dim=1)
        ez = (ez_vsl.ezvsl_loss(v, a), ez_vsl.avl_map(v, a))
        Slvs = lvs.similarity(v, a)
        lv = lvs.lvs_loss(v, a, _lvs_args())
    for t in (f_av, S, S_t, const, loss, *ez, Slvs, lv):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    assert const.abs().max() == 0                          # a constant map: S~ = 0 / (0 + 1e-10), not NaN


def test_bf16_only_where_the_gpu_has_it_natively(monkeypatch):
    for cap, dtype in (((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, cap=cap: cap)
        assert C.Amp(torch.device("cuda:1"), True).dtype == dtype
    assert C.Amp(torch.device("cpu"), True).enabled is False


def test_nvjpeg_waits_for_the_stream_and_a_failed_batch_is_said_once(monkeypatch, capsys):
    import torchvision.io
    calls = []

    class Stream:
        def synchronize(self):
            calls.append("sync")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())

    def decode(datas, mode, device):
        calls.append("decode")
        raise RuntimeError("nvjpeg: bad batch")
    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode)
    C.NVJPEG_FAILED.clear()
    assert C.nvjpeg([torch.zeros(4, dtype=torch.uint8)], torch.device("cuda")) is None
    assert C.nvjpeg([torch.zeros(4, dtype=torch.uint8)], torch.device("cuda")) is None
    assert calls == ["sync", "decode", "sync", "decode"]
    assert capsys.readouterr().err.count("nvJPEG could not decode a batch (nvjpeg: bad batch)") == 1


def test_skip_bad_under_ddp_is_refused_and_checkpoints_keep_the_gradient_scaler(tiny, tmp_path, monkeypatch):
    run = _bare_run(0, world=1, device="cuda")
    assert run.loader(C.AVDataset(tiny, C.read_split(tiny / "splits" / "train.txt")[:4], 3.0), 0).pin_memory
    lvs.main(_quick(tiny, tmp_path / "runs", "--epochs", "1"))
    assert "scaler" in torch.load(next((tmp_path / "runs").iterdir()) / "last.pt", weights_only=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(C.UserError, match="--skip-bad under torchrun"):
        lvs.main(_quick(tiny, tmp_path / "x", "--skip-bad"))


# ===== issue 23 (item 8): the methods on real-world data =====
def test_skip_bad_survives_a_batch_of_only_bad_clips_and_the_swapped_n_is_its_own(tiny, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(tiny, root)
    ids = C.read_split(root / "splits" / "test.txt")
    (root / "frames" / f"{ids[0]}.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    lvs.main(_quick(tiny, tmp_path / "runs", "--epochs", "1"))
    ck = next((tmp_path / "runs").iterdir()) / "best.pt"
    lvs.main(["--eval", "--ckpt", str(ck), "--data", str(root), "--skip-bad", "--batch-size", "1", "--out",
              str(tmp_path / "ev")])
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["n"] == 7 and res["skipped"] == 1 and res["audio_swapped"]["n"] == 7


def test_a_checkpoint_without_imagenet_weights_never_downloads_them(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(C, "imagenet_state_dict", lambda *a: pytest.fail("downloads ImageNet weights"))
    ez_vsl.main(_quick(tiny, tmp_path / "runs", "--epochs", "1"))                 # its test: OGL skipped too
    ck = next((tmp_path / "runs").iterdir()) / "best.pt"
    vid = C.read_split(tiny / "splits" / "test.txt")[0]
    ez_vsl.main(["--predict", "--ckpt", str(ck), "--image", str(tiny / "frames" / f"{vid}.jpg"), "--audio",
                 str(tiny / "audio" / f"{vid}.wav"), "--out", str(tmp_path / "h.png")])
    ez_vsl.main(["--eval", "--ckpt", str(ck), "--out", str(tmp_path / "ev")])
    assert capsys.readouterr().out.count("OGL skipped: the checkpoint was trained without ImageNet weights") == 3


def test_a_cpu_preset_dataset_holds_no_frames(tiny):
    import pickle
    args = SimpleNamespace(data=str(tiny), limit=None, preset="cpu", decode="fast", image_size=112)
    ds = C.av_dataset(args, tiny / "splits" / "train.txt", "crop_flip", 3.0, "center", 16000)
    for i in range(len(ds)):
        ds[i]
    assert len(pickle.dumps(ds)) < 20_000                  # the ids and paths, not 24 decoded frames and waveforms


# ===== issue 23: real videos (data_prep.py) =====
def _clip23(path, video_ts, audio=(), sr=16000, acodec="pcm_s16le", vcodec="mpeg4", frame=_bits_frame, vtb=None,
            audio_first=False, matrix=None, bframes=0, damage=None, options=None):
    """Video frame k = frame(k) with timestamp video_ts[k] (in vtb units, default ms); audio: (t in s, mono float
    samples) chunks, each encoded with timestamp t; packets of [damage[0], damage[1]) s replaced by junk bytes."""
    import av
    from fractions import Fraction
    vtb = vtb or Fraction(1, 1000)
    with av.open(str(path), "w", options=options or {}) as c:
        def add_audio():
            s = c.add_stream(acodec, rate=sr)
            s.layout = "mono"
            return s
        st = add_audio() if audio and audio_first else None
        vs = c.add_stream(vcodec, rate=10)
        vs.height, vs.width = frame(0).shape[:2]
        vs.pix_fmt, vs.codec_context.time_base = "yuv420p", vtb
        if vcodec == "mpeg4":
            vs.codec_context.qscale, vs.codec_context.max_b_frames = 2, bframes
        if matrix:
            vs.set_display_matrix(matrix)
        st = st or (add_audio() if audio else None)
        for k, t in enumerate(video_ts):
            fr = av.VideoFrame.from_ndarray(frame(k), format="rgb24")
            fr.pts, fr.time_base = t, vtb
            for pkt in vs.encode(fr):
                c.mux(pkt)
        for pkt in vs.encode():
            c.mux(pkt)
        fmt = {"pcm_s16le": "s16", "mp2": "s16", "aac": "fltp", "libopus": "flt"}[acodec]
        for t, x in list(audio) + [(None, None)]:
            if x is None:
                pkts = st.encode() if st else []
            else:
                fr = av.AudioFrame.from_ndarray(((x * 32767).astype(np.int16) if fmt == "s16" else
                                                 x.astype(np.float32))[None], format=fmt, layout="mono")
                fr.sample_rate, fr.pts, fr.time_base = sr, round(t * sr), Fraction(1, sr)
                pkts = st.encode(fr)
            for pkt in pkts:
                if damage and pkt.pts is not None and damage[0] <= float(pkt.pts * pkt.time_base) < damage[1]:
                    junk = av.Packet(b"\xff" * 40)
                    junk.pts, junk.dts, junk.time_base, junk.stream = pkt.pts, pkt.dts, pkt.time_base, st
                    pkt = junk
                c.mux(pkt)


def _tone23(t0, t1, sr, n, burst_at=None):
    """(t, samples) chunks of n samples from t0 to t1 s: a 0.3 sine at 440 Hz; the chunk starting at burst_at is a
    0.9 cosine at 1 kHz (its first sample is the onset)."""
    out = []
    for i in range(round((t1 - t0) * sr / n)):
        t = t0 + i * n / sr
        k = np.arange(n) / sr
        loud = burst_at is not None and abs(t - burst_at) < 0.5 / sr
        out.append((t, 0.9 * np.cos(2 * np.pi * 1000 * k) if loud else 0.3 * np.sin(2 * np.pi * 440 * (t + k))))
    return out


def _onset(x, sr, after=0.0):
    """Time (s) of the first sample above 0.5 after `after` s."""
    i = int(after * sr)
    return (i + int(np.argmax(np.abs(x[i:]) > 0.5))) / sr


def test_issue23_display_rotation_and_exif_orientation(tmp_path):
    from PIL import Image
    asym = lambda k: np.concatenate([_bits_frame(k), np.full((64, 32, 3), 128, np.uint8)], 1)   # 64 high, 96 wide
    src = tmp_path / "src"
    src.mkdir()
    ts = [100 * k for k in range(45)]                                   # 4.5 s at 10 fps: the middle shows frame 22
    audio = _tone23(0, 4.5, 16000, 800)
    # ISO 14496-12 matrices: (p, q) -> (a p + c q, b p + d q); [0, 1, -1, 0] turns a quarter clockwise (a phone's
    # "rotate=90", FFmpeg's display rotation -90), [-1, 0, 0, -1] half a turn. The MOV has its audio stream first.
    _clip23(src / "phone.mov", ts, audio, frame=asym, audio_first=True, matrix=[0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30])
    _clip23(src / "upside.mov", ts, audio, frame=asym, matrix=[-65536, 0, 0, 0, -65536, 0, 0, 0, 1 << 30])
    # mirrors, which FFmpeg's frame.rotation reads as turns (180 and 0 degrees); a mirror across the diagonal
    _clip23(src / "hmirror.mov", ts, audio, frame=asym, matrix=[-65536, 0, 0, 0, 65536, 0, 0, 0, 1 << 30])
    _clip23(src / "vmirror.mov", ts, audio, frame=asym, matrix=[65536, 0, 0, 0, -65536, 0, 0, 0, 1 << 30])
    _clip23(src / "diagonal.mov", ts, audio, frame=asym, matrix=[0, 65536, 0, 65536, 0, 0, 0, 0, 1 << 30])
    out = tmp_path / "out"
    data_prep.main(["videos", str(src), "--out", str(out)])
    rows = data_prep.read_manifest(out)
    f = asym(22)
    for vid, want, note in (("phone", np.rot90(f, -1), "display rotation -90"),
                            ("upside", np.rot90(f, 2), "display rotation 180"),
                            ("hmirror", f[:, ::-1], "display matrix [-1 0 0 1] (mirrored)"),
                            ("vmirror", f[::-1], "display matrix [1 0 0 -1] (mirrored)"),
                            ("diagonal", f.transpose(1, 0, 2), "display matrix [0 1 1 0] (mirrored)")):
        got = np.asarray(C.load_image(out / "frames" / f"{vid}.jpg"), float)
        assert got.shape == want.shape and np.abs(got - want).mean() < 8, vid             # as a player shows it
        assert rows[vid]["orientation"] in (note, note.replace("180", "-180")), rows[vid]["orientation"]
    # EXIF orientation 6: the stored rows are the picture's columns; viewers turn it a quarter clockwise
    pics = tmp_path / "pics"
    pics.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(asym(5)).save(pics / "side.jpg", quality=95, exif=exif)
    _write_audio_file(pics / "side.flac")
    data_prep.main(["frames", str(pics), "--out", str(tmp_path / "o2")])
    got = np.asarray(C.load_image(tmp_path / "o2" / "frames" / "side.jpg"), float)
    assert got.shape == (96, 64, 3) and np.abs(got - np.rot90(asym(5), -1)).mean() < 8
    assert data_prep.read_manifest(tmp_path / "o2")["side"]["orientation"] == "EXIF orientation 6"
    img, note = data_prep.load_frame(pics / "side.jpg", upright=False)     # flickr: the stored pixels, as the official
    assert img.size == (96, 64) and note == "EXIF orientation 6 ignored (as the official loaders)"   # loaders read them


def test_issue23_frame_shown_at_the_middle_b_frames_late_video_and_webm_without_duration(tmp_path):
    import av
    from fractions import Fraction
    src = tmp_path / "src"
    src.mkdir()
    audio = _tone23(0, 4.5, 16000, 800)
    # B-frames: frame k is shown at k / 10 s in every container; the middle of 4.5 s (2.25 s) shows frame 22
    _clip23(src / "avi_b.avi", range(45), audio, vtb=Fraction(1, 10), bframes=2)
    _clip23(src / "mp4_b.mp4", [100 * k for k in range(45)], _tone23(0, 4.5, 44100, 1024), sr=44100, acodec="aac",
            bframes=2)
    # the video starts 0.25 s after the container (the audio starts at 0): frame k is shown at 0.25 + k / 10
    _clip23(src / "late.mkv", [250 + 100 * k for k in range(45)], audio)
    # a browser-style WebM: no duration in its header (written as a live stream)
    _clip23(src / "live.webm", [100 * k for k in range(45)], _tone23(0, 4.5, 48000, 960), sr=48000, acodec="libopus",
            vcodec="libvpx", options={"live": "1"})
    with av.open(str(src / "live.webm")) as c:
        assert c.duration is None
    with av.open(str(src / "late.mkv")) as c:
        late_dur = c.duration / 1e6
    out = tmp_path / "out"
    data_prep.main(["videos", str(src), "--out", str(out)])
    rows = data_prep.read_manifest(out)
    for vid in ("avi_b", "mp4_b", "live"):
        assert rows[vid]["status"] == "ok", rows[vid]
        assert _read_bits(C.load_image(out / "frames" / f"{vid}.jpg")) == 22, vid
        assert float(rows[vid]["frame_time"]) == pytest.approx(2.2, abs=0.002)
        assert float(rows[vid]["duration"]) == pytest.approx(4.5, abs=0.03)
    assert float(rows["live"]["audio_duration"]) == pytest.approx(4.5, abs=0.03)
    k = int((late_dur / 2 - 0.25) // 0.1)                      # shown at container start + duration / 2
    assert _read_bits(C.load_image(out / "frames" / "late.jpg")) == k
    assert float(rows["late"]["frame_time"]) == pytest.approx(0.25 + 0.1 * k, abs=0.002)   # on the clip's clock
    data_prep.main(["videos", str(src), "--out", str(tmp_path / "o2"), "--time", "1.0"])
    assert _read_bits(C.load_image(tmp_path / "o2" / "frames" / "late.jpg")) == 7    # 0.95 <= 1.0 < 1.05


def test_issue23_audio_placed_by_its_timestamps(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    ts = [100 * k for k in range(45)]
    # PCM in MKV: the audio starts 60 ms after the video, 155 ms are missing after its first chunk, a burst at 2.015 s
    pcm = _tone23(0.06, 0.11, 16000, 800) + _tone23(0.265, 4.5, 16000, 800, burst_at=2.015)
    _clip23(src / "pcm.mkv", ts, pcm)
    # AAC in MP4 (44.1 kHz): 155 ms missing after the first frame, a burst at 2.0 s
    aac = _tone23(0, 1024 / 44100, 44100, 1024) + _tone23(1024 / 44100 + 0.155, 4.5, 44100, 1024, burst_at=None)
    t_burst = aac[80][0]
    aac[80] = (t_burst, 0.9 * np.cos(2 * np.pi * 1000 * np.arange(1024) / 44100))
    _clip23(src / "aac.mp4", ts, aac, sr=44100, acodec="aac")
    # Opus in WebM: the packets of 2.0-3.0 s are damaged (undecodable), a burst at 3.5 s
    _clip23(src / "damaged.webm", ts, _tone23(0, 4.5, 48000, 960, burst_at=3.5), sr=48000, acodec="libopus",
            vcodec="libvpx", damage=(2.0, 3.0))
    _clip23(src / "silent.mkv", ts, [(i * 0.05, np.zeros(800)) for i in range(90)])
    out = tmp_path / "out"
    data_prep.main(["videos", str(src), "--out", str(out)])
    rows = data_prep.read_manifest(out)
    assert all(r["status"] == "ok" for r in rows.values()), rows
    x, sr = C.read_wav(out / "audio" / "pcm.wav")
    assert not x[:960].any() and not x[1760:4240].any() and np.abs(x[1000:1700]).max() > 0.25   # start kept, gap silent
    assert _onset(x, sr) == 2.015                                                # to the sample
    assert (rows["pcm"]["audio_start"], rows["pcm"]["audio_filled"]) == ("0.060", "0.155")
    x, sr = C.read_wav(out / "audio" / "aac.wav")
    assert abs(_onset(x, sr) - t_burst) < 0.025 and float(rows["aac"]["audio_filled"]) == pytest.approx(0.155, abs=0.002)
    x, sr = C.read_wav(out / "audio" / "damaged.wav")
    assert abs(_onset(x, sr) - 3.5) < 0.01 and float(rows["damaged"]["audio_duration"]) == pytest.approx(4.5, abs=0.03)
    assert float(rows["damaged"]["audio_filled"]) == pytest.approx(1.0, abs=0.03) and not x[33000:47000].any()
    for vid in ("pcm", "aac", "damaged"):
        assert rows[vid]["reason"].startswith("warning: audio timestamps have gaps ("), vid
    assert rows["silent"]["reason"] == "warning: the audio track is silent (peak below -60 dBFS)"
    assert "warning: audio timestamps have gaps: aac, damaged, pcm" in capsys.readouterr().out    # ids named


def test_issue23_ids_clashes_commas_formats_and_source(tmp_path):
    from fractions import Fraction
    audio = _tone23(0, 2.0, 16000, 800)
    ts = [100 * k for k in range(20)]
    for a, b in (("one/sample.mkv", "two/sample.mkv"), ("sample.mkv", "sample.mp4")):
        src = tmp_path / f"clash{len(a)}"
        for f in (a, b):
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            _clip23(src / f, ts, audio if f.endswith("mkv") else _tone23(0, 2.0, 44100, 1024), acodec="pcm_s16le"
                    if f.endswith("mkv") else "aac", sr=16000 if f.endswith("mkv") else 44100)
        with pytest.raises(C.UserError) as e:
            data_prep.main(["videos", str(src), "--out", str(tmp_path / "never")])
        assert "1 ids name more than one file" in str(e.value)
        assert str((src / a).resolve()) in str(e.value) and str((src / b).resolve()) in str(e.value)
    pics = tmp_path / "pics"
    pics.mkdir()
    _write_audio_file(pics / "x.flac")
    _write_audio_file(pics / "x.wav", codec="pcm_s16le")
    with pytest.raises(C.UserError, match="x.flac.*x.wav"):
        data_prep.main(["frames", str(pics), "--out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
    # a comma cannot be in an id (split files are cut at the first comma); MPEG-TS files are videos
    src = tmp_path / "ts"
    src.mkdir()
    _clip23(src / "a,b.mkv", ts, audio)
    _clip23(src / "clip.ts", ts, _tone23(0, 2.0, 48000, 1152), sr=48000, acodec="mp2")
    out = tmp_path / "out"
    data_prep.main(["videos", str(src), "--out", str(out)])
    rows = data_prep.read_manifest(out)
    assert rows["a,b"]["status"] == "failed" and "cannot be an id" in rows["a,b"]["reason"]
    assert not (out / "frames" / "a,b.jpg").exists() and C.read_split(out / "splits" / "all.txt") == ["clip"]
    assert rows["clip"]["status"] == "ok" and rows["clip"]["source"] == str((src / "clip.ts").resolve())
    import av
    with av.open(str(src / "clip.ts")) as c:                 # the TS muxer starts the video after the audio
        t0, dur, v0 = c.start_time / 1e6, c.duration / 1e6, float(c.streams.video[0].start_time * Fraction(1, 90000))
    assert v0 > t0 and _read_bits(C.load_image(out / "frames" / "clip.jpg")) == int((t0 + dur / 2 - v0) // 0.1)


def test_issue23_reruns_remake_failed_and_broken_clips(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    ts = [100 * k for k in range(53)]
    for v in ("a", "b"):
        _clip23(src / f"{v}.mkv", ts, _tone23(0, 5.3, 16000, 800))
    out = tmp_path / "out"
    data_prep.main(["videos", str(src), "--out", str(out), "--time", "1"])
    (out / "frames" / "a.jpg").write_bytes((out / "frames" / "a.jpg").read_bytes()[:300])    # truncated JPEG
    (out / "audio" / "b.wav").write_bytes((out / "audio" / "b.wav").read_bytes()[:30])       # a 30-byte WAV
    capsys.readouterr()
    data_prep.main(["videos", str(src), "--out", str(out), "--time", "1"])
    assert "0 already done, 2 to process" in capsys.readouterr().out
    data_prep.main(["check", str(out), "--method", "ez_vsl"])                                  # both good again
    assert _read_bits(C.load_image(out / "frames" / "a.jpg")) == 10
    # a re-run with other settings that fails removes the earlier outputs; no clip ready: one error line, status 2
    r = run_py("data_prep.py", "videos", src, "--out", out, "--time", "7", check=False)
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "no clip could be prepared" in r.stderr
    assert "Traceback" not in r.stderr and "shorter: a, b" in r.stdout                   # the summary names the ids
    assert not list((out / "frames").iterdir()) and not list((out / "audio").iterdir())
    assert all(row["status"] == "failed" for row in data_prep.read_manifest(out).values())


def test_issue23_check_applies_the_methods_rules(tmp_path, capsys):
    from PIL import Image
    root = tmp_path / "root"
    for d in ("frames", "audio"):
        (root / d).mkdir(parents=True)
    t = lambda s, sr: 0.3 * np.sin(2 * np.pi * 440 * np.arange(int(s * sr)) / sr)
    for vid, seconds, sr in (("full", 10, 16000), ("rate48k", 10, 48000), ("two_s", 2, 16000), ("half_s", 0.5, 16000)):
        Image.fromarray(_bits_frame(1)).save(root / "frames" / f"{vid}.jpg")
        data_prep.write_wav(root / "audio" / f"{vid}.wav", t(seconds, sr), sr)
    with pytest.raises(SystemExit) as e:
        data_prep.main(["check", str(root)])
    assert e.value.code == 1
    bad = dict(ln.split("\t", 1) for ln in (root / "check_all.txt").read_text().splitlines())
    assert set(bad) == {"rate48k", "two_s", "half_s"}
    assert "sample rate 48000 Hz" in bad["rate48k"] and "(lvs_hardway" not in bad["rate48k"]     # every method's rule
    assert "audio too short" in bad["two_s"] and bad["two_s"].endswith("(lvs_hardway)")          # 10 s test window
    assert "(ez_vsl, lvs_hardway, sspl)" in bad["half_s"]                                         # CSOL's 1 s: tiled
    out = capsys.readouterr().out
    assert "ez_vsl will tile (as the official code does) the audio of 1 clips shorter than its window: two_s" in out
    assert "csol_classaware will tile (as the official code does) the audio of 1 clips shorter than its window: half_s" in out
    assert "lvs_hardway will tile" not in out
    with pytest.raises(SystemExit):
        data_prep.main(["check", str(root), "--method", "ez_vsl"])
    bad = dict(ln.split("\t", 1) for ln in (root / "check_all.txt").read_text().splitlines())
    assert set(bad) == {"rate48k", "half_s"}
    (root / "audio" / "rate48k.wav").unlink()
    (root / "frames" / "rate48k.jpg").unlink()
    (root / "audio" / "half_s.wav").unlink()
    (root / "frames" / "half_s.jpg").unlink()
    data_prep.main(["check", str(root), "--method", "ez_vsl"])                   # returns: status 0
    assert "0 bad" in capsys.readouterr().out


def test_issue23_synth_arguments_checked_before_writing(tmp_path):
    for args, msg in ((["--image-size", "8"], "at least 32"), (["--scale", "0"], "> 0"), (["--seed", "-1"], ">= 0"),
                      (["--classes", "3"], "between 4")):
        with pytest.raises(C.UserError, match=msg):
            data_prep.main(["synth", "--out", str(tmp_path / "s"), *args])
        assert not (tmp_path / "s").exists()
    r = run_py("data_prep.py", "synth", "--out", tmp_path / "s", "--image-size", "8", check=False)
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "Traceback" not in r.stderr


def test_the_gpu_proof_script_runs_its_steps_on_the_cpu(tmp_path):
    """.ci/gpu --device cpu --tiny: every step of the GPU run, small, on this CPU (so it works before a GPU sees it),
    in the GPU run's order, its whole record in two files (issue 32)."""
    import tarfile
    r = run_py(HERE / ".ci" / "gpu", "--device", "cpu", "--tiny", "--out", tmp_path / "out", "--work", tmp_path / "w",
               timeout=900, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == ["logs.tar.gz", "summary.json"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    rows = {s["step"]: s for s in summary["steps"]}
    steps = {k: row["status"] for k, row in rows.items()}
    assert len(steps) >= 30 and set(steps.values()) <= {"ok", "skipped"} and summary["passed"], steps
    assert all(steps[k] == "ok" for k in steps if k.endswith((".train", ".resume", ".eval", ".predict", ".torchrun1",
                                                              ".torchrun2", ".fp16"))), steps
    assert all(steps[f"{m}.video"] == "ok" or rows[f"{m}.video"]["note"].startswith("not available")
               for m in ("ezvsl", "lvs", "sspl", "csol"))
    # the wanted figures first: env, data, nvJPEG, the benchmarks, NCCL, then the chains; --compile last
    order = list(steps)
    assert order[:10] == ["env", "synth", "nvjpeg", "synth.640", "bench.ezvsl", "bench.lvs", "bench.sspl",
                          "bench.csol", "bench.ezvsl.pil", "nccl"] and order[-1] == "bench.ezvsl.compile", order
    # everything embedded: the checks, every results.json and benchmark.json, the nvJPEG fallbacks (none on a CPU)
    assert summary["env"]["torch"] == torch.__version__ and summary["env"]["dev_shm_mib"] > 0
    assert summary["nvjpeg"]["summary"]["files"] == 11 and summary["nccl"]["summary"]["world"] == 2
    for name in ("bench.ezvsl", "bench.csol", "bench.ezvsl.pil"):
        b = rows[name]["benchmark"]
        assert b["nvjpeg_fallback_batches"] == 0 and b["peak_reserved_mb"] is None and b["image_size"] == 112
        assert set(b["train_ms_per_step"]) == {"next_batch", "batch_to_device", "train_step"}
    assert all(rows[k]["results"]["nvjpeg_fallback_batches"] == 0 for k in steps if k.endswith((".train", ".eval")))
    assert summary["git"] and summary["host"]["open_files_limit"]["soft"] == summary["host"]["open_files_limit"]["hard"]
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as tar:
        logs = set(tar.getnames())
    assert logs == {f"logs/{k}.log" for k in steps if rows[k].get("command")} and len(logs) >= 30, logs
    # the benchmarks read 640x360 frames
    from PIL import Image
    assert Image.open(next((tmp_path / "w" / "bench640" / "frames").glob("*.jpg"))).size == (640, 360)


def test_data_prep_check_refuses_an_unwritable_report_before_reading_a_clip(tiny, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setattr(data_prep, "clip_problems", lambda job: pytest.fail("read a clip before checking the report"))
    with pytest.raises(C.UserError, match="the report .--report. .*a_file"):
        data_prep.main(["check", str(tiny), "--split", "test", "--report", str(tmp_path / "a_file" / "r.txt")])


# Issue 33: Tests that guard the numbers (each names the deliberate mistake it was seen to catch)
def test_issue33_csol_stage2_loss_against_the_official_formula():
    """training_stage_two.py's L_loc, written here in NumPy: l = sigmoid(5 cos) (Eq. 1); positives: GMP of l(a_i, v_i)
    -> 1; negatives: the max of each of the four quadrants (AdaptiveMaxPool2d((2, 2))) of l(a_i, v_j), j another
    grid (ours: the previous clip) -> 0; L = 0.5 (mean BCE_pos + mean BCE_neg). Caught: the negative term dropped."""
    net = _csol_identity_net()
    rng = np.random.default_rng(33)
    v, a = rng.normal(size=(3, 3, 4, 4)), rng.normal(size=(3, 3))
    loss = csol.stage2_loc_loss(net, torch.tensor(v, dtype=torch.float32), torch.tensor(a, dtype=torch.float32))
    vn, an = v / np.linalg.norm(v, axis=1, keepdims=True), a / np.linalg.norm(a, axis=1, keepdims=True)
    l = lambda i, j: 1 / (1 + np.exp(-5 * np.einsum("chw,c->hw", vn[j], an[i])))  # noqa: E731   audio i, image j
    pos = np.array([l(i, i).max() for i in range(3)])
    neg = np.array([l(i, i - 1)[y:y + 2, x:x + 2].max() for i in range(3) for y in (0, 2) for x in (0, 2)])
    assert len(set(np.round(neg, 6))) == 12                                  # four distinct quadrant maxima per pair
    ref = 0.5 * (-np.log(pos).mean() - np.log(1 - neg).mean())
    assert loss.item() == pytest.approx(ref, rel=1e-5)


def test_issue33_csol_class_maps_at_the_official_temperature():
    """Eq. 13 as test_stage_two.py: softmax(3 s) over the K classes per pixel (the factor 3 multiplies). Hand-worked:
    s = (2, 0, -1) -> e^6 / (e^6 + 1 + e^-3) = 0.99741. Caught: softmax(s / 3)."""
    s = torch.tensor([2.0, 0.0, -1.0]).view(1, 3, 1, 1)
    e = np.exp([6.0, 0.0, -3.0])
    np.testing.assert_allclose(csol.final_maps(s)[0, :, 0, 0].numpy(), e / e.sum(), rtol=1e-6)
    np.testing.assert_allclose(csol.final_maps(s, 3.0)[0, :, 0, 0].numpy(), e / e.sum(), rtol=1e-6)
    assert csol.final_maps(s)[0, 0, 0, 0].item() == pytest.approx(0.99741, abs=1e-5)
    assert csol.build_parser().parse_args([]).map_temp == 3.0


# each method's official test: (protocol, align_corners of the bilinear resize; False = cv2.resize)
OFFICIAL_TEST = {"lvs_hardway": ("median_strict", False), "ez_vsl": ("median", True), "sspl": ("abs0.5", False),
                 "csol_classaware": ("rel0.1", False)}
METHOD_MODULES = {"lvs_hardway": lvs, "ez_vsl": ez_vsl, "sspl": sspl, "csol_classaware": csol}


def _eval_args(mod, tiny, tmp_path, monkeypatch):
    """The args a method's --eval runs with (its main up to run_eval)."""
    got = []
    monkeypatch.setattr(mod, "run_eval", lambda args, *a, **k: got.append(args))
    mod.main(["--eval", "--ckpt", str(tmp_path / "x.pt"), "--data", str(tiny), "--out", str(tmp_path / "ev"),
              "--limit", "3"])
    return got[0]


@pytest.mark.parametrize("name", list(METHOD_MODULES))
def test_issue33_each_method_scores_with_its_official_resize_and_threshold(name, tiny, tmp_path, monkeypatch):
    """The method's --eval on given maps: every per-sample cIoU equals the official per-sample rule with the official
    test's resize (issue 12's re-implementation), and the other resize would change some. Caught: LVS with
    align_corners=True."""
    mod = METHOD_MODULES[name]
    args = _eval_args(mod, tiny, tmp_path, monkeypatch)
    protocol, ac = OFFICIAL_TEST[name]
    ids, ann = C.read_split(args.test_split), C.load_annotations(args.annotations)
    rng = np.random.default_rng(33)
    maps = {k: rng.normal(size=(7, 7)).astype(np.float32) for k in ids}
    ds = SimpleNamespace(ids=ids)
    if name == "csol_classaware":
        monkeypatch.setattr(mod, "compute_outputs", lambda *a, **k: (maps, {}))
        res = mod.evaluate_single(None, ds, ann, args, "cpu")
    else:
        monkeypatch.setattr(mod, "compute_maps", lambda *a, **k: (maps, {}) if name == "ez_vsl" else maps)
        res = mod.evaluate(None, ds, ann, args, "cpu")
    ref = [_official_ciou(maps[k], ann[k], protocol, ac) for k in ids]
    assert [res["per_sample"][k] for k in ids] == ref
    assert ref != [_official_ciou(maps[k], ann[k], protocol, not ac) for k in ids]     # the resize matters here


class _FixedFeatures(torch.nn.Module):
    """A stand-in for a method's encoders: every clip gets the same visual features V (c, h, w) and audio vector A,
    in each method's forward's form (LVS / EZ-VSL: forward -> L2-normalised V, A; SSPL: audio, visual; CSOL:
    features)."""

    def __init__(self, V, A):
        super().__init__()
        self.V, self.A = V, A

    def forward(self, image, spec):
        return (torch.nn.functional.normalize(self.V, dim=0).expand(len(image), -1, -1, -1),
                torch.nn.functional.normalize(self.A, dim=0).expand(len(image), -1))

    def audio(self, wav):
        return self.A.expand(len(wav), -1), None

    def visual(self, image, f_a, cycles=None):
        return self.V.expand(len(image), -1, -1, -1)

    def features(self, image, spec):
        return self.V.expand(len(image), -1, -1, -1), self.A.expand(len(image), -1)


@pytest.mark.parametrize("name", list(METHOD_MODULES))
def test_issue33_each_method_map_is_raw_on_its_negative_audio_scale_and_upright(name, tiny, tmp_path, monkeypatch):
    """The map a method's --eval scores and --negatives thresholds, through its test data path, from known features:
    row y, column x of the map is location (y, x) of the feature grid (not transposed), on the raw scale its
    --negatives threshold is set for (NEG_SCALE): the cosine (LVS S_ii, EZ-VSL S^AVL, SSPL S of Eq. 3) or CSOL's
    l = sigmoid(5 cos) of Eq. 1; never min-max normalised. CSOL's class maps: softmax(3 D.f l) (Eq. 7-8, 13).
    Caught: SSPL's map min-maxed (its --negatives pIA 0.2% -> 49%), a transposed LVS map."""
    mod = METHOD_MODULES[name]
    args = _eval_args(mod, tiny, tmp_path, monkeypatch)
    rng = np.random.default_rng(7)
    V, A = rng.normal(size=(3, 3, 3)), rng.normal(size=3)
    cos = np.einsum("chw,c->hw", V, A) / np.linalg.norm(V, axis=0) / np.linalg.norm(A)    # cos[y, x]
    assert cos.min() < -0.2 and cos.max() > 0.2 and not np.allclose(cos, cos.T)
    stub = _FixedFeatures(torch.tensor(V, dtype=torch.float32), torch.tensor(A, dtype=torch.float32))
    ds = mod.make_dataset(args, args.test_split, False)
    if name == "csol_classaware":
        net = _csol_identity_net(K=2)
        net.D = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
        net.features = stub.features
        maps, cls = mod.compute_outputs(net, ds, args, "cpu", with_classes=True)
        ref, lo, hi = 1 / (1 + np.exp(-5 * cos)), 0.0, 1.0
        s = V[[0, 2]] * ref                                                  # Eq. 7-8 with the identity affine
        e = np.exp(3 * (s - s.max(0)))
        for k in ds.ids:
            np.testing.assert_allclose(cls[k], e / e.sum(0), rtol=1e-5, atol=1e-7)
    elif name == "ez_vsl":
        maps, ref, lo, hi = mod.compute_maps(stub, ds, "cpu", args)[0], cos, -1.0, 1.0
    else:
        maps, ref, lo, hi = mod.compute_maps(stub, ds, "cpu", args), cos, -1.0, 1.0
    assert sorted(maps) == sorted(ds.ids)
    for k in ds.ids:
        np.testing.assert_allclose(maps[k], ref, rtol=1e-5, atol=1e-6)
    assert f"in [{lo:g}, {hi:g}]" in mod.NEG_SCALE
    assert lo < mod.NEG_THRESHOLD < hi


def test_issue33_best_pt_is_the_epoch_with_the_best_validation_score(tiny, tmp_path):
    """Run.end_epoch over four epochs whose validation cIoU@0.5 peaks at epoch 3 (the LVS learning run's case): best.pt
    holds epoch 3's weights, last.pt epoch 4's, and the test after training reads best.pt. Caught: best.pt = the
    last epoch."""
    args = C.parse_args(lvs.build_parser(), ["--train", "--data", str(tiny), "--epochs", "4", "--batch-size", "8",
                                                 "--out", str(tmp_path)])
    C.setup(args, lvs.PRESETS, lvs.synthetic_data, "median_strict", False, log=lambda *a: None)
    run = C.Run(args, lvs.METHOD)
    model = torch.nn.Linear(1, 1)
    run.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), model)
    for epoch, score in zip(run.epochs(), (0.25, 0.5, 0.75, 0.5)):
        model.bias.data.fill_(epoch + 1.0)                                   # the weights say which epoch they are
        val = {"test": {"ciou@0.5": score, "auc": score, "mean_ciou": score}, "protocol": "median_strict", "n": 8}
        run.end_epoch(epoch, {"loss": [1.0]}, lambda: val)
    assert run.finish()
    best, last = (torch.load(run.dir / f, weights_only=False) for f in ("best.pt", "last.pt"))
    assert best["epoch"] == 3 and best["model"]["bias"].item() == 3.0 and best["best"] == 0.75
    assert last["epoch"] == 4 and last["model"]["bias"].item() == 4.0
    assert args.ckpt == str(run.dir / "best.pt")


def test_issue33_negative_ap_recall_over_every_positive_pair():
    """SLAVC's AP when only some positive pairs are localised (recall = correct detections / ALL positive pairs).
    Five clips, two localised: ranked pairs C, C (confidence 1), W, W, W (0.8), then 15 negatives (-1). Hand-worked:
    P = 1 at R = 1/5, 2/5, then R stays: AP = 2/5 = 0.4, max-F1 = 2 * 1 * 0.4 / 1.4. Caught: recall over the correct
    pairs (AP 1.0)."""
    assert C.detection_ap([1.0, 1.0, 0.8, 0.8, 0.8], [True, True, False, False, False], 5) == \
        pytest.approx((0.4, 0.8 / 1.4))
    # distinct confidences, a miss between hits: C (P 1, R 1/4), W, C (P 2/3, R 2/4); two positives never correct
    assert C.detection_ap([0.9, 0.8, 0.7, 0.1], [True, False, True, False], 4)[0] == pytest.approx(0.25 + 0.25 * 2 / 3)
    ids = [f"c{i}" for i in range(5)]
    ann = {k: {"file": k, "bbox": [[0.0, 0.0, 0.5, 0.5]]} for k in ids}     # the top-left quarter
    pos = {}
    for i, k in enumerate(ids):
        m = np.full((224, 224), -1.0, np.float32)
        if i < 2:
            m[:112, :112] = 1.0                                              # on the box: cIoU 1, confidence 1
        else:
            m[112:, 112:] = 0.8                                              # off the box: cIoU 0, confidence 0.8
        pos[k] = m
    dark = {k: np.full((224, 224), -1.0, np.float32) for k in ids}
    r = C.negative_metrics(pos, {kind: dark for kind in C.NEGATIVE_KINDS}, ann, ids, 0.5)
    assert r["positives"]["ciou@0.5"] == pytest.approx(0.4)
    assert r["ap"] == pytest.approx(0.4) and r["max_f1"] == pytest.approx(0.8 / 1.4)
    assert all(v["ap"] == pytest.approx(0.4) for v in r["per_kind"].values())


def test_issue33_data_prep_clips_that_start_late(tmp_path):
    """Clips whose container clock starts late: an MPEG-TS and an MP4 starting at 1.5 s (PyAV's container start: the
    earliest stream, ~1.47 s), and an MKV whose streams all start at 5 s (FFmpeg gives it duration 9.5: the end
    time). Video frame k is shown at start + k / 10 s, 4.5 s of video and audio: the middle of the clip shows frame 22
    (start + 2.25 s), the duration is 4.5 s, no warning. Caught: the container start dropped (frame 7)."""
    import av
    src = tmp_path / "src"
    src.mkdir()
    for name, t0, sr, acodec, n in (("late_ts.ts", 1.5, 16000, "mp2", 1152), ("late_mp4.mp4", 1.5, 44100, "aac", 1024),
                                    ("late_mkv.mkv", 5.0, 16000, "pcm_s16le", 800)):
        _clip23(src / name, [round(1000 * t0) + 100 * k for k in range(45)], _tone23(t0, t0 + 4.5, sr, n), sr=sr,
                acodec=acodec)
    with av.open(str(src / "late_mkv.mkv")) as c:
        assert (c.start_time, c.duration) == (5_000_000, 9_500_000)          # the header's duration is an end time
    out = tmp_path / "out"
    data_prep.main(["videos", str(src), "--out", str(out)])
    rows = data_prep.read_manifest(out)
    for vid in ("late_ts", "late_mp4", "late_mkv"):
        assert rows[vid]["status"] == "ok" and rows[vid]["reason"] == "", rows[vid]
        assert _read_bits(C.load_image(out / "frames" / f"{vid}.jpg")) == 22, vid
        assert float(rows[vid]["duration"]) == pytest.approx(4.5, abs=0.05), rows[vid]
        assert float(rows[vid]["audio_duration"]) == pytest.approx(4.5, abs=0.05), rows[vid]
    assert float(rows["late_mkv"]["frame_time"]) == pytest.approx(2.2, abs=0.002)   # on the clip's clock


# ---------------------------------------------------------------------------------------------------------
# Issue 30: open set, AVSBench, IS3
# ---------------------------------------------------------------------------------------------------------
def _normalize_img(x):                                   # SSLalignment utils.normalize_img, written from it
    vmin, vmax = x.min(), x.max()
    return (x - vmin) / (vmax - vmin) if vmax - vmin != 0 else x


def _ref_is3(maps: dict, gts: dict) -> dict:
    """SSLalignment test.py (validate) + utils.Evaluator_iiou, per sample, from their definitions (maps at 224)."""
    def cal_ciou(infer, gtmap, thres):
        infer_map = np.zeros((224, 224))
        infer_map[infer > thres] = 1
        with np.errstate(invalid="ignore"):
            return np.sum(infer_map * gtmap) / (np.sum(gtmap) + np.sum(infer_map * (gtmap == 0)))
    ciou, adap, iou, iou_adap = [], [], {}, {}
    for name, m in maps.items():
        pred, gt_map = _normalize_img(m), gts[name]
        ciou.append(cal_ciou(pred, gt_map, np.sort(pred.flatten())[int(224 * 224 * 0.5)]))
        gt_nums = (gt_map != 0).sum()
        if int(gt_nums) == 0:
            gt_nums = 224 * 224 // 2
        adap.append(cal_ciou(pred, gt_map, np.sort(pred.flatten())[224 * 224 - int(gt_nums)]))
        short = "_".join(name.split("_")[:-1])
        iou.setdefault(short, []).append(ciou[-1])
        iou_adap.setdefault(short, []).append(adap[-1])

    def iiou_at(d, t):               # the one deviation, as the evaluator's cIoU: a NaN cIoU fails (not NaN overall)
        out = []
        for name in d:
            pair = np.nan_to_num(np.array(d[name]), nan=-1.0)
            pair[pair >= t] = 1
            pair[pair < t] = 0
            out.append(np.min(pair))
        return np.mean(out)
    thr = [0.05 * i for i in range(21)]
    auc = lambda c: np.trapezoid([np.sum(np.array(c) >= t) / len(c) for t in thr], thr)
    return {"ciou@0.5": np.sum(np.array(ciou) >= 0.5) / len(ciou), "auc": auc(ciou),
            "ciou_adap": np.sum(np.array(adap) >= 0.5) / len(adap), "auc_adap": auc(adap),
            "iiou": iiou_at(iou, 0.5), "iiou_adap": iiou_at(iou_adap, 0.5),
            "iauc": np.trapezoid([iiou_at(iou, t) for t in thr], thr),
            "iauc_adap": np.trapezoid([iiou_at(iou_adap, t) for t in thr], thr)}


def _is3_case(seed=0, n_images=5):
    """Maps and boxes at 224 with ties, constant maps and empty boxes; two annotations per image."""
    rng, maps, gts, ann = np.random.default_rng(seed), {}, {}, {}
    for g in range(n_images):
        for target in ("dog", "piano"):
            vid = f"dog_piano_{g}_{target}"
            kind = (g + (target == "dog")) % 5
            m = (rng.integers(0, 4, (224, 224)) if kind == 0 else np.full((224, 224), 2.5) if kind == 1 else
                 rng.normal(size=(224, 224)))
            m[rng.integers(0, 150):, rng.integers(0, 150):] += 3 * (kind == 3)
            box = [int(v) for v in np.sort(rng.integers(0, 225, 4))[[0, 1, 2, 3]]] if kind != 4 else [10, 10, 10, 50]
            box = [box[0], box[1], box[3], box[2] + 1] if kind != 4 else box
            maps[vid] = m.astype(np.float32)
            g_map = np.zeros((224, 224))
            g_map[box[1]:box[3], box[0]:box[2]] = 1                  # SSLalignment bbox2gtmap
            gts[vid] = g_map
            ann[vid] = {"file": vid, "bbox": [[data_prep.pixel_box(v) for v in box]], "group": f"dog_piano_{g}"}
    maps["dog_piano_4_piano"][:] = 7.0                 # an empty box and a constant map: cIoU 0/0 = NaN
    return maps, gts, ann


def test_issue30_is3_protocol_equals_sslalignment_per_sample():
    for seed in range(3):
        maps, gts, ann = _is3_case(seed)
        assert all(np.array_equal(C.gt_map(ann[v]), gts[v]) for v in ann)            # the boxes round-trip
        res = C.evaluate_maps(maps, ann, protocol="is3", baselines=False)
        ref = _ref_is3(maps, gts)
        for k, v in ref.items():
            assert res["test"][k] == pytest.approx(v, abs=1e-12), (seed, k)
        assert res["test"]["n_images"] == 5 and res["n"] == 10
    assert np.isnan(res["per_sample"]["dog_piano_4_piano"])
    maps, gts, ann = _is3_case(0)
    text = C.format_report(C.evaluate_maps(maps, ann, protocol="is3"))
    assert "IIoU" in text and "5 images, N=10 annotations" in text


def test_issue30_is3_an_image_missing_an_annotation_is_an_error():
    maps, _, ann = _is3_case(1)
    one = dict(maps)
    del one["dog_piano_2_dog"]
    with pytest.raises(C.UserError, match="IS3 image dog_piano_2: 1 of its 2 annotations listed with a map"):
        C.evaluate_maps(one, ann, protocol="is3")
    lone = {k: v for k, v in ann.items() if k != "dog_piano_2_dog"}
    with pytest.raises(C.UserError, match="IS3 image dog_piano_2: 1 of its 1 annotations listed"):
        C.evaluate_maps({k: maps[k] for k in lone}, lone, protocol="is3")


def _ref_avsbench(maps: dict, gts: dict, batch=None) -> dict:
    """ACL-SSL AVSBench/eval_utils.py Evaluator (thr 0.5 and the median) and OpenNLPLab/AVSBench utility.py mask_iou /
    _eval_pr / Eval_Fmeasure, per frame in float32 numpy, on min-max normalised maps (written from them)."""
    f32, thl = np.float32, torch.linspace(0, 1 - 1e-10, 255).numpy()          # the official threshold list

    def iou(pred, target, thr):
        p = (pred > thr).astype(f32)
        if target.sum() == 0:
            return ((1 - target) * (1 - p)).sum(dtype=f32) / (f32(224 * 224) + f32(1e-7))
        return (p * target).sum(dtype=f32) / (np.maximum(p, target).sum(dtype=f32) + f32(1e-7))

    def fcurve(pred, y):
        prec, recall = np.zeros(255, f32), np.zeros(255, f32)
        for i in range(255):
            y_temp = (pred >= thl[i]).astype(f32)
            tp = (y_temp * y).sum(dtype=f32)
            prec[i], recall[i] = tp / (y_temp.sum(dtype=f32) + f32(1e-20)), tp / (y.sum(dtype=f32) + f32(1e-20))
        with np.errstate(invalid="ignore"):
            f = (1 + f32(0.3)) * prec * recall / (f32(0.3) * prec + recall)
        f[f != f] = 0
        return f
    q = {k: _normalize_img(m) for k, m in maps.items()}
    curves = [fcurve(q[k], gts[k]) if gts[k].sum() else None for k in maps]
    out = {"miou": np.mean([iou(q[k], gts[k], 0.5) for k in maps]),
           "miou_median": np.mean([iou(q[k], gts[k], np.sort(q[k].flatten())[224 * 224 // 2]) for k in maps]),
           "fscore": np.max(np.mean([c for c in curves if c is not None], axis=0))}
    if batch:
        scores = []
        for s in range(0, len(curves), batch):
            got = [c for c in curves[s:s + batch] if c is not None]
            scores.append(np.max(np.mean(got, axis=0)) if got else 0.0)
        out["fscore_batch"] = np.mean(scores)
    return out


def _avs_case(tmp_path, seed=0, n=9):
    """Maps at 224 (ties, constant maps) and masks written as PNG (blobs; two empty)."""
    rng, maps, gts, entries = np.random.default_rng(seed), {}, {}, []
    yy, xx = np.mgrid[:224, :224]
    (tmp_path / "masks").mkdir(exist_ok=True)
    for i in range(n):
        vid = f"clip{i}_{i % 5 + 1}"
        cy, cx, r = rng.integers(30, 190, 2).tolist() + [int(rng.integers(5, 80))]
        g = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.float32) * (i % 4 != 3)
        m = (rng.integers(0, 6, (224, 224)) if i % 3 == 0 else np.full((224, 224), -1.0) if i == 4 else
             rng.normal(size=(224, 224)) + 2 * g)
        Image.fromarray((g * 255).astype(np.uint8)).save(tmp_path / "masks" / f"{vid}.png")
        maps[vid], gts[vid] = m.astype(np.float32), g
        entries.append({"file": vid, "class": "x", "bbox": [], "mask": f"masks/{vid}.png"})
    (tmp_path / "annotations.json").write_text(json.dumps(entries))
    return maps, gts, C.load_annotations(tmp_path / "annotations.json")


from PIL import Image  # noqa: E402  (the mask fixtures)


def test_issue30_avsbench_protocol_equals_the_official_per_frame(tmp_path):
    for seed in range(2):
        maps, gts, ann = _avs_case(tmp_path, seed)
        res = C.evaluate_maps(maps, ann, protocol="avsbench", baselines=False)
        ref = _ref_avsbench(maps, gts, batch=4)
        for k in ("miou", "miou_median", "fscore"):
            assert res["test"][k] == pytest.approx(float(ref[k]), rel=2e-7, abs=1e-7), (seed, k)
        assert res["test"]["n_empty_mask"] == 2 and res["n"] == 9
        assert eval_cioU.fscore_batched(res["f_curves"], 4) == pytest.approx(float(ref["fscore_batch"]), rel=2e-7)
    text = C.format_report(res)
    assert "mIoU" in text and "N=9 frames, 2 with an empty mask" in text


def test_issue30_mask_errors_are_one_line(tmp_path):
    maps, gts, ann = _avs_case(tmp_path)
    Image.fromarray(np.zeros((100, 120), np.uint8)).save(tmp_path / "masks" / "clip1_2.png")
    with pytest.raises(C.UserError, match=r"clip1_2.png: a 120x100 mask; AVSBench masks are 224x224"):
        C.evaluate_maps(maps, ann, protocol="avsbench")
    (tmp_path / "masks" / "clip1_2.png").unlink()
    with pytest.raises(C.UserError, match=r"clip1_2.png: mask file not found"):
        C.evaluate_maps(maps, ann, protocol="avsbench")
    (tmp_path / "bad.json").write_text(json.dumps([{"file": "a", "bbox": [], "mask": 3}]))
    with pytest.raises(C.UserError, match=r"bad.json entry 0 \(a\): an entry needs .* \(and 'mask': a PNG path\)"):
        C.load_annotations(tmp_path / "bad.json")


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _wav(path, seconds, sr=16000, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(seed).uniform(-0.5, 0.5, int(seconds * sr))
    data_prep.write_wav(path, x, sr)
    return C.read_wav(path)[0]


def _is3_release(src, n_images=3):
    """The IS3 release's layout: images/, audio_wav/, IS3_annotation.json with the authors' absolute paths."""
    rng, entries = np.random.default_rng(0), []
    for g in range(n_images):
        img = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
        pair = (("accordion", "baby"), ("dog", "piano"), ("cat", "drum"))[g % 3]
        for target in pair:
            name = f"{pair[0]}_{pair[1]}_{10467 + g}_{target}"
            _png(src / "images" / f"{name}.png", img)
            _wav(src / "audio_wav" / f"{name}.wav", 3.0, seed=g)
            x1, y1 = (int(v) for v in rng.integers(0, 120, 2))
            entries.append({"image": f"/mnt/lynx2/users/arda/synthetic3241/visual_frames/{name}.png",
                            "audio": f"/mnt/lynx2/users/arda/synthetic3241/audio_wav/{name}.wav",
                            "gt_box": [x1, y1, x1 + 61, y1 + 100.7]})
    (src / "IS3_annotation.json").write_text(json.dumps(entries))
    return entries


def test_issue30_data_prep_is3_reads_the_release(tmp_path):
    src, root = tmp_path / "IS3", tmp_path / "is3"
    entries = _is3_release(src)
    data_prep.main(["is3", str(src), "--out", str(root)])
    ann = C.load_annotations(root / "annotations.json")
    ids = C.read_split(root / "splits" / "test.txt")
    assert len(ids) == 6 and set(ids) == set(ann)
    for e in entries:                                            # SSLalignment bbox2gtmap of [int(v) for v in gt_box]
        vid = e["image"].split("/")[-1].split(".")[0]
        x1, y1, x2, y2 = (int(v) for v in e["gt_box"])
        g = np.zeros((224, 224))
        g[y1:y2, x1:x2] = 1
        assert np.array_equal(C.gt_map(ann[vid]), g) and ann[vid]["group"] == "_".join(vid.split("_")[:-1])
        assert (root / "frames" / f"{vid}.jpg").is_file() and (root / "audio" / f"{vid}.wav").is_file()
    # --boxes (the box list in SSLalignment's metadata, any paths); an image missing an audio file is left out
    (src / "IS3_annotation.json").unlink()
    (src / "boxes.json").write_text(json.dumps(entries))
    (src / "audio_wav" / "dog_piano_10468_piano.wav").unlink()
    r = tmp_path / "is3b"
    data_prep.main(["is3", str(src), "--out", str(r), "--boxes", str(src / "boxes.json")])
    assert len(C.read_split(r / "splits" / "test.txt")) == 4
    assert not any("10468" in e["file"] for e in json.loads((r / "annotations.json").read_text()))
    for bad, msg in (({"image": "a.png", "audio": "a.wav"}, "no 'gt_box' of four numbers; give the box list"),
                     ({"image": "a.png", "audio": "a.wav", "gt_box": [0, 0, 300, 5]}, r"coordinates in \[0, 224\]"),
                     ({"image": 3}, "needs string 'image' and 'audio'")):
        (src / "bad.json").write_text(json.dumps([bad]))
        with pytest.raises(C.UserError, match=msg):
            data_prep.main(["is3", str(src), "--out", str(tmp_path / "x"), "--boxes", str(src / "bad.json")])
    proc = run_py("data_prep.py", "is3", src, "--out", tmp_path / "x", check=False)      # no IS3_annotation.json
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1 and "IS3_annotation.json: not found" in proc.stderr


def _avs_release(src, subset):
    """AVSBench-object v1's layout: <Single-source|Multi-sources>/<s4|ms3>_meta_data.csv (name, start, category,
    split by position) and <s4|ms3>_data/{visual_frames,gt_masks,audio_wav}; two test clips and a train clip."""
    top, data = data_prep.AVS_DIRS[subset]
    base, rng, clips = src / top, np.random.default_rng(1), {}
    base.mkdir(parents=True)
    rows = [("name", "start", "category", "split"), ("-aaa", "0", "dog", "test"), ("bbb", "10", "cat", "test"),
            ("ccc", "0", "dog", "train")]
    (base / f"{subset}_meta_data.csv").write_text("".join(",".join(r) + "\n" for r in rows))
    for vid, _, cat, split in rows[1:3]:
        sub = Path("test", cat) if subset == "s4" else Path("test")
        clips[vid] = _wav(base / data / "audio_wav" / sub / f"{vid}.wav", 5.0, seed=len(clips))
        for k in range(1, 6):
            frame = (Path(sub, vid, f"{vid}_{k}.png") if subset == "s4" else Path(vid, f"{vid}.mp4_{k}.png"))
            _png(base / data / "visual_frames" / frame, rng.integers(0, 255, (224, 224, 3), dtype=np.uint8))
            mask = np.zeros((224, 224), np.uint8)
            mask[20 * k:40 + 20 * k, 30:90] = 255 * (vid != "bbb" or k != 3)          # bbb_3: an empty mask
            _png(base / data / "gt_masks" / sub / vid / f"{vid}_{k}.png", mask)
    return clips


def test_issue30_data_prep_avsbench_s4_and_ms3(tmp_path):
    for subset in ("s4", "ms3"):
        clips = _avs_release(tmp_path / subset, subset)
        root = tmp_path / f"root_{subset}"
        data_prep.main(["avsbench", str(tmp_path / subset), "--subset", subset, "--out", str(root)])
        ids = C.read_split(root / "splits" / "test.txt")
        assert ids == [f"{v}_{k}" for v in ("-aaa", "bbb") for k in range(1, 6)]
        ann = C.load_annotations(root / "annotations.json")
        assert [C.gt_map(ann[i]).sum() == 0 for i in ids].count(True) == 1 and C.gt_map(ann["bbb_3"]).sum() == 0
        assert ann["-aaa_2"]["class"] == ("dog" if subset == "s4" else "") and ann["-aaa_2"]["bbox"] == []
        for i in ("-aaa_1", "bbb_5"):                    # the clip turned so that the frame's time is the centre
            x, k = clips[i[:-2]], int(i[-1])
            y = C.read_wav(root / "audio" / f"{i}.wav")[0]
            assert len(y) == len(x) and np.abs(y - np.roll(x, len(x) // 2 - round((k - 1 + 15 / 16) * 16000))).max() \
                < 1e-4
    data_prep.main(["avsbench", str(tmp_path / "s4" / "Single-source"), "--subset", "s4", "--out",
                    str(tmp_path / "whole"), "--whole-clip"])
    assert np.abs(C.read_wav(tmp_path / "whole" / "audio" / "bbb_4.wav")[0] - clips["bbb"]).max() < 1e-4
    (tmp_path / "s4" / "Single-source" / "s4_meta_data.csv").write_text("name,start,category,part\nx,0,dog,test\n")
    for src, msg in ((tmp_path / "s4", "names no 'split' column"), (tmp_path, "s4_meta_data.csv: not found")):
        proc = run_py("data_prep.py", "avsbench", src, "--subset", "s4", "--out", tmp_path / "y", check=False)
        assert proc.returncode == 2 and proc.stderr.count("error:") == 1 and msg in proc.stderr, proc.stderr


def test_issue30_vggss_heard_lists_and_one_table_for_both_rows(tmp_path):
    ann = [{"file": f"v{i:02d}_000010", "class": f"c{i % 4}", "bbox": [[0.1, 0.1, 0.5, 0.5]]} for i in range(12)]
    (tmp_path / "vggss.json").write_text(json.dumps(ann))
    root = tmp_path / "root"
    for d in ("frames", "audio"):
        (root / d).mkdir(parents=True)
    present = [f"v{i:02d}_000010" for i in range(10)] + ["t0_000000", "t1_000005"]      # v10, v11, t2 absent
    for v in present:
        (root / "frames" / f"{v}.jpg").write_bytes(b"x")
        (root / "audio" / f"{v}.wav").write_bytes(b"x")
    lists = {"vggss_heard.txt": "t0_000000\nt1_000005\nt2_000000\n",            # the official files' formats
             "vggss_heard_test.csv": "v00_000010\nv01_000010\nv10_000010",
             "vggss_unheard_test.csv": "v02_000010\nv03_000010\nv11_000010\n"}
    for k, v in lists.items():
        (tmp_path / k).write_text(v)
    files = [str(tmp_path / k) for k in lists]
    data_prep.main(["vggss", "--json", str(tmp_path / "vggss.json"), "--clips", str(root), "--heard-lists", *files])
    sp = root / "splits"
    assert C.read_split(sp / "heard_train.txt") == ["t0_000000", "t1_000005"]
    assert C.read_split(sp / "heard_test.txt") == ["v00_000010", "v01_000010"]
    assert C.read_split(sp / "unheard_test.txt") == ["v02_000010", "v03_000010"]
    assert C.read_split(sp / "unheard_test.missing.txt") == ["v11_000010"]
    assert C.read_split(sp / "heard_train.missing.txt") == ["t2_000000"]
    with pytest.raises(C.UserError, match="vggss_heard.txt: 3 of its 3 ids are not in .*in this order"):
        data_prep.main(["vggss", "--json", str(tmp_path / "vggss.json"), "--clips", str(root), "--heard-lists",
                        files[1], files[0], files[2]])
    rows = [_results_file(tmp_path / s, split=str(sp / f"{s}.txt"), test=t)
            for s, t in (("heard_test", (0.40, 0.5, 0.5)), ("unheard_test", (0.30, 0.5, 0.5)))]
    table = eval_cioU.results_table(rows)                           # one checkpoint, two test splits: two rows
    assert [ln.split("|")[3].strip() for ln in table.splitlines()[2:4]] == ["heard_test.txt", "unheard_test.txt"]
    assert [_table_cells(table, "| ez_vsl")["model ciou@0.5"]] == ["40.00"]


def test_issue30_every_door_scores_is3_and_avsbench_roots(tiny, tmp_path):
    """A method's --eval --protocol is3 | avsbench on roots data_prep.py made from the official layouts; its
    results.json, and eval_cioU.py on its saved maps (--json), carry the protocols' keys with the same numbers."""
    _is3_release(tmp_path / "IS3")
    data_prep.main(["is3", str(tmp_path / "IS3"), "--out", str(tmp_path / "is3")])
    _avs_release(tmp_path / "AVS", "s4")
    data_prep.main(["avsbench", str(tmp_path / "AVS"), "--subset", "s4", "--out", str(tmp_path / "s4")])
    ez_vsl.main(["--train", "--data", str(tiny), "--preset", "cpu", "--batch-size", "8", "--max-steps", "1",
                 "--epochs", "1", "--no-pretrained", "--out", str(tmp_path / "run")])
    ck = next((tmp_path / "run").iterdir()) / "best.pt"
    for proto, root, keys in (("is3", "is3", ("ciou_adap", "auc_adap", "iiou", "iauc")),
                              ("avsbench", "s4", ("miou", "miou_median", "fscore"))):
        data, out = tmp_path / root, tmp_path / f"ev_{proto}"
        ez_vsl.main(["--eval", "--ckpt", str(ck), "--data", str(data), "--protocol", proto, "--no-pretrained",
                     "--no-ogl", "--preset", "cpu", "--save-maps", str(out / "m.npz"), "--out", str(out)]
                    + ["--negatives"] * (proto == "is3"))
        res = json.loads((out / "results.json").read_text())
        assert proto != "is3" or res["negatives"]["n"] == 6
        assert res["protocol"] == proto and all(0 <= res["test"][k] <= 1 for k in keys), res["test"]
        argv = ["--pred", str(out / "m.npz"), "--gt", str(data / "annotations.json"), "--protocol", proto,
                "--json", str(out / "s.json")] + (["--fscore-batch", "4"] if proto == "avsbench" else [])
        back = eval_cioU_main(argv)
        summary = json.loads((out / "s.json").read_text())
        assert all(summary["test"][k] == pytest.approx(res["test"][k]) for k in keys) and back["n"] == res["n"]
    assert 0 <= summary["test"]["fscore_batch"] <= 1 and res["test"]["n_empty_mask"] == 1
    r = run_py("eval_cioU.py", "--pred", out / "m.npz", "--gt", data / "annotations.json", "--fscore-batch", "4",
               check=False)
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "with --protocol avsbench" in r.stderr


def test_issue30_offscreen_audio_on_is3_comes_from_a_class_of_neither_source(tmp_path):
    _is3_release(tmp_path / "IS3")
    data_prep.main(["is3", str(tmp_path / "IS3"), "--out", str(tmp_path / "r")])
    ann = C.load_annotations(tmp_path / "r" / "annotations.json")
    ids = C.read_split(tmp_path / "r" / "splits" / "test.txt")
    for v in ids:                                       # the next clip whose class neither source of the image has
        assert ann[v]["offscreen"].split("_")[-1] not in v.split("_")[:2], v
    seen = {}

    def compute(d):
        seen[getattr(d, "kind", "positive")] = d
        return {v: np.ones((7, 7), np.float32) for v in ids}
    ds = type("DS", (list,), {"ids": ids})((f"frame{k}", f"audio{k}", v) for k, v in enumerate(ids))
    C.run_negatives(compute, ds, ann, 0.5, "raw", False)
    off = seen["offscreen"]
    assert [off[k][1] for k in range(len(ids))] == [f"audio{ids.index(ann[v]['offscreen'])}" for v in ids]
    del ann[ids[0]]["offscreen"]                                     # elsewhere: the next clip's audio
    C.run_negatives(compute, ds, ann, 0.5, "raw", False)
    assert seen["offscreen"][0][1] == "audio1"


@pytest.mark.parametrize("protocol", ["is3", "avsbench"])
def test_issue30_ciou_of_the_new_protocols_on_the_issue12_cases(protocol):
    """Mixed map sizes, both resizes, consensus boxes, constant maps, empty boxes: the per-sample cIoU of SSLalignment's
    rule (q > sorted(q)[25088]) and of AVSBench's (q > 0.5), bit for bit."""
    maps, ann = _issue12_cases()
    for ac in (False, True):
        res = C.evaluate_maps(maps, ann, protocol=protocol, align_corners=ac, chunk=5)
        for k in maps:
            q = _normalize_img(_official_resize(maps[k], ac))
            thr = np.sort(q.flatten())[int(224 * 224 * 0.5)] if protocol == "is3" else 0.5
            infer_map = np.zeros((224, 224))
            infer_map[q > thr] = 1
            gt = _official_gt(ann[k])
            with np.errstate(invalid="ignore"):
                ref = np.sum(infer_map * gt) / (np.sum(gt) + np.sum(infer_map * (gt == 0)))
            np.testing.assert_array_equal(res["per_sample"][k], ref)


# ==============================================================================================================

# ---------------------------------------------------------------------------------------------------------
# Issue 31: --predict --video (trained_lvs_run: the LVS learning test's run)
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_runs(tiny, tmp_path_factory):
    """{script: a run folder} of each method after two steps on the tiny dataset (checkpoints to predict with)."""
    out, runs = tmp_path_factory.mktemp("video_runs"), {}
    for script, mod in {**METHODS, "csol_classaware.py": csol}.items():
        mod.main(_quick(tiny, out / script, "--epochs", "1", *(["--stage", "1"] if mod is csol else [])))
        runs[script] = next((out / script).iterdir())
    return runs


def _video_streams(path) -> dict:
    """A written heat-map video read back: RGB frames, their times, audio (channels, n), its rate, stream durations."""
    import av
    with av.open(str(path)) as c:
        assert [s.type for s in c.streams] == ["video", "audio"] and c.streams.video[0].codec_context.name == "h264"
        r = dict(durations=[float(s.duration * s.time_base) for s in c.streams], rate=c.streams.audio[0].sample_rate)
        frames = [(f.to_ndarray(format="rgb24"), f.time) for f in c.decode(video=0)]
        c.seek(0)
        audio = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], 1)
    return dict(r, frames=[f for f, _ in frames], times=[t for _, t in frames], audio=audio)


def test_video_heat_map_follows_the_moving_sounding_object(trained_lvs_run, learn_root, tmp_path):
    meta = data_prep.moving_clip(tmp_path / "clip.mkv", seed=1, n_classes=4, seconds=3.0, fps=10)
    lvs.main(["--predict", "--ckpt", str(trained_lvs_run[0]), "--video", str(tmp_path / "clip.mkv"), "--out",
              str(tmp_path / "heat.mp4"), "--save-maps", str(tmp_path / "maps.npz")])
    v = _video_streams(tmp_path / "heat.mp4")
    assert len(v["frames"]) == 30 and v["frames"][0].shape == (128, 3 * 128, 3) and v["durations"] == pytest.approx(
        [3.0, 3.0], abs=0.1)
    assert v["times"] == pytest.approx(np.arange(30) / 10)
    x = meta["audio"]                                         # the clip's own sound, as AAC at its rate
    assert v["rate"] == 16000 and abs(v["audio"].shape[1] - len(x)) <= 2048
    assert np.corrcoef(v["audio"][0, :len(x) - 2048], x[:len(x) - 2048])[0, 1] > 0.95
    z = np.load(tmp_path / "maps.npz")
    assert z["maps"].shape == (30, 14, 14) and z["times"] == pytest.approx(np.arange(30) / 10)
    peaks = [np.unravel_index(np.argmax(_resize(m, 128)), (128, 128)) for m in z["maps"]]
    inside = lambda b, p: b[0] <= p[1] < b[2] and b[1] <= p[0] < b[3]        # noqa: E731
    on_sound = sum(inside(b[0], p) for b, p in zip(meta["boxes"], peaks))
    on_silent = sum(inside(b[1], p) for b, p in zip(meta["boxes"], peaks))
    assert on_sound >= 18 and on_sound >= 3 * on_silent, (on_sound, on_silent)


_VFR_MS = [0, 90, 130, 400, 410, 420, 700, 1050, 1100, 1500, 1800, 1900, 2400]      # irregular frame timestamps


@pytest.mark.parametrize("script", ["lvs_hardway.py", "ez_vsl.py", "sspl.py", "csol_classaware.py"])
def test_video_segment_of_a_variable_frame_rate_clip_with_its_sound(script, tiny_runs, tmp_path):
    _clip23(tmp_path / "vfr.mkv", _VFR_MS, _tone23(0, 3.0, 22050, 882), sr=22050)
    mod = {**METHODS, "csol_classaware.py": csol}[script]
    mod.main(["--predict", "--ckpt", str(tiny_runs[script]), "--video", str(tmp_path / "vfr.mkv"), "--start", "0.5",
              "--duration", "1.5", "--fps", "10", "--norm", "frame", "--out", str(tmp_path / "h.mp4"),
              "--save-maps", str(tmp_path / "m.npz")])
    v = _video_streams(tmp_path / "h.mp4")
    assert len(v["frames"]) == 15 and v["durations"] == pytest.approx([1.5, 1.5], abs=0.1) and v["rate"] == 22050
    shown = [max(k for k, ms in enumerate(_VFR_MS) if ms <= 500 + 100 * i) for i in range(15)]   # by timestamp
    from PIL import Image
    assert [_read_bits(Image.fromarray(f[:, :64])) for f in v["frames"]] == shown
    x = np.concatenate([c for _, c in _tone23(0, 3.0, 22050, 882)])[round(0.5 * 22050):round(2.0 * 22050)]
    assert np.corrcoef(v["audio"][0, 2048:len(x) - 2048], x[2048:len(x) - 2048])[0, 1] > 0.95   # the segment's
    z = np.load(tmp_path / "m.npz")
    assert z["times"] == pytest.approx(0.5 + np.arange(15) / 10) and len(z["maps"]) == 15 and z["maps"].ndim == 3


def test_video_of_a_rotated_clip_is_drawn_upright(tiny_runs, tmp_path):
    asym = lambda k: np.concatenate([_bits_frame(k), np.full((64, 32, 3), 128, np.uint8)], 1)   # noqa: E731 64x96
    _clip23(tmp_path / "phone.mov", [100 * k for k in range(20)], _tone23(0, 2.0, 16000, 800), frame=asym,
            matrix=[0, 65536, 0, -65536, 0, 0, 0, 0, 1 << 30])                  # a quarter turn clockwise
    sspl.main(["--predict", "--ckpt", str(tiny_runs["sspl.py"]), "--video", str(tmp_path / "phone.mov"), "--fps", "5",
               "--out", str(tmp_path / "h.mp4")])
    v = _video_streams(tmp_path / "h.mp4")
    assert len(v["frames"]) == 10 and v["frames"][0].shape == (96, 3 * 64, 3)
    for k, f in enumerate(v["frames"]):
        assert np.abs(f[:, :64].astype(float) - np.rot90(asym(2 * k), -1)).mean() < 10, k
    sspl.main(["--predict", "--ckpt", str(tiny_runs["sspl.py"]), "--video", str(tmp_path / "phone.mov"), "--fps", "5",
               "--start", "1.2", "--out", str(tmp_path / "h.mp4")])      # a later segment: decoded from a seek
    v = _video_streams(tmp_path / "h.mp4")
    assert len(v["frames"]) == 4
    for k, f in enumerate(v["frames"]):
        assert np.abs(f[:, :64].astype(float) - np.rot90(asym(12 + 2 * k), -1)).mean() < 10, k


def test_video_bad_inputs_are_one_line_each(tiny_runs, tmp_path, capsys):
    run = tiny_runs["ez_vsl.py"]

    def predict(video, *extra, out="h.mp4"):
        ez_vsl.main(["--predict", "--ckpt", str(run), "--video", str(video), "--out", str(tmp_path / out), *extra])

    def error(video, *extra, out="h.mp4"):
        with pytest.raises(C.UserError) as e:
            predict(video, *extra, out=out)
        assert not (tmp_path / out).exists() and not (tmp_path / f"{out}.part").exists()
        return str(e.value)
    _make_video(tmp_path / "mute.mkv", 25, 1.0, None)
    assert "mute.mkv: no audio track (give the sound with --audio WAV)" in error(tmp_path / "mute.mkv")
    _write_audio_file(tmp_path / "sound.flac", sr=44100, seconds=1.0)
    assert "sound.flac: no video stream" in error(tmp_path / "sound.flac")
    (tmp_path / "junk.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    assert "junk.mp4: cannot open" in error(tmp_path / "junk.mp4")
    _make_video(tmp_path / "ok.mp4", 25, 2.0, 48000, "5.1", acodec="aac")
    assert "name it *.mp4" in error(tmp_path / "ok.mp4", out="h.avi")
    assert "--start 5 s is past the end of the video (2.00 s)" in error(tmp_path / "ok.mp4", "--start", "5")
    data = (tmp_path / "ok.mp4").read_bytes()                # an MP4 cut short loses its index: nothing written
    (tmp_path / "cut.mp4").write_bytes(data[:len(data) // 2])
    assert "cut.mp4: cannot open" in error(tmp_path / "cut.mp4")
    _make_video(tmp_path / "long.mkv", 25, 4.0, 16000, "mono")   # a cut MKV: what it holds is written and playable
    data = (tmp_path / "long.mkv").read_bytes()
    (tmp_path / "cut.mkv").write_bytes(data[:len(data) // 2])
    capsys.readouterr()
    try:
        predict(tmp_path / "cut.mkv")
    except C.UserError as e:
        assert "were written to" in str(e)
    v = _video_streams(tmp_path / "h.mp4")
    assert 25 <= len(v["frames"]) < 90 and "truncated?" in capsys.readouterr().out
    predict(tmp_path / "ok.mp4", "--duration", "0.4")                 # 5.1 AAC at 48 kHz: kept
    assert len(_video_streams(tmp_path / "h.mp4")["frames"]) == 10
    predict(tmp_path / "mute.mkv", "--audio", str(tmp_path / "sound.flac"))   # the sound from --audio
    v = _video_streams(tmp_path / "h.mp4")
    assert len(v["frames"]) == 25 and v["rate"] == 44100 and v["durations"] == pytest.approx([1.0, 1.0], abs=0.04)
    work = tmp_path / "copied"                              # a method copied with common.py alone: one line
    work.mkdir()
    for f in ("ez_vsl.py", "common.py"):
        shutil.copy(HERE / f, work / f)
    r = run_py(work / "ez_vsl.py", "--predict", "--ckpt", run, "--video", tmp_path / "ok.mp4", "--out",
               tmp_path / "c.mp4", cwd=work, check=False, env_extra={"PYTHONPATH": ""})
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and lines == ["error: --video needs data_prep.py beside common.py (No module named "
                                           "'data_prep')"], r.stderr
