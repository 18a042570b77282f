"""Root conftest: doctests of the library see torch limited to one thread."""

import torch

torch.set_num_threads(1)
