# neurohybrid: hybrid mechanistic + deep-learning models of glioma, Alzheimer's disease and stroke.
#   snakemake --cores all                       (demo cohort; or set bids_dir in config/config.yaml)
#   snakemake --report results/report.html      (HTML report with the cohort tables and figures)
# Rules are thin: each calls one `neurohybrid ...` command; the logic lives in src/neurohybrid.

from snakemake.utils import min_version, validate

min_version("8.0")


configfile: "config/config.yaml"


# common.smk checks config and participants first, so an error names the key or row in one line
include: "workflow/rules/common.smk"


validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


wildcard_constraints:
    subject=one_of(SUBJECTS),
    disorder=one_of(COHORT_DISORDERS),
    family=one_of(FAMILIES),
    fold=r"\d+",


include: "workflow/rules/resources.smk"
include: "workflow/rules/synth.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/connectome.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/plan.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        rules.provenance.output,
        rules.cohort_table.output,
        rules.cohort_stats.output,
        rules.cohort_figures.output,
        expand(rules.preprocess_anat.output.qc, subject=IMAGE_SUBJECTS),
        expand(rules.preprocess_align.output.qc, subject=IMAGE_SUBJECTS),
        expand(rules.plan_cohort.output, disorder=COHORT_DISORDERS),
        expand(rules.preprocess_connectome.output.tsv, subject=connectome_subjects()),
