"""The test suite: python -m pytest test_all.py

Numbers are checked against independent computations (scipy, numpy written from the definitions, torchaudio's
filter banks, hand-worked examples); learning is checked by a score going up on the synthetic benchmark.
Nothing here needs ../shared or the network.
"""
import json
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
    C.make_synthetic(root, sizes=dict(train=24, val=8, test=8, cocktail_train=8, cocktail_test=6), log=lambda *a: None)
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
    ours = C.vggish_examples(torch.from_numpy(x)[None])
    assert ours.shape == (1, 3, 1, 96, 64)
    np.testing.assert_allclose(ours[0, :, 0].reshape(288, 64).numpy(), ref[:288], atol=1e-4)


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
    ours = C.csol_log_mel(torch.from_numpy(x)[None])
    assert ours.shape == (1, 1, 201, 64)
    np.testing.assert_allclose(ours[0, 0].numpy(), ref, atol=2e-3)
    np.testing.assert_allclose(C.slaney_mel_matrix(160, 16000, 64), fb, atol=1e-6)


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
    assert C.vgg16_conv5_3()(img).shape == (1, 512, 14, 14)
    assert C.VGGish()(torch.zeros(3, 1, 96, 64)).shape == (3, 128)
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
    trunk = C.vgg16_conv5_3()
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
    assert sorted(C.VGGish().state_dict()) == sorted(names)


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
    _write_pcm(tmp_path / "a24.wav", np.array([0, 1 << 22, -(1 << 23)]), 3)
    np.testing.assert_allclose(C.read_wav(tmp_path / "a24.wav")[0], [0, 0.5, -1])
    _write_pcm(tmp_path / "a32.wav", np.array([0, 1 << 30, -(1 << 31)]), 4)
    np.testing.assert_allclose(C.read_wav(tmp_path / "a32.wav")[0], [0, 0.5, -1])
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
    ds = C.AVDataset(tiny, ids, C.image_transform("squash", 96), seconds=3.0)
    img, wav, vid = ds[0]
    assert img.shape == (3, 96, 96) and wav.shape == (48000,) and vid == ids[0]
    assert abs(float(wav.abs().max()) - 0.7) < 0.01
    with pytest.raises(C.UserError, match="no frames"):
        C.AVDataset(tiny, ids + ["not_there"], lambda im: im, 3.0)
    # a corrupt JPEG and a wrong sample rate are errors that name the file
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    (bad / "frames" / f"{ids[0]}.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(C.UserError, match=f"{ids[0]}.jpg"):
        C.AVDataset(bad, ids, lambda im: im, 3.0)[0]
    C.write_wav(bad / "audio" / f"{ids[1]}.wav", np.zeros(100), 8000)
    with pytest.raises(C.UserError, match="--sr 16000"):
        C.AVDataset(bad, ids, lambda im: im, 3.0)[1]


def test_synthetic_boxes_match_what_was_drawn(tiny):
    from PIL import Image
    ann = C.load_annotations(tiny / "annotations.json")
    colors = {c[0]: np.array(c[1], float) for c in C.SYNTH_CLASSES}
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
        C.make_synthetic(tmp_path / d, seed=5, sizes=sizes, log=lambda *a: None)
    assert (tmp_path / "a/annotations.json").read_text() == (tmp_path / "b/annotations.json").read_text()
    assert (tmp_path / "a/audio/test_00001.wav").read_bytes() == (tmp_path / "b/audio/test_00001.wav").read_bytes()


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
def _half_map():
    m = np.zeros((224, 224))
    m[:, :112] = 1.0           # the left half is 1
    return m


def test_ciou_hand_worked_both_protocols():
    g = C.boxes_to_map([[0, 0, 0.5, 0.5]])                 # 112x112 = 12544 pixels
    assert g.sum() == 12544
    # P = left half (25088 px): inter 12544, union 12544 + 12544 -> 0.5
    for proto in ("abs0.5", "median"):
        assert C.ciou(C.binarize(_half_map(), proto), g) == pytest.approx(0.5)
    # ties at the median: the 0/1 map's median is 1, so the strict rule predicts nothing
    assert C.binarize(_half_map(), "median_strict").sum() == 0
    # a quarter at 1, the rest tied at 0: '>=' keeps everything, '>' keeps the quarter, abs0.5 the quarter
    q = np.zeros((224, 224))
    q[:112, :112] = 1
    assert C.binarize(q, "median").all()
    assert C.ciou(C.binarize(q, "median_strict"), g) == 1.0
    assert C.ciou(C.binarize(q, "abs0.5"), g) == 1.0
    assert C.ciou(C.binarize(q, "median"), g) == pytest.approx(12544 / 50176)


def test_consensus_gt_hand_worked():
    # two annotators: A = [0, .5]^2, B = [.25, .75]^2; overlap 56x56 = 3136 px -> 1, the rest of A and B -> 0.5
    g = C.boxes_to_map([[0, 0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]], "consensus")
    assert set(np.unique(g)) == {0.0, 0.5, 1.0}
    assert (g == 1).sum() == 3136 and g.sum() == 12544
    p = C.boxes_to_map([[0, 0, 0.5, 0.5]]).astype(bool)
    assert C.ciou(p, g) == pytest.approx((0.5 * (12544 - 3136) + 3136) / 12544)     # 0.625


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
    assert C.ciou(C.binarize(C.resize_map(const), "median"), g) == pytest.approx(0.5)    # whole image predicted
    assert C.ciou(C.binarize(C.resize_map(const), "abs0.5"), g) == 0.0                   # nothing predicted


def test_resize_variants_hand_worked():
    m = np.array([[1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(C.resize_map(m, 4, align_corners=False)[0], [1, 0.75, 0.25, 0])
    np.testing.assert_allclose(C.resize_map(m, 4, align_corners=True)[0], [1, 2 / 3, 1 / 3, 0])


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
    ciou_n, nsa = C.class_aware_scores({"A": a, "B": b}, {"A": [[0, 0, 0.5, 1]]}, ["B"])
    assert ciou_n == pytest.approx(1.0, abs=0.03) and nsa == 1.0
    s = C.summarize_class_aware([1.0, 0.2], [1.0, 0.5])
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
        C.write_wav(src / "Data" / "3" / f"{vid}.wav", 0.1 * np.sin(np.arange(22050) / 5), 22050)
    out = tmp_path / "root"
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
    # real data defaults to the paper preset, whose ImageNet weights cannot be downloaded here
    r = run_py(script, "--train", "--data", tiny, "--out", tmp_path, check=False,
               env_extra={"TORCH_HOME": str(tmp_path / "th"), "https_proxy": "http://127.0.0.1:9",
                          "HTTPS_PROXY": "http://127.0.0.1:9"})
    assert r.returncode == 2 and "--no-pretrained" in r.stderr and "Traceback" not in r.stderr
    r = run_py(script, "--eval", "--ckpt", tmp_path / "none.pt", "--data", tiny, check=False)
    assert r.returncode == 2 and "checkpoint not found" in r.stderr


@pytest.fixture(scope="session")
def learn_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("learn")
    C.make_synthetic(root, n_classes=4, sizes=dict(train=480, val=64, test=64, cocktail_train=256, cocktail_val=16,
                                                   cocktail_test=32), log=lambda *a: None)
    return root


@pytest.mark.parametrize("script,epochs", [("ez_vsl.py", 5), ("lvs_hardway.py", 4)])
def test_short_synthetic_run_learns_and_uses_the_sound(script, epochs, learn_root, tmp_path):
    METHODS[script].main(["--train", "--data", str(learn_root), "--preset", "cpu", "--epochs", str(epochs),
                          "--batch-size", "32", "--lr", "1e-3", "--out", str(tmp_path)])
    run = next(tmp_path.iterdir())
    hist = torch.load(run / "last.pt", weights_only=False)["history"]
    res = json.loads((run / "results.json").read_text())
    first, last = hist[0]["val"]["mean_ciou"], max(h["val"]["mean_ciou"] for h in hist)
    assert last > first + 0.08, hist                                          # the validation score goes up
    assert res["test"]["mean_ciou"] > res["audio_swapped"]["mean_ciou"] + 0.05, res   # it uses the sound
    if script == "lvs_hardway.py":                                            # and beats the centred prior
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


def test_sspl_short_run_learns_uses_the_sound_and_does_not_collapse(learn_root, tmp_path):
    sspl.main(["--train", "--data", str(learn_root), "--preset", "cpu", "--epochs", "5", "--batch-size", "32",
               "--out", str(tmp_path)])
    run = next(tmp_path.iterdir())
    hist = torch.load(run / "last.pt", weights_only=False)["history"]
    res = json.loads((run / "results.json").read_text())
    assert max(h["val"]["mean_ciou"] for h in hist) > hist[0]["val"]["mean_ciou"] + 0.05, hist
    assert min(h["f_av_std"] for h in hist) > 0.5 / np.sqrt(64), hist      # no collapse of f_av (1/sqrt(c) if spread)
    assert res["test"]["mean_ciou"] > res["audio_swapped"]["mean_ciou"] + 0.05, res


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
    run_py("csol_classaware.py", "--predict", "--ckpt", run2 / "stage2.pt", "--image", tiny / "frames" / f"{ids[0]}.jpg",
           "--audio", tiny / "audio" / f"{ids[0]}.wav", "--out", tmp_path / "heat.png")
    assert (tmp_path / "heat.png").is_file()
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
    data_prep.main(["videos", str(vids), "--out", str(tmp_path / "o2")])
    r = data_prep.read_manifest(tmp_path / "o2")["audio_only"]
    assert r["status"] == "failed" and r["reason"] == "no video stream"


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
    table = C.results_table(files)
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
    for field, kw in (("protocol", {"protocol": "median"}), ("n", {"n": 299}),
                      ("split", {"split": "/d/synth/splits/val.txt"})):
        files = [_results_file(tmp_path / "a"), _results_file(tmp_path / field, seed=1, **kw)]
        with pytest.raises(C.UserError, match=f"differ in {field}"):
            C.results_table(files)
    r = run_py("eval_cioU.py", "--table", *files, check=False)                  # one error line from the CLI
    assert r.returncode == 2 and "error: cannot average ez_vsl" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(C.UserError, match="no such results file"):
        C.results_table([tmp_path / "nothing.json"])


def test_seeds_trains_sibling_runs_and_tables_them(tiny, tmp_path, capsys):
    lvs.main(_quick(tiny, tmp_path, "--epochs", "1", "--seeds", "0,1"))
    runs = sorted(tmp_path.iterdir())
    assert [r.name.split("__")[2] for r in runs] == ["s0", "s1"]
    seeds = [json.loads((r / "results.json").read_text())["seed"] for r in runs]
    assert seeds == [0, 1]
    out = capsys.readouterr().out
    assert "| lvs_hardway |" in out and "| 2 (0,1) |" in out
