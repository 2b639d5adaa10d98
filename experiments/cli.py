"""Shared LightningCLI defaults: W&B offline + CSV logging under `runs/<experiment>/`, seeded runs.

W&B runs offline unless the user sets `WANDB_MODE=online` (nothing here needs an account or the
network); `wandb sync runs/<experiment>/wandb/...` uploads later.
"""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
