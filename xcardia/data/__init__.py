"""Cohort manifests: reading, validation and CT preprocessing for synthetic and real cohorts."""
