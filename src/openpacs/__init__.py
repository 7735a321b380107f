"""openpacs: an open-source imaging department — archive, worklist/MPPS broker, virtual modality."""

__version__ = "0.1.0"
