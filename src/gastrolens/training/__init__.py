"""Train the study's networks on a hospital's own images and score them as the study did.

``manifest`` (CSV data set, validation, patient-level split), ``datasets`` (streaming
readers: PNG / JPEG / DICOM), ``augment`` (the study's v2 augmentations on image and
mask, after the inference pre-processing), ``recipe`` (the study's recipe and our
documented choices), ``trainer`` + ``checkpoint`` (the loop, AMP, checkpoints, resume),
``packaging`` (a trained network into a model package, keeping the other network),
``metrics`` (pure functions: one-vs-rest counts, Wilson intervals, per-lesion rule, ROC
AUC, IoU), ``evaluate`` + ``report`` (run a package as the daemon does; report.md/json,
plots, the study's Table 2), ``synthetic`` (a learnable synthetic data set).

Heavy modules (torch) are imported by whoever needs them; importing this package is cheap.
"""
