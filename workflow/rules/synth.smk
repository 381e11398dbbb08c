# The embedded demo cohort: virtual patients on real anatomy, generated only when bids_dir is "".
# Its subjects are the participants table's rows (glioma01.., ad01.., stroke01..), so the whole
# DAG is known before the cohort exists. Ground truth goes to its own folder, read only by evaluation.

if DEMO:

    rule synth_cohort:
        input:
            participants=config["participants"],
        output:
            description=f"{BIDS}/dataset_description.json",
            participants=f"{BIDS}/participants.tsv",
            sessions=[sessions_table(s) for s in SUBJECTS],
            truth=directory(TRUTH),
        log:
            f"{LOGS}/synth_cohort.log",
        benchmark:
            f"{BENCH}/synth_cohort.tsv"
        conda:
            "../../envs/environment.yaml"
        threads: 2
        resources:
            mem_mb=4000,
            runtime=30,
        params:
            bids=lambda wildcards, output: os.path.dirname(output.description),
            counts=" ".join(f"--{d} {len(SUBJECTS_OF[d])}" for d in DISORDERS),
            voxel=config["synth"].get("voxel_mm", 2.0),
            dwi=min(
                config["synth"].get("dwi_subjects", 0), len(SUBJECTS_OF["alzheimer"])
            ),
            treated=config["synth"].get("glioma_treated_every", 2),
            seed=config["seed"],
            sloppy="--sloppy" if SLOPPY else "",
        shell:
            "neurohybrid synth --out {params.bids} --truth-out {output.truth} {params.counts}"
            " --voxel-mm {params.voxel} --dwi-subjects {params.dwi} --glioma-treated-every {params.treated}"
            " --seed {params.seed} --jobs {threads} {params.sloppy} > {log} 2>&1"
