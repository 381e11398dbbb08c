# Structural connectome per subject: dipy tractography when the subject has DWI, else the
# normative connectome of resources/ or config resources.connectome (preprocessing.connectome_method).


rule preprocess_connectome:
    input:
        rules.preprocess_anat.output.dseg,
        rules.preprocess_anat.output.probseg,
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
    threads: 2
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
