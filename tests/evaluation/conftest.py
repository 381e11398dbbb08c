from evaluation_builders import glioma_case  # noqa: F401  (fixture)
