"""File input/output: STAR particle files and output tables, MRC stacks and maps, HDF5, EM checkpoints, atomic
writes."""
from .atomic import BackgroundWriter, atomic_path, check_writable_dir
from .mrc import (check_stacks, map_statistics, read_hdf5, read_images, read_map, stack_info, write_hdf5,
                  write_map, write_stack)
from .star import ParticleStar, particles_table, read_particles, rebase_image_names, write_particles
from .star_tables import write_fsc_star, write_model_star

__all__ = [
    "atomic_path", "check_writable_dir", "BackgroundWriter",
    "ParticleStar", "read_particles", "rebase_image_names", "write_particles", "particles_table",
    "stack_info", "read_images", "check_stacks", "read_map", "write_map", "write_stack", "map_statistics",
    "write_hdf5", "read_hdf5", "write_fsc_star", "write_model_star",
]
