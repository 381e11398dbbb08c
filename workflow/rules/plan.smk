# Treatment planning from each family's fitted per-subject model: glioma radiotherapy targets,
# stroke reperfusion timing, Alzheimer's trajectories and a trial. Planning reads the model inputs
# (earlier sessions) and the forecasts only, never the held-out target or the ground truth; the
# glioma targets are scored against the held-out session by `evaluate` (ctv_coverage_*).


rule plan:
    input:
        inputs=f"{SUBJECT_INPUTS}.npz",
        fits=rules.forecast.output,
        config=RESOLVED_CONFIG,
        # glioma: the targets are also written in the subject's T1w space
        subject_space=plan_subject_space,
    output:
        # glioma CTV masks, stroke curves + figure, Alzheimer's forecasts and curves, and the tidy
        # sub-S_desc-plan.tsv: which files depends on the disorder, so the folder is the output
        directory(f"{PLANS}/sub-{{subject}}"),
    log:
        f"{LOGS}/plan/sub-{{subject}}.log",
    benchmark:
        f"{BENCH}/plan/sub-{{subject}}.tsv"
    conda:
        "../../envs/environment.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    params:
        disorder=disorder_of,
        inputs=lambda wildcards: INPUTS,
        forecast_dir=lambda wildcards, input: os.path.dirname(input.fits[0]),
        preproc=lambda wildcards, input: (
            f"--preproc {PREPROC}" if input.subject_space else ""
        ),
    shell:
        "neurohybrid plan {params.disorder} --subject {wildcards.subject} --inputs {params.inputs}"
        " --forecast-dir {params.forecast_dir} {params.preproc} --config {input.config} --out-dir {output} > {log} 2>&1"


rule plan_cohort:
    input:
        plans=lambda wildcards: expand(
            f"{PLANS}/sub-{{subject}}", subject=SUBJECTS_OF[wildcards.disorder]
        ),
        # glioma: the coverage of the targets by the held-out tumour, scored by `evaluate`
        metrics=lambda wildcards: (
            [f"{COHORT}/metrics.tsv"] if wildcards.disorder == "glioma" else []
        ),
    output:
        table=report(
            f"{COHORT}/treatment_{{disorder}}.tsv",
            caption="../report/treatment_table.rst",
            category="Treatment",
            subcategory="Tables",
            labels={"table": "{disorder}"},
        ),
        figure=report(
            f"{COHORT}/figures/treatment_{{disorder}}.png",
            caption="../report/treatment_figure.rst",
            category="Treatment",
            subcategory="Figures",
            labels={"figure": "{disorder}"},
        ),
    log:
        f"{LOGS}/plan_cohort/{{disorder}}.log",
    benchmark:
        f"{BENCH}/plan_cohort/{{disorder}}.tsv"
    conda:
        "../../envs/environment.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        metrics=lambda wildcards, input: (
            f"--metrics {input.metrics}" if input.metrics else ""
        ),
    shell:
        "neurohybrid plan cohort --disorder {wildcards.disorder} {input.plans} {params.metrics}"
        " --out {output.table} --figure {output.figure} > {log} 2>&1"
