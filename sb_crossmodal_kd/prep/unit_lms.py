"""The chain's unit LMs, each trained in a worker process of its own."""

import json
import os
from pathlib import Path

from sb_crossmodal_kd.prep.settings import _lexicon_file
from sb_crossmodal_kd.teachers.lm_training import train_unit_lm
from sb_crossmodal_kd.units.types import lm_unit_types, unit_type


def _unit_lms(prep_dir, lm_texts, settings, vocab_size, device, cores=None, jobs=None):
    """Trains the unit LMs (one per unit type that has one) in worker processes, side by side
    (most of a small LM's time is start-up, and one process per LM keeps their torch threads
    apart), or at most ``cores`` processes at a time when it is given. Each LM's hparams get
    the files of the resources its unit type is defined by. Each LM converts its text with
    its share of the cores and of the chain's ``jobs`` (``conversion_jobs``: the fewer of
    the two // the LMs side by side, at least 1), so the processes converting at once stay
    within the cores and the processes (memory) the chain was given."""
    from sb_crossmodal_kd.workers import process_pool

    resources = {"tokenizer": {"tokenizer_dir": str(prep_dir / "tokenizer"),
                               "vocab_size": vocab_size},
                 "tree": {"tree_file": str(prep_dir / "senone_tree.json")},
                 "lexicon": ({"lexicon_file": str(_lexicon_file(settings))}
                             if _lexicon_file(settings) is not None else {})}
    todo = {}
    for unit in lm_unit_types():
        folder = prep_dir / "lm" / unit
        if (folder / "results.json").is_file() and (folder / "lm" / "hyperparams.yaml").is_file():
            continue
        text = {split: Path(path).resolve() for split, path in lm_texts.items()}
        overrides = {"data_folder": str(text["train"].parent), "train_text": str(text["train"]),
                     "valid_text": str(text["valid"]), "output_folder": str(folder),
                     **settings["lm"]}
        for need in unit_type(unit).needs:
            overrides.update(resources[need])
        todo[unit] = (str(unit_type(unit).lm_hparams), overrides, {"device": device})
    if todo:
        # One share of the cores each: oversubscribed torch threads made every epoch several
        # times slower (a user's OMP_NUM_THREADS wins).
        workers = len(todo) if cores is None else max(1, min(len(todo), cores))
        threads = int(os.environ.get("OMP_NUM_THREADS")
                      or max(1, (cores or os.cpu_count() or 1) // workers))
        # The LM process waits while its conversion workers run: they take its share.
        available = cores or os.cpu_count() or 1
        conversion_jobs = max(1, min(jobs or available, available) // workers)
        with process_pool(workers, threads) as pool:
            futures = {unit: pool.submit(train_unit_lm, *args, conversion_jobs=conversion_jobs)
                       for unit, args in todo.items()}
            failed = []
            for unit, future in futures.items():
                try:
                    future.result()
                except Exception as error:  # noqa: BLE001 (each LM's failure is reported)
                    failed.append(f"{unit} ({type(error).__name__}: {error}; see "
                                  f"{prep_dir / 'lm' / unit / 'log.txt'})")
        if failed:
            raise RuntimeError(f"Training the unit LM failed for: {'; '.join(failed)}")
    return {unit: json.loads((prep_dir / "lm" / unit / "results.json").read_text())
            for unit in lm_unit_types()}
