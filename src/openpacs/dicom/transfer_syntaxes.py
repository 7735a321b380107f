"""Transfer syntaxes the archive accepts, in the order it prefers them.

Owns: the acceptor's preference list. The head of the list is seed 002 Table 3.57 in its printed
order (the SCP selects "the topmost transfer syntax in this table" that the requestor proposed),
without the two Sectra private syntaxes (1.2.752.24.3.7.6/7). Standard syntaxes the seed does not
list (JPEG-LS, HTJ2K, JPEG XL, HEVC, Deflated, Encapsulated Uncompressed, the other JPEG processes)
follow, so that no standard data is refused; docs/conformance.md records this extension.
"""

from __future__ import annotations

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"

# seed 002 Table 3.57, in order (private Sectra syntaxes removed).
SEED_002_T3_57: tuple[str, ...] = (
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Image Compression (Lossless Only)
    EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,  # retired
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, Non-Hierarchical, First-Order Prediction
    "1.2.840.10008.1.2.5",  # RLE Lossless
    IMPLICIT_VR_LITTLE_ENDIAN,
    "1.2.840.10008.1.2.4.91",  # JPEG 2000 Image Compression
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.55",  # JPEG Full Progression, Non-Hierarchical (Process 10 & 12), retired
    "1.2.840.10008.1.2.4.100",  # MPEG2 Main Profile @ Main Level
    "1.2.840.10008.1.2.4.101",  # MPEG2 Main Profile @ High Level
    "1.2.840.10008.1.2.4.102",  # MPEG-4 AVC/H.264 High Profile / Level 4.1
    "1.2.840.10008.1.2.4.103",  # MPEG-4 AVC/H.264 BD-compatible High Profile / Level 4.1
    "1.2.840.10008.1.2.4.104",  # MPEG-4 AVC/H.264 High Profile / Level 4.2 For 2D Video
    "1.2.840.10008.1.2.4.105",  # MPEG-4 AVC/H.264 High Profile / Level 4.2 For 3D Video
    "1.2.840.10008.1.2.4.106",  # MPEG-4 AVC/H.264 Stereo High Profile / Level 4.2
    "1.2.840.10008.1.2.4.100.1",  # Fragmentable MPEG2 MP@ML
    "1.2.840.10008.1.2.4.101.1",  # Fragmentable MPEG2 MP@HL
    "1.2.840.10008.1.2.4.102.1",  # Fragmentable MPEG-4 AVC/H.264 HP / Level 4.1
    "1.2.840.10008.1.2.4.103.1",  # Fragmentable MPEG-4 AVC/H.264 BD-compatible HP / Level 4.1
    "1.2.840.10008.1.2.4.104.1",  # Fragmentable MPEG-4 AVC/H.264 HP / Level 4.2 For 2D Video
    "1.2.840.10008.1.2.4.105.1",  # Fragmentable MPEG-4 AVC/H.264 HP / Level 4.2 For 3D Video
    "1.2.840.10008.1.2.4.106.1",  # Fragmentable MPEG-4 AVC/H.264 Stereo HP / Level 4.2
)

# Standard syntaxes beyond the seed (openpacs extension; docs/conformance.md).
BEYOND_SEED: tuple[str, ...] = (
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.201",  # High-Throughput JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.202",  # High-Throughput JPEG 2000 with RPCL Options (Lossless Only)
    "1.2.840.10008.1.2.4.203",  # High-Throughput JPEG 2000
    "1.2.840.10008.1.2.4.110",  # JPEG XL Lossless
    "1.2.840.10008.1.2.4.111",  # JPEG XL JPEG Recompression
    "1.2.840.10008.1.2.4.112",  # JPEG XL
    "1.2.840.10008.1.2.4.107",  # HEVC/H.265 Main Profile / Level 5.1
    "1.2.840.10008.1.2.4.108",  # HEVC/H.265 Main 10 Profile / Level 5.1
    "1.2.840.10008.1.2.1.98",  # Encapsulated Uncompressed Explicit VR Little Endian
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    "1.2.840.10008.1.2.4.52",  # JPEG Extended (Process 3 & 5), retired
    "1.2.840.10008.1.2.4.53",  # JPEG Spectral Selection, Non-Hierarchical (6 & 8), retired
    "1.2.840.10008.1.2.4.54",  # JPEG Spectral Selection, Non-Hierarchical (7 & 9), retired
    "1.2.840.10008.1.2.4.56",  # JPEG Full Progression, Non-Hierarchical (11 & 13), retired
    "1.2.840.10008.1.2.4.58",  # JPEG Lossless, Non-Hierarchical (Process 15), retired
    "1.2.840.10008.1.2.4.59",  # JPEG Extended, Hierarchical (16 & 18), retired
    "1.2.840.10008.1.2.4.60",  # JPEG Extended, Hierarchical (17 & 19), retired
    "1.2.840.10008.1.2.4.61",  # JPEG Spectral Selection, Hierarchical (20 & 22), retired
    "1.2.840.10008.1.2.4.62",  # JPEG Spectral Selection, Hierarchical (21 & 23), retired
    "1.2.840.10008.1.2.4.63",  # JPEG Full Progression, Hierarchical (24 & 26), retired
    "1.2.840.10008.1.2.4.64",  # JPEG Full Progression, Hierarchical (25 & 27), retired
    "1.2.840.10008.1.2.4.65",  # JPEG Lossless, Hierarchical (Process 28), retired
    "1.2.840.10008.1.2.4.66",  # JPEG Lossless, Hierarchical (Process 29), retired
    "1.2.840.10008.1.2.4.92",  # JPEG 2000 Part 2 Multi-component (Lossless Only)
    "1.2.840.10008.1.2.4.93",  # JPEG 2000 Part 2 Multi-component
    "1.2.840.10008.1.2.4.94",  # JPIP Referenced
    "1.2.840.10008.1.2.4.95",  # JPIP Referenced Deflate
)

STORAGE_TRANSFER_SYNTAXES: tuple[str, ...] = SEED_002_T3_57 + BEYOND_SEED

# Verification and the DIMSE-N / query services: seed 002 T3.54 accepts both uncompressed LE.
COMMAND_TRANSFER_SYNTAXES: tuple[str, ...] = (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN)
