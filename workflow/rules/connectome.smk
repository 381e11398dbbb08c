# Structural connectome per subject: dipy tractography when the subject has DWI, else the
# normative DK-68 connectome (preprocessing.connectome_method).


rule preprocess_connectome:
    input:
        rules.preprocess_anat.output.dseg,
        rules.preprocess_anat.output.probseg,
        rules.preprocess_align.output.done,
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
        normative=(
            f"--normative-csv {config['preprocessing']['normative_csv']}"
            if config["preprocessing"].get("normative_csv")
            else ""
        ),
        fast=fast_flag(),
    shell:
        "neurohybrid preprocess connectome --bids {params.bids} --subject {wildcards.subject} --out {params.out}"
        " --method {params.method} {params.normative} --threads {threads} {params.fast} > {log} 2>&1"
