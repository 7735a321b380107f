"""DICOMweb (PS3.18) under ``/dicom-web`` on the HTTP listener: QIDO-RS (``qido``), WADO-RS
(``wado``), STOW-RS (``stow``); what they share is in ``common``."""
