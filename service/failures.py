"""What kind of failure ended a run's job: read from Ray's message and the tail of the job's log.

One kind per failure, the first that matches in this order (an OOM reported through a dead node is
an OOM): ``oom``, ``nccl``, ``preempted``, ``node_lost``, else ``user_error`` (the job itself
raised: the spec, the code, the data).
"""

import re

PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("oom", re.compile(r"OutOfMemoryError|out of memory|\bOOM\b|running low on memory|oom-kill|MemoryError",
                       re.IGNORECASE)),
    ("nccl", re.compile(r"NCCL (error|WARN|timeout)|ncclInternalError|ncclSystemError|ncclUnhandledCudaError|"
                        r"ProcessGroupNCCL", re.IGNORECASE)),
    ("preempted", re.compile(r"preempt|node (is )?(being )?drain|spot (instance )?(interruption|reclaim)",
                             re.IGNORECASE)),
    ("node_lost", re.compile(r"NodeDiedError|node (has )?died|raylet (has )?died|node .* (is )?dead|"
                             r"lost (its|the) (node|connection to the GCS)|Ray cluster (stopped answering|"
                             r"did not answer)|ActorUnavailableError|OwnerDiedError", re.IGNORECASE)),
)


def classify(message: str, log_tail: str = "") -> str:
    text = f"{message}\n{log_tail}"
    for kind, pattern in PATTERNS:
        if pattern.search(text):
            return kind
    return "user_error"
