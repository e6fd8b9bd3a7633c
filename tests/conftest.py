"""Shared fixtures: real digits data and a plain user-written CNN module."""

from __future__ import annotations

import os
import warnings

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

os.environ.setdefault("PL_DISABLE_FORK", "1")
# Tiny models: one intra-op thread is faster than two, and far faster on a busy machine.
torch.set_num_threads(1)


class UserCNN(pl.LightningModule):
    """An ordinary LightningModule a user writes: plain nn.Conv2d/nn.Linear/nn.ReLU."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc1 = nn.Linear(32 * 2 * 2, 64)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(64, 10)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu1(self.conv1(x)))
        x = self.relu2(self.conv2(x))
        x = F.max_pool2d(x, 2).flatten(1)
        return self.fc2(self.relu3(self.fc1(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), sync_dist=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


@pytest.fixture
def user_cnn() -> UserCNN:
    pl.seed_everything(0, verbose=False)
    return UserCNN()


def quiet_trainer(**kwargs) -> pl.Trainer:
    """A CPU Trainer without progress bars or model summaries."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        deterministic=True,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


@pytest.fixture(autouse=True)
def _no_stray_warnings():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        yield


_LAUNCH_VARIABLES = {"LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED"}


def run_ddp_script(script, *args: str, cwd, timeout: float = 240):
    """Run a DDP script in a fresh process (Lightning's launcher re-executes ``sys.argv``).

    The environment drops the launch variables of any outer run, puts the repository on
    ``PYTHONPATH``, and runs torch on one thread per rank.
    """
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARIABLES}
    env.update(PL_DISABLE_FORK="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
