# The run's template, atlas and normative connectome as files: extracted once from the installed
# packages into resources/ (resources.dir), then checked together with any user file of config
# `resources:` into <output_dir>/resources.json, which every rule reading anatomy passes as
# `neurohybrid --resources`.

import shlex


rule extract_resources:
    output:
        files=[f"{RESOURCES_DIR}/{name}" for name in RESOURCE_FILES.values()],
        provenance=f"{RESOURCES_DIR}/resources.json",
    log:
        f"{LOGS}/extract_resources.log",
    benchmark:
        f"{BENCH}/extract_resources.tsv"
    conda:
        "../../envs/environment.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        out=lambda wildcards, output: os.path.dirname(output.provenance),
    shell:
        "neurohybrid resources extract --out {params.out} > {log} 2>&1"


rule resolve_resources:
    input:
        shipped=rules.extract_resources.output.files,
        user=list(USER_RESOURCES.values()),
    output:
        RESOURCES_MANIFEST,
    log:
        f"{LOGS}/resolve_resources.log",
    benchmark:
        f"{BENCH}/resolve_resources.tsv"
    conda:
        "../../envs/environment.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        out=lambda wildcards, input: os.path.dirname(input.shipped[0]),
        user=" ".join(
            f"--{key.replace('_', '-')} {shlex.quote(path)}"
            for key, path in USER_RESOURCES.items()
        ),
    shell:
        "neurohybrid resources resolve --resources-dir {params.out} {params.user} --out {output} > {log} 2>&1"
