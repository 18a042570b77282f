"""The chain's unit LMs, each trained in a worker process of its own."""

import json
import os
from pathlib import Path

from sb_crossmodal_kd.hparams import UNIT_LMS
from sb_crossmodal_kd.prep.settings import UNIT_TYPES, _lexicon_file
from sb_crossmodal_kd.teachers.lm_training import train_unit_lm


def _unit_lms(prep_dir, lm_texts, settings, vocab_size, device, cores=None):
    """Trains the three unit LMs in worker processes, side by side (most of a small LM's time
    is start-up, and one process per LM keeps their torch threads apart), or at most
    ``cores`` processes at a time when it is given."""
    from sb_crossmodal_kd.workers import process_pool

    todo = {}
    for unit in UNIT_TYPES:
        folder = prep_dir / "lm" / unit
        if (folder / "results.json").is_file() and (folder / "lm" / "hyperparams.yaml").is_file():
            continue
        text = {split: Path(path).resolve() for split, path in lm_texts.items()}
        overrides = {"data_folder": str(text["train"].parent), "train_text": str(text["train"]),
                     "valid_text": str(text["valid"]), "output_folder": str(folder),
                     **settings["lm"]}
        if unit == "subword":
            overrides.update(tokenizer_dir=str(prep_dir / "tokenizer"),
                             vocab_size=vocab_size)
        if unit == "senone":
            overrides["tree_file"] = str(prep_dir / "senone_tree.json")
        if unit != "subword" and _lexicon_file(settings) is not None:
            overrides["lexicon_file"] = str(_lexicon_file(settings))
        todo[unit] = (str(UNIT_LMS / f"{unit}.yaml"), overrides, {"device": device})
    if todo:
        # One share of the cores each: oversubscribed torch threads made every epoch several
        # times slower (a user's OMP_NUM_THREADS wins).
        workers = len(todo) if cores is None else max(1, min(len(todo), cores))
        threads = int(os.environ.get("OMP_NUM_THREADS")
                      or max(1, (cores or os.cpu_count() or 1) // workers))
        with process_pool(workers, threads) as pool:
            futures = {unit: pool.submit(train_unit_lm, *args) for unit, args in todo.items()}
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
            for unit in UNIT_TYPES}
