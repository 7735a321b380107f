"""The virtual modality (`openpacs modality`): a DX/CR modality's DICOM behaviour (seed 004)."""
