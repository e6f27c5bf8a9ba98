"""Stage 2, the pipeline: from a complete study to stored results and reports.

``completion`` marks studies complete after the quiet period, ``scheduler`` sends a
queue message for each study the ledger says is due, ``queue`` is the Celery
application (embedded or Redis), ``workers`` supervises the worker processes
``serve`` starts, ``tasks`` is the worker's thin task around ``analysis`` (pixels,
model, Grad-CAM, similar cases) followed by the reports (:mod:`service.reports`).
"""
