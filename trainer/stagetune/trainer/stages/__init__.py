"""Stage runners: one function per stage, ``run(assignment, reporter) -> TrialResult``."""
