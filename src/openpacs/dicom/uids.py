"""UIDs that identify openpacs, and UID generation.

Owns: the Implementation Class UID / Version Name put in A-ASSOCIATE and File Meta Information
(PS3.7 D.3.3.2, PS3.10 7.1), and new UIDs for objects openpacs creates (PS3.5 B.2: "2.25." and the
decimal form of a random UUID — needs no registered root and cannot collide in practice).
"""

from __future__ import annotations

import uuid

IMPLEMENTATION_CLASS_UID = "2.25.331373958394457291347211950296212640341"
IMPLEMENTATION_VERSION_NAME = "OPENPACS_010"  # ≤ 16 characters (SH)


def generate_uid() -> str:
    return f"2.25.{uuid.uuid4().int}"
