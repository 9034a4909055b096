"""The archive core every door calls (``service``), and where its work is scheduled
(``dispatch``: batches onto Ray tasks, group commits) and admitted (``admission``: limits,
the byte budget that is backpressure)."""

from cluster.archive.admission import ByteBudget
from cluster.archive.dispatch import Dispatcher, FileResult
from cluster.archive.service import Archive, ArchiveError, Deadlines, Incoming, Retrieval

__all__ = [
    "Archive",
    "ArchiveError",
    "ByteBudget",
    "Deadlines",
    "Dispatcher",
    "FileResult",
    "Incoming",
    "Retrieval",
]
