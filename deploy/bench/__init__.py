"""`moecluster bench <what>`: benchmarks that print a table beside a baseline measured in the same run."""
