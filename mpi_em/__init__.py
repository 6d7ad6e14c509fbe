"""mpi_em: MPI-distributed, multi-GPU cryo-EM reconstruction by expectation-maximisation."""

__version__ = "0.1.0"
