"""Gradient steps shared by ranks: the step of the whole batch, the same bytes on any
number of ranks (batch-norm running statistics included)."""

import os
import subprocess
import textwrap

import pytest
import torch
from launch import torchrun_command

from sb_crossmodal_kd.alignment.batch_parts import part_ranges, shared_step

PARTS = 4


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv1d(3, 8, 3, padding=1), torch.nn.BatchNorm1d(8),
                               torch.nn.ReLU(), torch.nn.Conv1d(8, 2, 1)).train()


def _batches():
    generator = torch.Generator().manual_seed(1)
    # 7 and 2 items: parts of 2 (one of 1), and parts of 1 with two empty ones
    return [(torch.randn(n, 3, 10, generator=generator), torch.randn(n, 2, 10, generator=generator))
            for n in (7, 2, 7)]


def _loss(model, x, y, start, stop, n):
    return ((model(x[start:stop]) - y[start:stop]) ** 2).sum() / n


def train_shared(model, optimiser=torch.optim.Adam):
    # Adam by default: it magnifies the smallest difference (a bias before batch norm has a
    # gradient of about 0, which Adam scales up to steps of the learning rate)
    optimiser = optimiser(model.parameters(), lr=0.01)
    losses = []
    for x, y in _batches():
        ranges = part_ranges(len(x), PARTS)

        def loss_of_part(part, x=x, y=y, ranges=ranges):
            start, stop = ranges[part]
            return None if start == stop else _loss(model, x, y, start, stop, len(x))

        losses.append(shared_step(model, optimiser, loss_of_part, PARTS))
    return losses


def test_a_step_on_parts_is_the_step_of_the_whole_batch():
    # The reference: each part's forward pass (its own batch statistics), the losses summed
    # and one backward pass; batch norm updating its running statistics itself.
    shared, reference = _model(), _model()
    optimiser = torch.optim.SGD(reference.parameters(), lr=0.01)
    expected = []
    for x, y in _batches():
        parts = [r for r in part_ranges(len(x), PARTS) if r[0] < r[1]]
        loss = sum(_loss(reference, x, y, start, stop, len(x)) for start, stop in parts)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        expected.append(loss.detach())
    losses = train_shared(shared, torch.optim.SGD)
    assert torch.allclose(torch.stack(losses), torch.stack(expected), atol=1e-6)
    for (name, got), want in zip(shared.state_dict().items(), reference.state_dict().values(),
                                 strict=True):
        assert torch.allclose(got.float(), want.float(), atol=1e-6), name
    assert int(shared[1].num_batches_tracked) == 4 + 2 + 4


UNDER_TORCHRUN = textwrap.dedent(
    """
    import sys
    import torch
    from sb_crossmodal_kd.distributed import init_distributed, rank
    sys.path.insert(0, sys.argv[2])
    from test_batch_parts import _model, train_shared

    init_distributed({})
    model = _model()
    train_shared(model)
    torch.save(model.state_dict(), f"{sys.argv[1]}/rank{rank()}.pt")
    """
)


def test_three_ranks_end_with_the_bytes_of_one_process(tmp_path):
    # 4 parts over 3 ranks: rank 0 takes two parts, the others one; some parts are empty.
    torch.set_num_threads(1)
    one = _model()
    train_shared(one)
    torch.save(one.state_dict(), tmp_path / "one.pt")
    worker = tmp_path / "worker.py"
    worker.write_text(UNDER_TORCHRUN)
    run = subprocess.run(torchrun_command([str(worker), str(tmp_path),
                                           os.path.dirname(__file__)], nproc=3),
                         cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    expected = one.state_dict()
    for r in range(3):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        for name, value in expected.items():
            assert value.dtype == got[name].dtype and torch.equal(value, got[name]), (r, name)


def test_the_aligner_refuses_a_batch_parts_that_is_not_a_whole_number_of_at_least_one():
    from sb_crossmodal_kd.alignment.forced import AlignerSettings

    for bad in (0, -1, 2.5, True, "4"):
        with pytest.raises(ValueError, match="batch_parts must be a whole number"):
            AlignerSettings(batch_parts=bad)


def test_a_batch_norm_layer_run_twice_in_a_part_is_refused():
    # Its running statistics would hold only the second call's batch.
    norm = torch.nn.BatchNorm1d(2)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), norm).train()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="ran twice in one part"):
        shared_step(model, optimiser, lambda part: norm(model(x)).sum(), parts=1)
    assert norm.momentum == 0.1  # put back
