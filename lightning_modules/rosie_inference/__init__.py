"""ROSIE whole-image inference: a sliding window over an H&E image -> a predicted multiplex image.

The paper (Methods, "Sample generation") runs the patch regressor on the foreground H&E patches
and stitches the outputs: with stride ``s`` every ``s``×``s`` block of the H&E image gets one
prediction, made from the 128×128 patch centred on that block (``s = 8`` gives the standard
8× downsampled image, ``s = 1`` one prediction per pixel). This package is that loop, written so a
whole slide never has to be in memory and so that the GPU, not the patch bookkeeping, sets the
speed. The command line is :mod:`experiments.rosie_predict`.

Reading, predicting and writing are separate modules, each explaining its own policy:

* :mod:`.he_input` — H&E files and arrays behind one lazy ``read`` interface, refused with a fix
  when ROSIE cannot use them; :mod:`.dataset_inputs` — what a dataset folder (masks, tissues
  row, channel table, DAPI plane) and the training set (H&E histograms) lend to a prediction.
* :mod:`.predictor` — the network behind one call (checkpoint loading, input convention).
* :mod:`.geometry` — the stride grid, the patch of each block, the foreground policy.
* :mod:`.tiles` — the sliding window itself, tile by tile (padding and streaming policies).
* :mod:`.blend` — the optional Gaussian blend to native resolution.
* :mod:`.accumulators` — consumers of tiles: QC sample, H&E histogram, per-cell sums.
* :mod:`.in_memory` — :func:`predict_image`, the whole result as arrays (small images).
* :mod:`.official_stitching` — the authors' stitching (``--stitching official``).
* :mod:`.resample` — an H&E at another µm/px seen at the model's, region by region.
* :mod:`.tile_plan` — one tissue cut into chunk-aligned regions with a record each (ranks write
  disjoint chunks; a killed run resumes); :mod:`.tissue_finish` — the tissue assembled from them.
* :mod:`.tile_module` — the LightningModule (``predict_step`` = one region); the tile DataModule is
  :mod:`datamodules.rosie_tiles`, the prediction writer :mod:`callbacks.rosie_prediction_writer`.
* :mod:`.options`, :mod:`.outputs`, :mod:`.records`, :mod:`.dataset_prediction` — streaming into a
  dataset folder: run settings, output files, per-tissue completion records and their merge, and
  :func:`predict_to_dataset`, which ties them together in one process.

``from lightning_modules import rosie_inference as ri`` gives every public name below.
"""

from __future__ import annotations

from datamodules.markers import ROSIE_PANEL  # the default marker names of a checkpoint that names none
from lightning_modules.rosie_inference.accumulators import CellAccumulator, QCSample, he_histogram_counts
from lightning_modules.rosie_inference.blend import blend_region
from lightning_modules.rosie_inference.dataset_inputs import (ChannelPlane, load_reference_hists, store_channel_table,
                                                              store_dapi_plane, store_has_cell_mask, store_tissue_inputs)
from lightning_modules.rosie_inference.dataset_prediction import (check_prediction_target, plan_tissue, predict_to_dataset,
                                                                  predictor_meta, run_regions)
from lightning_modules.rosie_inference.geometry import (MAX_STRIDE, PATCH_SIZE, check_stride, foreground_grid,
                                                        he_thumbnail, output_shape, patch_origin)
from lightning_modules.rosie_inference.he_input import (ArrayHE, HEInputError, as_he_image, check_he, check_store_he,
                                                        open_he_image)
from lightning_modules.rosie_inference.in_memory import Prediction, predict_image
from lightning_modules.rosie_inference.options import PredictOptions
from lightning_modules.rosie_inference.outputs import (CHUNK, MIN_TOP_SIDE, PREDICTED_MODALITY, add_ngff_pyramid,
                                                       create_zarr_image, fsspec_root, local_output, open_zarr_image,
                                                       write_ome_tiff)
from lightning_modules.rosie_inference.official_stitching import official_grid_stride, official_region
from lightning_modules.rosie_inference.predictor import OFFICIAL_MPP, PatchPredictor, file_sha256, resolve_device
from lightning_modules.rosie_inference.records import (RECORDS_DIR, is_complete, merge_records, read_record,
                                                       record_path, write_record)
from lightning_modules.rosie_inference.resample import ResampledHE, resample_he, same_mpp
from lightning_modules.rosie_inference.tile_module import RosieTilePredictor, tile_function
from lightning_modules.rosie_inference.tile_plan import WORK_DIR, PlanFiles, TissuePlan, load_plan, region_layout
from lightning_modules.rosie_inference.tiles import (DEFAULT_TILE, WHITE, RunStats, TileResult, iter_predictions,
                                                     predict_tile, read_tile, tile_grid)

__all__ = [
    # H&E input
    "ArrayHE", "HEInputError", "as_he_image", "check_he", "check_store_he", "open_he_image",
    "load_reference_hists", "store_channel_table", "store_tissue_inputs",
    "ChannelPlane", "store_dapi_plane", "store_has_cell_mask",
    # model
    "PatchPredictor", "ROSIE_PANEL", "resolve_device", "OFFICIAL_MPP", "file_sha256",
    "ResampledHE", "resample_he", "same_mpp",
    # geometry, foreground
    "MAX_STRIDE", "PATCH_SIZE", "check_stride", "foreground_grid", "he_thumbnail", "output_shape", "patch_origin",
    # tiled prediction, blend, tile consumers
    "DEFAULT_TILE", "WHITE", "RunStats", "TileResult", "iter_predictions", "predict_tile", "read_tile", "tile_grid",
    "blend_region", "official_grid_stride", "official_region",
    # the tile engine: plans of chunk-aligned regions, their records, the Lightning module
    "WORK_DIR", "PlanFiles", "TissuePlan", "load_plan", "region_layout", "plan_tissue", "predictor_meta", "run_regions",
    "RosieTilePredictor", "tile_function",
    "CellAccumulator", "QCSample", "he_histogram_counts", "Prediction", "predict_image",
    # outputs
    "CHUNK", "PREDICTED_MODALITY", "PredictOptions", "RECORDS_DIR", "check_prediction_target", "create_zarr_image",
    "fsspec_root", "is_complete", "local_output", "merge_records", "open_zarr_image", "predict_to_dataset",
    "read_record", "record_path", "write_ome_tiff", "write_record", "MIN_TOP_SIDE", "add_ngff_pyramid",
]
