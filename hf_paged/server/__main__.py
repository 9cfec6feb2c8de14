"""`python -m hf_paged.server [model] [options]`: the OpenAI-compatible server (same as `hf-paged serve`)."""

import argparse

from hf_paged.server.launch import ServerExtrasMissing, add_serve_args, run_serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hf_paged.server",
                                     description="Serve a model with an OpenAI-compatible API (hf_paged engine).")
    args = add_serve_args(parser).parse_args(argv)
    try:
        run_serve(args)
    except ServerExtrasMissing as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")


if __name__ == "__main__":
    main()
