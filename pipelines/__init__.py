"""Data readers and Ray Data jobs for frcnn-jobs."""
