"""Model factories for tests/test_study_processes.py, importable by name in spawned worker processes."""

import os

import torch
from torch import nn


def small_net(width: int = 16, seed: int = 0) -> nn.Module:
    """A seeded MLP over 3×32×32 images (folder data is resized to the model's input size)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, width), nn.ReLU(), nn.Linear(width, 3))
    net.num_classes = 3
    return net


def dies_in_worker(width: int = 16, seed: int = 0) -> nn.Module:
    """small_net, except that building it in a process other than the test's kills that process."""
    if os.environ.get("KTRANSFER_TEST_PARENT") != str(os.getpid()):
        os._exit(3)
    return small_net(width, seed)
