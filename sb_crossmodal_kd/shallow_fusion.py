"""Distillation against the LM at decoding time: the study's decoding rows.

The alternative a user would pick instead of distilling the LM into the acoustic model is to
decode the AM alone with the LM (shallow fusion: CTC prefix beam search scoring words with
an n-gram LM). For each trained model of ``conditions`` and each seed of a study folder
(:func:`~sb_crossmodal_kd.ablation.run_ablation`'s ``runs/<condition>/<seed>/``),
:func:`run_shallow_fusion`:

1. trains one word n-gram LM (interpolated Kneser-Ney) on the study's LM text, the text
   the unit-LM teachers learnt from (``data/lm_text/train.txt``);
2. exports the run's best checkpoint (:func:`~sb_crossmodal_kd.inference.export_asr`) and
   computes its CTC log-probabilities on valid and test once, timing the acoustic model;
3. chooses the LM weight and beam width on valid
   (:func:`~sb_crossmodal_kd.decoding.choose_decoding_settings`), never on test;
4. decodes test greedily and with the LM at that choice, timing each search.

Real-time factors are decoding time over audio time, in the same process, one after the
other: ``rtf`` counts the acoustic model (features, encoder, output layer) and the search,
``search_rtf`` the search alone. Each model's record goes to
``decoding/<condition>/<seed>/decoding.json`` (a finished one is reused when its settings
match, redone otherwise); the summary over seeds to ``decoding.json`` and ``decoding.md``.
"""

import csv
import functools
import logging
import tempfile
import time
from pathlib import Path

import torch

from sb_crossmodal_kd.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["FUSION_CONDITIONS", "NGRAM_ORDER", "acoustic_scores", "decode_model",
           "fusion_claims", "fusion_markdown", "run_shallow_fusion", "summarize_fusion"]

FUSION_CONDITIONS = ("am_alone", "hierarchy")
NGRAM_ORDER = 3
DECODING_FORMAT = "sbkd-decoding-1"
_BATCH_SIZE = 16


def _manifest(path):
    with open(path, newline="") as handle:
        return [row for row in csv.DictReader(handle)]


def _timed(device, step):
    """``step()`` and its wall time, the device's queue drained first and last."""
    synchronize = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    synchronize()
    start = time.perf_counter()
    out = step()
    synchronize()
    return out, time.perf_counter() - start


def acoustic_scores(asr, manifest, batch_size=_BATCH_SIZE):
    """The model's CTC log-probabilities for every utterance of a manifest, computed once.

    Utterances are batched by duration (shortest first: little padding).

    Returns
    -------
    dict
        ``log_probs`` (list of ``[B, T, V + 1]`` CPU tensors) with ``lengths`` (list of
        ``[B]`` relative lengths), ``references`` (their ``wrd``, in the same order),
        ``audio_s`` (seconds of audio) and ``am_s`` (wall time of the acoustic model).
    """
    from sb_crossmodal_kd.inference import read_audio

    rows = sorted(_manifest(manifest), key=lambda row: float(row["duration"]))
    out = {"log_probs": [], "lengths": [], "references": [], "audio_s": 0.0, "am_s": 0.0}
    sample_rate = asr.audio_normalizer.sample_rate
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        waves = [read_audio(asr, row["wav"]) for row in batch]
        sizes = torch.tensor([len(wave) for wave in waves], dtype=torch.float)
        padded = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
        lengths = sizes / sizes.max()
        with torch.inference_mode():
            log_probs, seconds = _timed(asr.device, functools.partial(asr.encode_batch, padded,
                                                                      lengths))
        out["log_probs"].append(log_probs.float().cpu())
        out["lengths"].append(lengths)
        out["references"] += [row["wrd"] for row in batch]
        out["audio_s"] += float(sizes.sum()) / sample_rate
        out["am_s"] += seconds
    return out


def _greedy_texts(asr, scores):
    from speechbrain.decoders import ctc_greedy_decode

    blank = int(asr.hparams.blank_index)
    return [asr.tokenizer.decode_ids(ids)
            for log_probs, lengths in zip(scores["log_probs"], scores["lengths"], strict=True)
            for ids in ctc_greedy_decode(log_probs, lengths, blank_id=blank)]


def _beam_texts(searcher, scores):
    return [text for log_probs, lengths in zip(scores["log_probs"], scores["lengths"],
                                               strict=True)
            for text in searcher.transcribe(log_probs, lengths)]


def decode_model(run_dir, lm_path, valid_manifest, test_manifest, lm_weights=None,
                 beam_widths=None, device="cpu"):
    """Greedy and LM decoding of one trained run on test, the LM settings chosen on valid.

    Arguments
    ---------
    run_dir : str or Path
        A finished training run (SpeechBrain output folder of the CTC or KD recipe).
    lm_path : str or Path
        The word n-gram LM (ARPA file).
    valid_manifest, test_manifest : str or Path
        CSV manifests (``ID``, ``duration``, ``wav``, ``wrd``).
    lm_weights, beam_widths : sequence, optional
        The grid searched on valid (default: that of
        :func:`~sb_crossmodal_kd.decoding.choose_decoding_settings`).
    device : str
        Where the acoustic model runs (the search runs on the host).

    Returns
    -------
    dict
        ``valid_grid`` (every setting's valid WER), ``chosen`` (the setting), ``greedy`` and
        ``lm`` (each ``wer``, ``search_s``, ``rtf``, ``search_rtf`` on test), ``test_audio_s``,
        ``am_s`` and ``threads``.
    """
    from sb_crossmodal_kd.decoding import choose_decoding_settings
    from sb_crossmodal_kd.decoding.tuning import word_error_rate
    from sb_crossmodal_kd.inference import export_asr, load_asr

    grid = {key: tuple(value) for key, value in (("lm_weights", lm_weights),
                                                 ("beam_widths", beam_widths)) if value}
    with tempfile.TemporaryDirectory(prefix="sbkd-fusion-") as scratch:
        export_asr(run_dir, Path(scratch) / "model")
        asr = load_asr(Path(scratch) / "model", device=device, lm=lm_path)
        valid = acoustic_scores(asr, valid_manifest)
        test = acoustic_scores(asr, test_manifest)
    searcher = asr.decoding_function
    choice = choose_decoding_settings(searcher, valid["log_probs"], valid["lengths"],
                                      valid["references"], **grid)
    record = {"valid_grid": choice["grid"], "chosen": choice["best"],
              "test_audio_s": round(test["audio_s"], 2), "am_s": round(test["am_s"], 3),
              "threads": torch.get_num_threads(), "device": str(device)}
    for name, decode in (("greedy", lambda: _greedy_texts(asr, test)),
                         ("lm", lambda: _beam_texts(searcher, test))):
        texts, seconds = _timed("cpu", decode)
        record[name] = {"wer": word_error_rate(texts, test["references"]),
                        "search_s": round(seconds, 3),
                        "search_rtf": seconds / test["audio_s"],
                        "rtf": (test["am_s"] + seconds) / test["audio_s"]}
    return record


def _decode_one(condition, seed, run_dir, lm_path, data_dir, record_path, settings, device):
    logger.info("decoding with the LM: %s, seed %d", condition, seed)
    result = decode_model(run_dir, lm_path, data_dir / "valid.csv", data_dir / "test.csv",
                          settings["lm_weights"], settings["beam_widths"], device)
    from sb_crossmodal_kd.revision import source_revision

    record = {"condition": condition, "seed": seed, "settings": settings, **result,
              "commit": source_revision()}
    atomic_write_json(record_path, record)
    return record


def _finished(record_path, settings):
    import json

    if not record_path.is_file():
        return None
    data = json.loads(record_path.read_text())
    if data.get("settings") != settings or "lm" not in data:
        logger.warning("%s: decoded with other settings or unfinished; decoding again",
                       record_path)
        return None
    return data


def run_shallow_fusion(study_dir, seeds, conditions=FUSION_CONDITIONS, lm_weights=None,
                       beam_widths=None, device="cpu", jobs=1):
    """The decoding rows of a study folder (see the module docstring); resumable.

    Arguments
    ---------
    study_dir : str or Path
        A study's output folder with ``data/`` and finished ``runs/<condition>/<seed>/``.
    seeds : list of int
        The study's seeds.
    conditions : sequence of str
        Conditions whose models are decoded greedily and with the LM.
    lm_weights, beam_widths : sequence, optional
        The grid chosen from on valid.
    device : str
        Where the acoustic models run.
    jobs : int
        Models decoded side by side, each in its own process with ``cpu_count // jobs``
        threads (both decodings of one model always share a process: their times compare).

    Returns
    -------
    dict
        The content of ``decoding.json``: ``rows`` (:func:`summarize_fusion`), ``runs``
        (every model's record), ``lm`` (the n-gram's order, words, text) and ``settings``.
    """
    import os

    from sb_crossmodal_kd.decoding import load_ngram, train_ngram
    from sb_crossmodal_kd.decoding.tuning import DEFAULT_BEAM_WIDTHS, DEFAULT_LM_WEIGHTS
    from sb_crossmodal_kd.teachers.speechbrain_lm import file_sha256
    from sb_crossmodal_kd.workers import process_pool

    study_dir = Path(study_dir).resolve()
    data_dir, out_dir = study_dir / "data", study_dir / "decoding"
    text = data_dir / "lm_text" / "train.txt"
    missing = [str(path) for path in (text, data_dir / "valid.csv", data_dir / "test.csv",
                                      *(study_dir / "runs" / name / str(seed) / "run.json"
                                        for name in conditions for seed in seeds))
               if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{study_dir} is not a finished study for decoding: missing "
                                f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    lm_path = out_dir / f"words_{NGRAM_ORDER}gram.arpa"
    settings = {"ngram_order": NGRAM_ORDER, "lm_text_sha256": file_sha256(text),
                "lm_weights": list(lm_weights or DEFAULT_LM_WEIGHTS),
                "beam_widths": list(beam_widths or DEFAULT_BEAM_WIDTHS)}
    lm_record = {"lm_text_sha256": settings["lm_text_sha256"], "order": NGRAM_ORDER}
    if not lm_path.is_file() or _lm_record(out_dir) != lm_record:
        train_ngram(text, lm_path, order=NGRAM_ORDER)
        atomic_write_json(out_dir / "lm.json", lm_record)
    lm = load_ngram(lm_path)
    records, todo = {}, []
    for name in conditions:
        for seed in seeds:
            record_path = out_dir / name / str(seed) / "decoding.json"
            found = _finished(record_path, settings)
            if found:
                records[(name, seed)] = found
            else:
                todo.append((name, seed, study_dir / "runs" / name / str(seed), lm_path,
                             data_dir, record_path, settings, device))
    if jobs > 1 and len(todo) > 1:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with process_pool(min(jobs, len(todo)), threads) as pool:
            futures = {args[:2]: pool.submit(_decode_one, *args) for args in todo}
            records.update({key: future.result() for key, future in futures.items()})
    else:
        records.update({args[:2]: _decode_one(*args) for args in todo})
    runs = [records[(name, seed)] for name in conditions for seed in seeds]
    result = {"format": DECODING_FORMAT, "rows": summarize_fusion(runs, conditions),
              "runs": runs, "seeds": list(seeds), "settings": settings,
              "lm": {"order": lm.order, "words": len(lm.words), "text": str(text)}}
    atomic_write_json(study_dir / "decoding.json", result)
    atomic_write_text(study_dir / "decoding.md", fusion_markdown(result))
    return result


def _lm_record(out_dir):
    import json

    path = out_dir / "lm.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _mean_std(values):
    values = torch.tensor(values, dtype=torch.float64)
    std = float(values.std()) if len(values) > 1 else None
    return float(values.mean()), std


def summarize_fusion(runs, conditions=FUSION_CONDITIONS):
    """One row per condition and decoding (``greedy``, ``lm``): test WER and real-time
    factors, mean and std over seeds, and the LM settings each seed chose on valid.

    Example
    -------
    >>> runs = [{"condition": "am_alone", "seed": s, "chosen": {"lm_weight": 0.5,
    ...          "beam_width": 8}, "greedy": {"wer": w, "rtf": 0.01, "search_rtf": 0.001},
    ...          "lm": {"wer": w - 2, "rtf": 0.05, "search_rtf": 0.04}}
    ...         for s, w in ((1, 30.0), (2, 32.0))]
    >>> rows = summarize_fusion(runs, ["am_alone"])
    >>> [(row["condition"], row["decoding"], row["wer"]) for row in rows]
    [('am_alone', 'greedy', 31.0), ('am_alone', 'lm', 29.0)]
    >>> rows[1]["chosen"]
    [{'seed': 1, 'lm_weight': 0.5, 'beam_width': 8}, {'seed': 2, 'lm_weight': 0.5, 'beam_width': 8}]
    """
    rows = []
    for name in conditions:
        mine = sorted((run for run in runs if run["condition"] == name),
                      key=lambda run: run["seed"])
        for decoding in ("greedy", "lm"):
            row = {"condition": name, "decoding": decoding, "seeds": [r["seed"] for r in mine]}
            for key in ("wer", "rtf", "search_rtf"):
                row[key], row[f"{key}_std"] = _mean_std([r[decoding][key] for r in mine])
            if decoding == "lm":
                row["chosen"] = [{"seed": r["seed"], "lm_weight": r["chosen"]["lm_weight"],
                                  "beam_width": r["chosen"]["beam_width"]} for r in mine]
            rows.append(row)
    return rows


def fusion_markdown(result):
    """The decoding rows as a Markdown table (test WER and real-time factors, mean ± std)."""

    def pm(mean, std, digits):
        return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")

    seeds = result["seeds"]
    lines = ["| model | decoding | test WER % | RTF | search RTF | LM weight, beam (valid) |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        chosen = ", ".join(sorted({f"{c['lm_weight']:g}, {c['beam_width']}"
                                   for c in row.get("chosen", [])})) or "-"
        decoding = ("greedy" if row["decoding"] == "greedy"
                    else f"+ {result['lm']['order']}-gram LM beam search")
        lines.append(f"| {row['condition']} | {decoding} | {pm(row['wer'], row['wer_std'], 2)} "
                     f"| {pm(row['rtf'], row['rtf_std'], 3)} "
                     f"| {pm(row['search_rtf'], row['search_rtf_std'], 3)} | {chosen} |")
    threads = sorted({run["threads"] for run in result["runs"]})
    lines += ["", f"Mean ± std over {len(seeds)} seed{'s' if len(seeds) > 1 else ''} "
              f"({', '.join(map(str, seeds))}). RTF: decoding time / audio time on test "
              "(acoustic model and search; search RTF: the search alone), each model's "
              f"greedy and LM decoding in one process with {', '.join(map(str, threads))} "
              "torch thread(s). The LM weight and beam were chosen on valid for each model."]
    return "\n".join(lines) + "\n"


def _paired(runs, left, right, metric="wer"):
    """Mean and std over seeds of ``left`` minus ``right``, each ``(condition, decoding)``."""
    by_key = {(run["condition"], run["seed"]): run for run in runs}
    seeds = sorted(seed for (name, seed) in by_key if name == left[0]
                   and (right[0], seed) in by_key)
    values = [by_key[(left[0], s)][left[1]][metric] - by_key[(right[0], s)][right[1]][metric]
              for s in seeds]
    return (*_mean_std(values), sum(value < 0 for value in values), len(values))


def fusion_claims(result):
    """Distillation (greedy) against shallow fusion, paired seed by seed, as Markdown bullets.

    Example
    -------
    >>> def run(name, seed, greedy, lm):
    ...     return {"condition": name, "seed": seed, "greedy": {"wer": greedy, "rtf": 0.01},
    ...             "lm": {"wer": lm, "rtf": 0.03}}
    >>> runs = [run("am_alone", 1, 30.0, 10.0), run("hierarchy", 1, 20.0, 8.0),
    ...         run("am_alone", 2, 32.0, 12.0), run("hierarchy", 2, 21.0, 9.0)]
    >>> print("\\n".join(fusion_claims({"runs": runs})))
    - hierarchy greedy − am_alone + LM: Δ WER +9.50 ± 0.71 (0 of 2 seeds below); RTF 0.33 × am_alone + LM's
    - hierarchy + LM − am_alone + LM: Δ WER -2.50 ± 0.71 (2 of 2 seeds below)
    - am_alone + LM − am_alone greedy: Δ WER -20.00 ± 0.00 (2 of 2 seeds below)
    """
    runs = result["runs"]
    names = {run["condition"] for run in runs}
    if not {"am_alone", "hierarchy"} <= names:
        return []

    def line(text, left, right, rtf=False):
        mean, std, below, seeds = _paired(runs, left, right)
        out = (f"- {text}: Δ WER {mean:+.2f}" + ("" if std is None else f" ± {std:.2f}")
               + f" ({below} of {seeds} seeds below)")
        if rtf:
            ratio = (sum(r[left[1]]["rtf"] for r in runs if r["condition"] == left[0])
                     / sum(r[right[1]]["rtf"] for r in runs if r["condition"] == right[0]))
            out += f"; RTF {ratio:.2f} × {right[0]} + LM's"
        return out

    return [line("hierarchy greedy − am_alone + LM", ("hierarchy", "greedy"), ("am_alone", "lm"),
                 rtf=True),
            line("hierarchy + LM − am_alone + LM", ("hierarchy", "lm"), ("am_alone", "lm")),
            line("am_alone + LM − am_alone greedy", ("am_alone", "lm"), ("am_alone", "greedy"))]
