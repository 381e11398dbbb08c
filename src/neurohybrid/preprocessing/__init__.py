"""Preprocessing of raw BIDS subjects: N4, brain extraction, registration to MNI152NLin2009cSym,
tissue segmentation, DK parcellation, regional PET, lesion/CBF resampling, connectomes, QC.

Entry points (one subject each; the CLI in ``cli.py`` documents inputs and outputs):
``pipeline.run_anat``, ``pipeline.run_lesions``, ``pipeline.run_pet``, ``pipeline.run_connectome``.
Backends: ``ants_backend`` (antspyx, default), ``fsl_backend`` (FSL through fslpy's fsl.wrappers), MRtrix3 and dipy in
``connectome``.
"""
