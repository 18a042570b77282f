"""Tiny sizes shared by the recipe tests that run the whole KD data chain and one epoch."""

from sb_crossmodal_kd.ablation import DEMO_TRAINING

# The ablation driver's data chain and training at sizes of a few seconds.
TINY_PREP = {
    "corpus": {"n_train": 30, "n_valid": 4, "n_test": 4, "n_text": 200, "n_text_valid": 20,
               "speakers": [3, 1, 1], "seed": 7},
    "vocab_size": 32,
    "aligner_utterances": 30,
    "aligner": {"iterations": 1, "epochs": 1, "hidden": 16},
    "tree": {"max_leaves": 130, "min_count": 5, "min_gain": 1.0},
    "lm": {"number_of_epochs": 1, "max_train_sentences": 100,
           "lm_model": {"hidden_size": 16, "embedding_dim": 8}},
    "cache_k": 8,
}
TINY_MODEL = {  # the demo's training with a tiny model (the CLI starts from DEMO_TRAINING)
    **DEMO_TRAINING,
    "number_of_epochs": 1, "d_model": 32, "num_layers": 3, "nhead": 2, "d_ffn": 64,
    "warmup_steps": 1, "max_batch_seconds": 30, "teacher_k": 8,
    "moe": {"num_experts": 2, "top_k": 1},
}


def tiny_chain(aligner_utterances=20):
    """A prep settings file (yaml text) for a chain of a few seconds."""
    return f"""
vocab_size: 32
aligner_utterances: {aligner_utterances}
aligner: {{iterations: 1, epochs: 1, hidden: 16}}
tree: {{max_leaves: 130, min_count: 5, min_gain: 1.0}}
lm: {{number_of_epochs: 1, max_train_sentences: 60, lm_model: {{hidden_size: 16, embedding_dim: 8}}}}
cache_k: 8
"""


# KD recipe overrides: a 3-layer Conformer of width 32 with all three heads, one epoch.
TINY_KD_MODEL = [
    "--number_of_epochs=1", "--d_model=32", "--num_layers=3", "--nhead=2", "--d_ffn=64",
    "--kernel_size=15", "--warmup_steps=5", "--max_batch_seconds=30", "--teacher_k=8",
    "--num_workers=0", "--heads={senone_layer: 1, monophone_layer: 2, subword_layer: 3}",
    "--dynamic_batch_sampler={num_buckets: 4}",
    "--valid_dataloader_opts={batch_size: 8, num_workers: 0}",
    "--test_dataloader_opts={batch_size: 8, num_workers: 0}",
]


DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digits_corpus_8khz(folder, sizes=(30, 6, 6), seed=3):
    """A corpus as a telephone digits task brings it: strings of two to four of ten words,
    spoken by eSpeak NG voices and stored at 8 kHz; ``{split}.csv`` manifests in ``folder``
    (returned as ``{"train", "valid", "test"}`` paths)."""
    import random
    from pathlib import Path

    import torch
    import torchaudio

    from sb_crossmodal_kd.data.espeak import fresh_espeak
    from sb_crossmodal_kd.io import write_wav_atomic

    folder = Path(folder)
    rng = random.Random(seed)
    voices = ["en-us", "en-us+f3", "en-us+m3", "en-us+f5"]
    paths = {}
    with fresh_espeak() as tts:
        for split, size in zip(("train", "valid", "test"), sizes, strict=True):
            lines = ["ID,duration,wav,wrd"]
            for i in range(size):
                words = " ".join(rng.choice(DIGITS) for _ in range(rng.randint(2, 4)))
                speech = tts.synthesize(words, voice=rng.choice(voices),
                                        rate=rng.randint(150, 200))
                audio = torch.from_numpy(speech.waveform.astype("float32") / 32768)
                audio = torchaudio.functional.resample(audio, speech.sample_rate, 8000)
                wav = folder / "audio" / f"{split}{i}.wav"
                write_wav_atomic(wav, audio.numpy(), 8000)
                lines.append(f"{split}{i},{len(audio) / 8000:.3f},{wav},{words}")
            paths[split] = folder / f"{split}.csv"
            paths[split].write_text("\n".join(lines) + "\n")
    return paths
