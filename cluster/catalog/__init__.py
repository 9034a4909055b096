"""The catalog: Delta Lake tables on MinIO, written by one actor, read with SQL.

- ``schema``: the tables, their columns and where they live (documented there);
- ``writer``: the one writer (group commit, versions, duplicates, study rows);
- ``queries``: DuckDB over the tables, and the searches the doors make.
"""

from cluster.catalog.queries import connect, find_instances, find_studies
from cluster.catalog.schema import (
    DEFAULT_BUCKET,
    INSTANCES,
    INSTANCES_SCHEMA,
    STUDIES,
    STUDIES_SCHEMA,
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
    "DEFAULT_BUCKET",
    "INSTANCES",
    "INSTANCES_SCHEMA",
    "STUDIES",
    "STUDIES_SCHEMA",
    "CatalogCommitFailedError",
    "CatalogWriter",
    "Committed",
    "IndexEntry",
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
