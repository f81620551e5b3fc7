"""Training feeds its device: loader workers sized to the cores, native precision only."""

from __future__ import annotations

import torch

from gastrolens.training.recipe import Recipe
from gastrolens.training.trainer import _loader, amp_dtype_for, loader_workers


def test_workers_follow_the_cores_unless_given() -> None:
    assert loader_workers(None, cpus=16) == 15
    assert loader_workers(None, cpus=64) == 16
    assert loader_workers(None, cpus=2) == 1
    assert loader_workers(None, cpus=1) == 0
    assert loader_workers(3, cpus=64) == 3
    assert loader_workers(0, cpus=64) == 0


def test_workers_compute_on_one_torch_thread_each() -> None:
    dataset = [torch.get_num_threads() for _ in range(4)]

    class Threads(torch.utils.data.Dataset[int]):
        def __len__(self) -> int:
            return len(dataset)

        def __getitem__(self, index: int) -> int:
            return torch.get_num_threads()

    recipe = Recipe(task="classifier", batch_size=2, epochs=1)
    loader = _loader(Threads(), recipe, 0, 1, False, shuffle=False)
    assert [int(n) for batch in loader for n in batch] == [1, 1, 1, 1]
    assert _loader(Threads(), recipe, 0, 0, False, shuffle=False).worker_init_fn is None


def test_training_precision_is_fp32_off_cuda() -> None:
    assert amp_dtype_for(torch.device("cpu")) is None
