"""jobs: the frcnn-jobs CLI and its glue to Ray Train and MLflow."""
