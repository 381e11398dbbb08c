# Model inputs per subject, cross-subject training per disorder x fold x family, and the
# per-subject fit + forecast of the held-out last session per subject x family.


rule model_inputs:
    input:
        rules.preprocess_anat.output.model_grid,
        disorder_preprocessing,
        raw=raw_files("sub-{subject}/sub-{subject}_sessions.tsv", "participants.tsv"),
        config=RESOLVED_CONFIG,
    output:
        inputs=multiext(SUBJECT_INPUTS, ".npz", ".json"),
        target=multiext(SUBJECT_TARGET, ".npz", ".json"),
    params:
        disorder=disorder_of,
        bids=lambda wildcards: BIDS,
        preproc=lambda wildcards: PREPROC,
        inputs=lambda wildcards: INPUTS,
        targets=lambda wildcards: TARGETS,
    log:
        f"{LOGS}/model_inputs/sub-{{subject}}.log",
    benchmark:
        f"{BENCH}/model_inputs/sub-{{subject}}.tsv"
    group:
        "subject"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=30,
    conda:
        "../../envs/environment.yaml"
    shell:
        "neurohybrid inputs --disorder {params.disorder} --subject {wildcards.subject} --bids {params.bids}"
        " --preproc {params.preproc} --config {input.config}"
        " --inputs-out {params.inputs} --targets-out {params.targets} > {log} 2>&1"


rule train_model:
    input:
        unpack(training_data),
        config=RESOLVED_CONFIG,
    output:
        f"{MODELS}/{{disorder}}/fold-{{fold}}/model-{{family}}.pt",
    wildcard_constraints:
        family=one_of([f for f in FAMILIES if is_trained(f)]),
    params:
        subjects=lambda wildcards: ",".join(training_subjects(wildcards.disorder, wildcards.fold)),
        inputs=lambda wildcards: INPUTS,
        targets=lambda wildcards: TARGETS,
    log:
        f"{LOGS}/train_model/{{disorder}}_fold-{{fold}}_model-{{family}}.log",
    benchmark:
        f"{BENCH}/train_model/{{disorder}}_fold-{{fold}}_model-{{family}}.tsv"
    threads: 2
    resources:
        mem_mb=6000,
        runtime=60,
        gpu=gpu_count(),
    conda:
        "../../envs/environment.yaml"
    shell:
        "neurohybrid train --disorder {wildcards.disorder} --family {wildcards.family} --subjects {params.subjects}"
        " --inputs {params.inputs} --targets {params.targets} --config {input.config} --out {output} > {log} 2>&1"


rule forecast:
    input:
        inputs=f"{SUBJECT_INPUTS}.npz",
        trained=trained_model,
        config=RESOLVED_CONFIG,
    output:
        f"{FORECASTS}/sub-{{subject}}/sub-{{subject}}_model-{{family}}_desc-fit.json",
    params:
        disorder=disorder_of,
        inputs=lambda wildcards: INPUTS,
        trained=lambda wildcards, input: f"--trained {input.trained}" if input.trained else "",
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
    log:
        f"{LOGS}/forecast/sub-{{subject}}_model-{{family}}.log",
    benchmark:
        f"{BENCH}/forecast/sub-{{subject}}_model-{{family}}.tsv"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=30,
        gpu=gpu_count(),
    conda:
        "../../envs/environment.yaml"
    shell:
        "neurohybrid forecast --disorder {params.disorder} --family {wildcards.family} --subject {wildcards.subject}"
        " --inputs {params.inputs} {params.trained} --config {input.config} --out-dir {params.out_dir} > {log} 2>&1"
