"""`python -m benchmarks <benchmark> [options]`; see benchmarks/__init__.py."""
import sys

from benchmarks import conv, linear, model

BENCHMARKS = {"linear": linear.main, "conv": conv.main, "model": model.main}


def _lazy(module):
    """GPU subcommands import their module (and triton) only when chosen."""
    def run(argv):
        import importlib
        return importlib.import_module(f"benchmarks.{module}").main(argv)
    return run


# Where the forward's time goes (issue 8's reasons for its misses).
BENCHMARKS["csr-profile"] = _lazy("csr_profile")
BENCHMARKS["cache-profile"] = _lazy("cache_profile")
# GPU path (sparsekern/triton): model and compile report need no GPU; gpu-bench needs CUDA.
BENCHMARKS.update({"roofline": _lazy("roofline"), "triton-compile": _lazy("triton_compile"),
                   "gpu-bench": _lazy("gpu_bench")})


def main(argv: list[str]) -> int:
    usage = (f"usage: python -m benchmarks {{{','.join(BENCHMARKS)}}} [options]\n"
             f"       python -m benchmarks <benchmark> --help")
    if argv[:1] in (["-h"], ["--help"]):
        import benchmarks
        print(f"{usage}\n\n{benchmarks.__doc__}")
        return 0
    if not argv or argv[0] not in BENCHMARKS:
        unknown = f"python -m benchmarks: unknown benchmark {argv[0]!r}\n" if argv else ""
        print(f"{unknown}{usage}", file=sys.stderr)
        return 2
    return BENCHMARKS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
