# Structural connectome per subject: dipy tractography when the subject has DWI, else the
# normative connectome of resources/ or config resources.connectome (preprocessing.connectome_method).


rule preprocess_connectome:
    input:
        rules.preprocess_anat.output.dseg,
        rules.preprocess_anat.output.probseg,
        rules.preprocess_align.output.done,
        resources=RESOURCES_MANIFEST,
        raw=raw_files("sub-{subject}/ses-*/dwi/sub-{subject}_ses-*_dwi.*"),
    output:
        tsv=f"{PREPROC}/sub-{{subject}}/dwi/sub-{{subject}}_atlas-DK_connectivity.tsv",
        json=f"{PREPROC}/sub-{{subject}}/dwi/sub-{{subject}}_atlas-DK_connectivity.json",
    log:
        f"{LOGS}/preprocess_connectome/sub-{{subject}}.log",
    benchmark:
        f"{BENCH}/preprocess_connectome/sub-{{subject}}.tsv"
    group:
        "subject"
    conda:
        "../../envs/environment.yaml"
    # only MRtrix's tckgen uses threads; dipy's tracking (auto, dipy) and the normative connectome
    # run on one. Claiming two for them kept this short job waiting, on 2 cores, until nothing else
    # was left to run (it alone then held back the Alzheimer's training: ~3 min of the demo)
    threads: 2 if config["preprocessing"].get("connectome_method", "auto") == "mrtrix" else 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        bids=lambda wildcards: BIDS,
        out=lambda wildcards: PREPROC,
        method=config["preprocessing"].get("connectome_method", "auto"),
        fast=fast_flag(),
    shell:
        "neurohybrid --resources {input.resources} preprocess connectome --bids {params.bids} --subject {wildcards.subject} --out {params.out}"
        " --method {params.method} --threads {threads} {params.fast} > {log} 2>&1"


# Alzheimer's subjects with regional SUVR tables instead of PET images: their tables become the
# regional SUVR, volumes and (normative) connectome the model inputs read; no image step runs.
rule preprocess_regional:
    input:
        resources=RESOURCES_MANIFEST,
        raw=raw_files(
            "sub-{subject}/sub-{subject}_sessions.tsv",
            "derivatives/regional/sub-{subject}/**/*_desc-suvr_pet.tsv",
        ),
        mapping=[REGIONAL_MAPPING] if REGIONAL_MAPPING else [],
    output:
        touch(f"{OUT}/flags/preprocess_regional/sub-{{subject}}.done"),
    log:
        f"{LOGS}/preprocess_regional/sub-{{subject}}.log",
    benchmark:
        f"{BENCH}/preprocess_regional/sub-{{subject}}.tsv"
    group:
        "subject"
    conda:
        "../../envs/environment.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        bids=lambda wildcards: BIDS,
        out=lambda wildcards: PREPROC,
        mapping=f"--mapping {REGIONAL_MAPPING}" if REGIONAL_MAPPING else "",
    shell:
        "neurohybrid --resources {input.resources} preprocess regional --bids {params.bids} --subject {wildcards.subject}"
        " --out {params.out} {params.mapping} > {log} 2>&1"
