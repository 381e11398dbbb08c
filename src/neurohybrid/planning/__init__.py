"""Treatment planning from each family's fitted per-subject model (``neurohybrid plan``).

Planning reads only what the model stages wrote before the held-out session is scored: the
subject's model inputs (every session but the last) and the family's forecast files and fit json.
It never reads ``results/targets`` or the ground truth; the evaluation step scores the plans
against the held-out session (glioma target coverage, ``evaluation.scoring``).

- ``glioma``: radiotherapy clinical target volumes (standard margin and personalised iso-density);
- ``stroke``: final infarct volume against onset-to-reperfusion time, triage measures;
- ``alzheimer``: regional tau trajectories, time to a meta-region threshold, a production-lowering trial.

Every table row carries its unit and the model family that produced it (``ROW_COLUMNS``).
"""

ROW_COLUMNS = ["subject", "disorder", "model", "measure", "value", "unit"]
