"""eval_cioU.py - score saved localization maps with a named protocol, exactly as the official test scripts do.

    python eval_cioU.py --pred maps.npz --gt ROOT/annotations.json [--split ROOT/splits/test.txt]
                        [--protocol median|median_strict|abs0.5|rel0.1|is3|avsbench] [--fscore-batch B]
                        [--align-corners | --no-align-corners]
                        [--per-sample out.csv] [--baselines] [--json summary.json] [--missing-out missing.txt]
                        [--neg-threshold T] [--device cpu|cuda]
    python eval_cioU.py --table runs/*/results.json      # mean ± std of many runs (seeds) as a markdown table

--pred: an .npz with one float map per id (any size), as every method's `--eval --save-maps` writes it.
--gt:   the standard layout's annotations.json, the original vggss.json, or a folder of the original Flickr-SoundNet
        XML files (consensus ground truth, C = 2). AVSBench and IS3 roots (data_prep.py avsbench / is3) are scored with
        --protocol avsbench (mIoU, F-score) / is3 (adaptive cIoU, IIoU, IAUC).
Printed: protocol, resize, N evaluated / N listed, cIoU@0.5 (the papers' "cIoU"), AUC, mean cIoU, with
--baselines the centred prior and the full image, and cIoU@0.5 by box area (SLAVC's bins). The maps are resized as
the method stored in the file (EZ-VSL: bilinear align_corners=True; LVS, SSPL, CSOL: False = cv2 INTER_LINEAR), else
False. An .npz written with `--eval --negatives` also holds the raw maps with negative audio (raw/<id>,
neg/<kind>/<id>): the negative-audio metrics (SLAVC AP / max-F1, pIA) are recomputed from them. Every bad input is
one `error:` line.
"""
import argparse
import csv
import json
from pathlib import Path

import numpy as np

import common as C


def load_maps(path):
    """(maps, negatives or None, the __eval__ meta) from an .npz of common.save_maps, or any {id: 2-D map} .npz. Every
    key that is not raw/..., neg/... or __...__ is an id; each map is checked (2-D, non-empty, finite)."""
    path = Path(path)
    if not path.is_file():
        raise C.UserError(f"prediction file not found: {path}")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:
        raise C.UserError(f"{path}: not a readable .npz archive ({type(e).__name__}: {e})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise C.UserError(f"{path}: a single .npy array, not an .npz archive with one map per id (write it with "
                          f"numpy.savez(path, **{{id: map}}))")
    try:
        with z:
            data = {k: z[k] for k in z.files}
    except Exception as e:
        raise C.UserError(f"{path}: corrupt .npz archive ({type(e).__name__}: {e})") from None
    meta = {}
    for key in ("__eval__", "__negatives__"):
        try:
            meta[key] = json.loads(str(data[key])) if key in data else None
        except json.JSONDecodeError:
            raise C.UserError(f"{path}: {key} is not valid json") from None
    maps = {k: C.check_map(k, v, f"{path}: map") for k, v in data.items() if not k.startswith(("raw/", "neg/", "__"))}
    if not maps:
        raise C.UserError(f"{path}: no maps in the archive")
    negs = meta["__negatives__"] and {
        "meta": meta["__negatives__"], "raw": {k[4:]: C.check_map(k, v) for k, v in data.items() if k[:4] == "raw/"},
        "neg": {kind: {k[len(f"neg/{kind}/"):]: C.check_map(k, v) for k, v in data.items()
                       if k.startswith(f"neg/{kind}/")} for kind in meta["__negatives__"]["kinds"]}}
    return maps, negs, meta["__eval__"] or {}


def fscore_batched(curves, batch: int) -> float:
    """The official OpenNLPLab/AVSBench F-score (test.py + utility.Eval_Fmeasure): per batch of `batch` frames in test
    order, the max of the mean F curve of its frames with a non-empty mask (0 for a batch without one); then the mean
    over the batches. It depends on the batch size (ACL-SSL's fix, the protocol's "fscore": one curve over all)."""
    scores = []
    for s in range(0, len(curves), batch):
        c = curves[s:s + batch]
        c = c[~np.isnan(c[:, 0])]
        scores.append(float(c.astype(np.float64).mean(0).max()) if len(c) else 0.0)
    return float(np.mean(scores))


PROTOCOL_KEYS = ("ciou_adap", "auc_adap", "iiou", "iauc", "miou", "miou_median", "fscore")   # is3 / avsbench


def results_table(paths) -> str:
    """A markdown table of results.json files: one row per (method, data, test split), mean ± sample std (ddof 1) over
    the runs of cIoU@0.5, AUC and mean cIoU (in %) of the model, the centred prior and the audio-swapped control, plus
    the negative-audio metrics and the is3 / avsbench columns when every run has them (so the heard and unheard
    evaluations of one checkpoint give two rows). Runs of one row that differ in protocol or N are not averaged: an
    error names the files and values."""
    groups: dict = {}
    for p in paths:
        p = Path(p) / "results.json" if Path(p).is_dir() else Path(p)
        try:
            r = json.loads(p.read_text())
        except FileNotFoundError:
            raise C.UserError(f"{p}: no such results file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise C.UserError(f"{p}: not a results.json ({e})") from None
        if not isinstance(r, dict) or not all(k in r for k in ("method", "data", "split", "protocol", "n", "test")):
            raise C.UserError(f"{p}: not a method's results.json (needs method, data, split, protocol, n, test)")
        groups.setdefault((r["method"], r["data"], str(r["split"])), []).append((p, r))
    if not groups:
        raise C.UserError("no results.json given")

    def mean_std(values):
        v = np.asarray(values, np.float64) * 100
        return f"{v[0]:.2f}" if v.size == 1 else f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"

    def flat(d, prefix=""):                               # the numeric leaves of a nested dict: {"a/b": 0.5}
        out = {}
        for k, v in (d or {}).items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}/"))
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{prefix}{k}"] = v
        return out
    parts = [("model", lambda r: r["test"]), ("centred prior", lambda r: (r.get("baselines") or {}).get("center")),
             ("audio-swapped", lambda r: r.get("audio_swapped"))]
    rows, neg_cols = [], []
    for (method, data, _), runs in groups.items():
        for field in ("protocol", "n"):
            if len({str(r[field]) for _, r in runs}) > 1:
                raise C.UserError(f"cannot average {method} on {data}: the runs differ in {field} ("
                                + "; ".join(f"{r[field]} in {p}" for p, r in runs) + "); table them separately")
        first = runs[0][1]
        row = {"method": method, "data": Path(data).name, "split": Path(first["split"]).name,
               "protocol": first["protocol"], "N": str(first["n"]),
               "runs (seeds)": f"{len(runs)} ({','.join(str(r.get('seed', '?')) for _, r in runs)})"}
        for name, get in parts:
            got = [get(r) for _, r in runs]
            for k in ("ciou@0.5", "auc", "mean_ciou"):
                row[f"{name} {k}"] = mean_std([g[k] for g in got]) if all(got) else "-"
        secs = [r.get("seconds") for _, r in runs]
        row["seconds"] = f"{np.mean(secs):.0f}" if all(isinstance(v, (int, float)) for v in secs) else "-"
        negs = [{**{f"model {k}": v for k, v in r["test"].items() if k in PROTOCOL_KEYS},
                 **{f"neg {k}": v for k, v in flat(r.get("negatives")).items()}} for _, r in runs]
        for k in sorted(set.intersection(*(set(n) for n in negs))) if all(negs) else []:
            row[k] = mean_std([n[k] for n in negs])
            neg_cols += [] if k in neg_cols else [k]
        rows.append(row)
    head = list(rows[0])[:6] + [f"{n} {k}" for n, _ in parts for k in ("ciou@0.5", "auc", "mean_ciou")] + neg_cols + \
        ["seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row.get(h, "-") for h in head) + " |" for row in rows]
    return "\n".join(lines) + (f"\n(mean ± sample std over the runs, in %; seconds: mean wall time of train + test; "
                               f"{len(paths)} results files)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", help=".npz with one 2-D map per id")
    p.add_argument("--gt", help="annotations json (VGG-SS format) or a Flickr XML folder")
    p.add_argument("--table", nargs="+", metavar="RESULTS", help="instead of scoring: table these results.json files "
                   "(or run folders) as mean ± std per method and data; runs that differ in split, protocol or N "
                   "are refused")
    p.add_argument("--split", help="test id list (one id per line or first csv column); default: the ids of --pred")
    p.add_argument("--protocol", default="median", choices=list(C.PROTOCOLS), help="how a map becomes binary")
    p.add_argument("--align-corners", action=argparse.BooleanOptionalAction, default=None,
                   help="bilinear resize with align_corners=True (EZ-VSL's test) or False (cv2 INTER_LINEAR); "
                        "default: the value the method stored in the file (--save-maps), else False")
    p.add_argument("--per-sample", help="write id,ciou per sample to this csv")
    p.add_argument("--baselines", action="store_true", help="also score the centred prior and the full image")
    p.add_argument("--json", help="write the summary (results.json keys) to this file")
    p.add_argument("--missing-out", help="where to list ids of the split without a prediction "
                                         "(default: <pred>.missing.txt when any are missing)")
    p.add_argument("--neg-threshold", type=float, help="negative-audio protocol: the fixed threshold (default: the "
                                                         "one stored in the file by the method)")
    p.add_argument("--device", default="cpu", help="where the evaluator runs: cpu (default) or cuda")
    p.add_argument("--fscore-batch", type=int, metavar="B", help="--protocol avsbench: also the official AVSBench "
                   "F-score averaged over batches of B frames (test.sh: 4 clips x 5 frames = 20)")
    a = p.parse_args(argv)
    if a.table:
        table = results_table(a.table)
        print(table)
        return table
    if not (a.pred and a.gt):
        raise C.UserError("give --pred and --gt (or --table RESULTS...)")
    C.check_numbers(a)
    for flag in ("per_sample", "json", "missing_out"):              # every output writable, before any work
        if getattr(a, flag):
            C.check_file_writable(getattr(a, flag), "--" + flag.replace("_", "-"))
    maps, negs, meta_eval = load_maps(a.pred)
    if a.align_corners is None:
        a.align_corners = bool(meta_eval.get("align_corners", False))
    ann = C.load_annotations(a.gt)
    ids = C.read_split(a.split) if a.split else None
    if ids is not None and not set(ids) & set(maps):
        raise C.UserError(f"{a.split}: none of its {len(ids)} ids has a map in {a.pred} (its first ids: "
                          f"{', '.join(list(maps)[:3])}); another split, or maps of another dataset?")
    if a.fscore_batch is not None and (a.protocol != "avsbench" or a.fscore_batch < 1):
        raise C.UserError(f"--fscore-batch {a.fscore_batch}: a batch size >= 1, with --protocol avsbench")
    res = C.evaluate_maps(maps, ann, ids, a.protocol, a.align_corners, baselines=a.baselines, device=a.device)
    if a.fscore_batch and res["f_curves"] is not None:
        res["test"]["fscore_batch"] = fscore_batched(res["f_curves"], a.fscore_batch)
    print(C.format_report(res, title=Path(a.pred).name))
    if a.fscore_batch:
        print(f"[{Path(a.pred).name}] official AVSBench F-score (mean over batches of {a.fscore_batch} frames): "
              f"{100 * res['test'].get('fscore_batch', float('nan')):6.2f}")
    if res["missing"]:
        out = Path(a.missing_out or f"{a.pred}.missing.txt")
        out.write_text("\n".join(res["missing"]) + "\n")
        print(f"[{Path(a.pred).name}] {len(res['missing'])} listed ids have no prediction; written to {out}")
    neg = None
    if negs:
        meta = negs["meta"]
        thr = meta["threshold"] if a.neg_threshold is None else a.neg_threshold
        neg = C.negative_metrics(negs["raw"], negs["neg"], ann, ids if ids is not None else list(negs["raw"]), thr,
                                 bool(meta.get("align_corners", False)), a.device)
        neg["scale"] = meta.get("scale", "")
        print(C.format_negatives(neg, f"{Path(a.pred).name} negatives"))
    if a.per_sample:
        with open(a.per_sample, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "ciou"])
            w.writerows([k, f"{v:.6f}"] for k, v in res["per_sample"].items())
    if a.json:
        C.write_json(a.json, {"data": str(a.gt), "split": a.split or "(ids of --pred)", "protocol": a.protocol,
                              "resize": res["resize"], "n": res["n"], "n_listed": res["n_listed"],
                              "test": res["test"], "baselines": res["baselines"], "by_size": res["by_size"],
                              "missing": res["missing"], "duplicates": res["duplicates"], "empty_gt": res["empty_gt"],
                              "boxes_outside": res["boxes_outside"],
                              "negatives": {k: v for k, v in neg.items() if k != "per_sample"} if neg else None})
    res["negatives"] = neg
    return res


if __name__ == "__main__":
    C.run_cli(main)
