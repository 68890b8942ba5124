"""Dead letters: tasks that failed for good, kept until replayed or purged."""

from swarm_workers.deadletters.store import (
    NOT_DEAD,
    AttemptRecord,
    DeadLetter,
    DeadLetterStore,
    is_dead,
)

__all__ = ["NOT_DEAD", "AttemptRecord", "DeadLetter", "DeadLetterStore", "is_dead"]
