"""Shared test set-up: deterministic, CPU-sized PyTorch for the reference side."""

import torch

torch.manual_seed(0)
torch.set_num_threads(2)
