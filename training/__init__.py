"""Training of the covfast networks (runs from the source tree: ``python -m training ...``; never imported by
covfast)."""
