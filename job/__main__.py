"""`python -m job ...` is `tunejob ...`."""

from job.cli import entry

entry()
