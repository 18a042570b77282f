"""Tiny sizes shared by the recipe tests that run the whole KD data chain and one epoch."""


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
