"""The catalog: Delta Lake tables on MinIO, written by one actor, read with SQL.

- ``schema``: the tables, their columns and where they live (documented there);
- ``writer``: the one writer (group commit, versions, duplicates, folds, placements);
- ``placements``: where objects live now (tier moves, key rotation);
- ``index``: the keyed SQLite index the writer answers lookups and searches from;
- ``queries``: the doors' search filters, and DuckDB over the Delta tables;
- ``maintenance``: compaction, checkpoints, vacuum.

Every table and column is documented in docs/catalog.md.
"""

from cluster.catalog.placements import Placement
from cluster.catalog.queries import (
    InstanceFilters,
    StudyFilters,
    connect,
    find_instances,
    find_studies,
)
from cluster.catalog.schema import (
    ACCESS,
    DEFAULT_BUCKET,
    INSTANCES,
    INSTANCES_SCHEMA,
    LATER_INSTANCE_COLUMNS,
    PLACEMENTS,
    STUDIES,
    STUDIES_SCHEMA,
    TABLES,
    CatalogCommitFailedError,
    Committed,
    IndexEntry,
    StudyRow,
    create_tables,
    derive_study,
    sql_string_literal,
    storage_options,
    table_uri,
    utc,
)
from cluster.catalog.writer import CatalogWriter, plan_group

__all__ = [
    "ACCESS",
    "DEFAULT_BUCKET",
    "INSTANCES",
    "INSTANCES_SCHEMA",
    "LATER_INSTANCE_COLUMNS",
    "PLACEMENTS",
    "STUDIES",
    "STUDIES_SCHEMA",
    "TABLES",
    "CatalogCommitFailedError",
    "CatalogWriter",
    "Committed",
    "IndexEntry",
    "InstanceFilters",
    "Placement",
    "StudyFilters",
    "StudyRow",
    "connect",
    "create_tables",
    "derive_study",
    "find_instances",
    "find_studies",
    "plan_group",
    "sql_string_literal",
    "storage_options",
    "table_uri",
    "utc",
]
