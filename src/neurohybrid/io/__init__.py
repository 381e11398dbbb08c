"""Reading and writing: validated NIfTI/TSV input, atomic output."""

from neurohybrid.io.atomic import atomic_path, write_json, write_tsv
from neurohybrid.io.nifti import load_image, load_volume, check_same_grid, save_volume

__all__ = [
    "atomic_path",
    "write_json",
    "write_tsv",
    "load_image",
    "load_volume",
    "check_same_grid",
    "save_volume",
]
