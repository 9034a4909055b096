"""The tier plan's study states as they were read before the due index: one DuckDB query
over the catalog's Delta tables for every study. Kept only as the baseline that
bench/tiering.py (``--full-scan``) times beside the plan of today
(``cluster.tiering.due``), in the same run.

One query joins ``studies`` (as of the last fold) with the latest read of each study
(``access``), its latest placement (``placements``) and its body parts (``instances``):
its time grows with the archive (~3,650 day partitions of ``studies`` and ``access`` in
a ten-year archive, then every row).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa

from cluster.catalog import queries
from cluster.catalog.placements import DELETED
from cluster.catalog.schema import ACCESS, DEFAULT_BUCKET, INSTANCES, PLACEMENTS, STUDIES
from cluster.tiering.engine import StudyState
from workers.records import StoreSettings

_SQL = f"""
WITH last_read AS (
    SELECT study_instance_uid, max(access_time) AS last_access_time
    FROM {ACCESS} GROUP BY 1
), last_placed AS (
    SELECT study_instance_uid, arg_max(tier, placed_time) AS tier, max(placed_time) AS since
    FROM {PLACEMENTS} GROUP BY 1
), parts AS (
    SELECT study_instance_uid,
           list(DISTINCT upper(body_part)) FILTER (WHERE body_part <> '') AS body_parts
    FROM {INSTANCES} GROUP BY 1
)
SELECT s.study_instance_uid, s.patient_pseudonym, coalesce(p.tier, s.tier) AS tier,
       s.study_date, s.first_ingest_time, r.last_access_time,
       coalesce(p.since, s.first_ingest_time) AS tier_since, s.modalities,
       coalesce(b.body_parts, []) AS body_parts, s.instance_count, s.bytes_stored
FROM {STUDIES} s
LEFT JOIN last_read r USING (study_instance_uid)
LEFT JOIN last_placed p USING (study_instance_uid)
LEFT JOIN parts b USING (study_instance_uid)
WHERE coalesce(p.tier, s.tier) <> '{DELETED}'
"""


def study_states(
    settings: StoreSettings,
    bucket: str = DEFAULT_BUCKET,
    studies: Sequence[str] | None = None,
) -> Iterator[StudyState]:
    """Every folded study's state (or only those of ``studies``), in batches (the whole
    archive is never in memory)."""
    connection = queries.connect(settings, bucket, (STUDIES, ACCESS, PLACEMENTS, INSTANCES))
    if studies is None:
        result = connection.execute(_SQL)
    else:
        connection.register("wanted", pa.table({"study_instance_uid": list(studies)}))
        result = connection.execute(
            f"{_SQL} AND s.study_instance_uid IN (SELECT study_instance_uid FROM wanted)"
        )
    while rows := result.fetchmany(10_000):
        for row in rows:
            yield _state(row)


def _state(row: tuple[Any, ...]) -> StudyState:
    (uid, patient, tier, study_date, first, last_read, since, modalities, parts, count, size) = row
    return StudyState(
        study_instance_uid=uid,
        patient_pseudonym=patient,
        tier=tier,
        study_date=study_date,
        first_ingest_time=first,
        last_access_time=last_read,
        tier_since=since,
        modalities=tuple(modalities or ()),
        body_parts=tuple(parts or ()),
        instances=int(count),
        bytes_stored=int(size),
    )
