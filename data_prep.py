"""data_prep.py - turn data into the standard layout (see common.py's docstring and the README).

    python data_prep.py synth --out ROOT                     the built-in synthetic benchmark
    python data_prep.py videos SRC --out ROOT [--sr 16000] [--time middle|SECONDS] [--workers N]
                                                             a folder of videos (VGG-Sound style <ytid>_<start:06d> names or any)
    python data_prep.py frames SRC --out ROOT [--sr 16000]   frames (jpg/png) + audio (wav/flac/mp3/m4a) already extracted
    python data_prep.py flickr SRC --out ROOT                the Flickr-SoundNet test download (Data/... + Annotations/*.xml)
    python data_prep.py vggss --json vggss.json --clips ROOT the VGG-SS test split + annotations from the clips present
    python data_prep.py split LIST --name NAME --root ROOT   any id list (*.txt / *.csv) as ROOT/splits/NAME.txt
    python data_prep.py check ROOT [--split NAME] [--workers N]  decode every frame and WAV (before a long run)

Every ingesting command writes ROOT/manifest.csv (id, status ok/missing/failed, reason, frame time, duration,
source sample rate, fps measured from the frame timestamps, audio duration, the settings the clip was made with),
skips ids already done with the same settings when re-run (a clip made with another --sr / --time is made again),
never replaces a broken clip by another one, writes each output atomically, and ends with a summary table. A clip
whose audio is much shorter than its video is kept ('ok') with a warning in its reason.
Run `python data_prep.py SUBCOMMAND --help` for details.
"""
import argparse
import csv
import json
import math
import os
import sys
import shutil
from collections import Counter
from multiprocessing import Pool
from pathlib import Path

import numpy as np

import common as C

VIDEO_EXT = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".3gp"}
IMAGE_EXT = {".jpg", ".jpeg", ".png"}
AUDIO_EXT = {".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg", ".opus"}
MANIFEST_FIELDS = ["id", "status", "reason", "frame_time", "duration", "src_sr", "fps", "audio_duration", "settings"]
SHORT_AUDIO = 0.8    # audio shorter than this fraction of the video (and by more than 0.5 s) is reported
FLICKR_MISSING = "3908875357"   # in the original 250-image test list, absent from the released data


# ----------------------------------------------------------------------------------------------------------
# Decoding with PyAV
# ----------------------------------------------------------------------------------------------------------
class ClipError(Exception):
    """A broken clip: recorded in the manifest with its reason, then skipped."""


def decode_audio(container, sr: int) -> tuple[np.ndarray, int]:
    """All audio of the first audio stream, down-mixed to mono by FFmpeg's resampler at rate sr (float32)."""
    import av
    if not container.streams.audio:
        raise ClipError("no audio stream")
    st = container.streams.audio[0]
    src_sr = st.codec_context.sample_rate or st.rate or 0
    res = av.AudioResampler(format="s16", layout="mono", rate=sr)
    chunks = []
    try:
        for frame in container.decode(st):
            frame.pts = None
            chunks += [f.to_ndarray().reshape(-1) for f in res.resample(frame)]
        chunks += [f.to_ndarray().reshape(-1) for f in res.resample(None)]
    except av.error.FFmpegError as e:
        if not chunks:
            raise ClipError(f"audio decoding failed ({e})") from None
    x = np.concatenate(chunks).astype(np.float32) / 32768.0 if chunks else np.zeros(0, np.float32)
    if x.size == 0:
        raise ClipError("zero-length audio")
    return x, src_sr


def frame_at(container, t: float):
    """The video frame displayed at time t (s, from the stream start): the last frame whose timestamp <= t,
    found by seeking to the key frame before t and decoding forward. Returns (PIL image, its time, fps)."""
    import av
    if not container.streams.video:
        raise ClipError("no video stream")
    vs = container.streams.video[0]
    fps = float(vs.average_rate) if vs.average_rate else 0.0
    start = float(vs.start_time * vs.time_base) if vs.start_time is not None else 0.0
    target = start + t
    try:
        container.seek(max(0, int((target - 1.0) / vs.time_base)), stream=vs, backward=True, any_frame=False)
    except av.error.FFmpegError:
        container.seek(0)
    best = None
    try:
        for frame in container.decode(vs):
            ft = float(frame.pts * vs.time_base) if frame.pts is not None else None
            if ft is None:
                continue
            if ft <= target + 1e-6 or best is None:
                best = (frame, ft)
            if ft > target + 1e-6:
                break
    except av.error.FFmpegError as e:
        if best is None:
            raise ClipError(f"video decoding failed ({e})") from None
    if best is None:
        raise ClipError("no decodable video frame")
    return best[0].to_image().convert("RGB"), best[1] - start, fps


def measured_fps(path) -> float | None:
    """The frame rate measured from the video packets' timestamps: (frames - 1) / (last - first timestamp).
    A variable-frame-rate file reports its real mean rate, not the nominal rate of its header."""
    import av
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        pts = sorted(float(p.pts * vs.time_base) for p in c.demux(vs) if p.pts is not None and p.size)
    return (len(pts) - 1) / (pts[-1] - pts[0]) if len(pts) > 1 and pts[-1] > pts[0] else None


def video_duration(container) -> float:
    if container.duration:
        return container.duration / 1e6
    durs = [float(s.duration * s.time_base) for s in container.streams if s.duration]
    return max(durs) if durs else 0.0


def save_jpeg(img, path):
    tmp = Path(str(path) + ".part")
    img.save(tmp, format="JPEG", quality=95)
    os.replace(tmp, path)


def process_video(job):
    """One video -> frames/<id>.jpg + audio/<id>.wav; returns a manifest row (never raises)."""
    import av
    vid, src, out, sr, when = job
    row = dict(id=vid, status="failed", reason="", frame_time="", duration="", src_sr="", fps="", audio_duration="",
               settings=settings_key(sr, when))
    try:
        try:
            container = av.open(str(src))
        except (av.error.FFmpegError, OSError) as e:
            raise ClipError(f"cannot open ({type(e).__name__}: {e})") from None
        with container:
            dur = video_duration(container)
            row["duration"] = f"{dur:.3f}"
            if dur <= 0:
                raise ClipError("zero length")
            t = dur / 2 if when == "middle" else float(when)
            if t > dur:
                raise ClipError(f"shorter ({dur:.2f} s) than the requested frame time {t:.2f} s")
            img, ft, fps = frame_at(container, t)
            row["frame_time"], row["fps"] = f"{ft:.3f}", f"{measured_fps(src) or fps:.3f}"
        with av.open(str(src)) as container:
            x, src_sr = decode_audio(container, sr)
            row["src_sr"], row["audio_duration"] = str(src_sr), f"{len(x) / sr:.3f}"
        if len(x) / sr < SHORT_AUDIO * dur and dur - len(x) / sr > 0.5:
            row["reason"] = f"warning: audio much shorter than the video ({len(x) / sr:.2f} s of {dur:.2f} s)"
        save_jpeg(img, Path(out) / "frames" / f"{vid}.jpg")
        C.write_wav(Path(out) / "audio" / f"{vid}.wav", x, sr)
        row["status"] = "ok"
    except ClipError as e:
        row["reason"] = str(e)
    except Exception as e:  # anything unexpected in a broken file is recorded, the run goes on
        row["reason"] = f"{type(e).__name__}: {e}"
    return row


def process_pair(job):
    """Already-extracted frame + audio file -> the layout (the frame re-encoded as RGB JPEG, the audio as mono
    PCM16 at sr)."""
    import av
    vid, img_path, aud_path, out, sr = job
    row = dict(id=vid, status="failed", reason="", frame_time="", duration="", src_sr="", fps="", audio_duration="",
               settings=settings_key(sr))
    try:
        if img_path is None or aud_path is None:
            row["status"], row["reason"] = "missing", "no frame" if img_path is None else "no audio"
            return row
        try:
            img = C.load_image(img_path)
        except C.UserError as e:
            raise ClipError(str(e)) from None
        try:
            with av.open(str(aud_path)) as container:
                x, src_sr = decode_audio(container, sr)
        except av.error.FFmpegError as e:
            raise ClipError(f"cannot decode audio ({e})") from None
        row["duration"], row["src_sr"] = f"{len(x) / sr:.3f}", str(src_sr)
        row["audio_duration"] = row["duration"]
        save_jpeg(img, Path(out) / "frames" / f"{vid}.jpg")
        C.write_wav(Path(out) / "audio" / f"{vid}.wav", x, sr)
        row["status"] = "ok"
    except ClipError as e:
        row["reason"] = str(e)
    except Exception as e:
        row["reason"] = f"{type(e).__name__}: {e}"
    return row


# ----------------------------------------------------------------------------------------------------------
# Manifest, resume, parallel runs
# ----------------------------------------------------------------------------------------------------------
def read_manifest(root) -> dict:
    p = Path(root) / "manifest.csv"
    if not p.is_file():
        return {}
    with open(p, newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def write_manifest(root, rows: dict):
    p = Path(root) / "manifest.csv"
    tmp = Path(str(p) + ".part")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, MANIFEST_FIELDS)
        w.writeheader()
        w.writerows(rows[k] for k in sorted(rows))
    os.replace(tmp, p)


def settings_key(sr: int, when=None) -> str:
    """The settings a clip is made with, recorded in the manifest: a re-run with others makes the clip again."""
    return f"sr={sr}" + (f";time={when}" if when is not None else "")


def done(root, vid, manifest, settings: str | None = None) -> bool:
    r = Path(root)
    row = manifest.get(vid, {})
    return row.get("status") == "ok" and (settings is None or row.get("settings") == settings) \
        and (r / "frames" / f"{vid}.jpg").is_file() and (r / "audio" / f"{vid}.wav").is_file()


def run_jobs(fn, jobs, root, workers: int, manifest: dict):
    """Run the jobs (in parallel with --workers), appending each row to the manifest as it completes (so an
    interrupted run keeps what it finished), then print the summary table."""
    if jobs:
        log_path = Path(root) / "manifest.csv"
        write_manifest(root, manifest)                  # (re)written with the current columns before appending
        with open(log_path, "a", newline="") as f:
            w = csv.DictWriter(f, MANIFEST_FIELDS)
            pool = Pool(workers) if workers > 1 else None
            it = pool.imap_unordered(fn, jobs) if pool else map(fn, jobs)
            for row in C.progress(it, "clips", total=len(jobs)):
                manifest[row["id"]] = row
                w.writerow(row)
                f.flush()
            if pool:
                pool.close()
                pool.join()
    write_manifest(root, manifest)
    summary(manifest)


def summary(manifest: dict):
    by = Counter((r["status"], (r.get("reason") or "").split(" (")[0]) for r in manifest.values())
    print(f"{'status':<8} {'count':>7}  reason")
    for (status, reason), n in sorted(by.items(), key=lambda kv: (kv[0][0] != "ok", -kv[1])):
        print(f"{status:<8} {n:>7}  {reason}")
    print(f"{'total':<8} {len(manifest):>7}")


def prepare_root(out):
    out = Path(out)
    for d in ("frames", "audio", "splits"):
        (out / d).mkdir(parents=True, exist_ok=True)
    return out


def files_by_stem(src, exts) -> dict:
    found = {}
    for p in sorted(Path(src).rglob("*")):
        if p.suffix.lower() in exts and p.is_file() and not p.name.startswith("."):
            found.setdefault(p.stem, p)
    return found


# ----------------------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------------------
def cmd_videos(a):
    out = prepare_root(a.out)
    videos = files_by_stem(a.src, VIDEO_EXT)
    if not videos:
        raise C.UserError(f"no video files ({', '.join(sorted(VIDEO_EXT))}) under {a.src}")
    manifest = read_manifest(out)
    key = settings_key(a.sr, a.time)
    todo = [(v, p, str(out), a.sr, a.time) for v, p in videos.items() if not done(out, v, manifest, key)]
    print(f"{len(videos)} videos under {a.src}: {len(videos) - len(todo)} already done, {len(todo)} to process")
    run_jobs(process_video, todo, out, a.workers, manifest)
    write_all_split(out, manifest)


def cmd_frames(a):
    out = prepare_root(a.out)
    imgs, auds = files_by_stem(a.src, IMAGE_EXT), files_by_stem(a.src, AUDIO_EXT)
    ids = sorted(set(imgs) | set(auds))
    if not ids:
        raise C.UserError(f"no frames or audio files under {a.src}")
    manifest = read_manifest(out)
    todo = [(v, imgs.get(v), auds.get(v), str(out), a.sr) for v in ids
            if not done(out, v, manifest, settings_key(a.sr))]
    print(f"{len(ids)} ids under {a.src}: {len(ids) - len(todo)} already done, {len(todo)} to process")
    run_jobs(process_pair, todo, out, a.workers, manifest)
    write_all_split(out, manifest)


def write_all_split(out, manifest):
    ok = sorted(k for k, r in manifest.items() if r["status"] == "ok")
    (Path(out) / "splits" / "all.txt").write_text("\n".join(ok) + ("\n" if ok else ""))
    print(f"{len(ok)} clips ready; id list in {Path(out) / 'splits' / 'all.txt'}")


def merge_annotations(out, entries: list):
    p = Path(out) / "annotations.json"
    old = json.loads(p.read_text()) if p.is_file() else []
    new_ids = {e["file"] for e in entries}
    C.write_json(p, [e for e in old if e["file"] not in new_ids] + entries)


def cmd_flickr(a):
    """Senocak's Flickr-SoundNet test download: Annotations/<id>.xml plus images and audio somewhere under
    Data/ (any depth); the XMLs are kept (ROOT/flickr_xml/) and converted to consensus entries."""
    src, out = Path(a.src), prepare_root(a.out)
    xml_dir = src / "Annotations"
    if not xml_dir.is_dir():
        raise C.UserError(f"{xml_dir} not found: expected the Flickr-SoundNet test download (Annotations/*.xml)")
    ann = C.load_annotations(xml_dir)
    keep = out / "flickr_xml"
    keep.mkdir(exist_ok=True)
    for vid in ann:
        shutil.copy2(xml_dir / f"{vid}.xml", keep / f"{vid}.xml")
    data = src / "Data" if (src / "Data").is_dir() else src
    imgs, auds = files_by_stem(data, IMAGE_EXT), files_by_stem(data, AUDIO_EXT)
    manifest = read_manifest(out)
    todo = [(v, imgs.get(v), auds.get(v), str(out), a.sr) for v in sorted(ann)
            if not done(out, v, manifest, settings_key(a.sr))]
    run_jobs(process_pair, todo, out, a.workers, manifest)
    ok = [v for v in sorted(ann) if manifest.get(v, {}).get("status") == "ok"]
    merge_annotations(out, [ann[v] for v in sorted(ann)])
    (out / "splits" / "flickr_test.txt").write_text("\n".join(ok) + "\n")
    print(f"Flickr-SoundNet test: {len(ok)} of {len(ann)} annotated ids prepared -> splits/flickr_test.txt "
          f"(the official lists use 249: id {FLICKR_MISSING} of the original 250 was never released"
          f"{'' if FLICKR_MISSING not in ann else '; it is present here'})")


def cmd_vggss(a):
    """VGG-SS: annotations from the original vggss.json and the test split of the clips present in --clips."""
    root = Path(a.clips)
    ann = C.load_annotations(a.json)
    present = [v for v in ann if (root / "frames" / f"{v}.jpg").is_file() and (root / "audio" / f"{v}.wav").is_file()]
    missing = [v for v in ann if v not in set(present)]
    (root / "splits").mkdir(parents=True, exist_ok=True)
    (root / "splits" / f"{a.name}.txt").write_text("\n".join(present) + "\n")
    (root / "splits" / f"{a.name}.missing.txt").write_text("\n".join(missing) + ("\n" if missing else ""))
    merge_annotations(root, list(json.loads(Path(a.json).read_text())))
    empty = [v for v in ann if C.gt_map(ann[v]).sum() == 0]
    print(f"VGG-SS: {len(present)} present / {len(ann)} annotated -> splits/{a.name}.txt; "
          f"{len(missing)} missing listed in splits/{a.name}.missing.txt; annotations merged into annotations.json")
    if empty:
        print(f"note: {len(empty)} entries have an empty ground truth (scored 0 by the official code): {', '.join(empty)}")


def cmd_synth(a):
    sizes = dict(C.SYNTH_DEFAULTS["sizes"])
    if a.scale != 1.0:
        sizes = {k: max(4, int(round(v * a.scale))) for k, v in sizes.items()}
    C.make_synthetic(a.out, seed=a.seed, n_classes=a.classes, image_size=a.image_size, sizes=sizes)


def cmd_split(a):
    root = Path(a.root)
    ids = C.read_split(a.list)
    present = [i for i in ids if (root / "frames" / f"{i}.jpg").is_file() and (root / "audio" / f"{i}.wav").is_file()]
    missing = [i for i in ids if i not in set(present)]
    (root / "splits").mkdir(parents=True, exist_ok=True)
    out = root / "splits" / f"{a.name}.txt"
    out.write_text("\n".join(present if a.present_only else ids) + "\n")
    print(f"{out}: {len(present if a.present_only else ids)} ids ({len(present)} of {len(ids)} listed ids present)")
    if missing:
        miss = root / "splits" / f"{a.name}.missing.txt"
        miss.write_text("\n".join(missing) + "\n")
        print(f"{len(missing)} listed ids have no frame/wav under {root}; listed in {miss}")


def frame_time(v: str) -> str:
    """--time: 'middle' or a finite number of seconds >= 0 (checked once, as an argument error)."""
    if v == "middle":
        return v
    try:
        t = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{v}' is neither 'middle' nor a number of seconds") from None
    if not math.isfinite(t) or t < 0:
        raise argparse.ArgumentTypeError(f"{v}: the frame time must be a finite number of seconds >= 0")
    return v


def check_clip(job):
    """Decode one clip's frame (PIL, every pixel) and WAV (common.read_wav) -> (id, reason or None)."""
    root, vid = job
    reasons = []
    for what, fn in (("frame", lambda: C.load_image(Path(root) / "frames" / f"{vid}.jpg")),
                     ("audio", lambda: C.read_wav(Path(root) / "audio" / f"{vid}.wav"))):
        try:
            fn()
        except C.UserError as e:
            reasons.append(str(e))
        except Exception as e:  # anything a broken file raises is a reason, never a crash of the check
            reasons.append(f"{what}: {type(e).__name__}: {e}")
    return vid, "; ".join(reasons) or None


def cmd_check(a):
    """Decode every frame and WAV of a split (or of every clip under ROOT) in parallel; write the bad ids with
    their reasons to ROOT/check_<NAME>.txt; exit status 1 if any is bad."""
    root = Path(a.root)
    if not root.is_dir():
        raise C.UserError(f"{root}: no such dataset root")
    if a.split:
        split = Path(a.split) if Path(a.split).suffix == ".txt" else root / "splits" / f"{a.split}.txt"
        ids, name = C.read_split(split), split.stem
    else:
        ids = sorted({p.stem for p in (root / "frames").glob("*.jpg")} |
                     {p.stem for p in (root / "audio").glob("*.wav")})
        name = "all"
        if not ids:
            raise C.UserError(f"{root}: no frames/*.jpg or audio/*.wav to check")
    jobs = [(str(root), v) for v in ids]
    pool = Pool(a.workers) if a.workers > 1 else None
    it = pool.imap_unordered(check_clip, jobs, chunksize=16) if pool else map(check_clip, jobs)
    bad = dict(r for r in C.progress(it, "check", total=len(jobs)) if r[1])
    if pool:
        pool.close()
        pool.join()
    out = root / f"check_{name}.txt"
    tmp = Path(str(out) + ".part")
    tmp.write_text("".join(f"{v}\t{bad[v]}\n" for v in sorted(bad)))
    os.replace(tmp, out)
    print(f"checked {len(ids)} clips ({'split ' + name if a.split else 'every clip under ' + str(root)}): "
          f"{len(ids) - len(bad)} ok, {len(bad)} bad; bad ids and reasons in {out}")
    for v in sorted(bad)[:5]:
        print(f"  {v}: {bad[v]}")
    if bad:
        sys.exit(1)


def ingest_args(s, src_help: str):
    """The arguments every ingesting subcommand shares."""
    s.add_argument("src", help=src_help)
    s.add_argument("--out", required=True, help="dataset root to write")
    s.add_argument("--sr", type=int, default=16000, help="audio sample rate to write (Hz)")
    s.add_argument("--workers", type=int, default=1, help="parallel processes")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("videos", help="a folder of videos -> frames + wav",
                       description="Reads every video under SRC (any depth; the file stem is the id, e.g. VGG-Sound's "
                                   "<ytid>_<start:06d>). Writes ROOT/frames/<id>.jpg (the frame displayed at --time, "
                                   "found by timestamp, not index), ROOT/audio/<id>.wav (the whole audio track, mono "
                                   "PCM16 at --sr), ROOT/manifest.csv and ROOT/splits/all.txt.")
    ingest_args(s, "folder with the videos")
    s.add_argument("--time", default="middle", type=frame_time,
                   help="frame time: 'middle' of the clip or SECONDS (>= 0) from its start")
    s.set_defaults(fn=cmd_videos)
    s = sub.add_parser("frames", help="already-extracted frames + audio -> the layout",
                       description="Pairs image files (jpg/png) and audio files (wav/flac/mp3/m4a/...) under SRC by "
                                   "file stem; writes RGB JPEG frames, mono PCM16 WAV at --sr, the manifest (an id "
                                   "with only one of the two is 'missing') and ROOT/splits/all.txt.")
    ingest_args(s, "folder with frames and audio files (any depth)")
    s.set_defaults(fn=cmd_frames)
    s = sub.add_parser("flickr", help="the Flickr-SoundNet test download",
                       description="Reads SRC/Annotations/<id>.xml and the images + audio under SRC/Data (any depth). "
                                   "Writes frames, audio, the manifest, ROOT/flickr_xml/ (the original XMLs), "
                                   "consensus entries in ROOT/annotations.json and ROOT/splits/flickr_test.txt.")
    ingest_args(s, "the unpacked download (with Annotations/ and Data/)")
    s.set_defaults(fn=cmd_flickr)
    s = sub.add_parser("vggss", help="VGG-SS test split + annotations from the clips present",
                       description="Reads the original vggss.json and the clips already in ROOT (prepare them with "
                                   "'videos' first). Writes ROOT/splits/NAME.txt (present ids), NAME.missing.txt, and "
                                   "merges the 5158 entries into ROOT/annotations.json; reports N present / 5158.")
    s.add_argument("--json", required=True, help="the original vggss.json")
    s.add_argument("--clips", required=True, help="dataset root holding the prepared clips")
    s.add_argument("--name", default="vggss_test", help="split name")
    s.set_defaults(fn=cmd_vggss)
    s = sub.add_parser("synth", help="write the synthetic benchmark",
                       description="Writes ROOT/frames, ROOT/audio (16 kHz mono PCM16, 3 s), ROOT/splits/{train,val,"
                                   "test,cocktail_train,cocktail_val,cocktail_test}.txt, ROOT/annotations.json and "
                                   "ROOT/synth.json. Deterministic by --seed.")
    s.add_argument("--out", required=True, help="dataset root to write")
    s.add_argument("--seed", type=int, default=0, help="generator seed")
    s.add_argument("--classes", type=int, default=6, help="number of object classes (4-8)")
    s.add_argument("--image-size", type=int, default=128, help="frame side in pixels")
    s.add_argument("--scale", type=float, default=1.0, help="multiply every split size by this factor")
    s.set_defaults(fn=cmd_synth)
    s = sub.add_parser("split", help="register an id list as a split",
                       description="Reads LIST (one id per line, or the first column of a csv) and writes "
                                   "ROOT/splits/NAME.txt; ids without frames/<id>.jpg and audio/<id>.wav are "
                                   "reported and listed in ROOT/splits/NAME.missing.txt.")
    s.add_argument("list", help="id list (.txt or .csv)")
    s.add_argument("--name", required=True, help="split name (e.g. test, vggss_10k)")
    s.add_argument("--root", required=True, help="dataset root in the standard layout")
    s.add_argument("--present-only", action="store_true", help="keep only the ids whose files are present")
    s.set_defaults(fn=cmd_split)
    s = sub.add_parser("check", help="decode every frame and WAV (run before a long training run)",
                       description="Decodes every frame (PIL, all pixels) and WAV (the reader the methods use) of "
                                   "a split, or of every clip under ROOT, in parallel. Writes the bad ids with their "
                                   "reasons to ROOT/check_<NAME>.txt (NAME: the split, or 'all'), prints a summary "
                                   "and exits with status 1 if any clip is bad.")
    s.add_argument("root", help="dataset root in the standard layout")
    s.add_argument("--split", help="split name (ROOT/splits/NAME.txt) or a .txt id list (default: every clip)")
    s.add_argument("--workers", type=int, default=1, help="parallel processes")
    s.set_defaults(fn=cmd_check)
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    C.run_cli(main)
