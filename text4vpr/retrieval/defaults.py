"""Retrieval defaults, one source for the CLI flags, the run config (`eval.*`) and the reports."""

KS = (1, 5, 10)  # top-k accuracies reported
RADII = (5.0, 10.0, 15.0, 30.0)  # metres
GALLERY = 40  # worst queries shown in report.html


def gallery_successes(failures: int) -> int:
    """Random successes shown beside `failures` worst queries: a quarter as many, at least one."""
    return max(1, failures // 4)
