# Model inputs per subject, cross-subject training of every family per disorder x fold, and the
# per-subject fit + forecast of the held-out last session by every family.
# One process per disorder x fold and per subject (not per family): the families share the
# subject's data and mechanistic fit, and each job pays the torch/numba start-up once.


rule model_inputs:
    input:
        model_grid_outputs,
        disorder_preprocessing,
        raw=raw_files(
            "sub-{subject}/sub-{subject}_sessions.tsv",
            "sub-{subject}/sub-{subject}_treatment.tsv",
            "participants.tsv",
        ),
        config=RESOLVED_CONFIG,
        resources=RESOURCES_MANIFEST,
    output:
        inputs=multiext(SUBJECT_INPUTS, ".npz", ".json"),
        target=multiext(SUBJECT_TARGET, ".npz", ".json"),
    log:
        f"{LOGS}/model_inputs/sub-{{subject}}.log",
    benchmark:
        f"{BENCH}/model_inputs/sub-{{subject}}.tsv"
    group:
        "subject"
    conda:
        "../../envs/environment.yaml"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=30,
    params:
        disorder=disorder_of,
        bids=lambda wildcards: BIDS,
        preproc=lambda wildcards: PREPROC,
        inputs=lambda wildcards: INPUTS,
        targets=lambda wildcards: TARGETS,
    shell:
        "neurohybrid --resources {input.resources} inputs --disorder {params.disorder} --subject {wildcards.subject} --bids {params.bids}"
        " --preproc {params.preproc} --config {input.config}"
        " --inputs-out {params.inputs} --targets-out {params.targets} > {log} 2>&1"


rule train_model:
    input:
        unpack(training_data),
        config=RESOLVED_CONFIG,
    output:
        # model-<family>.pt for each family the disorder trains (registry.trained_families), which
        # differ by disorder: the folder is the output
        directory(f"{MODELS}/{{disorder}}/fold-{{fold}}"),
    log:
        f"{LOGS}/train_model/{{disorder}}_fold-{{fold}}.log",
    benchmark:
        f"{BENCH}/train_model/{{disorder}}_fold-{{fold}}.tsv"
    conda:
        "../../envs/environment.yaml"
    # the families train with `torch_threads` intra-op threads (config models:, default 1: jobs run
    # side by side); a job reserving more cores than torch uses only leaves them idle
    threads: 1
    resources:
        mem_mb=6000,
        runtime=120,
        gpu=gpu_count(),
    params:
        families=lambda wildcards: ",".join(TRAINED_OF[wildcards.disorder]),
        subjects=lambda wildcards: ",".join(
            training_subjects(wildcards.disorder, wildcards.fold)
        ),
        inputs=lambda wildcards: INPUTS,
        targets=lambda wildcards: TARGETS,
        out_dir=lambda wildcards, output: output[0],
    shell:
        "neurohybrid train --disorder {wildcards.disorder} --family {params.families} --subjects {params.subjects}"
        " --inputs {params.inputs} --targets {params.targets} --config {input.config} --out-dir {params.out_dir} > {log} 2>&1"


rule forecast:
    input:
        inputs=f"{SUBJECT_INPUTS}.npz",
        trained=trained_models,
        config=RESOLVED_CONFIG,
    output:
        expand(
            f"{FORECASTS}/sub-{{{{subject}}}}/sub-{{{{subject}}}}_model-{{family}}_desc-fit.json",
            family=FAMILIES,
        ),
    log:
        f"{LOGS}/forecast/sub-{{subject}}.log",
    benchmark:
        f"{BENCH}/forecast/sub-{{subject}}.tsv"
    conda:
        "../../envs/environment.yaml"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=60,
        gpu=gpu_count(),
    params:
        disorder=disorder_of,
        families=",".join(FAMILIES),
        inputs=lambda wildcards: INPUTS,
        models_dir=models_dir_flag,
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
    shell:
        "neurohybrid forecast --disorder {params.disorder} --family {params.families} --subject {wildcards.subject}"
        " --inputs {params.inputs} {params.models_dir} --config {input.config} --out-dir {params.out_dir} > {log} 2>&1"
