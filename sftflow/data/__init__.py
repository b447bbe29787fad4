"""Data: the canonical record, refs to files, source formats, near-duplicate detection."""
