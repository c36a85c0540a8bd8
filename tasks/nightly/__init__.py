"""The nightly's own stages: open and close the pipeline run, prepare state and data, skip-unchanged, the
summary and the notifications it sends. They sit above tasks/data (they resolve and fingerprint datasets), so
they are not part of tasks/core, which imports nothing else of the project's."""
