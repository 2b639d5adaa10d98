"""The tile DataModule of ROSIE prediction: every pending output region of every tissue, read in workers.

One item is one chunk-aligned region of one tissue's output grid
(:mod:`lightning_modules.rosie_inference.tile_plan`): the white-padded H&E window covering all
its patches (None when the region has no foreground), its foreground blocks and its H&E
histogram. Lightning's predict sampler gives rank ``r`` of ``W`` the items ``r, r + W, ...``, so
one slide is spread over every device and node, and no two ranks ever get the same region.

Why the plans are made in ``prepare_data``
    The foreground grid, the empty output image and (for ``--segment``) the cell mask are made
    once, by global rank 0 (``prepare_data_per_node = False``: the output folder is shared by all
    nodes), before any rank lists its work. ``setup`` then reads the plans on every rank and lists
    the regions that have no record yet; a barrier after the listing keeps a fast rank from writing
    a record while a slow one is still listing, so every rank sees the same list.

Images are opened lazily in each worker process (``open_source``): an open TIFF handle shared
across ``fork`` would interleave seeks between workers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

from datamodules.store import DatasetStore
from lightning_modules.rosie_inference.he_input import check_store_he, open_he_image
from lightning_modules.rosie_inference.resample import resample_he
from lightning_modules.rosie_inference.tile_plan import PlanFiles, load_plan


def open_source(source: dict) -> Any:
    """The H&E image a plan's ``source`` names: ``{'kind': 'file', 'path'}`` or ``{'kind': 'store', 'root',
    'tissue_id'}``, resampled on the fly when ``source['resample']`` gives ``[from_mpp, to_mpp]``."""
    if source.get("kind") == "file":
        image, _ = open_he_image(source["path"])
    elif source.get("kind") == "store":
        image = DatasetStore(source["root"]).image("he", source["tissue_id"])
        check_store_he(image, image.path)
    else:
        raise ValueError(f"a {source.get('kind')!r} H&E source cannot be opened by a worker process")
    if source.get("resample"):
        image = resample_he(image, *source["resample"])
    return image


class RegionDataset(Dataset):
    """``(plan index, region index)`` items, padded with ``None`` up to ``min_length`` (the world size:
    Lightning's predict sampler wants an item for every rank; a rank with a padding item idles)."""

    def __init__(self, plans: Sequence[PlanFiles], items: Sequence[tuple[int, int]], min_length: int = 1):
        self.plans = list(plans)
        self.items: list[tuple[int, int] | None] = list(items) + [None] * max(0, min_length - len(items))
        self._images: dict[int, tuple[int, Any]] = {}

    def __len__(self) -> int:
        return len(self.items)

    def image(self, p: int) -> Any:
        pid, image = self._images.get(p, (None, None))
        if pid != os.getpid():
            image = open_source(self.plans[p].plan.source)
            self._images[p] = (os.getpid(), image)
        return image

    def __getitem__(self, index: int) -> dict | None:
        item = self.items[index]
        if item is None:
            return None
        p, k = item
        files = self.plans[p]
        region, fg, hist = files.read_inputs(self.image(p), k)
        return {"plan": p, "region_index": k, "region": region, "fg": fg, "hist": hist,
                "stride": files.plan.grid_stride}


def first_item(items: list) -> Any:
    return items[0]


class RosieTileDataModule(L.LightningDataModule):
    """Regions of the tissues ``tissue_ids`` in ``out``; ``prepare`` makes their plans (global rank 0)."""

    def __init__(self, out: str, tissue_ids: Sequence[str], prepare: Callable[[], Any] | None = None,
                 num_workers: int = 0):
        super().__init__()
        self.prepare_data_per_node = False
        self.out = str(out)
        self.tissue_ids = list(tissue_ids)
        self.prepare = prepare
        self.num_workers = num_workers
        self.plans: list[PlanFiles] = []
        self.items: list[tuple[int, int]] = []

    def prepare_data(self) -> None:
        if self.prepare is not None:
            self.prepare()

    def setup(self, stage: str | None = None) -> None:
        self.plans, self.items = [], []
        for tid in self.tissue_ids:
            plan = load_plan(self.out, tid)
            if plan is None:
                raise RuntimeError(f"{self.out}: tissue {tid!r} has no prediction plan (preparing it failed on rank 0)")
            files = PlanFiles(plan)
            self.items += [(len(self.plans), k) for k in files.pending()]
            self.plans.append(files)
        if self.trainer is not None:
            self.trainer.strategy.barrier("rosie-tiles-listed")

    def predict_dataloader(self) -> DataLoader:
        world = self.trainer.world_size if self.trainer is not None else 1
        return DataLoader(RegionDataset(self.plans, self.items, world), batch_size=1, shuffle=False,
                          collate_fn=first_item, num_workers=self.num_workers)
