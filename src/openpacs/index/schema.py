"""The index schema: patient / study / series / instance rows (SQLAlchemy Core; SQLite, PostgreSQL).

Owns: table and column definitions. Columns exist for every attribute that a query of seed 002
Tables 3.13/3.15/3.17 (QIDO-RS) and 3.71–3.74 (C-FIND) matches on, in a form SQL can compare:
dates 'YYYYMMDD', times normalised to 'HHMMSS' (fractions ignored, seed 002 §3.2.11.4),
study date+time 'YYYYMMDDHHMMSS' for the combined range rule, person names also upper-cased for
case-insensitive matching. Attributes that are only returned (sequences and the like) are kept
per level as the raw encoded elements (``attrs`` + ``attrs_ts``), decoded with pydicom only for
rows actually returned. Counts (number of related series/instances) are maintained on write.
Must not: contain query logic. Types are portable: no SQLite- or PostgreSQL-only column types.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

# An auto-increment primary key that is BIGINT on PostgreSQL and the rowid on SQLite.
PrimaryKey = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()

# 2: on SQLite, a trigger keeps the series' and study's instance counts (SQLITE_TRIGGERS).
SCHEMA_VERSION = 2

schema_info = Table(
    "schema_info",
    metadata,
    Column("version", Integer, nullable=False),
)

patients = Table(
    "patients",
    metadata,
    Column("pk", PrimaryKey, primary_key=True, autoincrement=True),
    Column("patient_id", String(64), nullable=False),  # (0010,0020) as indexed (see archive)
    Column("issuer", String(64), nullable=False, default=""),  # (0010,0021)
    Column("patient_id_generated", Integer, nullable=False, default=0),  # seed 002: empty ID rule
    Column("patient_name", String(400)),  # (0010,0010) decoded, '=' component groups kept
    Column("patient_name_norm", String(400)),  # upper-case, for case-insensitive matching
    Column("birth_date", String(8)),
    Column("sex", String(16)),
    Column("charset", String(128)),
    Column("num_studies", Integer, nullable=False, default=0),
    Column("attrs", LargeBinary),
    Column("attrs_ts", String(64)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("patient_id", "issuer", name="uq_patients_id_issuer"),
)
# text_pattern_ops: on PostgreSQL (non-C collations) a plain btree serves only "=", not the
# prefix LIKE that wild cards become; SQLite ignores the option.
Index(
    "ix_patients_name_norm",
    patients.c.patient_name_norm,
    postgresql_ops={"patient_name_norm": "text_pattern_ops"},
)
Index(
    "ix_patients_patient_id",
    patients.c.patient_id,
    postgresql_ops={"patient_id": "text_pattern_ops"},
)

studies = Table(
    "studies",
    metadata,
    Column("pk", PrimaryKey, primary_key=True, autoincrement=True),
    Column("patient_pk", PrimaryKey, ForeignKey("patients.pk"), nullable=False),
    Column("study_uid", String(64), nullable=False, unique=True),
    Column("study_date", String(8)),
    Column("study_time", String(6)),
    Column("study_datetime", String(14)),  # study_date + study_time, for date1.time1–date2.time2
    Column("accession_number", String(16)),
    Column("study_id", String(16)),
    Column("study_description", String(64)),
    Column("referring_physician", String(400)),
    Column("referring_physician_norm", String(400)),
    Column("institution_name", String(64)),
    Column("modalities", String(256)),  # Modalities in Study: sorted, backslash-joined
    Column("charset", String(128)),
    Column("num_series", Integer, nullable=False, default=0),
    Column("num_instances", Integer, nullable=False, default=0),
    Column("attrs", LargeBinary),
    Column("attrs_ts", String(64)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
Index("ix_studies_patient", studies.c.patient_pk)
Index("ix_studies_date", studies.c.study_date)
Index("ix_studies_datetime", studies.c.study_datetime)
Index(
    "ix_studies_accession",
    studies.c.accession_number,
    postgresql_ops={"accession_number": "text_pattern_ops"},
)
Index("ix_studies_study_id", studies.c.study_id)

series = Table(
    "series",
    metadata,
    Column("pk", PrimaryKey, primary_key=True, autoincrement=True),
    Column("study_pk", PrimaryKey, ForeignKey("studies.pk"), nullable=False),
    Column("series_uid", String(64), nullable=False, unique=True),
    Column("modality", String(16)),
    Column("series_number", Integer),
    Column("series_description", String(64)),
    Column("body_part", String(64)),
    Column("station_name", String(16)),
    Column("institution_name", String(64)),
    Column("pps_start_date", String(8)),
    Column("pps_start_time", String(6)),
    Column("charset", String(128)),
    Column("num_instances", Integer, nullable=False, default=0),
    Column("attrs", LargeBinary),
    Column("attrs_ts", String(64)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
Index("ix_series_study", series.c.study_pk)
Index("ix_series_modality", series.c.modality)

# Request Attributes Sequence items of a series (seed 002 T3.15/T3.73: matchable sub-keys).
series_requests = Table(
    "series_requests",
    metadata,
    Column("pk", PrimaryKey, primary_key=True, autoincrement=True),
    Column("series_pk", PrimaryKey, ForeignKey("series.pk"), nullable=False),
    Column("requested_procedure_id", String(16)),
    Column("scheduled_procedure_step_id", String(16)),
    Column("accession_number", String(16)),
)
Index("ix_series_requests_series", series_requests.c.series_pk)

instances = Table(
    "instances",
    metadata,
    Column("pk", PrimaryKey, primary_key=True, autoincrement=True),
    Column("series_pk", PrimaryKey, ForeignKey("series.pk"), nullable=False),
    # Not unique: duplicate_policy = "keep" stores the same SOP Instance UID twice (seed 002).
    Column("sop_uid", String(64), nullable=False),
    Column("sop_class_uid", String(64), nullable=False),
    Column("instance_number", Integer),
    Column("transfer_syntax", String(64), nullable=False),
    Column("blob_key", String(64), nullable=False, unique=True),
    Column("size", BigInteger, nullable=False),
    Column("dataset_offset", Integer),  # where the data set starts in the blob (after the meta)
    Column("calling_ae", String(16)),
    Column("content_date", String(8)),
    Column("content_time", String(6)),
    Column("number_of_frames", Integer),
    Column("rows", Integer),
    Column("columns", Integer),
    Column("bits_allocated", Integer),
    Column("image_type", Text),
    Column("charset", String(128)),
    Column("attrs", LargeBinary),
    Column("attrs_ts", String(64)),
    Column("received_at", DateTime(timezone=True), nullable=False),
)
Index("ix_instances_series", instances.c.series_pk)
Index("ix_instances_sop_uid", instances.c.sop_uid)

# Durable background work: storage commitment reports, later C-MOVE forwards and MPPS relays.
# A job is retried with backoff until done; a crash leaves it to be claimed again.
jobs = Table(
    "jobs",
    metadata,
    Column("pk", PrimaryKey, primary_key=True, autoincrement=True),
    Column("kind", String(32), nullable=False),
    Column("reference", String(64)),  # e.g. the Transaction UID
    Column("target", String(64)),  # e.g. the AE title to deliver to
    Column("payload", Text, nullable=False),  # JSON
    Column("state", String(16), nullable=False),  # pending | running | done | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("claimed_until", DateTime(timezone=True)),
    Column("last_error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
Index("ix_jobs_due", jobs.c.state, jobs.c.next_attempt_at)
Index("ix_jobs_reference", jobs.c.kind, jobs.c.reference)

# The worklist (RIS side): one row per Scheduled Procedure Step (seed 000 T3.7, seed 001 T3.2).
# Matching keys are columns; the whole item is kept as JSON for the return keys.
worklist_items = Table(
    "worklist_items",
    metadata,
    Column("pk", PrimaryKey, primary_key=True, autoincrement=True),
    Column("accession_number", String(16), nullable=False),
    Column("requested_procedure_id", String(16)),
    Column("sps_id", String(16)),
    Column("study_uid", String(64), nullable=False),
    Column("placer_order_number", String(64)),
    Column("filler_order_number", String(64)),
    Column("patient_id", String(64), nullable=False),
    Column("issuer", String(64), nullable=False, default=""),
    Column("patient_name", String(400)),
    Column("patient_name_norm", String(400)),
    Column("birth_date", String(8)),
    Column("sex", String(16)),
    Column("modality", String(16)),
    Column("station_ae", String(16)),
    Column("station_name", String(16)),
    Column("sps_start_date", String(8)),
    Column("sps_start_time", String(6)),
    Column("sps_datetime", String(14)),
    Column("performing_physician", String(400)),
    Column("performing_physician_norm", String(400)),
    Column("referring_physician", String(400)),
    Column("priority", String(16)),
    Column("status", String(16), nullable=False),  # SCHEDULED … COMPLETED, CANCELLED
    Column("item", Text, nullable=False),  # the WorklistItem as JSON
    Column("source", String(16)),  # hl7 | api | cli
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
Index("ix_worklist_status_date", worklist_items.c.status, worklist_items.c.sps_start_date)
Index("ix_worklist_station", worklist_items.c.station_ae)
Index("ix_worklist_accession", worklist_items.c.accession_number)
Index("ix_worklist_patient", worklist_items.c.patient_id)
Index("ix_worklist_study", worklist_items.c.study_uid)
Index("ix_worklist_placer", worklist_items.c.placer_order_number)
Index("ix_worklist_filler", worklist_items.c.filler_order_number)

# Modality Performed Procedure Steps received (seed 001 T4.2).
mpps = Table(
    "mpps",
    metadata,
    Column("pk", PrimaryKey, primary_key=True, autoincrement=True),
    Column("sop_uid", String(64), nullable=False, unique=True),
    Column("status", String(16), nullable=False),  # IN PROGRESS | COMPLETED | DISCONTINUED
    Column("pps_id", String(16)),
    Column("study_uid", String(64)),
    Column("accession_number", String(16)),
    Column("sps_id", String(16)),
    Column("patient_id", String(64)),
    Column("patient_name", String(400)),
    Column("modality", String(16)),
    Column("station_ae", String(16)),
    Column("start_date", String(8)),
    Column("start_time", String(6)),
    Column("end_date", String(8)),
    Column("end_time", String(6)),
    Column("calling_ae", String(16)),
    Column("scheduled", Integer, nullable=False, default=0),  # a worklist item was found
    Column("dataset", LargeBinary, nullable=False),  # merged attributes, Explicit VR LE
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
Index("ix_mpps_study", mpps.c.study_uid)

# What an MPPS says was made: Performed Series Sequence > Referenced Image / Non-Image items.
mpps_references = Table(
    "mpps_references",
    metadata,
    Column("pk", PrimaryKey, primary_key=True, autoincrement=True),
    Column("mpps_pk", PrimaryKey, ForeignKey("mpps.pk"), nullable=False),
    Column("series_uid", String(64)),
    Column("sop_class_uid", String(64)),
    Column("sop_uid", String(64), nullable=False),
)
Index("ix_mpps_references_mpps", mpps_references.c.mpps_pk)
Index("ix_mpps_references_sop", mpps_references.c.sop_uid)


# SQLite only (PostgreSQL's filing statements update the counts themselves). Filing an instance
# costs two statements fewer from Python: each is a GIL release and re-acquire in the index
# writer, which holds the cross-process write lock meanwhile. updated_at gets the instance's
# received_at, the value the explicit statements bound. Removals update the counts explicitly.
SQLITE_TRIGGERS = (
    """CREATE TRIGGER IF NOT EXISTS tr_instances_count AFTER INSERT ON instances BEGIN
    UPDATE series SET num_instances = num_instances + 1, updated_at = NEW.received_at
        WHERE pk = NEW.series_pk;
    UPDATE studies SET num_instances = num_instances + 1, updated_at = NEW.received_at
        WHERE pk = (SELECT study_pk FROM series WHERE pk = NEW.series_pk);
END""",
)
