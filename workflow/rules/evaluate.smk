# Per-subject scores of every family's forecast against the held-out last session, then the
# cohort: one tidy table, the pre-registered statistics (summary with bootstrap intervals, primary
# paired tests with Holm, a sample-size note), and figures for the report.


rule evaluate:
    input:
        fits=rules.forecast.output,
        target=f"{SUBJECT_TARGET}.npz",
        truth=truth_dir(),
        # glioma: the radiotherapy targets, whose coverage of the held-out tumour is scored here
        plan=glioma_plan,
    output:
        f"{METRICS}/sub-{{subject}}/sub-{{subject}}_metrics.tsv",
    log:
        f"{LOGS}/evaluate/sub-{{subject}}.log",
    benchmark:
        f"{BENCH}/evaluate/sub-{{subject}}.tsv"
    conda:
        "../../envs/environment.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        disorder=disorder_of,
        families=",".join(FAMILIES),
        forecast_dir=lambda wildcards, input: os.path.dirname(input.fits[0]),
        targets=lambda wildcards: TARGETS,
        truth=lambda wildcards, input: f"--truth {input.truth}" if input.truth else "",
        plan=lambda wildcards, input: f"--plan-dir {input.plan}" if input.plan else "",
    shell:
        "neurohybrid evaluate --disorder {params.disorder} --subject {wildcards.subject} --model {params.families}"
        " --forecast-dir {params.forecast_dir} --target {params.targets} {params.truth} {params.plan} --out {output} > {log} 2>&1"


rule cohort_table:
    input:
        expand(rules.evaluate.output[0], subject=SUBJECTS),
    output:
        report(
            f"{COHORT}/metrics.tsv",
            caption="../report/cohort_metrics.rst",
            category="Cohort",
            subcategory="Tables",
            labels={"table": "metrics (tidy)"},
        ),
    log:
        f"{LOGS}/cohort_table.log",
    benchmark:
        f"{BENCH}/cohort_table.tsv"
    conda:
        "../../envs/environment.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "neurohybrid cohort table {input} --out {output} > {log} 2>&1"


rule cohort_stats:
    input:
        metrics=rules.cohort_table.output[0],
        # the analysis plan (config analysis:) and the bootstrap seed
        config=RESOLVED_CONFIG,
    output:
        summary=report(
            f"{COHORT}/summary.tsv",
            caption="../report/cohort_summary.rst",
            category="Cohort",
            subcategory="Tables",
            labels={"table": "summary (mean, bootstrap CI, n missing)"},
        ),
        stats=report(
            f"{COHORT}/stats.tsv",
            caption="../report/cohort_stats.rst",
            category="Cohort",
            subcategory="Tables",
            labels={"table": "primary comparisons (paired Wilcoxon, Holm)"},
        ),
        power=report(
            f"{COHORT}/power.tsv",
            caption="../report/cohort_power.rst",
            category="Cohort",
            subcategory="Tables",
            labels={"table": "subjects needed (power)"},
        ),
    log:
        f"{LOGS}/cohort_stats.log",
    benchmark:
        f"{BENCH}/cohort_stats.tsv"
    conda:
        "../../envs/environment.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "neurohybrid cohort stats --metrics {input.metrics} --config {input.config} --summary-out {output.summary}"
        " --stats-out {output.stats} --power-out {output.power} > {log} 2>&1"


rule cohort_figures:
    input:
        metrics=rules.cohort_table.output[0],
        stats=rules.cohort_stats.output.stats,
        truth=truth_dir(),
        models=all_fold_models(),
    output:
        boxplot_glioma=cohort_figure("boxplot_glioma", "boxplot", "glioma metrics"),
        boxplot_alzheimer=cohort_figure(
            "boxplot_alzheimer", "boxplot", "Alzheimer's metrics"
        ),
        boxplot_stroke=cohort_figure("boxplot_stroke", "boxplot", "stroke metrics"),
        overlay_glioma=cohort_figure(
            "overlay_glioma", "overlay", "glioma forecast vs observed"
        ),
        overlay_stroke=cohort_figure(
            "overlay_stroke", "overlay", "stroke forecast vs observed"
        ),
        scatter_alzheimer=cohort_figure(
            "scatter_alzheimer", "scatter_alzheimer", "Alzheimer's regional SUVR"
        ),
        parameter_recovery=cohort_figure(
            "parameter_recovery", "parameter_recovery", "parameter recovery"
        ),
        sol_accuracy_cost=cohort_figure(
            "sol_accuracy_cost", "sol_accuracy_cost", "SOL accuracy vs cost"
        ),
        training_curves=cohort_figure(
            "training_curves", "training_curves", "training curves"
        ),
        primary_comparisons=cohort_figure(
            "primary_comparisons", "primary_comparisons", "primary comparisons"
        ),
    log:
        f"{LOGS}/cohort_figures.log",
    benchmark:
        f"{BENCH}/cohort_figures.tsv"
    conda:
        "../../envs/environment.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        forecasts=lambda wildcards: FORECASTS,
        targets=lambda wildcards: TARGETS,
        truth=lambda wildcards, input: f"--truth {input.truth}" if input.truth else "",
        models=lambda wildcards, input: f"--models {MODELS}" if input.models else "",
        out_dir=lambda wildcards, output: os.path.dirname(output.boxplot_glioma),
    shell:
        "neurohybrid cohort figures --metrics {input.metrics} --stats {input.stats} --forecasts {params.forecasts}"
        " --targets {params.targets} {params.truth} {params.models} --out-dir {params.out_dir} > {log} 2>&1"
