"""xcardia: reproducible companion to *X-Cardia: Phenotype-Guided Cross-Modal Alignment for Opportunistic Cardiac
Screening on Routine Chest CT* (Nizam et al., MIDL 2026)."""

__version__ = "0.1.0"
