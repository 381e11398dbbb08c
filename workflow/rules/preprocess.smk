# Structural preprocessing, lesion masks / perfusion and regional PET: `neurohybrid preprocess ...`.
# Per-subject jobs share the group "subject" so a cluster runs each subject in one allocation.

ANAT = f"{PREPROC}/sub-{{subject}}/anat/sub-{{subject}}"
TEMPLATE = "MNI152NLin2009cSym"


# Rigid within-subject alignment of every session's images to the first session's T1w (any grid,
# orientation, datatype); the later steps read its transforms. Its per-session QC figures (a set
# that varies between subjects) go to one folder, reported image by image.
rule preprocess_align:
    input:
        raw=raw_files(
            "sub-{subject}/ses-*/*/sub-{subject}_ses-*.nii.gz",
            "derivatives/lesions/sub-{subject}/ses-*/anat/sub-{subject}_ses-*_mask.nii.gz",
        ),
    output:
        done=touch(f"{OUT}/flags/preprocess_align/sub-{{subject}}.done"),
        qc=report(
            directory(f"{PREPROC}/sub-{{subject}}/figures/align"),
            patterns=["{name}.png"],
            caption="../report/qc_align.rst",
            category="Quality control",
            labels={"subject": "{subject}", "figure": "{name}"},
        ),
    log:
        f"{LOGS}/preprocess_align/sub-{{subject}}.log",
    benchmark:
        f"{BENCH}/preprocess_align/sub-{{subject}}.tsv"
    group:
        "subject"
    conda:
        "../../envs/environment.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        bids=lambda wildcards: BIDS,
        out=lambda wildcards: PREPROC,
        fast=fast_flag(),
        backend=config["preprocessing"]["backend"],
    shell:
        "neurohybrid preprocess align --bids {params.bids} --subject {wildcards.subject} --out {params.out}"
        " --backend {params.backend} --threads {threads} {params.fast} > {log} 2>&1"


rule preprocess_anat:
    input:
        rules.preprocess_align.output.done,
        resources=RESOURCES_MANIFEST,
        raw=raw_files(
            "sub-{subject}/ses-*/anat/sub-{subject}_ses-*_T1w.nii.gz",
            "derivatives/lesions/sub-{subject}/ses-*/anat/sub-{subject}_ses-*_mask.nii.gz",
        ),
    output:
        t1w=f"{ANAT}_desc-preproc_T1w.nii.gz",
        brain_mask=f"{ANAT}_desc-brain_mask.nii.gz",
        probseg=expand(
            f"{ANAT}_label-{{label}}_probseg.nii.gz",
            label=["GM", "WM", "CSF"],
            allow_missing=True,
        ),
        to_template=multiext(
            f"{ANAT}_from-T1w_to-{TEMPLATE}_mode-image_xfm", ".mat", ".nii.gz"
        ),
        from_template=multiext(
            f"{ANAT}_from-{TEMPLATE}_to-T1w_mode-image_xfm", ".mat", ".nii.gz"
        ),
        dseg=f"{ANAT}_atlas-DK_dseg.nii.gz",
        volumes=f"{ANAT}_atlas-DK_desc-volumes.tsv",
        reference=f"{ANAT}_label-cerebellumGM_mask.nii.gz",
        model_grid=expand(
            f"{ANAT}_space-{TEMPLATE}_res-model_label-{{label}}_probseg.nii.gz",
            label=["GM", "WM", "CSF"],
            allow_missing=True,
        ),
        qc=report(
            f"{PREPROC}/sub-{{subject}}/figures/sub-{{subject}}_desc-qc.png",
            caption="../report/qc.rst",
            category="Quality control",
            labels={
                "subject": "{subject}",
                "figure": "registration, segmentation, parcellation",
            },
        ),
    log:
        f"{LOGS}/preprocess_anat/sub-{{subject}}.log",
    benchmark:
        f"{BENCH}/preprocess_anat/sub-{{subject}}.tsv"
    group:
        "subject"
    conda:
        "../../envs/environment.yaml"
    threads: 1  # one ITK thread per subject: parallel subjects scale better, and results do not depend on core count
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        bids=lambda wildcards: BIDS,
        out=lambda wildcards: PREPROC,
        voxel=model_voxel_mm,
        fast=fast_flag(),
        backend=config["preprocessing"]["backend"],
        masking=(
            ""
            if config["preprocessing"].get("lesion_masking", True)
            else "--no-lesion-masking"
        ),
    shell:
        "neurohybrid --resources {input.resources} preprocess anat --bids {params.bids} --subject {wildcards.subject} --out {params.out}"
        " --model-voxel-mm {params.voxel} --backend {params.backend} --threads {threads} {params.fast} {params.masking} > {log} 2>&1"


# The lesion and PET steps write one file per session (and per lesion type), a set that varies
# between subjects and so cannot be a wildcard pattern: the rules declare a completion flag, and
# the model-input rule, which reads those files, depends on it.
rule preprocess_lesions:
    input:
        rules.preprocess_anat.output.to_template,
        rules.preprocess_align.output.done,
        resources=RESOURCES_MANIFEST,
        raw=raw_files(
            "derivatives/lesions/sub-{subject}/ses-*/anat/sub-{subject}_ses-*_mask.nii.gz",
            "sub-{subject}/ses-*/perf/sub-{subject}_ses-*_cbf.nii.gz",
        ),
    output:
        touch(f"{OUT}/flags/preprocess_lesions/sub-{{subject}}.done"),
    log:
        f"{LOGS}/preprocess_lesions/sub-{{subject}}.log",
    benchmark:
        f"{BENCH}/preprocess_lesions/sub-{{subject}}.tsv"
    group:
        "subject"
    conda:
        "../../envs/environment.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        bids=lambda wildcards: BIDS,
        out=lambda wildcards: PREPROC,
        voxel=model_voxel_mm,
    shell:
        "neurohybrid --resources {input.resources} preprocess lesions --bids {params.bids} --subject {wildcards.subject} --out {params.out}"
        " --model-voxel-mm {params.voxel} > {log} 2>&1"


rule preprocess_pet:
    input:
        rules.preprocess_align.output.done,
        rules.preprocess_anat.output.dseg,
        rules.preprocess_anat.output.reference,
        resources=RESOURCES_MANIFEST,
        raw=raw_files("sub-{subject}/ses-*/pet/sub-{subject}_ses-*_pet.nii.gz"),
    output:
        touch(f"{OUT}/flags/preprocess_pet/sub-{{subject}}.done"),
    log:
        f"{LOGS}/preprocess_pet/sub-{{subject}}.log",
    benchmark:
        f"{BENCH}/preprocess_pet/sub-{{subject}}.tsv"
    group:
        "subject"
    conda:
        "../../envs/environment.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        bids=lambda wildcards: BIDS,
        out=lambda wildcards: PREPROC,
    shell:
        "neurohybrid --resources {input.resources} preprocess pet --bids {params.bids} --subject {wildcards.subject} --out {params.out} > {log} 2>&1"
