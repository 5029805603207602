"""Tools that are not benchmarks: compiling every kernel for every GPU target without a GPU
(`compile_check`), timing neighbouring attention launch settings on CUDA (`tune_attention`), and
running every GPU check in one call on a lent machine (`gpu_suite.sh`)."""
