# Provenance beside the derivatives: the resolved config the model commands read, and a
# BIDS-Derivatives dataset_description.json naming what generated them.


rule provenance:
    output:
        config=RESOLVED_CONFIG,
        description=f"{OUT}/dataset_description.json",
    log:
        f"{LOGS}/provenance.log",
    benchmark:
        f"{BENCH}/provenance.tsv"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        # a changed config re-runs this rule and, through results/config.yaml, everything that reads it
        resolved=provenance_config(),
    run:
        write_provenance(params.resolved, output.config, output.description)


localrules:
    provenance,
