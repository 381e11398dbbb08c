# The embedded demo cohort: virtual patients on real anatomy, generated only when bids_dir is "".
# Its subjects come from the participants table and its session count from config, so the whole
# DAG is known before the cohort exists.

if DEMO:

    rule synth_cohort:
        input:
            config=RESOLVED_CONFIG,
            participants=config["participants"],
        output:
            description=f"{BIDS}/dataset_description.json",
            participants=f"{BIDS}/participants.tsv",
            sessions=[sessions_table(s) for s in SUBJECTS],
            truth=directory(TRUTH),
        params:
            bids=lambda wildcards, output: os.path.dirname(output.description),
            seed=config["seed"],
        log:
            f"{LOGS}/synth_cohort.log",
        benchmark:
            f"{BENCH}/synth_cohort.tsv"
        threads: resource("synth", "threads", 2)
        resources:
            mem_mb=resource("synth", "mem_mb", 4000),
            runtime=resource("synth", "runtime", 30),
        conda:
            "../../envs/neurohybrid.yaml"
        shell:
            "neurohybrid synth --out {params.bids} --truth {output.truth} --participants {input.participants}"
            " --config {input.config} --seed {params.seed} --threads {threads} > {log} 2>&1"
