"""Datasets and client partitioners for histopathology segmentation.

- `SyntheticHistology`: embedded procedural H&E (or IHC, ``stain="ihc"``) dataset with exact 4-class
  masks (no download); `STAINS` lists the stains.
- `MultiStainHistology`: pixel-aligned multi-stain (H&E + IHC) view of it with one shared mask.
- `SegmentationFolder` / `write_segmentation_folder`: the DHUnet / WSSS4LUAD folder layout.
- `PatchClassification` / `ImageFolderPatches`: one tissue label per patch (patch classification).
- `tile_wsi`: sliding-window tiles of a whole-slide image (tiffslide), background skipped.
- `iid`, `dirichlet`, `by_site`, `partition`, `train_val_split`: federated splits.

Class convention (WSSS4LUAD): 0 background, 1 normal tissue, 2 tumour-associated stroma,
3 tumour epithelium.
"""

from privfl.data.errors import DataError
from privfl.data.folder import SegmentationFolder, write_segmentation_folder
from privfl.data.multistain import MultiStainHistology
from privfl.data.partition import SCHEMES, by_site, dirichlet, iid, partition, train_val_split
from privfl.data.patches import ImageFolderPatches, PatchClassification
from privfl.data.synthetic import STAINS, SyntheticHistology, site_stain
from privfl.data.wsi import Tile, tile_wsi, tissue_fraction

__all__ = [
    "DataError",
    "ImageFolderPatches",
    "MultiStainHistology",
    "PatchClassification",
    "SCHEMES",
    "STAINS",
    "SegmentationFolder",
    "SyntheticHistology",
    "Tile",
    "by_site",
    "dirichlet",
    "iid",
    "partition",
    "site_stain",
    "tile_wsi",
    "tissue_fraction",
    "train_val_split",
    "write_segmentation_folder",
]
