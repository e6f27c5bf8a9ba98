"""Plumbing every stage shares: logging (PHI-safe, text or JSON), the spool's
atomic file writes, DICOM TLS contexts, and the Prometheus counters the stages bump."""
